//! A real InfluxDB 1.x (`influxd` from Debian's `influxdb` package) on loopback ports, with its
//! own data directory; it can be stopped and started again on the same port and data.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

pub struct Influx1 {
    dir: TempDir,
    port: u16,
    child: Option<Child>,
    /// Admin credentials the test's own queries use when auth is enabled.
    admin: Option<(String, String)>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Influx1 {
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// With `[http] auth-enabled = true`; the test's queries use an admin created at start
    /// (InfluxDB lets anyone create the first admin).
    pub async fn start_with_auth() -> Self {
        let mut influx = tokio::task::spawn_blocking(|| Self::start_with(true))
            .await
            .unwrap();
        influx
            .query(
                "",
                "CREATE USER admin WITH PASSWORD 'admin-pw' WITH ALL PRIVILEGES",
            )
            .await;
        influx.admin = Some(("admin".into(), "admin-pw".into()));
        influx
    }

    fn start_with(auth: bool) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("influx1-")
            .tempdir()
            .unwrap();
        let (port, rpc) = (free_port(), free_port());
        let d = dir.path().display();
        std::fs::write(
            dir.path().join("influxdb.conf"),
            format!(
                "reporting-disabled = true\nbind-address = \"127.0.0.1:{rpc}\"\n\
                 [meta]\n  dir = \"{d}/meta\"\n\
                 [data]\n  dir = \"{d}/data\"\n  wal-dir = \"{d}/wal\"\n  query-log-enabled = false\n\
                 [http]\n  bind-address = \"127.0.0.1:{port}\"\n  log-enabled = false\n  auth-enabled = {auth}\n\
                 [monitor]\n  store-enabled = false\n\
                 [continuous_queries]\n  enabled = false\n\
                 [logging]\n  level = \"warn\"\n"
            ),
        )
        .unwrap();
        let mut influx = Self {
            dir,
            port,
            child: None,
            admin: None,
        };
        influx.start_again();
        influx
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts the stopped server on the same port and data.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::File::create(self.dir.path().join("influxd.log")).unwrap();
        let child = Command::new("influxd")
            .arg("-config")
            .arg(self.dir.path().join("influxdb.conf"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("influxd not found; run tests/install-deps.sh");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "influxd did not open port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: an outage, not a shutdown.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub async fn query(&self, db: &str, q: &str) -> Value {
        let mut request = reqwest::Client::new()
            .post(format!("{}/query", self.url()))
            .query(&[("db", db), ("q", q), ("epoch", "ms")]);
        if let Some((user, password)) = &self.admin {
            request = request.basic_auth(user, Some(password));
        }
        let resp = request.send().await.expect("influx query");
        let status = resp.status();
        let body: Value = resp.json().await.unwrap();
        assert!(status.is_success(), "{q}: {body}");
        body
    }

    /// Points `settings` at this server's `db` through the v1 API, with small batches.
    pub fn configure(&self, settings: &mut candlestream::config::Settings, db: &str) {
        settings.influx.api = candlestream::config::InfluxApi::V1;
        settings.influx.url = self.url();
        settings.influx.database = db.to_string();
        settings.influx.batch_size = 50;
    }

    pub async fn create_database(&self, db: &str) {
        self.query(db, &format!("CREATE DATABASE \"{db}\"")).await;
    }

    /// Rows of the first series of a query result: column name → value, per row.
    pub async fn rows(&self, db: &str, q: &str) -> Vec<serde_json::Map<String, Value>> {
        let body = self.query(db, q).await;
        let mut out = Vec::new();
        for series in body["results"][0]["series"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let columns: Vec<String> = series["columns"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c.as_str().unwrap().to_string())
                .collect();
            for row in series["values"].as_array().unwrap() {
                out.push(
                    columns
                        .iter()
                        .cloned()
                        .zip(row.as_array().unwrap().iter().cloned())
                        .collect(),
                );
            }
        }
        out
    }

    /// Ticker points in `measurement`.
    pub async fn count(&self, db: &str, measurement: &str) -> usize {
        self.count_of(
            db,
            &format!("SELECT count(last_price) FROM \"{measurement}\""),
        )
        .await
    }

    /// Trade points in the default trades measurement.
    pub async fn count_trades(&self, db: &str) -> usize {
        self.count_of(db, "SELECT count(price) FROM trades").await
    }

    async fn count_of(&self, db: &str, q: &str) -> usize {
        let rows = self.rows(db, q).await;
        rows.first().and_then(|r| r["count"].as_u64()).unwrap_or(0) as usize
    }
}

impl Drop for Influx1 {
    fn drop(&mut self) {
        self.stop();
    }
}
