//! SIGTERM keeps its budget whatever the pipeline is waiting for: a consumer stopped while
//! InfluxDB is down, and a producer stopped while no broker answers, each exit 0 within their
//! `shutdown_timeout`. On the real cluster (Kafka 0.9, 3 brokers) and InfluxDB 1.6.7.

// The cluster lock is held across awaits on purpose: it keeps whole tests, each on its own
// runtime, from running two clusters at once.
#![allow(clippy::await_holding_lock)]

mod support;

use std::time::{Duration, Instant};

use support::kafka09::client_overrides;
use support::pipeline::*;
use support::rig::{CLUSTER, Rig};
use support::{Process, SYMBOLS, eventually_async};

/// Short budgets keep the tests lean; the bound is the same whatever its size.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(6);
/// What the process may take beyond its budget to tear down (librdkafka's threads, the
/// runtime) once everything that waits has given up.
const EXIT_SLACK: Duration = Duration::from_secs(1);

/// SIGTERM, then waits for the exit; a process still running `give_up` after the signal is
/// killed, so that a shutdown that hangs fails the test instead of hanging it.
fn terminate(
    process: &mut Process,
    give_up: Duration,
) -> (Option<std::process::ExitStatus>, Duration) {
    let signalled = Instant::now();
    std::process::Command::new("kill")
        .args(["-TERM", &process.0.id().to_string()])
        .status()
        .unwrap();
    while signalled.elapsed() < give_up {
        if let Some(status) = process.0.try_wait().unwrap() {
            return (Some(status), signalled.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    process.kill();
    (None, signalled.elapsed())
}

fn config_file(settings: &candlestream::config::Settings) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), support::settings_toml(settings)).unwrap();
    file
}

/// Points InfluxDB holds per partition of the ticks topic (each symbol has one partition).
async fn stored_per_partition(rig: &Rig, partitions: i32) -> Vec<i64> {
    let mut stored = vec![0; partitions as usize];
    for symbol in SYMBOLS {
        let q = format!("SELECT count(last_price) FROM ticker WHERE symbol = '{symbol}'");
        let rows = rig.influx.rows(&rig.db, &q).await;
        let n = rows.first().and_then(|r| r["count"].as_i64()).unwrap_or(0);
        stored[support::java_partition(symbol.as_bytes(), partitions) as usize] += n;
    }
    stored
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_stopped_during_an_influx_outage_exits_in_time_and_commits_nothing_unwritten() {
    let _one = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let mut rig = Rig::new().await;
    rig.settings.consumer.shutdown_timeout = SHUTDOWN_TIMEOUT;
    rig.settings.consumer.workers = 2;
    // Long enough waits that the signal lands inside one of them as well as inside a write.
    rig.settings.consumer.retry_backoff_max = Duration::from_secs(4);
    let config = config_file(&rig.settings);
    let producer = start(rig.producer_settings());
    let mut consumer = Process::spawn("consumer", config.path());
    rig.exchange.wait_subscribed(&SYMBOLS, WAIT).await;
    let load = Emitter::start(&rig.exchange, Duration::from_millis(20));
    eventually_async("points flowing", WAIT, || async { rig.stored().await > 30 }).await;

    rig.influx.stop();
    // Both members are holding batches and retrying by now.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (status, exit) =
        tokio::task::block_in_place(|| terminate(&mut consumer, SHUTDOWN_TIMEOUT * 4));
    load.stop().await;
    assert!(
        status.is_some_and(|s| s.success()),
        "consumer exits 0 on SIGTERM during the outage: {status:?} after {exit:?}"
    );
    assert!(
        exit <= SHUTDOWN_TIMEOUT + EXIT_SLACK,
        "consumer exits within consumer.shutdown_timeout ({SHUTDOWN_TIMEOUT:?}) of the signal, took {exit:?}"
    );

    tokio::task::block_in_place(|| rig.influx.start_again());
    let brokers = rig.cluster.bootstrap();
    let group = rig.settings.kafka.group_id.clone();
    let topic = rig.topic.clone();
    let offsets = tokio::task::spawn_blocking(move || {
        support::committed_offsets(&brokers, &group, &topic, 3, &client_overrides())
    })
    .await
    .unwrap();
    let stored = stored_per_partition(&rig, 3).await;
    for p in 0..3 {
        assert!(
            offsets[p] <= stored[p],
            "partition {p}: offset {} committed, InfluxDB holds {} points",
            offsets[p],
            stored[p]
        );
    }

    // The replacement reads from the last commit and writes what was not.
    let _next = Process::spawn("consumer", config.path());
    producer.stop().await;
    rig.assert_exact(
        &format!(
            "SIGTERM to a 2-worker consumer 4 s into an InfluxDB outage: exit 0 after {:.1}s (budget {:.0}s); committed {offsets:?} <= stored {stored:?}; the replacement stores every tick once",
            exit.as_secs_f64(),
            SHUTDOWN_TIMEOUT.as_secs_f64()
        ),
        None,
        0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_stopped_while_kafka_is_unreachable_exits_in_time() {
    let _one = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let mut rig = Rig::new().await;
    let mut settings = rig.producer_settings();
    settings.producer.shutdown_timeout = SHUTDOWN_TIMEOUT;
    // A small queue fills while the brokers are down, so the producer is also waiting for room.
    settings
        .kafka
        .producer
        .insert("queue.buffering.max.messages".into(), "100".into());
    let config = config_file(&settings);
    let mut producer = Process::spawn("producer", config.path());
    rig.exchange.wait_subscribed(&SYMBOLS, WAIT).await;
    let load = Emitter::start(&rig.exchange, Duration::from_millis(5));
    let brokers = rig.cluster.bootstrap();
    eventually_async("records in Kafka", WAIT, || async {
        let brokers = brokers.clone();
        let topic = rig.topic.clone();
        tokio::task::spawn_blocking(move || {
            support::topic_size(&brokers, &topic, &client_overrides()) > 30
        })
        .await
        .unwrap()
    })
    .await;

    tokio::task::block_in_place(|| {
        for i in 0..3 {
            rig.cluster.kill_broker(i);
        }
    });
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (status, exit) =
        tokio::task::block_in_place(|| terminate(&mut producer, SHUTDOWN_TIMEOUT * 4));
    let emitted = load.stop().await;
    assert!(
        status.is_some_and(|s| s.success()),
        "producer exits 0 on SIGTERM with every broker down: {status:?} after {exit:?}"
    );
    assert!(
        exit <= SHUTDOWN_TIMEOUT + EXIT_SLACK,
        "producer exits within producer.shutdown_timeout ({SHUTDOWN_TIMEOUT:?}) of the signal, took {exit:?}"
    );
    report!(
        "RELIABILITY | SIGTERM to a producer 4 s after all 3 brokers died ({emitted} updates emitted) | exit 0 after {:.1}s (budget {:.0}s)",
        exit.as_secs_f64(),
        SHUTDOWN_TIMEOUT.as_secs_f64()
    );
}
