//! A real Kafka cluster for tests: ZooKeeper plus brokers from Apache Kafka 0.9.0.1 on
//! loopback ports, each test with its own data directory.
//!
//! The distribution is found at `$CANDLESTREAM_KAFKA_HOME`, else `.test-deps/kafka` in the
//! repository (`tests/install-deps.sh` puts it there).
//!
//! [`KafkaCluster::start_with_tls`] adds an SSL listener beside the PLAINTEXT one, with a broker
//! certificate that [`TestCa`] signed: the shape of a managed cluster's TLS. Topic tooling and
//! the test's own readers keep using PLAINTEXT; the clients under test use the SSL ports.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub struct KafkaCluster {
    home: PathBuf,
    dir: TempDir,
    zk: Child,
    zk_port: u16,
    ports: Vec<u16>,
    tls: Option<Tls>,
    brokers: Vec<Option<Child>>,
}

/// The SSL listener: one port per broker, and the keystore every broker serves from.
struct Tls {
    ports: Vec<u16>,
    keystore: BrokerKeystore,
}

/// Settings every client of a 0.9 broker needs. They live here, not in production code: the
/// clusters candlestream targets answer ApiVersion requests and support idempotence.
pub fn client_overrides() -> BTreeMap<String, String> {
    [
        ("api.version.request", "false"),
        ("broker.version.fallback", "0.9.0.1"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Producer settings for 0.9: no idempotence, and a codec 0.9 brokers read.
pub fn producer_overrides() -> BTreeMap<String, String> {
    let mut m = client_overrides();
    m.insert("enable.idempotence".into(), "false".into());
    m.insert("compression.type".into(), "gzip".into());
    m
}

fn kafka_home() -> PathBuf {
    let home = std::env::var_os("CANDLESTREAM_KAFKA_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".test-deps/kafka"));
    assert!(
        home.join("bin/kafka-server-start.sh").exists(),
        "Kafka 0.9.0.1 not found at {}; run tests/install-deps.sh (or set CANDLESTREAM_KAFKA_HOME)",
        home.display()
    );
    home
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl KafkaCluster {
    /// Starts ZooKeeper and `brokers` brokers and waits until all have registered.
    pub fn start(brokers: usize) -> Self {
        Self::start_inner(brokers, None)
    }

    /// Like [`KafkaCluster::start`], each broker also listening for SSL on 127.0.0.1 with the
    /// certificate in `keystore` (see [`KafkaCluster::ssl_bootstrap`]).
    pub fn start_with_tls(brokers: usize, keystore: BrokerKeystore) -> Self {
        let ports = (0..brokers).map(|_| free_port()).collect();
        Self::start_inner(brokers, Some(Tls { ports, keystore }))
    }

    fn start_inner(brokers: usize, tls: Option<Tls>) -> Self {
        let home = kafka_home();
        let dir = tempfile::Builder::new()
            .prefix("kafka09-")
            .tempdir()
            .unwrap();
        let zk_port = free_port();
        let zk_conf = dir.path().join("zookeeper.properties");
        std::fs::write(
            &zk_conf,
            format!(
                "dataDir={}\nclientPort={zk_port}\nclientPortAddress=127.0.0.1\nmaxClientCnxns=0\n",
                dir.path().join("zk").display()
            ),
        )
        .unwrap();
        let zk = spawn(
            &home,
            dir.path(),
            "zookeeper",
            "zookeeper-server-start.sh",
            &zk_conf,
        );
        let ports: Vec<u16> = (0..brokers).map(|_| free_port()).collect();
        let mut cluster = Self {
            home,
            dir,
            zk,
            zk_port,
            ports,
            tls,
            brokers: Vec::new(),
        };
        cluster.wait_for_port(zk_port, Duration::from_secs(30));
        for i in 0..brokers {
            let child = cluster.spawn_broker(i);
            cluster.brokers.push(Some(child));
        }
        for i in 0..brokers {
            cluster.wait_for_broker(i);
        }
        cluster
    }

    pub fn bootstrap(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The SSL listeners' addresses; panics unless started with [`KafkaCluster::start_with_tls`].
    pub fn ssl_bootstrap(&self) -> String {
        let tls = self.tls.as_ref().expect("cluster started without TLS");
        tls.ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn zookeeper(&self) -> String {
        format!("127.0.0.1:{}", self.zk_port)
    }

    fn spawn_broker(&self, i: usize) -> Child {
        let conf = self.dir.path().join(format!("broker-{i}.properties"));
        // Kafka 0.9's SSL settings (broker configs `listeners`, `ssl.*`); brokers replicate over
        // PLAINTEXT, the default of `security.inter.broker.protocol`. TLS 1.2, said outright:
        // 0.9's default list is TLSv1.2,TLSv1.1,TLSv1, and Java 17 refuses the older two.
        let (listeners, ssl) = match &self.tls {
            None => (
                format!("PLAINTEXT://127.0.0.1:{}", self.ports[i]),
                String::new(),
            ),
            Some(tls) => (
                format!(
                    "PLAINTEXT://127.0.0.1:{},SSL://127.0.0.1:{}",
                    self.ports[i], tls.ports[i]
                ),
                format!(
                    "ssl.keystore.type=PKCS12\nssl.keystore.location={}\n\
                     ssl.keystore.password={pw}\nssl.key.password={pw}\n\
                     ssl.enabled.protocols=TLSv1.2\nssl.protocol=TLSv1.2\n",
                    tls.keystore.path.display(),
                    pw = tls.keystore.password,
                ),
            ),
        };
        std::fs::write(
            &conf,
            format!(
                "broker.id={id}\nlisteners={listeners}\n{ssl}\
                 log.dirs={logs}\nzookeeper.connect=127.0.0.1:{zk}\nunclean.leader.election.enable=false\n\
                 auto.create.topics.enable=false\noffsets.topic.replication.factor={n}\n\
                 offsets.topic.num.partitions=3\ndefault.replication.factor={n}\n\
                 controlled.shutdown.enable=true\nlog.flush.interval.messages=1\n\
                 replica.lag.time.max.ms=5000\nzookeeper.session.timeout.ms=6000\n",
                id = i + 1,
                logs = self.dir.path().join(format!("data-{i}")).display(),
                zk = self.zk_port,
                n = self.ports.len().min(3),
            ),
        )
        .unwrap();
        spawn(
            &self.home,
            self.dir.path(),
            &format!("broker-{i}"),
            "kafka-server-start.sh",
            &conf,
        )
    }

    fn wait_for_port(&self, port: u16, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "port {port} did not open; see {}",
                self.dir.path().display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Where broker `i` writes its output; a restart starts it afresh.
    fn broker_log(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("broker-{i}.log"))
    }

    /// A broker is ready when it registered itself in ZooKeeper.
    fn wait_for_broker(&self, i: usize) {
        if let Err(log) = self.broker_started(i) {
            panic!("broker {i} did not start:\n{}", tail(&log));
        }
    }

    /// Ok once the broker logs that it started; Err(log) when it gave up or took too long.
    fn broker_started(&self, i: usize) -> Result<(), String> {
        let log = self.broker_log(i);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("started (kafka.server.KafkaServer)") {
                return Ok(());
            }
            if text.contains("FATAL") || Instant::now() >= deadline {
                return Err(text);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Creates a topic the way ops would on 0.9 (no CreateTopics API), then waits until
    /// every partition has a leader and a full ISR.
    pub fn create_topic(&self, topic: &str, partitions: u32, replication: usize, min_isr: usize) {
        let out = Command::new(self.home.join("bin/kafka-topics.sh"))
            .args([
                "--zookeeper",
                &self.zookeeper(),
                "--create",
                "--topic",
                topic,
            ])
            .args([
                "--partitions",
                &partitions.to_string(),
                "--replication-factor",
                &replication.to_string(),
            ])
            .args(["--config", &format!("min.insync.replicas={min_isr}")])
            .envs(java_env(self.dir.path()))
            .output()
            .expect("kafka-topics.sh");
        assert!(
            out.status.success(),
            "create topic: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let d = self.describe(topic);
            let ready = d.lines().filter(|l| l.contains("Leader:")).count() == partitions as usize
                && d.lines().filter(|l| l.contains("Leader:")).all(|l| {
                    let isr = l.split("Isr:").nth(1).unwrap_or("").trim();
                    !l.contains("Leader: -1") && isr.split(',').count() == replication
                });
            if ready {
                return;
            }
            assert!(Instant::now() < deadline, "topic {topic} not ready:\n{d}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn describe(&self, topic: &str) -> String {
        let out = Command::new(self.home.join("bin/kafka-topics.sh"))
            .args([
                "--zookeeper",
                &self.zookeeper(),
                "--describe",
                "--topic",
                topic,
            ])
            .envs(java_env(self.dir.path()))
            .output()
            .expect("kafka-topics.sh");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// For a failure message: the topic's leaders and ISRs as ZooKeeper holds them, and each
    /// broker's last warnings and errors.
    pub fn state(&self, topic: &str) -> String {
        let mut out = self.describe(topic);
        for i in 0..self.brokers.len() {
            let log = self.broker_log(i);
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let alarms: Vec<&str> = text
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                .collect();
            out += &format!(
                "broker {} ({}): {} warnings and errors, the last ones:\n{}\n",
                i + 1,
                if self.brokers[i].is_some() {
                    "running"
                } else {
                    "killed"
                },
                alarms.len(),
                alarms[alarms.len().saturating_sub(6)..].join("\n")
            );
        }
        out
    }

    /// SIGKILL: the broker gets no chance to hand over leadership.
    pub fn kill_broker(&mut self, i: usize) {
        if let Some(mut child) = self.brokers[i].take() {
            eprintln!("kafka09: kill -9 broker {} at {}", i + 1, super::now_ms());
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a killed broker again. Its old ZooKeeper session lives until it times out, and
    /// until then the broker refuses to register; it is started again until it gets through.
    pub fn restart_broker(&mut self, i: usize) {
        self.kill_broker(i);
        let log = self.broker_log(i);
        for _ in 0..30 {
            let _ = std::fs::remove_file(&log);
            let child = self.spawn_broker(i);
            self.brokers[i] = Some(child);
            match self.broker_started(i) {
                Ok(()) => {
                    eprintln!(
                        "kafka09: broker {} started again at {}",
                        i + 1,
                        super::now_ms()
                    );
                    return;
                }
                Err(text) if text.contains("already registered") => {
                    self.kill_broker(i);
                    std::thread::sleep(Duration::from_secs(1));
                }
                Err(text) => panic!("broker {i} did not restart:\n{}", tail(&text)),
            }
        }
        panic!("broker {i} could not re-register in ZooKeeper");
    }
}

impl Drop for KafkaCluster {
    fn drop(&mut self) {
        for i in 0..self.brokers.len() {
            self.kill_broker(i);
        }
        let _ = self.zk.kill();
        let _ = self.zk.wait();
    }
}

/// A certificate authority made with Java's keytool, as the operator of a managed cluster runs
/// one: clients trust its certificate (PEM, librdkafka's `ssl.ca.location`), brokers serve
/// certificates it signed.
pub struct TestCa {
    dir: TempDir,
    store: PathBuf,
    password: String,
}

/// A broker's PKCS12 keystore: its key pair, with a certificate for 127.0.0.1 and the CA's chain.
pub struct BrokerKeystore {
    _dir: TempDir,
    path: PathBuf,
    password: String,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("test-ca-")
            .tempdir()
            .unwrap();
        let store = dir.path().join("ca.p12");
        // Generated per run: no key material or password lives in the repository.
        let password = format!("{:016x}", rand::random::<u64>());
        keytool(&[
            "-genkeypair",
            "-alias",
            "ca",
            "-dname",
            &format!("CN={name}"),
            "-ext",
            "bc:c",
            "-keystore",
            &store.display().to_string(),
            "-storepass",
            &password,
        ]);
        keytool(&[
            "-exportcert",
            "-rfc",
            "-alias",
            "ca",
            "-keystore",
            &store.display().to_string(),
            "-storepass",
            &password,
            "-file",
            &dir.path().join("ca.pem").display().to_string(),
        ]);
        Self {
            dir,
            store,
            password,
        }
    }

    /// The CA's certificate as PEM.
    pub fn cert_pem(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A key pair for a broker on 127.0.0.1 with a certificate this CA signed. The address is
    /// in the certificate's subject alternative names, so clients that verify the broker's
    /// hostname (librdkafka does by default) accept it.
    pub fn broker_keystore(&self) -> BrokerKeystore {
        let dir = tempfile::Builder::new()
            .prefix("broker-keystore-")
            .tempdir()
            .unwrap();
        let path = dir.path().join("broker.p12");
        let (store, csr, crt) = (
            path.display().to_string(),
            dir.path().join("broker.csr").display().to_string(),
            dir.path().join("broker.crt").display().to_string(),
        );
        let pw = self.password.as_str();
        let ca_store = self.store.display().to_string();
        let ca_pem = self.cert_pem().display().to_string();
        keytool(&[
            "-genkeypair",
            "-alias",
            "broker",
            "-dname",
            "CN=127.0.0.1",
            "-keystore",
            &store,
            "-storepass",
            pw,
        ]);
        keytool(&[
            "-certreq",
            "-alias",
            "broker",
            "-keystore",
            &store,
            "-storepass",
            pw,
            "-file",
            &csr,
        ]);
        keytool(&[
            "-gencert",
            "-alias",
            "ca",
            "-keystore",
            &ca_store,
            "-storepass",
            pw,
            "-infile",
            &csr,
            "-outfile",
            &crt,
            "-rfc",
            "-ext",
            "SAN=ip:127.0.0.1",
        ]);
        // The chain first, so that the signed certificate can be attached to the key pair.
        keytool(&[
            "-importcert",
            "-noprompt",
            "-alias",
            "ca",
            "-file",
            &ca_pem,
            "-keystore",
            &store,
            "-storepass",
            pw,
        ]);
        keytool(&[
            "-importcert",
            "-alias",
            "broker",
            "-file",
            &crt,
            "-keystore",
            &store,
            "-storepass",
            pw,
        ]);
        BrokerKeystore {
            _dir: dir,
            path,
            password: self.password.clone(),
        }
    }
}

/// Runs Java's keytool with RSA 2048 keys valid for two days in PKCS12 stores (the defaults
/// differ between Java versions; these are what a 0.9 broker on Java 17 and OpenSSL 3 accept).
fn keytool(args: &[&str]) {
    let mut cmd = Command::new("keytool");
    // Each call starts a JVM: the brokers' quick JIT tier and serial collector suit it too.
    cmd.args(["-J-XX:TieredStopAtLevel=1", "-J-XX:+UseSerialGC"])
        .args(args);
    if args[0] == "-genkeypair" {
        cmd.args(["-keyalg", "RSA", "-keysize", "2048", "-storetype", "PKCS12"]);
    }
    if matches!(args[0], "-genkeypair" | "-gencert") {
        cmd.args(["-validity", "2"]);
    }
    let out = cmd.output().expect("keytool (Java) on PATH");
    assert!(
        out.status.success(),
        "keytool {}: {}{}",
        args[0],
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Kafka 0.9's scripts pass GC-logging flags Java 9+ rejects; blank them, keep heaps small.
fn java_env(dir: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("KAFKA_GC_LOG_OPTS", " ".into()),
        ("KAFKA_JMX_OPTS", " ".into()),
        ("KAFKA_HEAP_OPTS", "-Xmx256m -Xms64m".into()),
        (
            "KAFKA_JVM_PERFORMANCE_OPTS",
            "-XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Djava.awt.headless=true".into(),
        ),
        ("LOG_DIR", dir.join("logs").display().to_string()),
    ]
}

fn spawn(home: &Path, dir: &Path, name: &str, script: &str, conf: &Path) -> Child {
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    Command::new(home.join("bin").join(script))
        .arg(conf)
        .envs(java_env(dir))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {script}: {e}"))
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
