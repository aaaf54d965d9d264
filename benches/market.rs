//! A whole market on real parts: 300 pairs from one pattern (`t*USD`) on the fake exchange →
//! the `candlestream producer` binary → Kafka 0.9.0.1 (3 brokers, replication 3,
//! min.insync.replicas 2, acks=all) → the `candlestream consumer` binary → InfluxDB 1.6.7, for
//! 10 minutes at live-like market rates. Run by `benches/market.sh`; prints one Markdown table
//! on stdout (progress on stderr).
//!
//! - The fake lists 303 pairs (300 USD ones and 3 others) and enforces Bitfinex's websocket
//!   limits, unscaled: 25 channels per connection, 20 upgrades per rolling minute (HTTP 429
//!   beyond), counting every refusal. The producer runs with Bitfinex's defaults (20 opens a
//!   minute, 25 channels a connection, the REST budgets), so its ramp-up to 24 connections takes
//!   over a minute while REST polls the tickers of the pairs still waiting.
//! - Once every channel is subscribed and a warm-up trade and ticker per pair are stored, the
//!   fake trades at 300 trades/s with a 5 s burst to 3 000 trades/s every minute, skewed like a
//!   market (3 hot pairs carry 60 % of the trades, 27 warm ones 30 %, the 270 others 10 %), and
//!   sends 30 ticker updates a second (each pair every 10 s).
//! - Latency runs from the fake writing a record's frame to its websocket to the first InfluxDB
//!   query that returns the point (queried every [`POLL`]).
//! - At the end every trade the fake executed must be in InfluxDB exactly once (same ids, same
//!   symbols, nothing extra); the bench fails otherwise.
//!
//! Every setting is candlestream's default except what this machine needs, as in
//! benches/pipeline.rs: Kafka 0.9 compatibility overrides, InfluxDB 1.x, backfill off (the fake
//! has no history from before the bench).

#[path = "../tests/support/mod.rs"]
mod support;

#[path = "measure.rs"]
mod measure;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candlestream::config::{InfluxApi, Settings};
use futures::future::join_all;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use measure::{Pending, Polls, Usage, metric_sum, percentile, poll, rss_mb};
use support::fake_bitfinex::FakeBitfinex;
use support::fake_registry::FakeRegistry;
use support::influx1::Influx1;
use support::kafka09::{KafkaCluster, client_overrides, producer_overrides};
use support::rig::free_port;
use support::{Process, settings_toml, unique};

const PAIRS: usize = 300;
/// Bitfinex's websocket limits, enforced by the fake as Bitfinex does.
const CHANNELS_PER_CONNECTION: usize = 25;
const UPGRADES_PER_MINUTE: usize = 20;
const MINUTE: Duration = Duration::from_secs(60);
/// Trades per second outside bursts, and during the burst of every minute.
const BASE_RATE: f64 = 300.0;
const BURST_RATE: f64 = 3_000.0;
/// Bursts start this far into every minute of the window and last `BURST_SECS`.
const BURST_AT_SECS: f64 = 30.0;
const BURST_SECS: f64 = 5.0;
/// Ticker updates per second over all pairs: each pair every 10 s.
const TICKER_RATE: f64 = 30.0;
/// How often InfluxDB is queried for the points of records not seen yet.
const POLL: Duration = Duration::from_millis(10);
/// How long the ramp-up may take: 24 connections at 20 a minute is 72 s; more is a failure.
const RAMP_WAIT: Duration = Duration::from_secs(240);

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    // --quick: 2 minutes (two bursts) instead of 10, for trying the bench, not for figures.
    let window = Duration::from_secs(if quick { 120 } else { 600 });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let table = rt.block_on(run(window));
    println!("{table}");
}

fn progress(msg: &str) {
    eprintln!("market bench: {msg}");
}

/// `t*USD` pairs `tP000USD`… as Bitfinex would list them.
fn usd_pairs() -> Vec<String> {
    (0..PAIRS).map(|i| format!("tP{i:03}USD")).collect()
}

/// Trades due by `t` seconds into the window: the base rate throughout plus the bursts' excess.
fn trades_due(t: f64) -> f64 {
    let minutes = (t / 60.0).floor();
    let in_burst = (t - minutes * 60.0 - BURST_AT_SECS).clamp(0.0, BURST_SECS);
    BASE_RATE * t + (BURST_RATE - BASE_RATE) * (minutes * BURST_SECS + in_burst)
}

/// Picks pairs with a market's skew: 3 hot pairs 20 % each, 27 warm ones 30 % together, the
/// 270 others 10 % together (about one trade every 9 s each at the base rate).
struct Skew {
    /// Cumulative weights, one per pair, ending at 1.
    cumulative: Vec<f64>,
    rng: StdRng,
}

impl Skew {
    fn new() -> Self {
        let mut total = 0.0;
        let cumulative = (0..PAIRS)
            .map(|i| {
                total += match i {
                    0..3 => 0.2,
                    3..30 => 0.3 / 27.0,
                    _ => 0.1 / (PAIRS - 30) as f64,
                };
                total
            })
            .collect();
        Self {
            cumulative,
            rng: StdRng::seed_from_u64(18),
        }
    }

    fn pick(&mut self) -> usize {
        let x: f64 = self.rng.random::<f64>() * self.cumulative[PAIRS - 1];
        self.cumulative.partition_point(|&c| c <= x).min(PAIRS - 1)
    }
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

    fn tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

/// Everything the bench runs: the cluster, InfluxDB, the registry, the fake exchange, and the
/// producer and consumer processes.
struct Env {
    _cluster: KafkaCluster,
    influx: Influx1,
    _registry: FakeRegistry,
    dir: tempfile::TempDir,
    http: reqwest::Client,
    exchange: FakeBitfinex,
    settings: Settings,
    db: String,
    producer: Option<Proc>,
    consumer: Option<Proc>,
    producer_port: u16,
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
            .prefix("market-bench-")
            .tempdir()
            .unwrap();
        let topic = unique("market");
        for t in [topic.clone(), format!("{topic}-trades")] {
            tokio::task::block_in_place(|| cluster.create_topic(&t, 3, 3, 2));
        }
        let db = topic.replace('-', "_");
        influx.create_database(&db).await;
        let exchange = FakeBitfinex::start().await;
        let mut listing = usd_pairs();
        listing.extend(["tBTCEUR", "tETHBTC", "tTESTBTC:TESTUSDT"].map(String::from));
        exchange.set_listing(&listing.iter().map(String::as_str).collect::<Vec<_>>());
        exchange.set_ws_limits(CHANNELS_PER_CONNECTION, UPGRADES_PER_MINUTE, MINUTE);
        let mut s = Settings::default();
        s.bitfinex.ws_url = exchange.ws_url();
        s.bitfinex.rest_url = exchange.rest_url();
        s.bitfinex.symbols = vec!["t*USD".into()];
        s.bitfinex.backfill = Duration::ZERO;
        s.kafka.brokers = cluster.bootstrap();
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
        s.schema_registry.url = registry.url();
        s.influx.api = InfluxApi::V1;
        s.influx.url = influx.url();
        s.influx.database = db.clone();
        Self {
            _cluster: cluster,
            influx,
            _registry: registry,
            dir,
            http: reqwest::Client::new(),
            exchange,
            settings: s,
            db,
            producer: None,
            consumer: None,
            producer_port: free_port(),
        }
    }

    fn spawn(&self, name: &'static str) -> Proc {
        let mut s = self.settings.clone();
        let port = if name == "producer" {
            self.producer_port
        } else {
            free_port()
        };
        s.http.listen = ([127, 0, 0, 1], port).into();
        let config = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(&config, settings_toml(&s)).unwrap();
        let log = self.dir.path().join(format!("{name}.log"));
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

    fn procs(&self) -> impl Iterator<Item = &Proc> {
        self.producer.iter().chain(self.consumer.iter())
    }

    fn pids(&self) -> Vec<String> {
        self.procs().map(|p| p.pid().to_string()).collect()
    }

    /// Fails the bench with `what` and the tails of the processes' logs.
    fn fail(&self, what: &str) -> ! {
        let logs: Vec<String> = self
            .procs()
            .map(|p| format!("--- {} log:\n{}", p.name, p.tail()))
            .collect();
        panic!("{what}\n{}", logs.join("\n"));
    }

    /// Fails the bench when the producer or the consumer has exited.
    fn check_alive(&mut self) {
        let mut exited = None;
        for p in self.producer.iter_mut().chain(self.consumer.iter_mut()) {
            if let Ok(Some(status)) = p.process.0.try_wait() {
                exited = Some(format!("{} exited ({status})", p.name));
            }
        }
        if let Some(what) = exited {
            self.fail(&what);
        }
    }

    async fn count(&self, measurement: &str, field: &str) -> usize {
        let q = format!("SELECT count({field}) FROM \"{measurement}\"");
        let rows = self.influx.rows(&self.db, &q).await;
        rows.first().and_then(|r| r["count"].as_u64()).unwrap_or(0) as usize
    }
}

/// REST endpoints of the fake, by the name `rest_requests_by` knows them, and the listing.
const ENDPOINTS: [&str; 4] = ["tickers", "trades", "candles", "listing"];

/// Once a second from the producer's start: REST requests so far by endpoint, and the RSS of
/// the producer and the consumer.
#[derive(Default)]
struct Samples {
    at: Vec<Instant>,
    rest: Vec<[u64; 4]>,
    rss: Vec<(f64, f64)>,
}

impl Samples {
    /// The most requests to endpoint `e` within any rolling minute (to the second the samples
    /// allow), and the mean per minute.
    fn rest_per_minute(&self, e: usize) -> (u64, f64) {
        let mut most = 0;
        for i in 0..self.at.len() {
            let j = self.at[i..]
                .iter()
                .take_while(|t| t.duration_since(self.at[i]) <= MINUTE)
                .count();
            // Requests after sample i up to sample i + j - 1: within one minute.
            most = most.max(self.rest[i + j - 1][e] - self.rest[i][e]);
        }
        let total = self.rest.last().map_or(0, |r| r[e]);
        let span = match (self.at.first(), self.at.last()) {
            (Some(a), Some(b)) => b.duration_since(*a).as_secs_f64() / 60.0,
            _ => 1.0,
        };
        (most, total as f64 / span.max(1.0 / 60.0))
    }
}

fn rest_counts(ex: &FakeBitfinex) -> [u64; 4] {
    [
        ex.rest_requests_by("tickers"),
        ex.rest_requests_by("trades"),
        ex.rest_requests_by("candles"),
        ex.listing_requests(),
    ]
}

/// What the window measured.
struct Measured {
    window: f64,
    trades: usize,
    burst_trades: usize,
    tickers: usize,
    latencies: Vec<f64>,
    trade_latencies: Vec<f64>,
    ticker_latencies: Vec<f64>,
    unseen: usize,
    polls: Polls,
    producer_cpu: f64,
    consumer_cpu: f64,
    machine_busy: f64,
    cpu_parts: String,
    /// When the window closed: records awaiting Kafka's ack, consumer lag, measured records not
    /// yet in InfluxDB.
    backlog: (f64, f64, usize),
    drain_secs: f64,
}

async fn run(window: Duration) -> String {
    let total = Instant::now();
    let mut env = Env::start().await;
    let pairs = usd_pairs();
    let pair_refs: Vec<&str> = pairs.iter().map(String::as_str).collect();

    progress("starting the consumer and the producer on t*USD (300 of 303 listed pairs)");
    env.consumer = Some(env.spawn("consumer"));
    env.producer = Some(env.spawn("producer"));
    let mut sampler = Sampler {
        samples: Samples::default(),
        pids: (
            env.producer.as_ref().unwrap().pid(),
            env.consumer.as_ref().unwrap().pid(),
        ),
    };
    sampler.sample(&env.exchange);
    let ramp_started = Instant::now();
    let ramp_deadline = ramp_started + RAMP_WAIT;
    // Ramp-up: sampled here once a second until every channel is subscribed.
    let mut next_sample = Instant::now() + Duration::from_secs(1);
    loop {
        let tickers_ok = subscribed_all(&env.exchange.subscribed(), &pair_refs);
        let trades_ok = subscribed_all(&env.exchange.trades_subscribed(), &pair_refs);
        if tickers_ok && trades_ok {
            break;
        }
        if Instant::now() >= ramp_deadline {
            env.fail(&format!(
                "ramp-up: {} ticker and {} trades channels of {PAIRS} subscribed after {RAMP_WAIT:?}",
                env.exchange.subscribed().len(),
                env.exchange.trades_subscribed().len()
            ));
        }
        env.check_alive();
        if Instant::now() >= next_sample {
            sampler.sample(&env.exchange);
            next_sample += Duration::from_secs(1);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ramp = ramp_started.elapsed();
    let connections = env.exchange.channels_per_open_connection();
    progress(&format!(
        "ramp-up: {} channels on {} connections in {:.1} s",
        connections.iter().sum::<usize>(),
        connections.len(),
        ramp.as_secs_f64()
    ));

    // Warm-up: one trade and one ticker per pair through the whole pipeline, so that group joins
    // and first writes are not measured.
    for s in &pair_refs {
        env.exchange.execute(s, 1).await;
        env.exchange.emit(s).await.expect("subscribed");
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while env.count("trades", "price").await < PAIRS
        || env.count("ticker", "last_price").await < PAIRS
    {
        env.check_alive();
        if Instant::now() >= deadline {
            env.fail("warm-up records not stored");
        }
        if Instant::now() >= next_sample {
            sampler.sample(&env.exchange);
            next_sample += Duration::from_secs(1);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    progress(&format!("warm; measuring for {} s", window.as_secs()));

    let measured = drive(&mut env, &pair_refs, window, &mut sampler, &mut next_sample).await;

    // Exact count: every trade the fake executed (warm-up and drain included) is in InfluxDB
    // once, with its symbol, and nothing else is.
    let ledger = env.exchange.ledger();
    let deadline = Instant::now() + Duration::from_secs(120);
    while env.count("trades", "price").await < ledger.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sampler.sample(&env.exchange);
    let (producer_rss, consumer_rss) = (
        rss_mb(env.producer.as_ref().unwrap().pid()),
        rss_mb(env.consumer.as_ref().unwrap().pid()),
    );
    let rows = env
        .influx
        .rows(&env.db, "SELECT symbol, id FROM trades")
        .await;
    let mut stored: HashMap<i64, String> = HashMap::with_capacity(rows.len());
    let mut doubled = 0;
    for r in &rows {
        let id = r["id"].as_i64().expect("integer id");
        let symbol = r["symbol"].as_str().unwrap_or_default().to_string();
        if stored.insert(id, symbol).is_some() {
            doubled += 1;
        }
    }
    let executed: HashSet<i64> = ledger.iter().map(|t| t.id).collect();
    let missing = ledger
        .iter()
        .filter(|t| stored.get(&t.id) != Some(&t.symbol))
        .count();
    let extra = stored.keys().filter(|id| !executed.contains(id)).count();
    if (missing, extra, doubled) != (0, 0, 0) || rows.len() != ledger.len() {
        env.fail(&format!(
            "exact count: executed {}, stored {} points: {missing} missing or under another symbol, {extra} never executed, {doubled} stored twice",
            ledger.len(),
            rows.len()
        ));
    }
    progress(&format!(
        "exact: {} trades executed, {} stored, each once",
        ledger.len(),
        rows.len()
    ));

    let most_opens = env.exchange.most_upgrades_within(MINUTE);
    let limits = Limits {
        ramp_secs: ramp.as_secs_f64(),
        connections: connections.len(),
        channels: connections.iter().sum(),
        upgrades: env.exchange.upgrades(),
        most_opens,
        refused_upgrades: env.exchange.refused_upgrades(),
        refused_channels: env.exchange.refused_channels(),
    };
    progress(&format!("done in {:.0} s", total.elapsed().as_secs_f64()));
    table(
        &measured,
        &limits,
        &sampler.samples,
        ledger.len(),
        producer_rss,
        consumer_rss,
    )
}

/// Takes the once-a-second samples, on the bench's main task.
struct Sampler {
    samples: Samples,
    /// Producer and consumer.
    pids: (u32, u32),
}

impl Sampler {
    fn sample(&mut self, ex: &FakeBitfinex) {
        let s = &mut self.samples;
        s.at.push(Instant::now());
        s.rest.push(rest_counts(ex));
        s.rss.push((rss_mb(self.pids.0).1, rss_mb(self.pids.1).1));
    }
}

fn subscribed_all(have: &[String], want: &[&str]) -> bool {
    let have: HashSet<&str> = have.iter().map(String::as_str).collect();
    want.iter().all(|w| have.contains(w))
}

/// Trades and tickers at the market's rates for `window`, latency of each record sent within
/// it; then the same base rate, unmeasured, until every measured record is seen.
async fn drive(
    env: &mut Env,
    pairs: &[&str],
    window: Duration,
    sampler: &mut Sampler,
    next_sample: &mut Instant,
) -> Measured {
    let pending = Arc::new(Mutex::new(Pending::default()));
    let driving = Arc::new(AtomicBool::new(true));
    let poller = tokio::spawn(poll(
        env.http.clone(),
        env.influx.url(),
        env.db.clone(),
        POLL,
        pending.clone(),
        driving.clone(),
    ));
    let usage = Usage::start(&env.pids());
    let started = Instant::now();
    let mut skew = Skew::new();
    let (mut sent_trades, mut sent_tickers, mut next_ticker) = (0usize, 0usize, 0usize);
    let (mut trades, mut burst_trades, mut tickers) = (0usize, 0usize, 0usize);
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Records sent within the window are measured. Sending goes on at the base rate until they
    // are all seen, so that the last ones meet the same pipeline as the others rather than an
    // idle one.
    let drain_deadline = started + window + Duration::from_secs(120);
    let (mut measuring, mut window_closed, mut backlog) = (true, started, (0.0, 0.0, 0));
    let (mut drain_trades, mut drain_tickers) = (0.0, 0.0);
    let mut minute = 0;
    loop {
        tick.tick().await;
        let elapsed = started.elapsed().as_secs_f64();
        if measuring && elapsed >= window.as_secs_f64() {
            measuring = false;
            window_closed = Instant::now();
            (drain_trades, drain_tickers) = (sent_trades as f64, sent_tickers as f64);
            backlog = (
                metric_sum(&env.http, env.producer_port, "candlestream_kafka_in_flight").await,
                // The producer reads the group's lag from the brokers.
                metric_sum(
                    &env.http,
                    env.producer_port,
                    "candlestream_consumer_lag_records",
                )
                .await,
                pending.lock().unwrap().len(),
            );
            progress(&format!(
                "sent {trades} trades and {tickers} tickers; sending on at the base rate until their points are seen"
            ));
        }
        if !measuring && (pending.lock().unwrap().is_empty() || Instant::now() >= drain_deadline) {
            break;
        }
        if Instant::now() >= *next_sample {
            env.check_alive();
            sampler.sample(&env.exchange);
            *next_sample += Duration::from_secs(1);
            if measuring && elapsed >= (minute + 1) as f64 * 60.0 {
                minute += 1;
                progress(&format!(
                    "minute {minute}: {trades} trades, {tickers} tickers sent, {} pending",
                    pending.lock().unwrap().len()
                ));
            }
        }
        let (due_trades, due_tickers) = if measuring {
            (trades_due(elapsed), TICKER_RATE * elapsed)
        } else {
            let after = window_closed.elapsed().as_secs_f64();
            (
                drain_trades + BASE_RATE * after,
                drain_tickers + TICKER_RATE * after,
            )
        };
        // As many as are due by now, each on a pair picked with the market's skew; at most a
        // few hundred per tick so that a stall is caught up over several ticks.
        let n = (due_trades as usize).saturating_sub(sent_trades).min(300);
        let mut batch: BTreeMap<usize, usize> = BTreeMap::new();
        for _ in 0..n {
            *batch.entry(skew.pick()).or_default() += 1;
        }
        let executed = join_all(
            batch
                .iter()
                .map(|(&i, &count)| env.exchange.execute(pairs[i], count)),
        )
        .await;
        let at = Instant::now();
        let in_burst = {
            let in_minute = elapsed % 60.0;
            (BURST_AT_SECS..BURST_AT_SECS + BURST_SECS).contains(&in_minute)
        };
        for t in executed.iter().flatten() {
            sent_trades += 1;
            if measuring {
                trades += 1;
                burst_trades += usize::from(in_burst);
                pending.lock().unwrap().add_trade(t.id, t.mts, at);
            }
        }
        let n = (due_tickers as usize).saturating_sub(sent_tickers);
        let symbols: Vec<&str> = (0..n)
            .map(|k| pairs[(next_ticker + k) % pairs.len()])
            .collect();
        next_ticker += n;
        let sent = join_all(symbols.iter().map(|s| env.exchange.emit(s))).await;
        let at = Instant::now();
        for s in sent {
            let s = s.expect("subscribed");
            sent_tickers += 1;
            if measuring {
                tickers += 1;
                let ms = s.exchange_time.expect("websocket update");
                pending
                    .lock()
                    .unwrap()
                    .add_ticker(&s.symbol, s.values[7], ms, at);
            }
        }
    }
    let drain_secs = window_closed.elapsed().as_secs_f64();
    let (cpu, _, machine_busy) = usage.stop();
    let cpu_parts = usage.breakdown();
    driving.store(false, Ordering::Relaxed);
    let polls = poller.await.unwrap();
    let p = std::mem::take(&mut *pending.lock().unwrap());
    let unseen = p.len();
    let mut trade_latencies = p.trade_latencies;
    let mut ticker_latencies = p.ticker_latencies;
    let mut latencies: Vec<f64> = trade_latencies
        .iter()
        .chain(&ticker_latencies)
        .copied()
        .collect();
    for v in [&mut trade_latencies, &mut ticker_latencies, &mut latencies] {
        v.sort_by(f64::total_cmp);
    }
    progress(&format!(
        "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {} records ({unseen} never seen)",
        percentile(&latencies, 50.0),
        percentile(&latencies, 99.0),
        percentile(&latencies, 100.0),
        latencies.len()
    ));
    Measured {
        window: window.as_secs_f64(),
        trades,
        burst_trades,
        tickers,
        latencies,
        trade_latencies,
        ticker_latencies,
        unseen,
        polls,
        producer_cpu: cpu[0],
        consumer_cpu: cpu[1],
        machine_busy,
        cpu_parts,
        backlog,
        drain_secs,
    }
}

/// Bitfinex's limits as the fake saw them.
struct Limits {
    ramp_secs: f64,
    connections: usize,
    channels: usize,
    upgrades: usize,
    most_opens: usize,
    refused_upgrades: u64,
    refused_channels: u64,
}

fn table(
    m: &Measured,
    l: &Limits,
    s: &Samples,
    executed: usize,
    producer_rss: (f64, f64),
    consumer_rss: (f64, f64),
) -> String {
    let ms = |v: &[f64], p: f64| format!("{:.0}", percentile(v, p));
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    let mut t = String::from("| measure | value | goal |\n| --- | --- | --- |\n");
    t.push_str(&format!(
        "| load: 300 pairs from `t*USD` (303 listed), {:.0} s; trades at 300/s with a 5 s burst to 3 000/s every minute, skewed (3 pairs 60 %, 27 pairs 30 %, 270 pairs 10 %); tickers 30/s | {} trades ({} in bursts; {:.0}/s on average), {} tickers | - |\n",
        m.window,
        m.trades,
        m.burst_trades,
        m.trades as f64 / m.window,
        m.tickers,
    ));
    t.push_str(&format!(
        "| end-to-end latency, exchange frame sent → point queryable in InfluxDB, {} records: p50 / p99 / max | {} / {} / {} ms | - |\n",
        m.latencies.len(),
        ms(&m.latencies, 50.0),
        ms(&m.latencies, 99.0),
        ms(&m.latencies, 100.0),
    ));
    for (who, (hwm, now), cpu) in [
        ("producer", producer_rss, m.producer_cpu),
        ("consumer", consumer_rss, m.consumer_cpu),
    ] {
        t.push_str(&format!(
            "| {who}: peak RSS (VmHWM), RSS at the end; CPU over the {:.0} s window | {hwm:.1} MB, {now:.1} MB; {cpu:.1} CPU s ({:.1} % of a core) | < 60 MB: {} |\n",
            m.window,
            cpu / m.window * 100.0,
            met(hwm < 60.0),
        ));
    }
    t.push_str(&format!(
        "| websocket connection opens: the most in any rolling minute (fake's upgrade times), all opens; refused: 429 on upgrade, 10305 beyond 25 channels | {} in a minute, {} opens; {} / {} refused | ≤ 20 a minute, nothing refused: {} |\n",
        l.most_opens,
        l.upgrades,
        l.refused_upgrades,
        l.refused_channels,
        met(l.most_opens <= UPGRADES_PER_MINUTE && l.refused_upgrades + l.refused_channels == 0),
    ));
    t.push_str(&format!(
        "| ramp-up from start to every channel subscribed | {:.1} s: {} channels on {} connections | - |\n",
        l.ramp_secs, l.channels, l.connections,
    ));
    let run_minutes = match (s.at.first(), s.at.last()) {
        (Some(a), Some(b)) => b.duration_since(*a).as_secs_f64() / 60.0,
        _ => 0.0,
    };
    let rest: Vec<String> = ENDPOINTS
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let (most, mean) = s.rest_per_minute(i);
            let total = s.rest.last().map_or(0, |r| r[i]);
            format!("{e}: {total} ({mean:.1}/min, at most {most} in a minute)")
        })
        .collect();
    t.push_str(&format!(
        "| REST requests by endpoint over the whole run ({run_minutes:.1} min from the producer's start) | {} | tickers ≤ 90, trades ≤ 12, candles ≤ 10 a minute (the producer's budgets) |\n",
        rest.join("; "),
    ));
    t.push_str(&format!(
        "| exact count: trades the fake executed (warm-up and drain included) vs points in InfluxDB | {executed} executed, {executed} stored, each once, none extra | exact: met |\n",
    ));
    t.push_str(&format!(
        "| machine busy over the window (2 cores, shared) | {:.0} % | - |\n",
        m.machine_busy * 100.0
    ));
    t.push('\n');
    let peak_sampled = |f: fn(&(f64, f64)) -> f64| s.rss.iter().map(f).fold(0.0, f64::max);
    t.push_str(&format!(
        "- Latency: trades p50 / p99 / max {} / {} / {} ms ({}), tickers {} / {} / {} ms ({}); {} never seen. InfluxDB polled {} times, every {:.1} ms on average (query round trip p50 {:.1} ms), so figures are upper bounds by up to one poll period plus a round trip.\n",
        ms(&m.trade_latencies, 50.0),
        ms(&m.trade_latencies, 99.0),
        ms(&m.trade_latencies, 100.0),
        m.trade_latencies.len(),
        ms(&m.ticker_latencies, 50.0),
        ms(&m.ticker_latencies, 99.0),
        ms(&m.ticker_latencies, 100.0),
        m.ticker_latencies.len(),
        m.unseen,
        m.polls.count,
        m.polls.mean_period_ms,
        m.polls.round_trip_p50_ms,
    ));
    t.push_str(&format!(
        "- When the window closed: {:.0} records awaiting Kafka's ack in the producer, consumer lag {:.0} (librdkafka statistics, 5 s old at most), {} measured records not yet in InfluxDB; the last was seen {:.1} s later. RSS sampled every second from the start, highest: producer {:.1} MB, consumer {:.1} MB.\n",
        m.backlog.0,
        m.backlog.1,
        m.backlog.2,
        m.drain_secs,
        peak_sampled(|r| r.0),
        peak_sampled(|r| r.1),
    ));
    t.push_str(&format!(
        "- CPU seconds by part over the {:.0} s window: {}.\n",
        m.window, m.cpu_parts
    ));
    t.push_str(
        "- All parts run on this 2-core machine: 3 Kafka brokers and ZooKeeper (JVMs), InfluxDB 1.6.7, the fake exchange and Schema Registry (in the bench process), producer, consumer. \
         The fake enforces Bitfinex's limits unscaled (25 channels per connection, 20 upgrades per rolling minute) and repeats every trade as `tu` 100 ms after its `te`.\n",
    );
    t.push_str(
        "- Settings: candlestream's defaults (connections_per_minute 20, channels_per_connection 25, rest_tickers_per_minute 90, linger.ms 20, influx.batch_size 500, 1 consumer worker), except for Kafka 0.9 \
         (enable.idempotence=false, compression.type=gzip, api.version.request=false, broker.version.fallback=0.9.0.1, consumer session.timeout.ms 10 s) and backfill off (the fake has no history). \
         Topics: 3 partitions, replication 3, min.insync.replicas 2.\n",
    );
    t
}
