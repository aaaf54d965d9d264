//! The producer against a real replicated Kafka cluster: ZooKeeper + 3 brokers of Kafka 0.9.0.1,
//! topic with replication 3 and min.insync.replicas=2, acks=all.

// The cluster lock is held across awaits on purpose: it keeps whole tests, each on its own
// runtime, from running two clusters at once.
#![allow(clippy::await_holding_lock)]

mod support;

use std::sync::Mutex;

use support::fake_bitfinex::FakeBitfinex;
use support::fake_registry::FakeRegistry;
use support::kafka09::{client_overrides, producer_overrides, KafkaCluster};
use support::pipeline::*;
use support::{settings, unique, SYMBOLS};
use support::pipeline::{make_ticks, start_consumer};

/// One cluster at a time: each is four JVMs on a two-core machine.
static CLUSTER: Mutex<()> = Mutex::new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_writes_every_update_through_a_replicated_cluster() {
    let _one_at_a_time = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let cluster = tokio::task::spawn_blocking(|| KafkaCluster::start(3)).await.unwrap();
    let topic = unique("ticks");
    cluster.create_topic(&topic, 3, 3, 2);
    assert!(cluster.describe(&topic).contains("min.insync.replicas=2"));

    let exchange = FakeBitfinex::start().await;
    let registry = FakeRegistry::start().await;
    let mut s = settings(&exchange, &registry, &cluster.bootstrap(), &topic);
    s.kafka.producer = producer_overrides();
    s.kafka.producer.insert("acks".into(), "all".into());
    let running = start(s);
    exchange.wait_subscribed(&SYMBOLS, WAIT).await;
    assert_eq!(emit_rounds(&exchange, 50).await, 150);
    let records = stop_when_delivered(running, &exchange, &cluster.bootstrap(), &topic, &client_overrides()).await;
    let ticks = decode_all(&registry, &records).await;
    assert_exactly_sent(&exchange.sent(), &ticks);
    assert_one_partition_per_symbol(&records, 3);
}

/// The whole pipeline on real parts where they exist: fake exchange → producer → Kafka 0.9
/// (3 brokers, RF 3, min.insync 2) → two consumers in one group → InfluxDB 1.6; Grafana's
/// 2-minute candle query must return exactly the candles the sent ticks imply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_to_end_candles_match_what_the_exchange_sent() {
    use candlestream::candles::{candles, Tick, CANDLE_WIDTH_MS};
    use support::influx1::Influx1;

    let _one_at_a_time = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let cluster = tokio::task::spawn_blocking(|| KafkaCluster::start(3)).await.unwrap();
    let topic = unique("ticks");
    cluster.create_topic(&topic, 3, 3, 2);
    cluster.create_topic(&format!("{topic}-dlq"), 1, 3, 2);
    let influx = tokio::task::spawn_blocking(Influx1::start).await.unwrap();
    influx.create_database("candles").await;

    // Exchange time starts on a candle boundary and moves 7 s per frame: ~6 candles per symbol.
    let start_ms: u64 = 1_763_787_600_000;
    let exchange = FakeBitfinex::start_synthetic(start_ms, 7_000).await;
    let registry = FakeRegistry::start().await;
    let mut s = settings(&exchange, &registry, &cluster.bootstrap(), &topic);
    s.kafka.producer = producer_overrides();
    s.kafka.consumer = client_overrides();
    s.kafka.consumer.insert("session.timeout.ms".into(), "6000".into());
    influx.configure(&mut s, "candles");
    let consumers = [start_consumer(s.clone(), 1), start_consumer(s.clone(), 1)];
    let producer = start(s);

    exchange.wait_subscribed(&SYMBOLS, WAIT).await;
    let sent = emit_rounds(&exchange, 40).await;
    assert_eq!(sent, 120);
    support::eventually_async("every tick in InfluxDB", WAIT * 2, || async { influx.count("candles", "ticker").await >= sent })
        .await;
    producer.stop().await;
    for c in consumers {
        c.stop().await;
    }
    assert_eq!(influx.count("candles", "ticker").await, sent, "exactly one point per tick");

    let sent = exchange.sent();
    for symbol in SYMBOLS {
        let ticks: Vec<Tick> = sent
            .iter()
            .filter(|x| x.symbol == symbol)
            .map(|x| {
                let mut t = make_ticks(&[symbol], 1, x.exchange_time.unwrap(), 0).remove(0);
                t.exchange_time = x.exchange_time.unwrap();
                t.last_price = x.last_price();
                t
            })
            .collect();
        let want = candles(&ticks, CANDLE_WIDTH_MS);
        assert!(want.len() >= 3, "the test should span several candles");
        let q = format!(
            "SELECT first(last_price), max(last_price), min(last_price), last(last_price) FROM ticker \
             WHERE symbol='{symbol}' AND time >= {start_ms}ms AND time < {end}ms GROUP BY time(2m) fill(none)",
            end = start_ms + 3_600_000
        );
        let rows = influx.rows("candles", &q).await;
        let got: Vec<candlestream::candles::Candle> = rows
            .iter()
            .map(|r| candlestream::candles::Candle {
                start_ms: r["time"].as_i64().unwrap(),
                open: r["first"].as_f64().unwrap(),
                high: r["max"].as_f64().unwrap(),
                low: r["min"].as_f64().unwrap(),
                close: r["last"].as_f64().unwrap(),
            })
            .collect();
        assert_eq!(got, want, "candles of {symbol}");
    }
}
