//! Consumer integration tests: Kafka (librdkafka's mock cluster) → consumer group → a real
//! InfluxDB 1.x, plus the v2 API against a faithful fake of `/api/v2/write`.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use candlestream::candles::{Record, Tick};
use candlestream::config::{InfluxApi, Settings};
use candlestream::consumer::dlq_header;
use rdkafka::mocking::MockCluster;

use support::fake_registry::FakeRegistry;
use support::influx1::Influx1;
use support::pipeline::*;
use support::{eventually_async, read_all, unique};

const SYMBOLS: [&str; 3] = ["tBTCUSD", "tETHUSD", "tSOLUSD"];
const START_MS: i64 = 1_763_787_600_000;

struct Setup {
    topic: String,
    cluster: MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    registry: FakeRegistry,
    influx: Influx1,
    db: String,
    settings: Settings,
}

impl Setup {
    async fn new() -> Self {
        let topic = unique("ticks");
        let cluster = MockCluster::new(3).unwrap();
        cluster.create_topic(&topic, 3, 3).unwrap();
        cluster.create_topic(&format!("{topic}-trades"), 3, 3).unwrap();
        cluster.create_topic(&format!("{topic}-dlq"), 1, 3).unwrap();
        let registry = FakeRegistry::start().await;
        let influx = tokio::task::spawn_blocking(Influx1::start).await.unwrap();
        let db = topic.replace('-', "_");
        influx.create_database(&db).await;
        let mut settings = Settings::default();
        settings.kafka.brokers = cluster.bootstrap_servers();
        settings.kafka.topic = topic.clone();
        settings.kafka.trades_topic = format!("{topic}-trades");
        settings.kafka.dlq_topic = format!("{topic}-dlq");
        settings.kafka.group_id = format!("{topic}-group");
        settings.schema_registry.url = registry.url();
        influx.configure(&mut settings, &db);
        settings.influx.timeout = Duration::from_secs(2);
        settings.consumer.retry_backoff_max = Duration::from_millis(500);
        settings.consumer.shutdown_timeout = Duration::from_secs(10);
        settings.http.listen = ([127, 0, 0, 1], 0).into();
        Self { topic, cluster, registry, influx, db, settings }
    }

    /// Switches the consumer to the v2 API of a fake that accepts org "acme", bucket "ticks"
    /// and `token`.
    async fn use_v2_fake(&mut self, token: &str) -> support::fake_influx2::FakeInflux2 {
        let fake = support::fake_influx2::FakeInflux2::start("acme", "ticks", token).await;
        self.settings.influx.api = InfluxApi::V2;
        self.settings.influx.url = fake.url();
        self.settings.influx.org = "acme".into();
        self.settings.influx.bucket = "ticks".into();
        self.settings.influx.token = Some(token.into());
        fake
    }

    fn brokers(&self) -> String {
        self.cluster.bootstrap_servers()
    }

    async fn produce(&self, ticks: &[Tick]) {
        produce_ticks(&self.brokers(), &self.topic, &self.registry, &BTreeMap::new(), ticks).await;
    }

    async fn wait_for_points(&self, n: usize) {
        eventually_async(&format!("{n} points in InfluxDB"), WAIT, || async { self.influx.count(&self.db, "ticker").await >= n })
            .await;
    }

    /// Every tick is exactly one point with exactly its values, and there is nothing else.
    async fn assert_points_are(&self, ticks: &[Tick]) {
        let rows = self.influx.rows(&self.db, "SELECT * FROM ticker").await;
        assert_eq!(rows.len(), ticks.len(), "point count");
        let by_key: BTreeMap<(String, i64), &serde_json::Map<String, serde_json::Value>> = rows
            .iter()
            .map(|r| ((r["symbol"].as_str().unwrap().to_string(), r["time"].as_i64().unwrap()), r))
            .collect();
        for t in ticks {
            let row = by_key.get(&(t.symbol.clone(), t.exchange_time)).unwrap_or_else(|| panic!("no point for {t:?}"));
            let fields = [
                ("bid", t.bid),
                ("bid_size", t.bid_size),
                ("ask", t.ask),
                ("ask_size", t.ask_size),
                ("daily_change", t.daily_change),
                ("daily_change_relative", t.daily_change_relative),
                ("last_price", t.last_price),
                ("volume", t.volume),
                ("high", t.high),
                ("low", t.low),
            ];
            for (name, want) in fields {
                assert_eq!(row[name].as_f64(), Some(want), "{name} of {t:?}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_ticks_become_exactly_n_points_and_replays_overwrite() {
    let t = Setup::new().await;
    let ticks = make_ticks(&SYMBOLS, 100, START_MS, 1000);
    t.produce(&ticks).await;
    let running = start_consumer(t.settings.clone(), 1);
    t.wait_for_points(ticks.len()).await;
    running.stop().await;
    t.assert_points_are(&ticks).await;

    // Another group replays the whole topic: same points, none added.
    let mut replay = t.settings.clone();
    replay.kafka.group_id = unique("replay");
    let running = start_consumer(replay, 1);
    tokio::time::sleep(Duration::from_secs(2)).await;
    running.stop().await;
    t.assert_points_are(&ticks).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_records_go_to_the_dead_letter_topic_and_the_rest_is_written() {
    let t = Setup::new().await;
    let good = make_ticks(&SYMBOLS, 20, START_MS, 1000);
    t.produce(&good[..30]).await;
    let producer = raw_producer(&t.brokers(), &BTreeMap::new());
    let schema_id = t.registry.latest(&format!("{}-value", t.topic)).unwrap().0.to_be_bytes();
    let valid = {
        let mut p = Vec::new();
        let encoder = candlestream::codec::Encoder::new(&t.settings.schema_registry, &t.settings.kafka).unwrap();
        p.extend(encoder.encode(&Record::Tick(good[0].clone())).await.unwrap());
        p
    };
    let truncated = valid[..valid.len() - 20].to_vec();
    let poison: Vec<(&str, Vec<u8>)> = vec![
        ("bad-magic-byte", b"{\"symbol\":\"tBTCUSD\"}".to_vec()),
        ("unknown-schema-id", [&[0u8, 0, 0, 0x7f, 0x7f][..], &valid[5..]].concat()),
        ("corrupt-avro", truncated),
        ("bad-magic-byte", vec![]),
    ];
    let _ = schema_id;
    for (_, payload) in &poison {
        produce_raw(&producer, &t.topic, Some(b"tBTCUSD"), payload).await;
    }
    t.produce(&good[30..]).await;

    let running = start_consumer(t.settings.clone(), 1);
    t.wait_for_points(good.len()).await;
    let dlq = format!("{}-dlq", t.topic);
    eventually_async("dead letters", WAIT, || async { support::topic_size(&t.brokers(), &dlq, &BTreeMap::new()) >= poison.len() }).await;
    running.stop().await;
    t.assert_points_are(&good).await;

    let letters = read_all(&t.brokers(), &dlq, &BTreeMap::new());
    assert_eq!(letters.len(), poison.len());
    let mut got: Vec<(String, Vec<u8>)> =
        letters.iter().map(|r| (r.headers[dlq_header::REASON].clone(), r.payload.clone())).collect();
    let mut want: Vec<(String, Vec<u8>)> = poison.iter().map(|(r, p)| (r.to_string(), p.clone())).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want, "the dead-letter topic holds exactly the poison, unchanged, with its reason");
    for r in &letters {
        assert_eq!(r.key.as_deref(), Some("tBTCUSD"));
        assert_eq!(r.headers[dlq_header::TOPIC], t.topic);
        assert!(!r.headers[dlq_header::DETAIL].is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn influx_outage_holds_the_batch_and_loses_nothing() {
    let mut t = Setup::new().await;
    let ticks = make_ticks(&SYMBOLS, 100, START_MS, 1000);
    let running = start_consumer(t.settings.clone(), 1);
    t.produce(&ticks[..150]).await;
    t.wait_for_points(150).await;
    t.influx.stop();
    t.produce(&ticks[150..]).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    tokio::task::block_in_place(|| t.influx.start_again());
    t.wait_for_points(ticks.len()).await;
    running.stop().await;
    t.assert_points_are(&ticks).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_share_the_partitions() {
    let t = Setup::new().await;
    let ticks = make_ticks(&SYMBOLS, 100, START_MS, 1000);
    let running = start_consumer(t.settings.clone(), 2);
    t.produce(&ticks).await;
    t.wait_for_points(ticks.len()).await;
    running.stop().await;
    t.assert_points_are(&ticks).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_then_restart_still_gives_exactly_n() {
    let t = Setup::new().await;
    let ticks = make_ticks(&SYMBOLS, 300, START_MS, 1000);
    t.produce(&ticks).await;
    let mut s = t.settings.clone();
    // A killed member's session must expire quickly for the group to hand its partitions on.
    s.kafka.consumer.insert("session.timeout.ms".into(), "6000".into());
    s.kafka.consumer.insert("heartbeat.interval.ms".into(), "500".into());
    s.influx.batch_size = 20;
    s.influx.flush_interval = Duration::from_millis(100);
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(config.path(), support::settings_toml(&s)).unwrap();
    let mut child = support::Process::spawn("consumer", config.path());
    eventually_async("some points written", WAIT, || async { t.influx.count(&t.db, "ticker").await >= 100 }).await;
    child.kill();
    let mid = t.influx.count(&t.db, "ticker").await;
    assert!(mid < ticks.len(), "killed mid-stream ({mid} of {})", ticks.len());
    let mut child = support::Process::spawn("consumer", config.path());
    t.wait_for_points(ticks.len()).await;
    assert!(child.terminate().success(), "SIGTERM exits 0");
    t.assert_points_are(&ticks).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_api_writes_the_same_line_protocol_with_token_org_bucket_and_gzip() {
    let mut t = Setup::new().await;
    let influx2 = t.use_v2_fake("s3cret").await;
    let ticks = make_ticks(&SYMBOLS, 50, START_MS, 1000);
    t.produce(&ticks).await;
    let running = start_consumer(t.settings.clone(), 1);
    support::eventually("150 points in the v2 fake", WAIT, || influx2.lines().len() >= ticks.len()).await;
    running.stop().await;
    let mut want: Vec<String> = ticks
        .iter()
        .map(|tick| {
            let mut line = String::new();
            candlestream::sink::influx::write_line(&mut line, "ticker", &Record::Tick(tick.clone()));
            line.trim_end().to_string()
        })
        .collect();
    want.sort();
    let mut got = influx2.lines();
    got.sort();
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_batch_is_dead_lettered_not_retried_forever() {
    let mut t = Setup::new().await;
    let influx2 = t.use_v2_fake("right-token").await;
    t.settings.influx.token = Some("wrong-token".into());
    let ticks = make_ticks(&SYMBOLS, 10, START_MS, 1000);
    t.produce(&ticks).await;
    let running = start_consumer(t.settings.clone(), 1);
    let dlq = format!("{}-dlq", t.topic);
    eventually_async("rejected batch dead-lettered", WAIT, || async {
        support::topic_size(&t.brokers(), &dlq, &BTreeMap::new()) >= ticks.len()
    })
    .await;
    running.stop().await;
    let letters = read_all(&t.brokers(), &dlq, &BTreeMap::new());
    assert_eq!(letters.len(), ticks.len());
    assert!(letters.iter().all(|r| r.headers[dlq_header::REASON] == "influx-rejected"));
    assert!(letters[0].headers[dlq_header::DETAIL].contains("401"), "{:?}", letters[0].headers);
    assert!(influx2.requests() <= 2, "a 401 is not retried ({} requests)", influx2.requests());
}
