//! Consumer integration tests: Kafka (librdkafka's mock cluster) → consumer group → a real
//! InfluxDB 1.x, plus the v2 API against a faithful fake of `/api/v2/write`.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use candlestream::config::{InfluxApi, Settings};
use candlestream::consumer::dlq_header;
use candlestream::model::{Record, Tick};
use rdkafka::mocking::MockCluster;

use support::fake_registry::FakeRegistry;
use support::influx1::Influx1;
use support::pipeline::*;
use support::{eventually_async, read_all, unique};

const SYMBOLS: [&str; 3] = ["tBTCUSD", "tETHUSD", "tSOLUSD"];
const START_MS: i64 = 1_763_787_600_000;

struct Setup {
    topic: String,
    /// Leaked, so that it outlives the test's runtime. Why: when a test panics, the consumer's
    /// task is dropped with the runtime, after `Setup`; librdkafka's consumer close then waits for
    /// a cluster that is gone, and the test hung for good (17 minutes in one CI run) instead of
    /// failing.
    cluster: &'static MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    registry: FakeRegistry,
    influx: Influx1,
    db: String,
    settings: Settings,
}

impl Setup {
    async fn new() -> Self {
        Self::with_influx(tokio::task::spawn_blocking(Influx1::start).await.unwrap()).await
    }

    async fn with_influx(influx: Influx1) -> Self {
        let topic = unique("ticks");
        let cluster: &'static _ = Box::leak(Box::new(MockCluster::new(3).unwrap()));
        cluster.create_topic(&topic, 3, 3).unwrap();
        cluster
            .create_topic(&format!("{topic}-trades"), 3, 3)
            .unwrap();
        cluster.create_topic(&format!("{topic}-dlq"), 1, 3).unwrap();
        let registry = FakeRegistry::start().await;
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
        settings.http.listen = ([127, 0, 0, 1], support::rig::free_port()).into();
        Self {
            topic,
            cluster,
            registry,
            influx,
            db,
            settings,
        }
    }

    /// The consumer's /healthz: status and body.
    async fn health(&self) -> (u16, String) {
        match reqwest::get(format!("http://{}/healthz", self.settings.http.listen)).await {
            Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
            Err(e) => (0, e.to_string()),
        }
    }

    fn dead_letters(&self) -> usize {
        support::topic_size(
            &self.brokers(),
            &format!("{}-dlq", self.topic),
            &BTreeMap::new(),
        )
    }

    /// Waits until /healthz is 503 with a body containing `reason`; meanwhile nothing may be
    /// written or dead-lettered.
    async fn assert_held(&self, reason: &str) {
        eventually_async(&format!("/healthz 503 naming {reason:?}"), WAIT, || async {
            let (status, body) = self.health().await;
            status == 503 && body.contains(reason)
        })
        .await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(self.dead_letters(), 0, "held records are not dead-lettered");
        let (status, body) = self.health().await;
        assert_eq!(status, 503, "still unhealthy while held: {body}");
    }

    /// Every tick arrives, nothing is dead-lettered, and /healthz is healthy again.
    async fn assert_recovered(&self, ticks: &[Tick]) {
        self.wait_for_points(ticks.len()).await;
        eventually_async("/healthz 200 again", WAIT, || async {
            self.health().await.0 == 200
        })
        .await;
        assert_eq!(self.dead_letters(), 0);
        self.assert_points_are(ticks).await;
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
        produce_ticks(
            &self.brokers(),
            &self.topic,
            &self.registry,
            &BTreeMap::new(),
            ticks,
        )
        .await;
    }

    async fn wait_for_points(&self, n: usize) {
        eventually_async(&format!("{n} points in InfluxDB"), WAIT, || async {
            self.influx.count(&self.db, "ticker").await >= n
        })
        .await;
    }

    /// Every tick is exactly one point with exactly its values, and there is nothing else.
    async fn assert_points_are(&self, ticks: &[Tick]) {
        let rows = self.influx.rows(&self.db, "SELECT * FROM ticker").await;
        assert_eq!(rows.len(), ticks.len(), "point count");
        let by_key: BTreeMap<(String, i64), &serde_json::Map<String, serde_json::Value>> = rows
            .iter()
            .map(|r| {
                (
                    (
                        r["symbol"].as_str().unwrap().to_string(),
                        r["time"].as_i64().unwrap(),
                    ),
                    r,
                )
            })
            .collect();
        for t in ticks {
            let row = by_key
                .get(&(t.symbol.clone(), t.exchange_time))
                .unwrap_or_else(|| panic!("no point for {t:?}"));
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
    let schema_id = t
        .registry
        .latest(&format!("{}-value", t.topic))
        .unwrap()
        .0
        .to_be_bytes();
    let valid = {
        let mut p = Vec::new();
        let encoder =
            candlestream::codec::Encoder::new(&t.settings.schema_registry, &t.settings.kafka)
                .unwrap();
        p.extend(
            encoder
                .encode(&Record::Tick(good[0].clone()))
                .await
                .unwrap(),
        );
        p
    };
    let truncated = valid[..valid.len() - 20].to_vec();
    let poison: Vec<(&str, Vec<u8>)> = vec![
        ("bad-magic-byte", b"{\"symbol\":\"tBTCUSD\"}".to_vec()),
        (
            "unknown-schema-id",
            [&[0u8, 0, 0, 0x7f, 0x7f][..], &valid[5..]].concat(),
        ),
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
    eventually_async("dead letters", WAIT, || async {
        support::topic_size(&t.brokers(), &dlq, &BTreeMap::new()) >= poison.len()
    })
    .await;
    running.stop().await;
    t.assert_points_are(&good).await;

    let letters = read_all(&t.brokers(), &dlq, &BTreeMap::new());
    assert_eq!(letters.len(), poison.len());
    let mut got: Vec<(String, Vec<u8>)> = letters
        .iter()
        .map(|r| (r.headers[dlq_header::REASON].clone(), r.payload.clone()))
        .collect();
    let mut want: Vec<(String, Vec<u8>)> = poison
        .iter()
        .map(|(r, p)| (r.to_string(), p.clone()))
        .collect();
    got.sort();
    want.sort();
    assert_eq!(
        got, want,
        "the dead-letter topic holds exactly the poison, unchanged, with its reason"
    );
    for r in &letters {
        assert_eq!(r.key.as_deref(), Some("tBTCUSD"));
        assert_eq!(r.headers[dlq_header::TOPIC], t.topic);
        assert!(!r.headers[dlq_header::DETAIL].is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn influx_outage_holds_the_batch_and_loses_nothing() {
    let mut t = Setup::new().await;
    t.settings.health.max_ack_silence = Duration::from_secs(1);
    let ticks = make_ticks(&SYMBOLS, 100, START_MS, 1000);
    let running = start_consumer(t.settings.clone(), 1);
    t.produce(&ticks[..150]).await;
    t.wait_for_points(150).await;
    assert_eq!(t.health().await.0, 200, "nothing waits");
    t.influx.stop();
    t.produce(&ticks[150..]).await;
    // The held batch is work waiting for InfluxDB: red once it waited max_ack_silence.
    t.assert_held("records_stored").await;
    tokio::task::block_in_place(|| t.influx.start_again());
    t.assert_recovered(&ticks).await;
    running.stop().await;
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
    s.kafka
        .consumer
        .insert("session.timeout.ms".into(), "6000".into());
    s.kafka
        .consumer
        .insert("heartbeat.interval.ms".into(), "500".into());
    s.influx.batch_size = 20;
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(config.path(), support::settings_toml(&s)).unwrap();
    let mut child = support::Process::spawn("consumer", config.path());
    eventually_async("some points written", WAIT, || async {
        t.influx.count(&t.db, "ticker").await >= 100
    })
    .await;
    child.kill();
    let mid = t.influx.count(&t.db, "ticker").await;
    assert!(
        mid < ticks.len(),
        "killed mid-stream ({mid} of {})",
        ticks.len()
    );
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
    support::eventually("150 points in the v2 fake", WAIT, || {
        influx2.lines().len() >= ticks.len()
    })
    .await;
    running.stop().await;
    let mut want: Vec<String> = ticks
        .iter()
        .map(|tick| {
            let mut line = String::new();
            candlestream::sink::influx::write_line(
                &mut line,
                "ticker",
                &Record::Tick(tick.clone()),
            );
            line.trim_end().to_string()
        })
        .collect();
    want.sort();
    let mut got = influx2.lines();
    got.sort();
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_v2_token_holds_the_records_until_it_is_fixed() {
    let mut t = Setup::new().await;
    let influx2 = t.use_v2_fake("rotated-token").await;
    t.settings.influx.token = Some("old-token".into());
    let ticks = make_ticks(&SYMBOLS, 10, START_MS, 1000);
    t.produce(&ticks).await;
    let running = start_consumer(t.settings.clone(), 1);
    t.assert_held("CANDLESTREAM__INFLUX__TOKEN").await;
    assert!(influx2.lines().is_empty());
    influx2.set_token("old-token");
    support::eventually("every point in the v2 fake", WAIT, || {
        influx2.lines().len() == ticks.len()
    })
    .await;
    eventually_async("/healthz 200 again", WAIT, || async {
        t.health().await.0 == 200
    })
    .await;
    running.stop().await;
    assert_eq!(t.dead_letters(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_influx_credentials_hold_the_records_until_the_password_is_right() {
    let mut t = Setup::with_influx(Influx1::start_with_auth().await).await;
    t.influx
        .query("", "CREATE USER writer WITH PASSWORD 'before'")
        .await;
    t.influx
        .query("", &format!("GRANT WRITE ON \"{}\" TO writer", t.db))
        .await;
    t.settings.influx.username = Some("writer".into());
    t.settings.influx.password = Some("after".into());
    let ticks = make_ticks(&SYMBOLS, 40, START_MS, 1000);
    t.produce(&ticks).await;
    let running = start_consumer(t.settings.clone(), 1);
    t.assert_held("InfluxDB rejected the credentials (HTTP 401)")
        .await;
    assert_eq!(t.influx.count(&t.db, "ticker").await, 0);
    t.influx
        .query("", "SET PASSWORD FOR writer = 'after'")
        .await;
    t.assert_recovered(&ticks).await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_database_holds_the_records_until_it_exists() {
    let t = Setup::new().await;
    t.influx
        .query("", &format!("DROP DATABASE \"{}\"", t.db))
        .await;
    let ticks = make_ticks(&SYMBOLS, 40, START_MS, 1000);
    t.produce(&ticks).await;
    let running = start_consumer(t.settings.clone(), 2);
    t.assert_held("no such database").await;
    t.influx.create_database(&t.db).await;
    t.assert_recovered(&ticks).await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_field_type_conflict_dead_letters_exactly_the_rejected_points() {
    let t = Setup::new().await;
    // Ticks a day apart span several shard groups (7 days each). An integer `bid` already in one
    // shard makes InfluxDB 1.x refuse exactly the ticks that fall in it, in a partial write.
    let ticks = make_ticks(&SYMBOLS, 40, START_MS, 86_400_000);
    // Shard groups start on Mondays (Go truncates from year 1); the Unix epoch was a Thursday.
    const DAY_NS: i64 = 86_400 * 1_000_000_000;
    let week = |ms: i64| (ms * 1_000_000 - 4 * DAY_NS).div_euclid(7 * DAY_NS);
    let poisoned = week(ticks[60].exchange_time);
    let conflict = format!(
        "ticker,symbol=conflict bid=1i {}",
        poisoned * 7 * DAY_NS + 4 * DAY_NS
    );
    let resp = reqwest::Client::new()
        .post(format!("{}/write", t.influx.url()))
        .query(&[("db", t.db.as_str())])
        .body(conflict)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{:?}", resp.text().await);
    let (bad, good): (Vec<Tick>, Vec<Tick>) = ticks
        .iter()
        .cloned()
        .partition(|x| week(x.exchange_time) == poisoned);
    assert!(!bad.is_empty() && !good.is_empty());
    t.produce(&ticks).await;
    let running = start_consumer(t.settings.clone(), 1);
    eventually_async("rejected points dead-lettered", WAIT, || async {
        t.dead_letters() >= bad.len()
    })
    .await;
    eventually_async("valid points stored", WAIT, || async {
        t.influx.count(&t.db, "ticker").await >= good.len()
    })
    .await;
    running.stop().await;

    let letters = read_all(&t.brokers(), &format!("{}-dlq", t.topic), &BTreeMap::new());
    assert_eq!(
        letters.len(),
        bad.len(),
        "exactly the conflicting ticks, each once"
    );
    let decoder = candlestream::codec::Decoder::new(&t.settings.schema_registry).unwrap();
    let mut got = Vec::new();
    for letter in &letters {
        assert_eq!(letter.headers[dlq_header::REASON], "influx-rejected");
        assert!(
            letter.headers[dlq_header::DETAIL].contains("field type conflict"),
            "{:?}",
            letter.headers
        );
        got.push(
            decoder
                .decode(&letter.payload)
                .await
                .unwrap()
                .exchange_time(),
        );
    }
    got.sort();
    let mut want: Vec<i64> = bad.iter().map(|x| x.exchange_time).collect();
    want.sort();
    assert_eq!(got, want);
    let rows = t
        .influx
        .rows(&t.db, "SELECT * FROM ticker WHERE symbol != 'conflict'")
        .await;
    assert_eq!(rows.len(), good.len(), "every other tick stored, once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_answering_500_is_retried_not_dead_lettered() {
    let mut t = Setup::new().await;
    t.settings.health.max_ack_silence = Duration::from_secs(1);
    let ticks = make_ticks(&SYMBOLS, 30, START_MS, 1000);
    t.produce(&ticks).await;
    t.registry.fail_with(500);
    let running = start_consumer(t.settings.clone(), 1);
    // A record waiting to be decoded waits to be stored too: red once it waited max_ack_silence.
    t.assert_held("records_stored").await;
    assert_eq!(t.influx.count(&t.db, "ticker").await, 0);
    t.registry.fail_with(0);
    t.assert_recovered(&ticks).await;
    running.stop().await;
}

/// Reads one sample of the Prometheus text, e.g. `name_bucket{kind="ticker",le="0.25"}`.
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .map_or(0.0, |v| v.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_stream_is_written_record_by_record_and_latency_is_measured() {
    let t = Setup::new().await;
    let mut s = t.settings.clone();
    // The shipped batching, not the tests' small batches.
    s.influx.batch_size = Settings::default().influx.batch_size;
    s.influx.flush_interval = Settings::default().influx.flush_interval;
    // The mock cluster answers a fetch only when fetch.wait.max.ms (500 ms) ends; a broker
    // answers as soon as data arrives. Keep the mock's share small so the writer's shows.
    s.kafka
        .consumer
        .insert("fetch.wait.max.ms".into(), "20".into());
    // Its own process, so that /metrics holds only this consumer's histograms.
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(config.path(), support::settings_toml(&s)).unwrap();
    let mut child = support::Process::spawn("consumer", config.path());
    eventually_async("consumer serving", WAIT, || async {
        t.health().await.0 == 200
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    let n = 12;
    for i in 0..n {
        let now = support::now_ms();
        let mut tick = make_ticks(&["tBTCUSD"], 1, 0, 0).remove(0);
        (tick.exchange_time, tick.received_at, tick.volume) = (now - 1000, now, i as f64);
        t.produce(&[tick]).await;
        t.wait_for_points(i + 1).await;
    }
    let metrics = reqwest::get(format!("http://{}/metrics", s.http.listen))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("# TYPE candlestream_pipeline_latency_seconds histogram"),
        "{metrics}"
    );
    let latency = |le: &str| {
        sample(
            &metrics,
            &format!("candlestream_pipeline_latency_seconds_bucket{{kind=\"ticker\",le=\"{le}\"}}"),
        )
    };
    assert_eq!(
        sample(
            &metrics,
            "candlestream_pipeline_latency_seconds_count{kind=\"ticker\"}"
        ),
        n as f64
    );
    // Written at once: no record waited for a batch to fill or a timer to fire.
    assert_eq!(latency("1"), n as f64, "{metrics}");
    let skewed = |le: &str| {
        sample(
            &metrics,
            &format!(
                "candlestream_exchange_to_store_seconds_bucket{{kind=\"ticker\",le=\"{le}\"}}"
            ),
        )
    };
    assert_eq!(
        (skewed("0.5"), skewed("2.5")),
        (0.0, n as f64),
        "exchange time is 1 s before receipt: {metrics}"
    );
    assert!(child.terminate().success());
}
