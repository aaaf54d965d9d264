//! The operations view: Prometheus in the stack, the "candlestream: pipeline health" dashboard
//! and the Grafana alert rules.
//!
//! Static checks: the compose service, the scrape config, the Grafana datasource, the dashboard and
//! the alert rules parse and refer to each other by the right names and uids.
//!
//! Real scrape: the real producer and two consumer processes on Kafka 0.9 (3 brokers) and
//! InfluxDB 1.6.7 with the fake exchange trading, scraped by the real Prometheus (2.42, Debian)
//! started with the compose file's flags and scrape config, only the targets pointed at the test's
//! ports and the interval shortened. Every panel and alert query runs through /api/v1/query,
//! expanded as Grafana expands it, and must return data; the stale-feed query names exactly the
//! symbol that stopped trading, the lag query rises when the consumers stop.

// The cluster lock is held across awaits on purpose: it keeps whole tests, each on its own
// runtime, from running two clusters at once.
#![allow(clippy::await_holding_lock)]

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use yaml_rust2::{Yaml, YamlEmitter, YamlLoader};

use support::fake_trades::Trader;
use support::kafka09::{client_overrides, producer_overrides};
use support::pipeline::{WAIT, produce_raw, raw_producer};
use support::rig::{CLUSTER, Rig, free_port};
use support::{Process, SYMBOLS, eventually_async, now_ms, settings_toml, topic_size};

const PROMETHEUS_UID: &str = "candlestream-prometheus";
const SCRAPE_CONFIG: &str = "prometheus/prometheus.yml";
const DATASOURCE: &str = "grafana/provisioning/datasources/prometheus.yaml";
const DASHBOARD: &str = "grafana/dashboards/health.json";
const ALERT_RULES: &str = "grafana/provisioning/alerting/candlestream.yaml";

/// The test's scrape interval, in seconds: short, so that rates have samples within seconds.
const TEST_SCRAPE_SECS: u64 = 1;

fn repo(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml(path: &str) -> Yaml {
    YamlLoader::load_from_str(&repo(path)).unwrap().remove(0)
}

fn text(y: &Yaml) -> String {
    match y {
        Yaml::String(s) | Yaml::Real(s) => s.clone(),
        Yaml::Integer(i) => i.to_string(),
        Yaml::Boolean(b) => b.to_string(),
        other => panic!("not a scalar: {other:?}"),
    }
}

fn list(y: &Yaml) -> Vec<Yaml> {
    y.as_vec().cloned().unwrap_or_default()
}

/// The compose file's app environment (an anchor merged into every app service).
fn compose_app_env(compose: &Yaml) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    let service = &compose["services"]["producer"]["environment"];
    let hash = service.as_hash().expect("producer environment");
    for (k, v) in hash {
        if text(k) == "<<" {
            for (k, v) in v.as_hash().expect("merged anchor") {
                env.insert(text(k), text(v));
            }
        } else {
            env.insert(text(k), text(v));
        }
    }
    env
}

fn host_port(target: &str) -> (String, u16) {
    let (host, port) = target.rsplit_once(':').expect("host:port");
    (host.to_string(), port.parse().expect("port"))
}

fn grafana_duration(value: &str) -> Duration {
    humantime::parse_duration(value).unwrap_or_else(|e| panic!("{value}: {e}"))
}

/// Grafana's `$__rate_interval` (pkg/promlib): max($__interval + scrape interval,
/// 4 × scrape interval), the scrape interval being the datasource's `timeInterval`.
fn rate_interval(interval: Duration, scrape: Duration) -> Duration {
    (interval + scrape).max(4 * scrape)
}

/// One query of the dashboard or an alert rule.
#[derive(Debug, Clone)]
struct Query {
    name: String,
    expr: String,
}

fn dashboard() -> Value {
    serde_json::from_str(&repo(DASHBOARD)).unwrap()
}

fn panel_queries() -> Vec<Query> {
    let mut out = Vec::new();
    for p in dashboard()["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            out.push(Query {
                name: format!(
                    "panel {:?} {}",
                    p["title"].as_str().unwrap(),
                    t["refId"].as_str().unwrap()
                ),
                expr: t["expr"].as_str().unwrap().to_string(),
            });
        }
    }
    out
}

/// An alert rule: its query A and the threshold C applies to it.
#[derive(Debug, Clone)]
struct Rule {
    uid: String,
    query: Query,
    /// "gt" or "lt".
    op: String,
    threshold: f64,
}

impl Rule {
    fn fires(&self, value: f64) -> bool {
        match self.op.as_str() {
            "gt" => value > self.threshold,
            "lt" => value < self.threshold,
            other => panic!("{}: evaluator {other}", self.uid),
        }
    }
}

fn rules() -> Vec<Rule> {
    let doc = yaml(ALERT_RULES);
    let mut out = Vec::new();
    for group in list(&doc["groups"]) {
        for r in list(&group["rules"]) {
            let data = list(&r["data"]);
            let by_ref = |id: &str| {
                data.iter()
                    .find(|d| text(&d["refId"]) == id)
                    .unwrap_or_else(|| panic!("{}: no refId {id}", text(&r["uid"])))
                    .clone()
            };
            let condition = by_ref(&text(&r["condition"]));
            let threshold = &condition["model"];
            let source = by_ref(&text(&threshold["expression"]));
            let evaluator = &threshold["conditions"][0]["evaluator"];
            let value = &evaluator["params"][0];
            out.push(Rule {
                uid: text(&r["uid"]),
                query: Query {
                    name: format!("alert {:?}", text(&r["title"])),
                    expr: text(&source["model"]["expr"]),
                },
                op: text(&evaluator["type"]),
                threshold: value
                    .as_f64()
                    .or_else(|| value.as_i64().map(|i| i as f64))
                    .expect("numeric threshold"),
            });
        }
    }
    out
}

fn rule(uid: &str) -> Rule {
    rules()
        .into_iter()
        .find(|r| r.uid == uid)
        .unwrap_or_else(|| panic!("no alert rule {uid}"))
}

#[test]
fn compose_prometheus_scrape_config_datasource_and_rules_refer_to_each_other() {
    let compose = yaml("docker-compose.yml");
    let services = compose["services"].as_hash().unwrap();
    let names: Vec<String> = services.keys().map(text).collect();
    let prom = &compose["services"]["prometheus"];
    assert!(!prom.is_badvalue(), "no prometheus service");

    // Pinned, on BIND_ADDRESS, healthchecked with a tool the busybox image has.
    let image = text(&prom["image"]);
    assert!(
        image.starts_with("prom/prometheus:v") && !image.ends_with(":latest"),
        "{image}"
    );
    let ports: Vec<String> = list(&prom["ports"]).iter().map(text).collect();
    assert_eq!(
        ports,
        ["${BIND_ADDRESS:-127.0.0.1}:${PROMETHEUS_PORT:-9090}:9090"]
    );
    let health: Vec<String> = list(&prom["healthcheck"]["test"])
        .iter()
        .map(text)
        .collect();
    assert_eq!(health[..2], ["CMD", "wget"], "{health:?}");
    assert!(
        health.last().unwrap() == "http://localhost:9090/-/healthy",
        "{health:?}"
    );
    assert_eq!(text(&prom["restart"]), "unless-stopped");

    // The flags name the mounted scrape config, a volume for the data, 15 days.
    let flags: BTreeMap<String, String> = list(&prom["command"])
        .iter()
        .map(|f| {
            let f = text(f);
            let (k, v) = f.split_once('=').expect("--flag=value");
            (k.to_string(), v.to_string())
        })
        .collect();
    assert_eq!(flags["--storage.tsdb.retention.time"], "15d");
    let volumes: Vec<String> = list(&prom["volumes"]).iter().map(text).collect();
    let config_mount = format!("./{SCRAPE_CONFIG}:{}:ro,z", flags["--config.file"]);
    assert!(volumes.contains(&config_mount), "{volumes:?}");
    let data = volumes
        .iter()
        .find(|v| v.ends_with(&format!(":{}", flags["--storage.tsdb.path"])))
        .expect("a volume for the TSDB");
    let volume = data.split(':').next().unwrap();
    assert!(
        compose["volumes"]
            .as_hash()
            .unwrap()
            .contains_key(&Yaml::String(volume.into())),
        "{volume} is not a named volume"
    );

    // The scrape config: every 15 s, the app's roles at the port they listen on in compose,
    // by their compose service names; the consumers through DNS, so every replica is scraped.
    let config = yaml(SCRAPE_CONFIG);
    assert_eq!(text(&config["global"]["scrape_interval"]), "15s");
    let app_port = host_port(&compose_app_env(&compose)["CANDLESTREAM__HTTP__LISTEN"]).1;
    let jobs: BTreeMap<String, Yaml> = list(&config["scrape_configs"])
        .into_iter()
        .map(|j| (text(&j["job_name"]), j))
        .collect();
    for role in ["producer", "verifier"] {
        let targets: Vec<String> = list(&jobs[role]["static_configs"][0]["targets"])
            .iter()
            .map(text)
            .collect();
        assert_eq!(targets, [format!("{role}:{app_port}")], "{role}");
        assert!(names.contains(&role.to_string()), "no {role} service");
    }
    let dns = &jobs["consumer"]["dns_sd_configs"][0];
    assert_eq!(
        list(&dns["names"]).iter().map(text).collect::<Vec<_>>(),
        ["consumer"]
    );
    assert_eq!(text(&dns["type"]), "A");
    assert_eq!(text(&dns["port"]), app_port.to_string());
    assert!(names.contains(&"consumer".to_string()));
    support::promtool(
        &["check", "config", SCRAPE_CONFIG],
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")),
    );

    // The datasource: the prometheus service at its container port, the scrape interval as
    // Grafana's timeInterval (what $__rate_interval is computed from).
    let ds = &yaml(DATASOURCE)["datasources"][0];
    assert_eq!(text(&ds["uid"]), PROMETHEUS_UID);
    assert_eq!(text(&ds["type"]), "prometheus");
    assert_eq!(text(&ds["url"]), "http://prometheus:9090");
    assert_eq!(
        text(&ds["jsonData"]["timeInterval"]),
        text(&config["global"]["scrape_interval"])
    );

    // Grafana reads every provisioning folder, each mounted where Grafana looks for it.
    let mounts: Vec<String> = list(&compose["services"]["grafana"]["volumes"])
        .iter()
        .map(text)
        .collect();
    let provisioning = Path::new(env!("CARGO_MANIFEST_DIR")).join("grafana/provisioning");
    for folder in std::fs::read_dir(provisioning).unwrap() {
        let name = folder.unwrap().file_name().into_string().unwrap();
        let mount = format!("./grafana/provisioning/{name}:/etc/grafana/provisioning/{name}:ro,z");
        assert!(
            mounts.contains(&mount),
            "grafana mounts {mount}: {mounts:?}"
        );
    }

    // The dashboard sits beside the candles dashboard, with a uid of its own, and every query
    // goes to that datasource; every panel says what healthy looks like.
    let dash = dashboard();
    let candles: Value = serde_json::from_str(&repo("grafana/dashboards/candles.json")).unwrap();
    assert_eq!(dash["title"], "candlestream: pipeline health");
    assert_ne!(dash["uid"], candles["uid"]);
    for p in dash["panels"].as_array().unwrap() {
        let title = p["title"].as_str().unwrap();
        assert_eq!(p["datasource"]["uid"], PROMETHEUS_UID, "{title}");
        assert!(
            p["description"].as_str().unwrap().contains("Healthy:"),
            "{title}: the description says what a healthy value is"
        );
        for t in p["targets"].as_array().unwrap() {
            assert_eq!(t["datasource"]["uid"], PROMETHEUS_UID, "{title}");
        }
    }
    let symbol = &dash["templating"]["list"][0];
    assert_eq!(symbol["datasource"]["uid"], PROMETHEUS_UID);

    // The alert rules: file-provisioned, on that datasource, each with a summary and a pending
    // period Grafana parses; the six the issue asks for, the stall alert of issue 19, the
    // verifier's overdue alert and the producer's dropped records.
    let doc = yaml(ALERT_RULES);
    assert_eq!(text(&doc["apiVersion"]), "1");
    let mut uids = Vec::new();
    for group in list(&doc["groups"]) {
        grafana_duration(&text(&group["interval"]));
        for r in list(&group["rules"]) {
            let uid = text(&r["uid"]);
            let data = list(&r["data"]);
            let a = &data[0];
            assert_eq!(text(&a["datasourceUid"]), PROMETHEUS_UID, "{uid}");
            assert_eq!(text(&data[1]["datasourceUid"]), "__expr__", "{uid}");
            assert_eq!(text(&r["condition"]), text(&data[1]["refId"]), "{uid}");
            assert_eq!(
                text(&data[1]["model"]["expression"]),
                text(&a["refId"]),
                "{uid}"
            );
            grafana_duration(&text(&r["for"]));
            assert!(!text(&r["annotations"]["summary"]).is_empty(), "{uid}");
            assert!(!text(&r["title"]).is_empty(), "{uid}");
            uids.push(uid);
        }
    }
    uids.sort();
    assert_eq!(
        uids,
        [
            "candlestream-candles-left-wrong",
            "candlestream-consumer-lag",
            "candlestream-dead-letters",
            "candlestream-latency-p99",
            "candlestream-producer-dropped",
            "candlestream-stale-feed",
            "candlestream-stall",
            "candlestream-unhealthy",
            "candlestream-verify-behind",
        ]
    );
    // Grafana reads alerting provisioning from this folder only; no contact point by default.
    for f in std::fs::read_dir(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("grafana/provisioning/alerting"),
    )
    .unwrap()
    {
        let text = std::fs::read_to_string(f.unwrap().path()).unwrap();
        assert!(
            !text.contains("contactPoints:"),
            "no contact point by default"
        );
    }
}

/// The real Prometheus, with the compose file's flags but this test's paths and port.
struct Prometheus {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// `targets`: job name → the test's host:port targets. Jobs not in it are left out.
    fn start(targets: &BTreeMap<&str, Vec<String>>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(&config, test_scrape_config(targets, port)).unwrap();
        let compose = yaml("docker-compose.yml");
        let mut args: Vec<String> = Vec::new();
        for flag in list(&compose["services"]["prometheus"]["command"]) {
            let flag = text(&flag);
            args.push(match flag.split_once('=') {
                Some(("--config.file", _)) => format!("--config.file={}", config.display()),
                Some(("--storage.tsdb.path", _)) => {
                    format!("--storage.tsdb.path={}", dir.path().join("data").display())
                }
                _ => flag,
            });
        }
        args.push(format!("--web.listen-address=127.0.0.1:{port}"));
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = std::process::Command::new("prometheus")
            .args(&args)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("prometheus not found; run tests/install-deps.sh");
        Self {
            child,
            port,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }

    async fn ready(&self) {
        let url = format!("http://127.0.0.1:{}/-/ready", self.port);
        let deadline = tokio::time::Instant::now() + WAIT;
        while !reqwest::get(&url)
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "prometheus not ready:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// An instant query at `at` (Unix seconds): the series' labels and values, or the error.
    async fn query(
        &self,
        expr: &str,
        at: f64,
    ) -> Result<Vec<(BTreeMap<String, String>, f64)>, String> {
        let url = format!("http://127.0.0.1:{}/api/v1/query", self.port);
        let body: Value = reqwest::Client::new()
            .get(url)
            .query(&[("query", expr), ("time", &format!("{at:.3}"))])
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        if body["status"] != "success" {
            return Err(format!("{}: {}", body["errorType"], body["error"]));
        }
        let data = &body["data"];
        let value = |v: &Value| v[1].as_str().unwrap().parse::<f64>().unwrap();
        Ok(match data["resultType"].as_str() {
            Some("vector") => data["result"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| {
                    let labels = r["metric"]
                        .as_object()
                        .unwrap()
                        .iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                        .collect();
                    (labels, value(&r["value"]))
                })
                .collect(),
            Some("scalar") => vec![(BTreeMap::new(), value(&data["result"]))],
            other => return Err(format!("result type {other:?}")),
        })
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The committed scrape config with each job's service discovery replaced by the test's
/// targets, and the intervals shortened to [`TEST_SCRAPE_SECS`].
fn test_scrape_config(targets: &BTreeMap<&str, Vec<String>>, prometheus_port: u16) -> String {
    let mut doc = yaml(SCRAPE_CONFIG);
    let key = |k: &str| Yaml::String(k.into());
    let interval = Yaml::String(format!("{TEST_SCRAPE_SECS}s"));
    let Yaml::Hash(root) = &mut doc else {
        panic!("not a mapping")
    };
    let Some(Yaml::Hash(global)) = root.get_mut(&key("global")) else {
        panic!("no global")
    };
    for k in ["scrape_interval", "scrape_timeout", "evaluation_interval"] {
        global.insert(key(k), interval.clone());
    }
    let Some(Yaml::Array(jobs)) = root.get_mut(&key("scrape_configs")) else {
        panic!("no scrape_configs")
    };
    let mut rewritten = Vec::new();
    for job in jobs.drain(..) {
        let Yaml::Hash(mut job) = job else {
            panic!("job not a mapping")
        };
        let name = text(&job[&key("job_name")]);
        let test_targets = if name == "prometheus" {
            vec![format!("127.0.0.1:{prometheus_port}")]
        } else if let Some(t) = targets.get(name.as_str()) {
            t.clone()
        } else {
            continue;
        };
        job.remove(&key("dns_sd_configs"));
        let mut sc = yaml_rust2::yaml::Hash::new();
        sc.insert(
            key("targets"),
            Yaml::Array(test_targets.into_iter().map(Yaml::String).collect()),
        );
        job.insert(key("static_configs"), Yaml::Array(vec![Yaml::Hash(sc)]));
        rewritten.push(Yaml::Hash(job));
    }
    *jobs = rewritten;
    let mut out = String::new();
    YamlEmitter::new(&mut out).dump(&doc).unwrap();
    out
}

/// A panel query as Grafana sends it: `$__rate_interval` for the datasource's scrape interval
/// (here the test's) and the smallest `$__interval` (the scrape interval), `$symbol` = All.
fn expand(expr: &str) -> String {
    let scrape = Duration::from_secs(TEST_SCRAPE_SECS);
    let rate = rate_interval(scrape, scrape);
    let out = expr
        .replace("$__rate_interval", &format!("{}s", rate.as_secs()))
        .replace("$symbol", ".*");
    assert!(!out.contains('$'), "unexpanded variable in {out}");
    out
}

fn now() -> f64 {
    now_ms() as f64 / 1000.0
}

fn render(series: &[(BTreeMap<String, String>, f64)]) -> String {
    series
        .iter()
        .map(|(labels, v)| {
            let l: Vec<String> = labels
                .iter()
                .filter(|(k, _)| !matches!(k.as_str(), "instance" | "__name__"))
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            format!("{{{}}} {v:.3}", l.join(","))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `q` until it returns at least one number (not NaN), or fails with what it returned.
async fn returns_data(
    prom: &Prometheus,
    q: &Query,
    timeout: Duration,
) -> Vec<(BTreeMap<String, String>, f64)> {
    let expr = expand(&q.expr);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let result = prom.query(&expr, now()).await;
        match &result {
            Ok(series) if series.iter().any(|(_, v)| !v.is_nan()) => return series.clone(),
            _ if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await
            }
            _ => panic!("{}: `{expr}` returned {result:?}", q.name),
        }
    }
}

/// Everything on real parts: see the module comment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_panel_and_alert_query_returns_data_on_a_real_scrape() {
    let _one = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let mut rig = Rig::new().await;
    let now_ms = now_ms();
    for sym in SYMBOLS {
        rig.exchange
            .preload_history(sym, now_ms - 120_000, now_ms - 1_000, 50);
    }
    // A few REST refusals (429) during the backfill, retried.
    rig.exchange.set_rate_limit_every(Some(3));
    // Small batches fill the writer's queue at once while InfluxDB is down: a pause.
    rig.settings.influx.batch_size = 5;
    let dir = tempfile::tempdir().unwrap();
    let config = |name: &str, settings: &candlestream::config::Settings| -> PathBuf {
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, settings_toml(settings)).unwrap();
        path
    };
    let producer_config = config("producer", &rig.producer_settings());
    let mut consumers = Vec::new();
    let mut consumer_targets = Vec::new();
    for i in 0..2 {
        let port = free_port();
        let mut s = rig.settings.clone();
        s.http.listen = ([127, 0, 0, 1], port).into();
        consumers.push(Process::spawn(
            "consumer",
            &config(&format!("consumer-{i}"), &s),
        ));
        consumer_targets.push(format!("127.0.0.1:{port}"));
    }
    let _producer = Process::spawn("producer", &producer_config);
    let mut targets = BTreeMap::from([
        ("producer", vec![format!("127.0.0.1:{}", rig.producer_port)]),
        ("consumer", consumer_targets),
    ]);
    let port = free_port();
    let mut s = rig.settings.clone();
    s.http.listen = ([127, 0, 0, 1], port).into();
    // Each series checked every second over the closed minutes of the preloaded history.
    let path = config("verifier", &s);
    let verify = "[verify]\ninterval = \"1s\"\ngrace = \"5s\"\nlookback = \"10m\"\n\
                  timeframes = [\"1m\"]\nrest_trades_per_minute = 6000\n\
                  rest_candles_per_minute = 6000\n";
    std::fs::write(&path, settings_toml(&s) + verify).unwrap();
    let _verifier = Process::spawn("verify", &path);
    targets.insert("verifier", vec![format!("127.0.0.1:{port}")]);
    let prom = Prometheus::start(&targets);
    prom.ready().await;

    let ex = &rig.exchange;
    ex.wait_trades_subscribed(&SYMBOLS, WAIT).await;
    // The last symbol trades on its own, so that it alone can stop.
    let (steady, quiet) = SYMBOLS.split_at(2);
    let trader = Trader::start(ex, steady, 1, Duration::from_millis(50));
    let quiet_trader = Trader::start(ex, quiet, 1, Duration::from_millis(50));

    // What the rarer panels show: a websocket drop long enough for a gap repaired from REST,
    // a record no consumer can decode, InfluxDB down long enough for a pause.
    tokio::time::sleep(Duration::from_secs(2)).await;
    ex.set_accepting(false);
    ex.drop_connections().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    ex.set_accepting(true);
    ex.wait_trades_subscribed(&SYMBOLS, WAIT).await;
    let raw = raw_producer(&rig.cluster.bootstrap(), &producer_overrides());
    produce_raw(&raw, &rig.topic, Some(b"tETHUSD"), b"not avro at all").await;
    let dlq = format!("{}-dlq", rig.topic);
    eventually_async("a dead letter", WAIT, || async {
        topic_size(&rig.cluster.bootstrap(), &dlq, &client_overrides()) >= 1
    })
    .await;
    rig.influx.stop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    rig.influx.start_again();
    // Back to steady writing, so that the rates below show the running pipeline.
    let written = Query {
        name: "points written".into(),
        expr: "sum(rate(candlestream_influx_points_written_total[$__rate_interval])) > 0".into(),
    };
    returns_data(&prom, &written, WAIT).await;
    tokio::time::sleep(Duration::from_secs(5)).await;

    // Every query returns data.
    let mut results = Vec::new();
    let queries = panel_queries()
        .into_iter()
        .chain(rules().into_iter().map(|r| r.query));
    for q in queries {
        let series = returns_data(&prom, &q, Duration::from_secs(60)).await;
        results.push((q.name.clone(), render(&series)));
    }

    // The dead letter fires its alert.
    let dead = rule("candlestream-dead-letters");
    let dead_values = prom.query(&dead.query.expr, now()).await.unwrap();
    assert!(
        dead_values.iter().any(|(_, v)| dead.fires(*v)),
        "the dead letter fires: {dead_values:?}"
    );

    // Stale feed: one symbol stops trading. Grafana evaluates the rule's query and fires above
    // the threshold (5 minutes), which cannot be waited out here; the same query evaluated
    // `threshold - 10 s` in the future sees a symbol silent for 20 s as 310 s old and one that
    // trades at most a few seconds old as under 300 s.
    quiet_trader.stop().await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    let stale = rule("candlestream-stale-feed");
    let at = now() + stale.threshold - 10.0;
    let ages = prom.query(&stale.query.expr, at).await.unwrap();
    let firing: Vec<&str> = ages
        .iter()
        .filter(|(_, v)| stale.fires(*v))
        .map(|(l, _)| l["symbol"].as_str())
        .collect();
    assert_eq!(
        firing, quiet,
        "stale feed fires for exactly the silent symbol: {ages:?}"
    );
    assert_eq!(
        ages.len(),
        SYMBOLS.len(),
        "every symbol that traded is there: {ages:?}"
    );
    results.push((
        format!(
            "{} at now + {:.0} s, one symbol silent for 20 s",
            stale.query.name,
            stale.threshold - 10.0
        ),
        render(&ages),
    ));

    // Consumer lag: both consumers stop while trades flow; the lag query rises past its
    // threshold on the trades topic.
    let lag = rule("candlestream-consumer-lag");
    let total = "sum(candlestream_consumer_lag_records)";
    let lag_before = prom.query(&lag.query.expr, now()).await.unwrap();
    let total_before = prom.query(total, now()).await.unwrap()[0].1;
    for c in &mut consumers {
        assert!(c.terminate().success());
    }
    let trades_topic = rig.trades_topic();
    let stopped = tokio::time::Instant::now();
    let lag_after = loop {
        let series = prom.query(&lag.query.expr, now()).await.unwrap();
        let fires = series
            .iter()
            .any(|(l, v)| l["topic"] == trades_topic && lag.fires(*v));
        if fires || stopped.elapsed() > Duration::from_secs(40) {
            break series;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let rose = stopped.elapsed();
    assert!(
        lag_after
            .iter()
            .any(|(l, v)| l["topic"] == trades_topic && lag.fires(*v)),
        "lag growth on {trades_topic} crosses {} records/s with the consumers stopped: before {lag_before:?}, after {lag_after:?}",
        lag.threshold
    );
    let total_after = prom.query(total, now()).await.unwrap()[0].1;
    assert!(
        total_after > total_before,
        "lag {total_before} -> {total_after}"
    );
    results.push((
        format!("{} before the consumers stopped", lag.query.name),
        render(&lag_before),
    ));
    results.push((
        format!(
            "{} {:.0} s after they stopped",
            lag.query.name,
            rose.as_secs_f64()
        ),
        render(&lag_after),
    ));
    // Their targets are down now: the health query says 0 for them, 1 for the producer.
    let unhealthy = rule("candlestream-unhealthy");
    let roles: usize = targets.values().map(Vec::len).sum();
    let expected = |health: &[(BTreeMap<String, String>, f64)]| {
        health.len() == roles
            && health
                .iter()
                .all(|(l, v)| unhealthy.fires(*v) == (l["job"] == "consumer"))
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let health = loop {
        let health = prom.query(&unhealthy.query.expr, now()).await.unwrap();
        if expected(&health) || tokio::time::Instant::now() > deadline {
            break health;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        expected(&health),
        "stopped consumers red, the rest green: {health:?}"
    );
    results.push((
        format!("{} with the consumers stopped", unhealthy.query.name),
        render(&health),
    ));
    trader.stop().await;

    for (name, value) in &results {
        report!("OPERATIONS | {name} | {value}");
    }
}

/// The stale-feed alert's query, threshold and pending time, run by `promtool test rules`: a
/// symbol trading 10 a minute that stops fires once silent for over 5 minutes and 1 minute
/// pending, whether its trades came by websocket or by REST polls (`mode = "rest"`); a quiet one
/// (a trade every 20 minutes, as most pairs trade when every pair is streamed) never fires,
/// silent for 19 minutes at a time, nor does a quiet one whose backfill sent 300 trades of
/// history at a cold start (the rule without `source!="backfill"` fired for it).
#[test]
fn stale_feed_fires_for_an_active_symbol_not_for_a_quiet_or_backfilled_one() {
    let stale = rule("candlestream-stale-feed");
    let pending = list(&yaml(ALERT_RULES)["groups"])
        .iter()
        .flat_map(|g| list(&g["rules"]))
        .find(|r| text(&r["uid"]) == "candlestream-stale-feed")
        .map(|r| text(&r["for"]))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let rules = format!(
        "groups:\n  - name: stale\n    rules:\n      - alert: Stale\n        expr: '({}) > {}'\n        for: {pending}\n",
        stale.query.expr, stale.threshold
    );
    std::fs::write(dir.path().join("rules.yml"), rules).unwrap();
    // One sample a minute. tBTCUSD trades 10 a minute on the websocket for an hour, tRESTUSD as
    // many by REST polls; both stop at minute 60: the time of their last stored trade stays at
    // 3600 s. tQUIETUSD trades once every 20 minutes. tOLDUSD's backfill sent 300 trades at
    // minute 1, the newest from before the producer started; it never trades since.
    let received = |symbol: &str, source: &str, values: &str| {
        format!(
            "      - series: 'candlestream_trades_received_total{{symbol=\"{symbol}\",source=\"{source}\"}}'\n        values: '{values}'\n"
        )
    };
    let stored = |symbol: &str, values: &str| {
        format!(
            "      - series: 'candlestream_trade_last_stored_timestamp_seconds{{symbol=\"{symbol}\"}}'\n        values: '{values}'\n"
        )
    };
    let alert_at = |minute: u32, firing: bool| {
        let expected = if firing {
            "\n          - exp_labels: {symbol: tBTCUSD}\n          - exp_labels: {symbol: tRESTUSD}"
        } else {
            " []"
        };
        format!(
            "      - eval_time: {minute}m\n        alertname: Stale\n        exp_alerts:{expected}\n"
        )
    };
    let test = format!(
        "rule_files: [rules.yml]\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n    input_series:\n{}{}{}{}{}{}{}{}{}    alert_rule_test:\n{}{}{}{}{}",
        received("tBTCUSD", "websocket", "0+10x60 600x20"),
        stored("tBTCUSD", "0+60x60 3600x20"),
        received("tRESTUSD", "rest", "0+10x60 600x20"),
        stored("tRESTUSD", "0+60x60 3600x20"),
        received("tQUIETUSD", "websocket", "0x19 1x19 2x19 3x19 4x4"),
        stored("tQUIETUSD", "0x19 1200x19 2400x19 3600x19 4800x4"),
        received("tOLDUSD", "backfill", "0 300x79"),
        received("tOLDUSD", "websocket", "0x80"),
        stored("tOLDUSD", "-7200x80"),
        // The backfilled pair's history is 2 hours old; trading; silent 3 minutes; silent 6
        // (pending); silent 7 and more: firing.
        alert_at(12, false),
        alert_at(59, false),
        alert_at(63, false),
        alert_at(66, false),
        alert_at(68, true),
    );
    std::fs::write(dir.path().join("test.yml"), test).unwrap();
    support::promtool(&["test", "rules", "test.yml"], dir.path());
}

/// The dropped-records alert's query and threshold, run by `promtool test rules`: it fires for
/// the 5 minutes after a record Kafka can never take (a counter the producer registers at 0) and
/// after one the registry refused (a counter that appears at its first error), on the producer
/// that dropped it; never for delivery failures that were sent again.
#[test]
fn dropped_records_alert_fires_on_a_permanent_failure_not_on_retries() {
    let dropped = rule("candlestream-producer-dropped");
    let dir = tempfile::tempdir().unwrap();
    let rules = format!(
        "groups:\n  - name: dropped\n    rules:\n      - alert: Dropped\n        expr: '({}) > {}'\n",
        dropped.query.expr, dropped.threshold
    );
    std::fs::write(dir.path().join("rules.yml"), rules).unwrap();
    // One sample a minute, per producer: p1 drops a record too large at minute 11; p2 cannot
    // encode one at minute 20; p3's deliveries keep failing and are sent again.
    let series = |selector: String, values: &str| {
        format!("      - series: '{selector}'\n        values: '{values}'\n")
    };
    let delivery = |kind: &str, instance: &str, values: &str| {
        series(
            format!(
                "candlestream_kafka_delivery_errors_total{{kind=\"{kind}\",instance=\"{instance}\"}}"
            ),
            values,
        )
    };
    let encode = |instance: &str, values: &str| {
        series(
            format!("candlestream_encode_errors_total{{instance=\"{instance}\"}}"),
            values,
        )
    };
    let alert_at = |minute: u32, instance: Option<&str>| {
        let expected = match instance {
            Some(i) => format!("\n          - exp_labels: {{instance: {i}}}"),
            None => " []".to_string(),
        };
        format!(
            "      - eval_time: {minute}m\n        alertname: Dropped\n        exp_alerts:{expected}\n"
        )
    };
    let test = format!(
        "rule_files: [rules.yml]\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n    input_series:\n{}{}{}{}{}{}    alert_rule_test:\n{}{}{}{}{}{}{}",
        delivery("permanent", "p1", "0x10 1x20"),
        delivery("retried", "p1", "0x30"),
        delivery("permanent", "p2", "0x30"),
        encode("p2", "_x20 1x10"),
        delivery("permanent", "p3", "0x30"),
        delivery("retried", "p3", "0+5x30"),
        alert_at(10, None),
        alert_at(11, Some("p1")),
        alert_at(15, Some("p1")),
        alert_at(17, None),
        alert_at(20, Some("p2")),
        alert_at(24, Some("p2")),
        alert_at(26, None),
    );
    std::fs::write(dir.path().join("test.yml"), test).unwrap();
    support::promtool(&["test", "rules", "test.yml"], dir.path());
}

/// The left-wrong alert's query and threshold, run by `promtool test rules`: it fires for the
/// hour after the verifier gives up on a candle, on that symbol and timeframe only, also for the
/// first one (the counter is at 0 from the series' start) and across a verifier restart; never
/// for a symbol whose candles were all healed or equal.
#[test]
fn left_wrong_alert_fires_for_an_hour_after_a_candle_is_given_up() {
    let left = rule("candlestream-candles-left-wrong");
    let dir = tempfile::tempdir().unwrap();
    let rules = format!(
        "groups:\n  - name: left\n    rules:\n      - alert: LeftWrong\n        expr: '({}) > {}'\n",
        left.query.expr, left.threshold
    );
    std::fs::write(dir.path().join("rules.yml"), rules).unwrap();
    let series = |symbol: &str, timeframe: &str, values: &str| {
        format!(
            "      - series: 'candlestream_candles_given_up_total{{symbol=\"{symbol}\",timeframe=\"{timeframe}\",instance=\"v\"}}'\n        values: '{values}'\n"
        )
    };
    let alert_at = |minute: u32, labels: Option<(&str, &str)>| {
        let expected = match labels {
            Some((s, t)) => format!("\n          - exp_labels: {{symbol: {s}, timeframe: {t}}}"),
            None => " []".to_string(),
        };
        format!(
            "      - eval_time: {minute}m\n        alertname: LeftWrong\n        exp_alerts:{expected}\n"
        )
    };
    // One sample a minute. tBTCUSD gives up a minute at minute 10; tETHUSD's 1h series, at 2
    // from before the window, restarts at minute 90 (back to 0) and gives up one at minute 100;
    // tSOLUSD never.
    let test = format!(
        "rule_files: [rules.yml]\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n    input_series:\n{}{}{}{}    alert_rule_test:\n{}{}{}{}{}{}",
        series("tBTCUSD", "1m", "0x9 1x200"),
        series("tETHUSD", "1h", "2x89 0x9 1x100"),
        series("tETHUSD", "1m", "0x200"),
        series("tSOLUSD", "1m", "0x200"),
        alert_at(9, None),
        alert_at(10, Some(("tBTCUSD", "1m"))),
        alert_at(60, Some(("tBTCUSD", "1m"))),
        alert_at(75, None),
        alert_at(100, Some(("tETHUSD", "1h"))),
        alert_at(170, None),
    );
    std::fs::write(dir.path().join("test.yml"), test).unwrap();
    support::promtool(&["test", "rules", "test.yml"], dir.path());
}

/// The stall alert's query and threshold, run by `promtool test rules` over the gauge as a frozen
/// partition and a broker failover draw it: it fires for a freeze of a minute, on the frozen
/// partition only, while it lasts, and not for a failover that delays records by 18 s.
#[test]
fn stall_alert_fires_for_a_freeze_not_for_a_failover() {
    let stall = rule("candlestream-stall");
    let dir = tempfile::tempdir().unwrap();
    let rules = format!(
        "groups:\n  - name: stall\n    rules:\n      - alert: Stall\n        expr: '({}) > {}'\n",
        stall.query.expr, stall.threshold
    );
    std::fs::write(dir.path().join("rules.yml"), rules).unwrap();
    // One sample per 15 s scrape, from two consumers that export the same partitions.
    let series = |partition: u32, instance: &str, values: &str| {
        format!(
            "      - series: 'candlestream_oldest_unstored_seconds{{topic=\"t\",partition=\"{partition}\",instance=\"{instance}\"}}'\n        values: '{values}'\n"
        )
    };
    let frozen = "0 0 15 30 45 60 0 0 0 0 0 0";
    let failover = "0 0 8 18 0 0 0 0 0 0 0 0";
    let alert_at = |seconds: u32, firing: bool| {
        let expected = if firing {
            "\n          - exp_labels: {topic: t, partition: \"0\"}"
        } else {
            " []"
        };
        format!(
            "      - eval_time: {seconds}s\n        alertname: Stall\n        exp_alerts:{expected}\n"
        )
    };
    let test = format!(
        "rule_files: [rules.yml]\nevaluation_interval: 15s\ntests:\n  - interval: 15s\n    input_series:\n{}{}{}{}    alert_rule_test:\n{}{}{}{}",
        series(0, "c1", frozen),
        series(0, "c2", frozen),
        series(1, "c1", failover),
        series(1, "c2", failover),
        // Before the freeze passes 30 s; while it does; within a minute after; a minute after.
        alert_at(30, false),
        alert_at(75, true),
        alert_at(120, true),
        alert_at(150, false),
    );
    std::fs::write(dir.path().join("test.yml"), test).unwrap();
    support::promtool(&["test", "rules", "test.yml"], dir.path());
}
