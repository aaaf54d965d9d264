//! Reliability suite on real parts: a Kafka 0.9 cluster of 3 brokers (topic with replication 3
//! and min.insync.replicas=2, acks=all) and InfluxDB 1.6.7, fed by the fake exchange. Every
//! scenario ends with an exact count: each update the exchange sent to a subscribed client is
//! in InfluxDB exactly once. Each prints a `RELIABILITY |` line with what it measured.

// The cluster lock is held across awaits on purpose: it keeps whole tests, each on its own
// runtime, from running two clusters at once.
#![allow(clippy::await_holding_lock)]

mod support;

use std::time::{Duration, Instant};

use support::fake_registry::FakeRegistry;
use support::kafka09::{client_overrides, producer_overrides};
use support::pipeline::*;
use support::rig::{CLUSTER, Rig, STORE_WAIT, free_port, until};
use support::{Process, SYMBOLS, eventually_async, read_all, topic_size};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_loss() {
    let _one = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let mut rig = Rig::new().await;
    let consumer = start_consumer(rig.settings.clone(), 2);
    let producer = start(rig.producer_settings());
    rig.exchange.wait_subscribed(&SYMBOLS, WAIT).await;
    let load = Emitter::start(&rig.exchange, Duration::from_millis(30));

    // One broker dies: replication 3 with min.insync 2 still takes writes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let held = rig.high_watermarks().await;
    rig.cluster.kill_broker(0);
    let before = rig.produced().await;
    let kept_going = until(Duration::from_secs(30), || async {
        rig.produced().await > before + 30
    })
    .await;
    assert!(
        kept_going.is_some(),
        "the producer kept writing with one broker down"
    );

    // A second one dies: no acks are possible; the producer holds the data and says so. Not
    // before the first election is complete on every partition: Kafka 0.9 would lose acknowledged
    // records otherwise (see `wait_refetched`).
    rig.wait_refetched(&held, Duration::from_secs(60)).await;
    rig.cluster.kill_broker(1);
    let unhealthy = until(Duration::from_secs(45), || async {
        let (status, body) = rig.health().await;
        status == 503 && body.contains("kafka_acks")
    })
    .await;
    assert!(
        unhealthy.is_some(),
        "/healthz reports missing acks: {:?}",
        rig.health().await
    );
    assert!(rig.metrics().await.contains("candlestream_kafka_in_flight"));
    // Records have waited for an ack at least since the health check's silence began.
    let oldest = counter(&rig, "candlestream_producer_oldest_unacked_seconds").await;
    assert!(
        oldest >= 1.0,
        "the oldest unacknowledged record's age rises while no broker takes writes: {oldest} s"
    );

    let restarted = Instant::now();
    tokio::task::block_in_place(|| {
        rig.cluster.restart_broker(0);
        rig.cluster.restart_broker(1);
    });
    let healthy = until(Duration::from_secs(60), || async {
        rig.health().await.0 == 200
    })
    .await;
    assert!(healthy.is_some(), "healthy again once the brokers are back");
    load.stop().await;
    let recovery = restarted.elapsed();
    rig.assert_exact(
        "broker loss: kill -9 one broker, then a second, then restart both",
        Some(recovery),
        0,
    )
    .await;
    let caught_up = until(Duration::from_secs(5), || async {
        counter(&rig, "candlestream_producer_oldest_unacked_seconds").await == 0.0
    })
    .await;
    assert!(
        caught_up.is_some(),
        "no record waits for an ack once everything is stored"
    );
    producer.stop().await;
    consumer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_crash() {
    let _one = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let rig = Rig::new().await;
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(config.path(), support::settings_toml(&rig.settings)).unwrap();
    let mut doomed = Process::spawn("consumer", config.path());
    let mut survivor = Process::spawn("consumer", config.path());
    let producer = start(rig.producer_settings());
    rig.exchange.wait_subscribed(&SYMBOLS, WAIT).await;
    let load = Emitter::start(&rig.exchange, Duration::from_millis(20));
    eventually_async("points flowing", WAIT, || async { rig.stored().await > 60 }).await;
    doomed.kill();
    let killed = Instant::now();
    let at_kill = rig.exchange.sent().len();
    tokio::time::sleep(Duration::from_secs(3)).await;
    load.stop().await;
    let recovered = until(STORE_WAIT, || async { rig.stored().await >= at_kill }).await;
    rig.assert_exact(
        "consumer crash: kill -9 one of two consumers mid-batch",
        recovered.map(|_| killed.elapsed()),
        0,
    )
    .await;
    producer.stop().await;
    assert!(survivor.terminate().success());
}

/// One sample of the in-process /metrics (consumer and producer share the recorder).
async fn counter(rig: &Rig, series: &str) -> f64 {
    let metrics = rig.metrics().await;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// The largest value of a metric over its label sets that contain `labels`; 0 when absent. The
/// recorder is the process's, shared by every test of this binary: `labels` picks a test's own.
fn max_of(metrics: &str, name: &str, labels: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|r| r.starts_with('{')) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, f64::max)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn influx_outage() {
    let _one = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let mut rig = Rig::new().await;
    // The outage lasts five times as long as a member may go without polling.
    let max_poll = Duration::from_secs(6);
    rig.settings.kafka.consumer.insert(
        "max.poll.interval.ms".into(),
        max_poll.as_millis().to_string(),
    );
    let consumer = start_consumer(rig.settings.clone(), 2);
    let producer = start(rig.producer_settings());
    rig.exchange.wait_subscribed(&SYMBOLS, WAIT).await;
    let load = Emitter::start(&rig.exchange, Duration::from_millis(50));
    eventually_async("points flowing", WAIT, || async { rig.stored().await > 30 }).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let revoked = r#"candlestream_consumer_rebalances_total{event="revoke"}"#;
    let revokes = counter(&rig, revoked).await;
    let write_stalls = r#"candlestream_pipeline_stalls_total{stage="write"}"#;
    let stalls_before = counter(&rig, write_stalls).await;
    // This test's partitions (ticker and trades topics share the prefix).
    let ours = format!("topic=\"{}", rig.topic);
    let outage = Duration::from_secs(30);
    rig.influx.stop();
    tokio::time::sleep(outage).await;
    assert!(
        counter(&rig, "candlestream_consumer_pauses_total").await > 0.0,
        "partitions paused while InfluxDB was down"
    );
    // The freeze is visible while it lasts: the oldest unstored record is older than the outage
    // minus a check interval, and the stall was logged as waiting for the write.
    let metrics = rig.metrics().await;
    let oldest = max_of(&metrics, "candlestream_oldest_unstored_seconds", &ours);
    let stall_warning = rig.settings.pipeline.stall_warning.as_secs_f64();
    assert!(
        oldest > outage.as_secs_f64() - 5.0,
        "candlestream_oldest_unstored_seconds {oldest} after a {outage:?} outage"
    );
    let stalls = counter(&rig, write_stalls).await - stalls_before;
    assert!(
        stalls >= 1.0,
        "a stall waiting for the write was logged: {stalls}"
    );
    tokio::task::block_in_place(|| rig.influx.start_again());
    let back = Instant::now();
    load.stop().await;
    let sent = rig.exchange.sent().len();
    let recovered = until(STORE_WAIT, || async { rig.stored().await >= sent })
        .await
        .map(|_| back.elapsed());
    assert_eq!(
        counter(&rig, revoked).await,
        revokes,
        "no member lost its partitions during a {outage:?} outage (max.poll.interval.ms {max_poll:?})"
    );
    rig.assert_exact(
        "InfluxDB down for 30 s (5 x max.poll.interval.ms), two members, no revoke",
        recovered,
        0,
    )
    .await;
    // Everything stored and committed: the gauge falls back under the warning.
    let fresh = until(Duration::from_secs(15), || async {
        max_of(
            &rig.metrics().await,
            "candlestream_oldest_unstored_seconds",
            &ours,
        ) < stall_warning
    })
    .await;
    assert!(
        fresh.is_some(),
        "candlestream_oldest_unstored_seconds back under {stall_warning} s once caught up"
    );
    producer.stop().await;
    consumer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_registry_outage() {
    let _one = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    // Down at start: nothing listens on the registry's port yet.
    let port = free_port();
    let placeholder = FakeRegistry::start().await;
    let mut rig = Rig::with_registry(placeholder).await;
    rig.settings.schema_registry.url = format!("http://127.0.0.1:{port}");
    let consumer = start_consumer(rig.settings.clone(), 1);
    let producer = start(rig.producer_settings());
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        rig.exchange.ws_connections(),
        0,
        "no exchange reads before the schema is registered"
    );
    assert!(
        !producer.task.is_finished(),
        "the producer waits for the registry instead of exiting"
    );
    let registry = FakeRegistry::start_on(port).await;
    let appeared = Instant::now();
    rig.exchange.wait_subscribed(&SYMBOLS, WAIT).await;
    let started = appeared.elapsed();
    emit_rounds(&rig.exchange, 20).await;
    eventually_async("first points", WAIT, || async { rig.stored().await >= 60 }).await;

    // Down mid-run: cached schema ids keep both sides going.
    registry.set_down(true);
    emit_rounds(&rig.exchange, 20).await;
    rig.assert_exact(
        "Schema Registry down at start, then down mid-run",
        Some(started),
        0,
    )
    .await;
    registry.set_down(false);
    producer.stop().await;
    consumer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_faults() {
    let _one = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let rig = Rig::new().await;
    let consumer = start_consumer(rig.settings.clone(), 1);
    let producer = start(rig.producer_settings());
    let ex = &rig.exchange;
    ex.wait_subscribed(&SYMBOLS, WAIT).await;
    let cap = rig.settings.bitfinex.reconnect_backoff_max;
    let mut worst_reconnect = Duration::ZERO;
    let mut reconnect = |d: Duration| worst_reconnect = worst_reconnect.max(d);

    let brokers = rig.cluster.bootstrap();
    let quiet = || caught_up(ex, &brokers, &rig.topic, &rig.settings.kafka.consumer);
    emit_rounds(ex, 5).await;
    ex.restart().await;
    let t = Instant::now();
    ex.wait_subscribed(&SYMBOLS, WAIT).await;
    reconnect(t.elapsed());

    emit_rounds(ex, 5).await;
    ex.maintenance_start().await;
    ex.maintenance_end().await;
    ex.wait_subscribed(&SYMBOLS, WAIT).await;

    ex.set_extra_fields(true);
    emit_rounds(ex, 5).await;
    ex.set_extra_fields(false);
    for garbage in [
        "<html>502 Bad Gateway</html>",
        "",
        "[1,",
        "{\"event\":\"somethingNew\"}",
        "[999999,[1,2]]",
    ] {
        ex.send_raw(garbage).await;
    }
    ex.skip_sequence(7).await;
    emit_rounds(ex, 5).await;

    quiet().await;
    ex.drop_connections().await;
    let t = Instant::now();
    ex.wait_subscribed(&SYMBOLS, WAIT).await;
    reconnect(t.elapsed());
    emit_rounds(ex, 5).await;

    // Heartbeat-only silence is normal; total silence trips the watchdog.
    quiet().await;
    ex.go_silent().await;
    let t = Instant::now();
    ex.wait_subscribed(&SYMBOLS, WAIT).await;
    let silence = t.elapsed();
    assert!(
        silence <= rig.settings.bitfinex.heartbeat_timeout + cap + Duration::from_secs(1),
        "watchdog took {silence:?}"
    );
    emit_rounds(ex, 5).await;

    quiet().await;
    let connections = ex.ws_connections();
    ex.send_raw(&format!("[1,\"{}\"]", "x".repeat(2 << 20)))
        .await;
    let t = Instant::now();
    eventually_async("reconnect after an oversized frame", WAIT, || async {
        ex.ws_connections() > connections
    })
    .await;
    ex.wait_subscribed(&SYMBOLS, WAIT).await;
    reconnect(t.elapsed());
    emit_rounds(ex, 5).await;

    assert!(
        worst_reconnect <= cap + Duration::from_secs(1),
        "reconnects within the backoff cap: {worst_reconnect:?}"
    );
    let metrics = rig.metrics().await;
    let gaps = metrics
        .lines()
        .find(|l| l.starts_with("candlestream_exchange_sequence_gaps_total"))
        .unwrap_or("");
    assert!(
        !gaps.ends_with(" 0") && !gaps.is_empty(),
        "sequence gap counted: {gaps:?}"
    );
    rig.assert_exact(
        "exchange: 20051, 20060/20061, extra fields, garbage, seq gap, abrupt close, silence, oversized frame",
        Some(worst_reconnect.max(silence)), 0)
    .await;
    producer.stop().await;
    consumer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_kafka_records() {
    let _one = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let rig = Rig::new().await;
    let consumer = start_consumer(rig.settings.clone(), 1);
    let producer = start(rig.producer_settings());
    rig.exchange.wait_subscribed(&SYMBOLS, WAIT).await;
    emit_rounds(&rig.exchange, 10).await;
    eventually_async("points flowing", WAIT, || async {
        rig.stored().await >= 30
    })
    .await;

    let raw = raw_producer(&rig.cluster.bootstrap(), &producer_overrides());
    let valid = read_all(&rig.cluster.bootstrap(), &rig.topic, &client_overrides())[0]
        .payload
        .clone();
    let poison: Vec<(&str, Vec<u8>)> = vec![
        // (reason, payload)
        ("bad-magic-byte", b"not avro at all".to_vec()),
        (
            "unknown-schema-id",
            [&[0u8, 0, 0, 0x55, 0x55][..], &valid[5..]].concat(),
        ),
        ("corrupt-avro", valid[..valid.len() / 2].to_vec()),
    ];
    for (_, payload) in &poison {
        produce_raw(&raw, &rig.topic, Some(b"tETHUSD"), payload).await;
    }
    emit_rounds(&rig.exchange, 10).await;
    let dlq = format!("{}-dlq", rig.topic);
    eventually_async("dead letters", WAIT, || async {
        topic_size(&rig.cluster.bootstrap(), &dlq, &client_overrides()) >= 3
    })
    .await;
    // Kafka 0.9 predates record headers, so the reasons travel only where headers exist (the
    // consumer tests check them on the mock cluster); here the poison itself must be there.
    let letters = read_all(&rig.cluster.bootstrap(), &dlq, &client_overrides());
    let mut got: Vec<Vec<u8>> = letters.iter().map(|r| r.payload.clone()).collect();
    let mut want: Vec<Vec<u8>> = poison.iter().map(|(_, p)| p.clone()).collect();
    got.sort();
    want.sort();
    assert_eq!(
        got, want,
        "the dead-letter topic holds exactly the poison, unchanged"
    );
    rig.assert_exact(
        "bad records: wrong magic byte, unknown schema id, truncated Avro (all 3 in the DLQ)",
        None,
        3,
    )
    .await;
    producer.stop().await;
    consumer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load() {
    let _one = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let rig = Rig::new().await;
    let producer_config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        producer_config.path(),
        support::settings_toml(&rig.producer_settings()),
    )
    .unwrap();
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(config.path(), support::settings_toml(&rig.settings)).unwrap();
    let mut producer = Process::spawn("producer", producer_config.path());
    let mut consumer = Process::spawn("consumer", config.path());
    rig.exchange.wait_subscribed(&SYMBOLS, WAIT).await;
    let load = Emitter::start(&rig.exchange, Duration::from_millis(5));
    eventually_async("points flowing", WAIT, || async {
        rig.stored().await > 100
    })
    .await;

    let t = Instant::now();
    assert!(
        consumer.terminate().success(),
        "consumer exits 0 on SIGTERM"
    );
    let consumer_exit = t.elapsed();
    let t = Instant::now();
    assert!(
        producer.terminate().success(),
        "producer exits 0 on SIGTERM"
    );
    let producer_exit = t.elapsed();
    load.stop().await;
    let limit = rig
        .settings
        .producer
        .shutdown_timeout
        .max(rig.settings.consumer.shutdown_timeout)
        + Duration::from_secs(5);
    assert!(
        producer_exit < limit && consumer_exit < limit,
        "exits in time: {producer_exit:?}, {consumer_exit:?}"
    );

    // What the stopped consumer had not committed, the next one writes.
    let _next = Process::spawn("consumer", config.path());
    rig.assert_exact(
        &format!(
            "SIGTERM under load: producer exit {:.1}s, consumer exit {:.1}s",
            producer_exit.as_secs_f64(),
            consumer_exit.as_secs_f64()
        ),
        None,
        0,
    )
    .await;
}

/// Seconds Kafka may take to move leadership off a killed broker, plus the bound on what a
/// failover may add to any record beyond that: issue 19's target.
const FAILOVER_BOUND: Duration = Duration::from_secs(10);

/// What the watcher saw of the ticker topic at one moment, read by a fresh client each time so
/// that no cached metadata colours it: the leader and high watermark of every partition.
struct Sample {
    at_ms: i64,
    leaders: Vec<i32>,
    isr: Vec<Vec<i32>>,
    /// None where the leader did not answer within the poll.
    high: Vec<Option<i64>>,
}

fn watch_topic(
    brokers: String,
    topic: String,
    stop: tokio_util::sync::CancellationToken,
) -> Vec<Sample> {
    use rdkafka::consumer::Consumer;
    let mut samples = Vec::new();
    while !stop.is_cancelled() {
        let started = Instant::now();
        let client = support::reader(&brokers, &client_overrides());
        if let Ok(md) = client.fetch_metadata(Some(&topic), Duration::from_secs(1)) {
            let parts = md.topics()[0].partitions();
            let leaders: Vec<i32> = parts.iter().map(|p| p.leader()).collect();
            let isr = parts.iter().map(|p| p.isr().to_vec()).collect();
            let high = parts
                .iter()
                .map(|p| {
                    client
                        .fetch_watermarks(&topic, p.id(), Duration::from_millis(500))
                        .ok()
                        .map(|(_, h)| h)
                })
                .collect();
            samples.push(Sample {
                at_ms: support::now_ms(),
                leaders,
                isr,
                high,
            });
        }
        std::thread::sleep(Duration::from_millis(200).saturating_sub(started.elapsed()));
    }
    samples
}

/// Percentile of sorted values (nearest rank).
fn percentile(sorted: &[i64], p: f64) -> i64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One run of issue 19's scenario: records flow while one of three brokers is killed (-9) and
/// restarted. Every record's send, Kafka (high watermark past it) and InfluxDB times are
/// measured; none may be stored later than [`FAILOVER_BOUND`] after both its send and the
/// election that moved leadership off the killed broker.
async fn failover_run(run: usize) {
    let mut rig = Rig::new().await;
    // The session must outlast a failover of the group's coordinator: the brokers notice a dead
    // one after their ZooKeeper session timeout (6 s here), then elect. The rig's 6 s would end
    // the member's session on the client while the coordinator is away, and the rejoin waits
    // for the old member's session to expire at the new coordinator: ~12 s without a partition.
    rig.settings
        .kafka
        .consumer
        .insert("session.timeout.ms".into(), "15000".into());
    if let Ok(contexts) = std::env::var("CANDLESTREAM_FAILOVER_DEBUG") {
        rig.settings
            .kafka
            .consumer
            .insert("debug".into(), contexts.clone());
        rig.settings.kafka.producer.insert("debug".into(), contexts);
    }
    let consumer = start_consumer(rig.settings.clone(), 1);
    let producer = start(rig.producer_settings());
    rig.exchange.wait_subscribed(&SYMBOLS, WAIT).await;
    let stop_watch = tokio_util::sync::CancellationToken::new();
    let watcher = {
        let (b, t, s) = (
            rig.cluster.bootstrap(),
            rig.topic.clone(),
            stop_watch.clone(),
        );
        tokio::task::spawn_blocking(move || watch_topic(b, t, s))
    };

    // Emission: (symbol, volume bits) -> when the exchange wrote it, until told to stop.
    let stop_emit = tokio_util::sync::CancellationToken::new();
    let emitter = {
        let (ex, stop) = (rig.exchange.handle(), stop_emit.clone());
        tokio::spawn(async move {
            let mut sent = std::collections::BTreeMap::new();
            while !stop.is_cancelled() {
                for s in SYMBOLS {
                    if let Some(x) = ex.emit(s).await {
                        sent.insert(x.key(), support::now_ms());
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            sent
        })
    };
    // Stored: the same identity -> when InfluxDB first returned it.
    let stop_store = tokio_util::sync::CancellationToken::new();
    let store_watch = {
        let (influx_url, db, stop) = (rig.influx.url(), rig.db.clone(), stop_store.clone());
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut seen = std::collections::BTreeMap::new();
            while !stop.is_cancelled() {
                let q = "SELECT symbol, volume FROM ticker";
                let body: Option<serde_json::Value> = match client
                    .get(format!("{influx_url}/query"))
                    .query(&[("db", db.as_str()), ("q", q)])
                    .send()
                    .await
                {
                    Ok(r) => r.json().await.ok(),
                    Err(_) => None,
                };
                let now = support::now_ms();
                let values = body
                    .as_ref()
                    .and_then(|b| b["results"][0]["series"][0]["values"].as_array().cloned())
                    .unwrap_or_default();
                for row in values {
                    let key = (
                        row[1].as_str().unwrap_or_default().to_string(),
                        row[2].as_f64().unwrap_or_default().to_bits(),
                    );
                    seen.entry(key).or_insert(now);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            seen
        })
    };

    // The consumer fetches before the kill: a record the group has not started reading yet
    // waits for its first fetch, which is not what is measured here.
    eventually_async("points flowing", WAIT, || async { rig.stored().await > 30 }).await;
    let victim = run % 3;
    let victim_id = victim as i32 + 1;
    rig.cluster.kill_broker(victim);
    let killed_ms = support::now_ms();
    let brokers = rig.cluster.bootstrap();
    let topic = rig.topic.clone();
    // Elected: a fresh client's metadata names no partition led by the dead broker.
    let elected = until(Duration::from_secs(60), || {
        let (b, t) = (brokers.clone(), topic.clone());
        async move {
            tokio::task::spawn_blocking(move || {
                use rdkafka::consumer::Consumer;
                let md = support::reader(&b, &client_overrides())
                    .fetch_metadata(Some(&t), Duration::from_secs(1));
                md.is_ok_and(|md| {
                    md.topics()[0]
                        .partitions()
                        .iter()
                        .all(|p| p.leader() != victim_id && p.leader() >= 0)
                })
            })
            .await
            .unwrap()
        }
    })
    .await
    .expect("leaders elected for the killed broker's partitions");
    let elected_ms = killed_ms + elected.as_millis() as i64;
    tokio::task::block_in_place(|| rig.cluster.restart_broker(victim));
    let restarted_ms = support::now_ms();
    // Long enough for what follows a restart: the broker back in the in-sync replicas, and the
    // preferred-leader election (5 s after a new controller started) handing leadership back.
    tokio::time::sleep(Duration::from_secs(6)).await;
    stop_emit.cancel();
    let sent = emitter.await.unwrap();
    until(STORE_WAIT, || async { rig.stored().await >= sent.len() }).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    stop_store.cancel();
    stop_watch.cancel();
    let stored = store_watch.await.unwrap();
    let samples = watcher.await.unwrap();
    // The delays are the FAILOVER line's business.
    rig.assert_exact(
        &format!("broker failover run {run}: kill -9 broker {victim_id}, restart it"),
        None,
        0,
    )
    .await;

    // When each record became readable in Kafka: the first sample whose high watermark passed it.
    let records = support::read_all(&rig.cluster.bootstrap(), &rig.topic, &client_overrides());
    let decoder = candlestream::codec::Decoder::new(&rig.settings.schema_registry).unwrap();
    let mut in_kafka: std::collections::BTreeMap<(String, u64), i64> = Default::default();
    for r in &records {
        let candlestream::model::Record::Tick(t) = decoder.decode(&r.payload).await.unwrap() else {
            panic!("a trade in the ticker topic")
        };
        let seen = samples
            .iter()
            .find(|s| s.high.get(r.partition as usize).copied().flatten() > Some(r.offset))
            .map_or(i64::MAX, |s| s.at_ms);
        let e = in_kafka
            .entry((t.symbol, t.volume.to_bits()))
            .or_insert(seen);
        *e = (*e).min(seen);
    }
    // One record's way, in Unix ms: sent by the exchange, readable in Kafka, stored.
    #[derive(Clone, Copy)]
    struct Way {
        sent: i64,
        kafka: i64,
        stored: i64,
    }
    let ways: Vec<(&(String, u64), Way)> = sent
        .iter()
        .map(|(key, &sent)| {
            let (kafka, stored) = (in_kafka[key], stored[key]);
            (
                key,
                Way {
                    sent,
                    kafka,
                    stored,
                },
            )
        })
        .collect();
    let (key, worst) = *ways
        .iter()
        .max_by_key(|(_, w)| w.stored - w.sent)
        .expect("records sent");
    let late: Vec<(&(String, u64), i64, i64, i64)> = ways
        .iter()
        .filter(|(_, w)| w.stored > w.sent.max(elected_ms) + FAILOVER_BOUND.as_millis() as i64)
        .map(|(k, w)| {
            (
                *k,
                w.sent - killed_ms,
                w.kafka - killed_ms,
                w.stored - killed_ms,
            )
        })
        .collect();
    let sorted = |f: fn(&Way) -> i64| {
        let mut v: Vec<i64> = ways.iter().map(|(_, w)| f(w)).collect();
        v.sort();
        v
    };
    let delays = sorted(|w| w.stored - w.sent);
    // Per stage: send to Kafka (producer and brokers), Kafka to InfluxDB (consumer).
    let to_kafka = sorted(|w| w.kafka - w.sent);
    let to_store = sorted(|w| w.stored - w.kafka);
    // What the brokers said, each time it changed: leaders, in-sync replicas and whether each
    // partition's high watermark moved since the sample before.
    let mut timeline = String::new();
    let mut last = String::new();
    for w in samples.windows(2) {
        let moved: Vec<bool> = (0..w[1].high.len())
            .map(|p| w[1].high[p].is_some() && w[1].high[p] > w[0].high.get(p).copied().flatten())
            .collect();
        let now = format!(
            "leaders {:?} isr {:?} hw moving {:?}",
            w[1].leaders, w[1].isr, moved
        );
        if now != last {
            timeline += &format!(
                "\n  {:+.1}s {now}",
                (w[1].at_ms - killed_ms) as f64 / 1000.0
            );
            last = now;
        }
    }
    if std::env::var_os("CANDLESTREAM_FAILOVER_TIMELINE").is_some() {
        report!("FAILOVER | run {run} | timeline:{timeline}");
    }
    // Every record's send-to-store delay (ms), for distributions over a local loop of runs.
    if let Some(path) = std::env::var_os("CANDLESTREAM_FAILOVER_DELAYS") {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        for d in &delays {
            writeln!(f, "{run} {d}").unwrap();
        }
    }
    let rel = |t: i64| (t - killed_ms) as f64 / 1000.0;
    let kafka_leaders = samples
        .last()
        .map(|s| s.leaders.clone())
        .unwrap_or_default();
    report!(
        "FAILOVER | run {run} | broker {victim_id} killed, leaders elected +{:.1}s, restarted +{:.1}s | {} records | send-to-store p50 {:.2}s p99 {:.2}s max {:.2}s | to Kafka p50 {:.2}s max {:.2}s | Kafka to store p50 {:.2}s max {:.2}s | worst {key:?}: sent {:+.1}s, in Kafka {:+.1}s, stored {:+.1}s | late {} | leaders at end {kafka_leaders:?}",
        rel(elected_ms),
        rel(restarted_ms),
        sent.len(),
        percentile(&delays, 50.0) as f64 / 1000.0,
        percentile(&delays, 99.0) as f64 / 1000.0,
        (worst.stored - worst.sent) as f64 / 1000.0,
        percentile(&to_kafka, 50.0) as f64 / 1000.0,
        percentile(&to_kafka, 100.0) as f64 / 1000.0,
        percentile(&to_store, 50.0) as f64 / 1000.0,
        percentile(&to_store, 100.0) as f64 / 1000.0,
        rel(worst.sent),
        rel(worst.kafka),
        rel(worst.stored),
        late.len(),
    );
    assert!(
        late.is_empty(),
        "run {run}: {} records stored more than {FAILOVER_BOUND:?} after both their send and the election (+{:.1}s); first (sent, in Kafka, stored, seconds after the kill): {:?}; what the brokers said:{timeline}",
        late.len(),
        rel(elected_ms),
        &late[..late.len().min(5)]
    );
    producer.stop().await;
    consumer.stop().await;
}

/// Issue 19: a broker killed and restarted while records flow delays no record by more than
/// [`FAILOVER_BOUND`] beyond the leader election. One run in CI; `CANDLESTREAM_FAILOVER_RUNS=20`
/// loops it locally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_failover() {
    let _one = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let runs: usize = std::env::var("CANDLESTREAM_FAILOVER_RUNS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1);
    // The victim rotates with the run number; a local loop of single runs sets where it starts.
    let first: usize = std::env::var("CANDLESTREAM_FAILOVER_FIRST_RUN")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    for run in first..first + runs {
        failover_run(run).await;
    }
}
