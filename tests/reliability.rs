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

    // A second one dies: no acks are possible; the producer holds the data and says so.
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
    let outage = Duration::from_secs(30);
    rig.influx.stop();
    tokio::time::sleep(outage).await;
    assert!(
        counter(&rig, "candlestream_consumer_pauses_total").await > 0.0,
        "partitions paused while InfluxDB was down"
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
