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
