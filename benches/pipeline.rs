//! The whole pipeline on real parts, next to plain tools: the fake exchange → the `candlestream
//! producer` binary → Kafka 0.9.0.1 (3 brokers, replication 3, min.insync.replicas 2, acks=all)
//! → the `candlestream consumer` binary → InfluxDB 1.6.7. Run by `benches/pipeline.sh`; prints
//! one Markdown table on stdout (progress on stderr).
//!
//! Three phases, each on fresh topics, a fresh database, a fresh fake exchange and fresh
//! producer and consumer processes, so that every process's peak RSS and CPU belong to its
//! phase:
//!
//! 1. Producer throughput: the fake exchange sends trades and tickers over 6 symbols as fast as
//!    it can for a while; records/s acknowledged by Kafka (the producer's own counter) from the
//!    first send to the last ack. Then kcat produces the very same records (keys and Avro
//!    payloads read back from the topics) to the same topics with the same acks, compression,
//!    linger and partitioner, and is timed from start to exit.
//! 2. and 3. End-to-end latency at a live-like rate and at 5 000 records/s: from the moment the
//!    fake exchange wrote a record's frame to the socket to the first InfluxDB query that returns
//!    its point (queries every few milliseconds), plus RSS and CPU of both processes.
//!
//! Every setting is candlestream's default except what this machine needs: the brokers are
//! Kafka 0.9, so the clients get the compatibility overrides the tests use (no idempotence, gzip
//! instead of lz4, no ApiVersion request), InfluxDB is 1.x (`api = "v1"`), and backfill is off
//! (the fake has no history).

#[path = "../tests/support/mod.rs"]
mod support;
// Shared with benches/market.rs; this bench keeps its own per-symbol point polling, so the
// module's `Pending` and `poll` go unused here.
#[path = "measure.rs"]
#[allow(dead_code)]
mod measure;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candlestream::config::{InfluxApi, Settings};
use serde_json::Value;

use measure::{Usage, clock_ticks, metric_sum, percentile, rows, rss_mb};
use support::fake_bitfinex::FakeBitfinex;
use support::fake_registry::FakeRegistry;
use support::influx1::Influx1;
use support::kafka09::{KafkaCluster, client_overrides, producer_overrides};
use support::rig::free_port;
use support::{Process, read_all, settings_toml, topic_size, unique};

const SYMBOLS: [&str; 6] = [
    "tBTCUSD", "tETHUSD", "tSOLUSD", "tXRPUSD", "tLTCUSD", "tADAUSD",
];
/// How often the latency phases query InfluxDB for points not seen yet.
const POLL: Duration = Duration::from_millis(5);
/// Delimiters for kcat's input file; checked to occur in no record.
const RECORD_DELIM: &str = "|~csbench-end~|";
const KEY_DELIM: &str = "|~csbench-key~|";

/// Durations of the phases; `--quick` divides them by 4 (for trying the bench, not for figures);
/// `--throughput` runs only phase 1 (producer next to kcat).
struct Plan {
    flat_out: Duration,
    live: Duration,
    high: Duration,
    throughput_only: bool,
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let k = if quick { 4 } else { 1 };
    let plan = Plan {
        flat_out: Duration::from_secs(12 / k),
        live: Duration::from_secs(48 / k),
        high: Duration::from_secs(32 / k),
        throughput_only: std::env::args().any(|a| a == "--throughput"),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let table = rt.block_on(run(plan));
    println!("{table}");
}

fn progress(msg: &str) {
    eprintln!("pipeline bench: {msg}");
}

/// What every phase shares: the cluster, InfluxDB, the registry.
struct Env {
    cluster: KafkaCluster,
    influx: Influx1,
    registry: FakeRegistry,
    dir: tempfile::TempDir,
    http: reqwest::Client,
}

/// One phase's topics, database, exchange and processes.
struct Phase {
    topic: String,
    db: String,
    exchange: FakeBitfinex,
    settings: Settings,
    producer: Option<Proc>,
    consumer: Option<Proc>,
    producer_port: u16,
}

struct Proc {
    name: &'static str,
    process: Process,
    log: PathBuf,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.process.0.id()
    }

    /// Fails the bench with the log's tail when the process has exited.
    fn check_alive(&mut self) {
        if let Ok(Some(status)) = self.process.0.try_wait() {
            panic!("{} exited ({status}):\n{}", self.name, self.tail());
        }
    }

    fn tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

/// CPU seconds of this process's children that have exited and been waited for.
fn reaped_children_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    // cutime and cstime are fields 16 and 17 of the file.
    (ticks(13) + ticks(14)) / clock_ticks()
}

impl Env {
    async fn start() -> Self {
        progress("starting ZooKeeper and 3 Kafka 0.9.0.1 brokers, InfluxDB 1.x");
        let cluster = tokio::task::spawn_blocking(|| KafkaCluster::start(3))
            .await
            .unwrap();
        let influx = tokio::task::spawn_blocking(Influx1::start).await.unwrap();
        let registry = FakeRegistry::start().await;
        let dir = tempfile::Builder::new()
            .prefix("pipeline-bench-")
            .tempdir()
            .unwrap();
        Self {
            cluster,
            influx,
            registry,
            dir,
            http: reqwest::Client::new(),
        }
    }

    async fn phase(&self, name: &str) -> Phase {
        let topic = unique(&format!("bench-{name}"));
        let brokers = self.cluster.bootstrap();
        for t in [topic.clone(), format!("{topic}-trades")] {
            let cluster = &self.cluster;
            tokio::task::block_in_place(|| cluster.create_topic(&t, 3, 3, 2));
        }
        let db = topic.replace('-', "_");
        self.influx.create_database(&db).await;
        let exchange = FakeBitfinex::start().await;
        let mut s = Settings::default();
        s.bitfinex.ws_url = exchange.ws_url();
        s.bitfinex.rest_url = exchange.rest_url();
        s.bitfinex.symbols = SYMBOLS.map(String::from).to_vec();
        s.bitfinex.backfill = Duration::ZERO;
        s.kafka.brokers = brokers;
        s.kafka.topic = topic.clone();
        s.kafka.trades_topic = format!("{topic}-trades");
        s.kafka.dlq_topic = format!("{topic}-dlq");
        s.kafka.group_id = format!("{topic}-group");
        s.kafka.producer = producer_overrides();
        s.kafka.consumer = client_overrides();
        // 0.9 brokers refuse session timeouts above group.max.session.timeout.ms (30 s);
        // librdkafka's default is 45 s.
        s.kafka
            .consumer
            .insert("session.timeout.ms".into(), "10000".into());
        s.schema_registry.url = self.registry.url();
        s.influx.api = InfluxApi::V1;
        s.influx.url = self.influx.url();
        s.influx.database = db.clone();
        Phase {
            topic,
            db,
            exchange,
            settings: s,
            producer: None,
            consumer: None,
            producer_port: free_port(),
        }
    }

    fn spawn(&self, phase: &Phase, name: &'static str) -> Proc {
        let mut s = phase.settings.clone();
        let port = if name == "producer" {
            phase.producer_port
        } else {
            free_port()
        };
        s.http.listen = ([127, 0, 0, 1], port).into();
        let config = self.dir.path().join(format!("{}-{name}.toml", phase.topic));
        std::fs::write(&config, settings_toml(&s)).unwrap();
        let log = self.dir.path().join(format!("{}-{name}.log", phase.topic));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_candlestream"))
            .arg(name)
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("candlestream binary");
        Proc {
            name,
            process: Process(child),
            log,
        }
    }

    /// Records Kafka acknowledged to the producer, from its /metrics.
    async fn produced(&self, phase: &Phase) -> Option<u64> {
        let url = format!("http://127.0.0.1:{}/metrics", phase.producer_port);
        let text = self.http.get(url).send().await.ok()?.text().await.ok()?;
        Some(
            text.lines()
                .filter(|l| {
                    l.starts_with("candlestream_kafka_produced_total ")
                        || l.starts_with("candlestream_kafka_produced_total{")
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>() as u64,
        )
    }

    /// Starts the producer (and the consumer) and waits until every channel is subscribed.
    async fn start_pipeline(&self, phase: &mut Phase, consumer: bool) {
        if consumer {
            phase.consumer = Some(self.spawn(phase, "consumer"));
        }
        phase.producer = Some(self.spawn(phase, "producer"));
        let wait = Duration::from_secs(60);
        phase.exchange.wait_subscribed(&SYMBOLS, wait).await;
        phase.exchange.wait_trades_subscribed(&SYMBOLS, wait).await;
        let deadline = Instant::now() + wait;
        while self.produced(phase).await.is_none() {
            assert!(Instant::now() < deadline, "producer /metrics not reachable");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Phase {
    fn pids(&self) -> Vec<String> {
        self.producer
            .iter()
            .chain(self.consumer.iter())
            .map(|p| p.pid().to_string())
            .collect()
    }

    fn check_alive(&mut self) {
        for p in self.producer.iter_mut().chain(self.consumer.iter_mut()) {
            p.check_alive();
        }
    }

    /// Fails the bench with `what` and the tails of the processes' logs.
    fn fail(&self, what: &str) -> ! {
        let logs: Vec<String> = self
            .producer
            .iter()
            .chain(self.consumer.iter())
            .map(|p| format!("--- {} log:\n{}", p.name, p.tail()))
            .collect();
        panic!("{what}\n{}", logs.join("\n"));
    }
}

// ---------------------------------------------------------------------------------------------
// Phase 1: producer throughput, next to kcat.

struct Throughput {
    records: usize,
    trades: usize,
    tickers: usize,
    mean_value_bytes: f64,
    mean_ticker_bytes: f64,
    mean_trade_bytes: f64,
    send_secs: f64,
    ack_secs: f64,
    ours: f64,
    kcat: f64,
    kcat_secs: f64,
    kcat_cpu: f64,
    kcat_machine_busy: f64,
    cpu_parts: String,
    kcat_cpu_parts: String,
    producer_cpu: f64,
    bench_cpu: f64,
    machine_busy: f64,
    producer_rss: (f64, f64),
}

async fn throughput(env: &Env, flat_out: Duration) -> Throughput {
    let mut phase = env.phase("throughput").await;
    progress("phase 1: producer throughput (fake exchange flat out, 6 symbols)");
    env.start_pipeline(&mut phase, false).await;
    let before = env.produced(&phase).await.unwrap();
    assert_eq!(before, 0, "nothing produced before the exchange sends");
    let self_pid = std::process::id().to_string();
    let usage = Usage::start(&[phase.pids()[0].clone(), self_pid]);
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let trades = Arc::new(AtomicUsize::new(0));
    let tickers = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for s in SYMBOLS {
        let (ex, stop, trades) = (phase.exchange.handle(), stop.clone(), trades.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                trades.fetch_add(ex.execute(s, 20).await.len(), Ordering::Relaxed);
            }
        }));
    }
    {
        let (ex, stop, tickers) = (phase.exchange.handle(), stop.clone(), tickers.clone());
        tasks.push(tokio::spawn(async move {
            for s in SYMBOLS.iter().cycle() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                tickers.fetch_add(ex.emit(s).await.map_or(0, |_| 1), Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(flat_out).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let send_secs = started.elapsed().as_secs_f64();
    let (n_trades, n_tickers) = (
        phase.exchange.trades_sent().len(),
        phase.exchange.sent().len(),
    );
    assert_eq!(
        n_trades,
        trades.load(Ordering::Relaxed),
        "every executed trade went out as te"
    );
    let records = n_trades + n_tickers;
    progress(&format!(
        "sent {n_trades} trades and {n_tickers} tickers in {send_secs:.1} s; waiting for Kafka's acks"
    ));
    let deadline = Instant::now() + Duration::from_secs(120);
    let acked_at = loop {
        let produced = env.produced(&phase).await.unwrap_or(0) as usize;
        if produced >= records {
            break started.elapsed().as_secs_f64();
        }
        phase.check_alive();
        if Instant::now() >= deadline {
            phase.fail(&format!("only {produced} of {records} acknowledged"));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let (cpu, _, machine_busy) = usage.stop();
    let cpu_parts = usage.breakdown();
    let producer_rss = rss_mb(phase.producer.as_ref().unwrap().pid());
    let ours = records as f64 / acked_at;
    progress(&format!(
        "candlestream: {records} records acknowledged in {acked_at:.2} s = {ours:.0}/s"
    ));
    phase.producer = None; // killed: kcat gets the machine to itself

    // The same records, byte for byte, into the same topics.
    let brokers = env.cluster.bootstrap();
    let topics = [
        phase.topic.clone(),
        phase.settings.kafka.trades_topic.clone(),
    ];
    let mut files = Vec::new();
    let mut sizes = Vec::new();
    for t in &topics {
        let records = tokio::task::block_in_place(|| read_all(&brokers, t, &client_overrides()));
        let path = env.dir.path().join(format!("{t}.kcat"));
        let mut data = Vec::new();
        for (i, r) in records.iter().enumerate() {
            for part in [r.key.as_deref().unwrap_or("").as_bytes(), &r.payload[..]] {
                assert!(
                    !contains(part, RECORD_DELIM.as_bytes())
                        && !contains(part, KEY_DELIM.as_bytes()),
                    "a record holds a delimiter"
                );
            }
            if i > 0 {
                data.extend_from_slice(RECORD_DELIM.as_bytes());
            }
            data.extend_from_slice(r.key.as_deref().unwrap_or("").as_bytes());
            data.extend_from_slice(KEY_DELIM.as_bytes());
            data.extend_from_slice(&r.payload);
        }
        std::fs::write(&path, data).unwrap();
        sizes.push((
            records.len(),
            records.iter().map(|r| r.payload.len()).sum::<usize>(),
        ));
        files.push(path);
    }
    assert_eq!(
        sizes[0].0 + sizes[1].0,
        records,
        "the topics hold exactly the records sent"
    );
    progress(&format!(
        "kcat: producing the same {records} records to the same topics"
    ));
    let kcat_usage = Usage::start(&[]);
    let children_cpu = reaped_children_cpu_seconds();
    let started = Instant::now();
    let logs: Vec<PathBuf> = files.iter().map(|f| f.with_extension("log")).collect();
    let mut kcats: Vec<_> = topics
        .iter()
        .zip(&files)
        .zip(&logs)
        .map(|((t, f), log)| kcat(&brokers, t, f, log))
        .collect();
    for (k, log) in kcats.iter_mut().zip(&logs) {
        let status = k.wait().unwrap();
        assert!(
            status.success(),
            "kcat failed ({status}): {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
    let kcat_secs = started.elapsed().as_secs_f64();
    let kcat_cpu = reaped_children_cpu_seconds() - children_cpu;
    let (_, _, kcat_machine_busy) = kcat_usage.stop();
    let kcat_cpu_parts = kcat_usage.breakdown();
    let after: usize = tokio::task::block_in_place(|| {
        topics
            .iter()
            .map(|t| topic_size(&brokers, t, &client_overrides()))
            .sum()
    });
    assert_eq!(
        after,
        2 * records,
        "kcat produced exactly the same number of records"
    );
    let kcat_rate = records as f64 / kcat_secs;
    progress(&format!(
        "kcat: {records} records in {kcat_secs:.2} s = {kcat_rate:.0}/s"
    ));
    let (ours_us, kcat_us) = (
        cpu[0] / records as f64 * 1e6,
        kcat_cpu / records as f64 * 1e6,
    );
    progress(&format!(
        "CPU per record: producer {ours_us:.2} µs, kcat {kcat_us:.2} µs, ratio {:.2}; producer peak RSS {:.1} MB",
        ours_us / kcat_us,
        producer_rss.0
    ));
    let bytes = (sizes[0].1 + sizes[1].1) as f64;
    Throughput {
        records,
        trades: n_trades,
        tickers: n_tickers,
        mean_value_bytes: bytes / records as f64,
        mean_ticker_bytes: sizes[0].1 as f64 / sizes[0].0.max(1) as f64,
        mean_trade_bytes: sizes[1].1 as f64 / sizes[1].0.max(1) as f64,
        send_secs,
        ack_secs: acked_at,
        ours,
        kcat: kcat_rate,
        kcat_secs,
        kcat_cpu,
        kcat_machine_busy,
        cpu_parts,
        kcat_cpu_parts,
        producer_cpu: cpu[0],
        bench_cpu: cpu[1],
        machine_busy,
        producer_rss,
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// kcat with the settings candlestream's producer runs with on the 0.9 cluster: acks=all, gzip,
/// linger 20 ms, Java's murmur2 partitioner on the key, at most 5 requests in flight per
/// connection, and the 0.9 compatibility settings.
fn kcat(brokers: &str, topic: &str, file: &Path, log: &Path) -> std::process::Child {
    Command::new("kcat")
        .args([
            "-P",
            "-q",
            "-b",
            brokers,
            "-t",
            topic,
            "-K",
            KEY_DELIM,
            "-D",
            RECORD_DELIM,
            "-z",
            "gzip",
        ])
        .args([
            "-X",
            "acks=all",
            "-X",
            "linger.ms=20",
            "-X",
            "partitioner=murmur2_random",
            "-X",
            "max.in.flight.requests.per.connection=5",
        ])
        .args([
            "-X",
            "api.version.request=false",
            "-X",
            "broker.version.fallback=0.9.0.1",
        ])
        .arg("-l")
        .arg(file)
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("kcat not found; run tests/install-deps.sh")
}

// ---------------------------------------------------------------------------------------------
// Phases 2 and 3: end-to-end latency and cost at a given rate.

/// Records sent and not yet seen in InfluxDB, with their send times, per symbol.
#[derive(Default)]
struct Pending {
    /// symbol → (exchange ms, id) → sent.
    trades: BTreeMap<String, BTreeMap<(i64, i64), Instant>>,
    /// id → (symbol, exchange ms).
    trade_keys: HashMap<i64, (String, i64)>,
    /// symbol → (exchange ms, volume bits) → sent; volume is unique per symbol in the fake.
    tickers: BTreeMap<String, BTreeMap<(i64, u64), Instant>>,
    /// (symbol, volume bits) → exchange ms.
    ticker_keys: HashMap<(String, u64), i64>,
    trade_latencies: Vec<f64>,
    ticker_latencies: Vec<f64>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.trade_keys.is_empty() && self.ticker_keys.is_empty()
    }

    fn len(&self) -> usize {
        self.trade_keys.len() + self.ticker_keys.len()
    }

    fn add_trade(&mut self, symbol: &str, id: i64, ms: i64, sent: Instant) {
        self.trades
            .entry(symbol.to_string())
            .or_default()
            .insert((ms, id), sent);
        self.trade_keys.insert(id, (symbol.to_string(), ms));
    }

    fn add_ticker(&mut self, symbol: &str, volume: f64, ms: i64, sent: Instant) {
        self.tickers
            .entry(symbol.to_string())
            .or_default()
            .insert((ms, volume.to_bits()), sent);
        self.ticker_keys
            .insert((symbol.to_string(), volume.to_bits()), ms);
    }

    fn see_trade(&mut self, id: i64, seen: Instant) {
        if let Some((symbol, ms)) = self.trade_keys.remove(&id)
            && let Some(sent) = self
                .trades
                .get_mut(&symbol)
                .and_then(|m| m.remove(&(ms, id)))
        {
            self.trade_latencies.push((seen - sent).as_secs_f64() * 1e3);
        }
    }

    fn see_ticker(&mut self, symbol: &str, volume: f64, seen: Instant) {
        let key = (symbol.to_string(), volume.to_bits());
        if let Some(ms) = self.ticker_keys.remove(&key)
            && let Some(sent) = self
                .tickers
                .get_mut(symbol)
                .and_then(|m| m.remove(&(ms, key.1)))
        {
            self.ticker_latencies
                .push((seen - sent).as_secs_f64() * 1e3);
        }
    }

    /// One InfluxQL statement per symbol and measurement with records pending, each from that
    /// symbol's oldest pending exchange time on: a symbol's records stay in order (one
    /// partition, one writer), so each answer holds little beyond the newly stored points.
    fn statements(&self) -> Vec<(bool, String)> {
        let mut out = Vec::new();
        for (symbol, m) in &self.trades {
            if let Some(((ms, _), _)) = m.first_key_value() {
                out.push((
                    true,
                    format!("SELECT id FROM trades WHERE symbol = '{symbol}' AND time >= {ms}ms"),
                ));
            }
        }
        for (symbol, m) in &self.tickers {
            if let Some(((ms, _), _)) = m.first_key_value() {
                out.push((false, format!("SELECT symbol, volume FROM ticker WHERE symbol = '{symbol}' AND time >= {ms}ms")));
            }
        }
        out
    }
}

struct Rate {
    /// Trades per second over all symbols.
    trades: f64,
    /// Ticker updates per second over all symbols.
    tickers: f64,
}

struct Latency {
    label: String,
    sent_trades: usize,
    sent_tickers: usize,
    seconds: f64,
    all: Vec<f64>,
    trades: Vec<f64>,
    tickers: Vec<f64>,
    unseen: usize,
    polls: usize,
    poll_mean_ms: f64,
    query_p50_ms: f64,
    producer: (f64, f64, f64),
    consumer: (f64, f64, f64),
    window: f64,
    machine_busy: f64,
    cpu_parts: String,
    /// At the end of the window: records awaiting Kafka's ack in the producer, consumer lag (as
    /// last read from the brokers by the producer, every 5 s), measured records not yet in InfluxDB.
    backlog: (f64, f64, usize),
    /// From the end of the window until the last measured record was seen.
    drain_secs: f64,
}

async fn latency(env: &Env, name: &str, label: String, rate: Rate, duration: Duration) -> Latency {
    let mut phase = env.phase(name).await;
    progress(&format!("{label}: starting producer and consumer"));
    env.start_pipeline(&mut phase, true).await;
    // Warm-up: one trade and one ticker per symbol through the whole pipeline, so that group
    // joins and first connections are not measured.
    for s in SYMBOLS {
        phase.exchange.execute(s, 1).await;
        phase.exchange.emit(s).await.expect("subscribed");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while count(env, &phase.db, "trades", "price").await < SYMBOLS.len()
        || count(env, &phase.db, "ticker", "last_price").await < SYMBOLS.len()
    {
        phase.check_alive();
        if Instant::now() >= deadline {
            phase.fail("warm-up records not stored");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    progress(&format!(
        "{label}: warm, measuring for {} s",
        duration.as_secs()
    ));

    let pending = Arc::new(Mutex::new(Pending::default()));
    let driving = Arc::new(AtomicBool::new(true));
    let poller = tokio::spawn(poll(
        env.http.clone(),
        env.influx.url(),
        phase.db.clone(),
        pending.clone(),
        driving.clone(),
    ));
    let usage = Usage::start(&phase.pids());
    let started = Instant::now();
    let (mut sent_trades, mut sent_tickers, mut next_symbol, mut next_ticker) =
        (0usize, 0usize, 0usize, 0usize);
    let (mut measured_trades, mut measured_tickers) = (0usize, 0usize);
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Records sent within `duration` are measured. Sending goes on at the same rate until they
    // are all seen, so that the last ones meet the same pipeline as the others rather than an
    // idle one (a partial batch waiting for its flush interval).
    let drain_deadline = started + duration + Duration::from_secs(60);
    let mut measuring = true;
    let mut window_closed = started;
    let mut backlog = (0.0, 0.0, 0);
    loop {
        tick.tick().await;
        if measuring && started.elapsed() >= duration {
            measuring = false;
            window_closed = Instant::now();
            backlog = (
                metric_sum(
                    &env.http,
                    phase.producer_port,
                    "candlestream_kafka_in_flight",
                )
                .await,
                // The producer reads the group's lag from the brokers.
                metric_sum(
                    &env.http,
                    phase.producer_port,
                    "candlestream_consumer_lag_records",
                )
                .await,
                pending.lock().unwrap().len(),
            );
            progress(&format!(
                "{label}: sent {sent_trades} trades and {sent_tickers} tickers; sending on until their points are seen"
            ));
        }
        if !measuring && (pending.lock().unwrap().is_empty() || Instant::now() >= drain_deadline) {
            break;
        }
        if !measuring {
            phase.check_alive();
        }
        let elapsed = started.elapsed().as_secs_f64();
        // Catch up with the schedule: as many as are due by now, one symbol after another.
        while (sent_trades as f64) < rate.trades * elapsed {
            let s = SYMBOLS[next_symbol % SYMBOLS.len()];
            next_symbol += 1;
            let due = ((rate.trades * elapsed) as usize - sent_trades)
                .div_ceil(SYMBOLS.len())
                .clamp(1, 8);
            let trades = phase.exchange.execute(s, due).await;
            let at = Instant::now();
            sent_trades += trades.len();
            if measuring {
                measured_trades += trades.len();
                let mut p = pending.lock().unwrap();
                for t in &trades {
                    p.add_trade(&t.symbol, t.id, t.mts, at);
                }
            }
        }
        while (sent_tickers as f64) < rate.tickers * elapsed {
            let s = SYMBOLS[next_ticker % SYMBOLS.len()];
            next_ticker += 1;
            let sent = phase.exchange.emit(s).await.expect("subscribed");
            let at = Instant::now();
            sent_tickers += 1;
            if measuring {
                measured_tickers += 1;
                let ms = sent.exchange_time.expect("websocket update");
                pending
                    .lock()
                    .unwrap()
                    .add_ticker(&sent.symbol, sent.values[7], ms, at);
            }
        }
    }
    let drain_secs = window_closed.elapsed().as_secs_f64();
    let (cpu, window, machine_busy) = usage.stop();
    let cpu_parts = usage.breakdown();
    driving.store(false, Ordering::Relaxed);
    let (polls, poll_mean_ms, query_p50_ms) = poller.await.unwrap();
    let p = std::mem::take(&mut *pending.lock().unwrap());
    let unseen = p.len();
    // Every trade sent ends up in InfluxDB once (the warm-up's too).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut stored_trades = 0;
    while Instant::now() < deadline {
        stored_trades = count(env, &phase.db, "trades", "price").await;
        if stored_trades >= sent_trades + SYMBOLS.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        stored_trades,
        sent_trades + SYMBOLS.len(),
        "InfluxDB holds every trade sent, once"
    );
    let (sent_trades, sent_tickers, seconds) =
        (measured_trades, measured_tickers, duration.as_secs_f64());
    let rss = |proc: &Option<Proc>| rss_mb(proc.as_ref().unwrap().pid());
    let (ph, pr) = rss(&phase.producer);
    let (ch, cr) = rss(&phase.consumer);
    let mut trades = p.trade_latencies;
    let mut tickers = p.ticker_latencies;
    let mut all: Vec<f64> = trades.iter().chain(&tickers).copied().collect();
    for v in [&mut trades, &mut tickers, &mut all] {
        v.sort_by(f64::total_cmp);
    }
    progress(&format!(
        "{label}: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {} records ({unseen} never seen)",
        percentile(&all, 50.0),
        percentile(&all, 99.0),
        percentile(&all, 100.0),
        all.len()
    ));
    Latency {
        label,
        sent_trades,
        sent_tickers,
        seconds,
        all,
        trades,
        tickers,
        unseen,
        polls,
        poll_mean_ms,
        query_p50_ms,
        producer: (ph, pr, cpu[0]),
        consumer: (ch, cr, cpu[1]),
        window,
        machine_busy,
        cpu_parts,
        backlog,
        drain_secs,
    }
}

async fn count(env: &Env, db: &str, measurement: &str, field: &str) -> usize {
    let rows = env
        .influx
        .rows(db, &format!("SELECT count({field}) FROM \"{measurement}\""))
        .await;
    rows.first().and_then(|r| r["count"].as_u64()).unwrap_or(0) as usize
}

/// Queries InfluxDB every [`POLL`] for the points of pending records, from the oldest pending
/// exchange time on, and stamps each at the response that first holds it. Returns the number of
/// polls, their mean period and the median query round trip, in ms.
async fn poll(
    http: reqwest::Client,
    url: String,
    db: String,
    pending: Arc<Mutex<Pending>>,
    driving: Arc<AtomicBool>,
) -> (usize, f64, f64) {
    let started = Instant::now();
    let mut round_trips = Vec::new();
    while driving.load(Ordering::Relaxed) {
        let next = tokio::time::Instant::now() + POLL;
        let statements = pending.lock().unwrap().statements();
        if !statements.is_empty() {
            let q = statements
                .iter()
                .map(|(_, q)| q.as_str())
                .collect::<Vec<_>>()
                .join(";");
            let asked = Instant::now();
            let body = match http
                .get(format!("{url}/query"))
                .query(&[("db", db.as_str()), ("q", q.as_str()), ("epoch", "ms")])
                .send()
                .await
            {
                Ok(r) => r.json::<Value>().await.ok(),
                Err(_) => None,
            };
            let seen = Instant::now();
            round_trips.push((seen - asked).as_secs_f64() * 1e3);
            let results = body
                .as_ref()
                .and_then(|b| b["results"].as_array())
                .cloned()
                .unwrap_or_default();
            let mut p = pending.lock().unwrap();
            for ((is_trade, _), result) in statements.iter().zip(&results) {
                for row in rows(result) {
                    if *is_trade {
                        if let Some(id) = row.first().and_then(Value::as_i64) {
                            p.see_trade(id, seen);
                        }
                    } else if let (Some(symbol), Some(volume)) = (
                        row.first().and_then(Value::as_str),
                        row.get(1).and_then(Value::as_f64),
                    ) {
                        p.see_ticker(symbol, volume, seen);
                    }
                }
            }
        }
        tokio::time::sleep_until(next).await;
    }
    let polls = round_trips.len();
    round_trips.sort_by(f64::total_cmp);
    (
        polls,
        started.elapsed().as_secs_f64() * 1e3 / polls.max(1) as f64,
        percentile(&round_trips, 50.0),
    )
}

// ---------------------------------------------------------------------------------------------

async fn run(plan: Plan) -> String {
    let total = Instant::now();
    let env = Env::start().await;
    let tp = throughput(&env, plan.flat_out).await;
    if plan.throughput_only {
        return table(&tp, &[]);
    }

    let live = latency(
        &env,
        "live",
        "live-like rate".into(),
        Rate {
            trades: 50.0,
            tickers: SYMBOLS.len() as f64 / 10.0,
        },
        plan.live,
    )
    .await;
    let high = latency(
        &env,
        "high",
        "5 000 records/s".into(),
        Rate {
            trades: 4_800.0,
            tickers: 200.0,
        },
        plan.high,
    )
    .await;
    progress(&format!("done in {:.0} s", total.elapsed().as_secs_f64()));
    table(&tp, &[&live, &high])
}

fn table(tp: &Throughput, runs: &[&Latency]) -> String {
    let mut t = String::new();
    let ms = |v: &[f64], p: f64| format!("{:.0}", percentile(v, p));
    t.push_str(
        "| measure | candlestream | plain tool | ratio / goal |\n| --- | --- | --- | --- |\n",
    );
    t.push_str(&format!(
        "| producer throughput: {} records ({} trades, {} tickers; values {:.0} B on average), acks=all, records/s from the first send to the last ack | {:.0} /s | kcat: {:.0} /s | {:.2} (goal ≥ 0.8) |\n",
        tp.records,
        tp.trades,
        tp.tickers,
        tp.mean_value_bytes,
        tp.ours,
        tp.kcat,
        tp.ours / tp.kcat,
    ));
    let (ours_us, kcat_us) = (
        tp.producer_cpu / tp.records as f64 * 1e6,
        tp.kcat_cpu / tp.records as f64 * 1e6,
    );
    t.push_str(&format!(
        "| producer CPU per record (user + system), same records | {ours_us:.1} µs | kcat: {kcat_us:.1} µs | {:.2} (goal ≤ 2) |\n",
        ours_us / kcat_us,
    ));
    for r in runs {
        let goal = if r.label.starts_with("live") {
            "goal p99 ≤ 100 ms"
        } else {
            "-"
        };
        t.push_str(&format!(
            "| end-to-end latency at {}: {:.0} trades/s + {:.1} tickers/s, 6 symbols, {} records: p50 / p99 / max | {} / {} / {} ms | - | {goal} |\n",
            r.label,
            r.sent_trades as f64 / r.seconds,
            r.sent_tickers as f64 / r.seconds,
            r.all.len(),
            ms(&r.all, 50.0),
            ms(&r.all, 99.0),
            ms(&r.all, 100.0),
        ));
    }
    for r in runs {
        let goals = if r.label.starts_with('5') {
            ("goal < 30 MB", "goal < 50 MB")
        } else {
            ("-", "-")
        };
        for (who, (hwm, now, cpu), goal) in [
            ("producer", r.producer, goals.0),
            ("consumer", r.consumer, goals.1),
        ] {
            t.push_str(&format!(
                "| {who} at {}: peak RSS (VmHWM), RSS at the end; CPU over {:.0} s | {hwm:.1} MB, {now:.1} MB; {cpu:.1} CPU s ({:.0} % of a core) | - | {goal} |\n",
                r.label,
                r.window,
                cpu / r.window * 100.0,
            ));
        }
    }
    t.push('\n');
    t.push_str(&format!(
        "- Throughput: the fake exchange (in the bench process) sent for {:.1} s ({:.0} records/s), the last ack came {:.2} s after the first send. \
         Producer: {:.1} CPU s ({:.1} µs per record, {:.0} % of a core), peak RSS {:.1} MB; fake exchange + bench: {:.1} CPU s; machine {:.0} % busy. \
         kcat: {:.2} s from start to exit for the same records (tickers {:.0} B, trades {:.0} B, read back from the topics byte for byte; two kcat processes, one per topic, in parallel), {:.1} CPU s ({:.1} µs per record); machine {:.0} % busy.\n",
        tp.send_secs,
        tp.records as f64 / tp.send_secs,
        tp.ack_secs,
        tp.producer_cpu,
        tp.producer_cpu / tp.records as f64 * 1e6,
        tp.producer_cpu / tp.ack_secs * 100.0,
        tp.producer_rss.0,
        tp.bench_cpu,
        tp.machine_busy * 100.0,
        tp.kcat_secs,
        tp.mean_ticker_bytes,
        tp.mean_trade_bytes,
        tp.kcat_cpu,
        tp.kcat_cpu / tp.records as f64 * 1e6,
        tp.kcat_machine_busy * 100.0,
    ));
    t.push_str(&format!(
        "- CPU seconds by part while candlestream produced: {}; while kcat produced: {}.\n",
        tp.cpu_parts, tp.kcat_cpu_parts
    ));
    for r in runs {
        t.push_str(&format!(
            "- Latency at {}: trades p50 / p99 {} / {} ms ({}), tickers p50 / p99 {} / {} ms ({}); {} never seen. InfluxDB polled {} times, every {:.1} ms on average (query round trip p50 {:.1} ms), so figures are upper bounds by up to one poll period plus a round trip. Machine {:.0} % busy.\n",
            r.label,
            ms(&r.trades, 50.0),
            ms(&r.trades, 99.0),
            r.trades.len(),
            ms(&r.tickers, 50.0),
            ms(&r.tickers, 99.0),
            r.tickers.len(),
            r.unseen,
            r.polls,
            r.poll_mean_ms,
            r.query_p50_ms,
            r.machine_busy * 100.0,
        ));
        t.push_str(&format!(
            "- At {}, when the window closed: {:.0} records awaiting Kafka's ack in the producer, consumer lag {:.0} (librdkafka statistics, 5 s old at most), {} measured records not yet in InfluxDB; the last was seen {:.1} s later. CPU seconds by part over {:.0} s: {}.\n",
            r.label, r.backlog.0, r.backlog.1, r.backlog.2, r.drain_secs, r.window, r.cpu_parts,
        ));
    }
    if !runs.is_empty() {
        t.push_str(
            "- Latency runs from the fake exchange writing a record's frame to its websocket to the first InfluxDB query that returns the point. \
             All parts run on this 2-core machine: 3 Kafka brokers and ZooKeeper (JVMs), InfluxDB 1.6.7, the fake exchange and Schema Registry, producer, consumer.\n",
        );
    }
    t.push_str(
        "- Settings: candlestream's defaults (linger.ms 20, influx.batch_size 500, influx.flush_interval 0 s (group commit), 1 consumer worker), except for Kafka 0.9: the test-only overrides \
         enable.idempotence=false, compression.type=gzip (not lz4), api.version.request=false, broker.version.fallback=0.9.0.1, and consumer session.timeout.ms 10 s (0.9 caps it at 30 s); kcat gets the same acks=all, gzip, linger.ms 20, murmur2_random partitioner and max.in.flight.requests.per.connection 5. \
         Topics: 3 partitions, replication 3, min.insync.replicas 2. Backfill off (the fake has no history). The fake repeats every trade as `tu` 100 ms after its `te`, as Bitfinex does; the producer drops the repeats.\n",
    );
    t
}
