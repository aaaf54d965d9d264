//! Shared test support: fakes for what cannot run here (Bitfinex, Schema Registry), the real
//! Kafka 0.9 cluster harness, and helpers to read topics back.
#![allow(dead_code)]

pub mod fake_bitfinex;
pub mod fake_influx2;
pub mod fake_registry;
pub mod fake_trades;
pub mod influx1;
pub mod kafka09;
pub mod pipeline;
pub mod rig;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use candlestream::config::Settings;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use fake_bitfinex::FakeBitfinex;
use fake_registry::FakeRegistry;

pub const SYMBOLS: [&str; 3] = ["tBTCUSD", "tETHUSD", "tSOLUSD"];

/// A unique name per call, so tests sharing a cluster never share a topic or group.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// Settings pointing at the fakes, with short timers so faults resolve quickly.
pub fn settings(
    exchange: &FakeBitfinex,
    registry: &FakeRegistry,
    brokers: &str,
    topic: &str,
) -> Settings {
    let mut s = Settings::default();
    s.bitfinex.ws_url = exchange.ws_url();
    s.bitfinex.rest_url = exchange.rest_url();
    s.bitfinex.symbols = SYMBOLS.map(String::from).to_vec();
    s.bitfinex.rest_poll_interval = Duration::from_millis(100);
    s.bitfinex.heartbeat_timeout = Duration::from_secs(3);
    s.bitfinex.reconnect_backoff_min = Duration::from_millis(50);
    s.bitfinex.reconnect_backoff_max = Duration::from_secs(1);
    s.bitfinex.rest_backoff_min = Duration::from_millis(100);
    s.bitfinex.rest_backoff_max = Duration::from_secs(1);
    s.bitfinex.repair_backoff_min = Duration::from_millis(100);
    s.bitfinex.repair_backoff_max = Duration::from_secs(1);
    s.bitfinex.request_timeout = Duration::from_secs(2);
    // The fake exchange allows far more than Bitfinex; tests that check the limiter lower this.
    s.bitfinex.rest_trades_per_minute = 6_000;
    s.bitfinex.rest_tickers_per_minute = 6_000;
    s.bitfinex.connections_per_minute = 600;
    s.kafka.brokers = brokers.to_string();
    s.kafka.topic = topic.to_string();
    s.kafka.trades_topic = format!("{topic}-trades");
    s.kafka.dlq_topic = format!("{topic}-dlq");
    s.kafka.group_id = format!("{topic}-group");
    s.schema_registry.url = registry.url();
    s.http.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    s.producer.shutdown_timeout = Duration::from_secs(10);
    s.producer.retry_backoff_max = Duration::from_secs(1);
    s
}

#[derive(Debug, Clone)]
pub struct Record {
    pub key: Option<String>,
    pub payload: Vec<u8>,
    pub partition: i32,
    pub offset: i64,
    pub headers: BTreeMap<String, String>,
}

/// A consumer of its own group that reads without committing.
pub fn reader(brokers: &str, client_overrides: &BTreeMap<String, String>) -> BaseConsumer {
    group_reader(brokers, &unique("reader"), client_overrides)
}

/// A consumer in `group` that never joins it (no subscribe) nor commits: it can ask for the
/// group's committed offsets.
pub fn group_reader(
    brokers: &str,
    group: &str,
    client_overrides: &BTreeMap<String, String>,
) -> BaseConsumer {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false");
    for (k, v) in client_overrides {
        cfg.set(k, v);
    }
    cfg.create().expect("reader")
}

/// The group's committed offset per partition of `topic`, read by a [`group_reader`]; 0 where it
/// committed none.
pub fn committed_offsets(
    brokers: &str,
    group: &str,
    topic: &str,
    partitions: i32,
    client_overrides: &BTreeMap<String, String>,
) -> Vec<i64> {
    use rdkafka::consumer::Consumer;
    let consumer = group_reader(brokers, group, client_overrides);
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let committed = consumer
        .committed_offsets(tpl, std::time::Duration::from_secs(10))
        .unwrap();
    (0..partitions)
        .map(|p| {
            let offset = committed.find_partition(topic, p).unwrap().offset();
            offset.to_raw().unwrap_or(0).max(0)
        })
        .collect()
}

/// Number of records in `topic` (sum of high watermarks; nothing is deleted in tests).
pub fn topic_size(
    brokers: &str,
    topic: &str,
    client_overrides: &BTreeMap<String, String>,
) -> usize {
    high_watermarks(brokers, topic, client_overrides)
        .iter()
        .map(|&high| high as usize)
        .sum()
}

/// Each partition's high watermark, by partition id, as its leader of the moment answers.
/// Retries while a partition has no leader, as after a broker was killed.
pub fn high_watermarks(
    brokers: &str,
    topic: &str,
    client_overrides: &BTreeMap<String, String>,
) -> Vec<i64> {
    let consumer = reader(brokers, client_overrides);
    let mut attempts = 0;
    loop {
        let highs = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .and_then(|metadata| {
                let mut ids: Vec<i32> = metadata.topics()[0]
                    .partitions()
                    .iter()
                    .map(|p| p.id())
                    .collect();
                ids.sort_unstable();
                ids.into_iter()
                    .map(|p| {
                        consumer
                            .fetch_watermarks(topic, p, Duration::from_secs(10))
                            .map(|(_, high)| high)
                    })
                    .collect::<Result<Vec<i64>, _>>()
            });
        match highs {
            Ok(highs) => return highs,
            Err(e) if attempts < 10 => {
                attempts += 1;
                eprintln!("high_watermarks({topic}): {e}; retrying");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => panic!("cannot read the high watermarks of {topic}: {e}"),
        }
    }
}

/// Every record of a topic.
pub fn read_all(
    brokers: &str,
    topic: &str,
    client_overrides: &BTreeMap<String, String>,
) -> Vec<Record> {
    let n = topic_size(brokers, topic, client_overrides);
    let records = read_topic(brokers, topic, client_overrides, n, Duration::from_secs(30));
    assert_eq!(records.len(), n, "could not read back all of {topic}");
    records
}

/// Reads a topic from the beginning until `expected` records arrived or `timeout` passed.
pub fn read_topic(
    brokers: &str,
    topic: &str,
    client_overrides: &BTreeMap<String, String>,
    expected: usize,
    timeout: Duration,
) -> Vec<Record> {
    let consumer = reader(brokers, client_overrides);
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let partitions = metadata.topics()[0].partitions().len() as i32;
    assert!(partitions > 0, "topic {topic} has no partitions");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let deadline = std::time::Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < expected && std::time::Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| {
                            (
                                h.key.to_string(),
                                String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push(Record {
                key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                payload: m.payload().unwrap_or_default().to_vec(),
                partition: m.partition(),
                offset: m.offset(),
                headers,
            });
        }
    }
    out
}

/// Kafka's Java murmur2 partitioner, to check that keys land where Java clients put them.
pub fn java_partition(key: &[u8], partitions: i32) -> i32 {
    const M: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ key.len() as u32;
    let mut chunks = key.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]).wrapping_mul(M);
        k ^= k >> 24;
        h = h.wrapping_mul(M) ^ k.wrapping_mul(M);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        for (i, b) in rest.iter().enumerate().rev() {
            h ^= (*b as u32) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    ((h as i32) & 0x7fff_ffff) % partitions
}

/// Prints a result line that stays in CI's log: the test harness swallows `println!` of passing
/// tests, not writes to stdout itself.
#[macro_export]
macro_rules! report {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

// Not every test binary uses it.
#[allow(unused_imports)]
pub use candlestream::model::now_ms;

/// Polls `cond` every 20 ms until it holds; panics with `what` after `timeout`.
pub async fn eventually(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Like [`eventually`], for conditions that must await.
pub async fn eventually_async<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The keys tests set, as a config file for running the `candlestream` binary.
pub fn settings_toml(s: &Settings) -> String {
    let table = |m: &BTreeMap<String, String>| {
        m.iter()
            .map(|(k, v)| format!("\"{k}\" = \"{v}\"\n"))
            .collect::<String>()
    };
    let symbols = s
        .bitfinex
        .symbols
        .iter()
        .map(|x| format!("\"{x}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let d = |d: Duration| format!("\"{}ms\"", d.as_millis());
    format!(
        "[bitfinex]\nws_url = \"{}\"\nrest_url = \"{}\"\nsymbols = [{symbols}]\nrest_poll_interval = {}\n\
         heartbeat_timeout = {}\nreconnect_backoff_min = {}\nreconnect_backoff_max = {}\n\
         rest_backoff_min = {}\nrest_backoff_max = {}\nrepair_backoff_min = {}\nrepair_backoff_max = {}\n\
         mode = \"{}\"\ntrades = {}\nbackfill = {}\nrest_trades_per_minute = {}\n\
         rest_tickers_per_minute = {}\nconnections_per_minute = {}\nresume_timeout = {}\n\
         [kafka]\nbrokers = \"{}\"\ntopic = \"{}\"\ntrades_topic = \"{}\"\ndlq_topic = \"{}\"\ngroup_id = \"{}\"\n\
         [kafka.producer]\n{}[kafka.consumer]\n{}\
         [schema_registry]\nurl = \"{}\"\n\
         [producer]\nshutdown_timeout = {}\n\
         [consumer]\nworkers = {}\nshutdown_timeout = {}\nretry_backoff_max = {}\n\
         [influx]\napi = \"v1\"\nurl = \"{}\"\ndatabase = \"{}\"\nbatch_size = {}\nflush_interval = {}\n\
         [http]\nlisten = \"{}\"\n[log]\nlevel = \"warn\"\n",
        s.bitfinex.ws_url,
        s.bitfinex.rest_url,
        d(s.bitfinex.rest_poll_interval),
        d(s.bitfinex.heartbeat_timeout),
        d(s.bitfinex.reconnect_backoff_min),
        d(s.bitfinex.reconnect_backoff_max),
        d(s.bitfinex.rest_backoff_min),
        d(s.bitfinex.rest_backoff_max),
        d(s.bitfinex.repair_backoff_min),
        d(s.bitfinex.repair_backoff_max),
        if s.bitfinex.mode == candlestream::config::ExchangeMode::Rest {
            "rest"
        } else {
            "websocket"
        },
        s.bitfinex.trades,
        d(s.bitfinex.backfill),
        s.bitfinex.rest_trades_per_minute,
        s.bitfinex.rest_tickers_per_minute,
        s.bitfinex.connections_per_minute,
        d(s.bitfinex.resume_timeout),
        s.kafka.brokers,
        s.kafka.topic,
        s.kafka.trades_topic,
        s.kafka.dlq_topic,
        s.kafka.group_id,
        table(&s.kafka.producer),
        table(&s.kafka.consumer),
        s.schema_registry.url,
        d(s.producer.shutdown_timeout),
        s.consumer.workers,
        d(s.consumer.shutdown_timeout),
        d(s.consumer.retry_backoff_max),
        s.influx.url,
        s.influx.database,
        s.influx.batch_size,
        d(s.influx.flush_interval),
        s.http.listen,
    )
}

/// The `candlestream` binary as a child process, killed if the test fails.
pub struct Process(pub std::process::Child);

impl Process {
    pub fn spawn(subcommand: &str, config: &std::path::Path) -> Self {
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_candlestream"))
            .arg(subcommand)
            .arg("--config")
            .arg(config)
            .stdin(std::process::Stdio::null())
            .spawn()
            .unwrap();
        Self(child)
    }

    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// SIGTERM, then waits for the exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.0.id().to_string();
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        self.0.wait().unwrap()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `promtool` (Prometheus's own checker) with `args` in `dir`; the test fails with its
/// output unless it succeeds.
pub fn promtool(args: &[&str], dir: &std::path::Path) {
    let out = std::process::Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool not found; run tests/install-deps.sh");
    assert!(
        out.status.success(),
        "promtool {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
