//! Producer integration tests: fake Bitfinex → producer → librdkafka's mock cluster (3 brokers),
//! with the fake Schema Registry.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use candlestream::candles::{Tick, TickSource};
use candlestream::codec::{value_subject, TickDecoder};
use candlestream::config::{ExchangeMode, Settings};
use candlestream::producer::{self, ProducerError};
use rdkafka::mocking::MockCluster;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use support::fake_bitfinex::{FakeBitfinex, Sent};
use support::fake_registry::FakeRegistry;
use support::{eventually, java_partition, read_all, settings, topic_size, unique, Record, SYMBOLS};

const PARTITIONS: i32 = 3;
const WAIT: Duration = Duration::from_secs(15);

struct Running {
    cancel: CancellationToken,
    task: JoinHandle<Result<(), ProducerError>>,
}

fn start(settings: Settings) -> Running {
    let cancel = CancellationToken::new();
    let task = tokio::spawn(producer::run(settings, cancel.clone()));
    Running { cancel, task }
}

impl Running {
    async fn stop(self) {
        self.cancel.cancel();
        let result = tokio::time::timeout(WAIT, self.task).await.expect("producer stops in time");
        result.expect("no panic").expect("clean shutdown");
    }
}

fn mock_cluster(topic: &str) -> MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
    let cluster = MockCluster::new(3).unwrap();
    cluster.create_topic(topic, PARTITIONS, 3).unwrap();
    cluster
}

async fn emit_rounds(exchange: &FakeBitfinex, rounds: usize) -> usize {
    let mut n = 0;
    for _ in 0..rounds {
        for s in SYMBOLS {
            n += exchange.emit(s).await.map_or(0, |_| 1);
        }
    }
    n
}

/// Stops the producer once what was sent so far is in Kafka (frames still unread in the socket at
/// shutdown are given up by design), then returns the whole topic.
async fn stop_when_delivered(running: Running, exchange: &FakeBitfinex, brokers: &str, topic: &str) -> Vec<Record> {
    let sent = exchange.sent().len();
    eventually("sent updates reach Kafka", WAIT, || topic_size(brokers, topic, &BTreeMap::new()) >= sent).await;
    running.stop().await;
    read_all(brokers, topic, &BTreeMap::new())
}

async fn decode_all(registry: &FakeRegistry, records: &[Record]) -> Vec<Tick> {
    let decoder = TickDecoder::new(&candlestream::config::SchemaRegistryConfig {
        url: registry.url(),
        ..Default::default()
    })
    .unwrap();
    let mut ticks = Vec::new();
    for r in records {
        let tick = decoder.decode(&r.payload).await.expect("every record decodes through the registry");
        assert_eq!(r.key.as_deref(), Some(tick.symbol.as_str()), "key is the symbol");
        ticks.push(tick);
    }
    ticks
}

/// (symbol, volume bits, source): volume is unique per symbol and update in the fake.
type Identity = (String, u64, bool);

fn sent_identity(s: &Sent) -> Identity {
    (s.symbol.clone(), s.values[7].to_bits(), s.rest)
}

fn tick_identity(t: &Tick) -> Identity {
    (t.symbol.clone(), t.volume.to_bits(), t.source == TickSource::Rest)
}

/// Every sent update is in the topic exactly once, with the values and times that were sent.
fn assert_exactly_sent(sent: &[Sent], ticks: &[Tick]) {
    let mut want: Vec<Identity> = sent.iter().map(sent_identity).collect();
    let mut got: Vec<Identity> = ticks.iter().map(tick_identity).collect();
    want.sort();
    got.sort();
    assert_eq!(got.len(), want.len(), "record count");
    assert_eq!(got, want, "records differ from what the exchange sent");
    let by_identity: BTreeMap<Identity, &Tick> = ticks.iter().map(|t| (tick_identity(t), t)).collect();
    for s in sent {
        let t = by_identity[&sent_identity(s)];
        let got = [t.bid, t.bid_size, t.ask, t.ask_size, t.daily_change, t.daily_change_relative, t.last_price, t.volume, t.high, t.low];
        assert_eq!(got, s.values, "values of {s:?}");
        if let Some(ts) = s.exchange_time {
            // Exact, unless it shared a millisecond with a REST tick and was moved forward.
            assert!((ts..ts + 50).contains(&t.exchange_time), "exchange time {} for sent {ts}", t.exchange_time);
            assert_eq!(t.sequence, s.seq.map(|x| x as i64));
        }
    }
}

fn assert_one_partition_per_symbol(records: &[Record]) {
    let mut partitions: BTreeMap<String, BTreeSet<i32>> = BTreeMap::new();
    for r in records {
        partitions.entry(r.key.clone().unwrap()).or_default().insert(r.partition);
    }
    for (symbol, parts) in partitions {
        assert_eq!(parts.len(), 1, "{symbol} spread over {parts:?}");
        let expected = java_partition(symbol.as_bytes(), PARTITIONS);
        assert_eq!(parts.first(), Some(&expected), "{symbol} not where Java's murmur2 puts it");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_update_arrives_across_restart_and_abrupt_close() {
    let topic = unique("ticks");
    let cluster = mock_cluster(&topic);
    let exchange = FakeBitfinex::start().await;
    let registry = FakeRegistry::start().await;
    let running = start(settings(&exchange, &registry, &cluster.bootstrap_servers(), &topic));

    exchange.wait_subscribed(&SYMBOLS, WAIT).await;
    let mut emitted = emit_rounds(&exchange, 20).await;
    exchange.restart().await;
    exchange.wait_subscribed(&SYMBOLS, WAIT).await;
    emitted += emit_rounds(&exchange, 20).await;
    exchange.drop_connections().await;
    exchange.wait_subscribed(&SYMBOLS, WAIT).await;
    emitted += emit_rounds(&exchange, 20).await;
    assert_eq!(emitted, 180, "every emit reached a subscribed client");
    assert!(exchange.ws_connections() >= 3, "reconnected after 20051 and after the close");
    let records = stop_when_delivered(running, &exchange, &cluster.bootstrap_servers(), &topic).await;
    let sent = exchange.sent();
    let ticks = decode_all(&registry, &records).await;
    assert_exactly_sent(&sent, &ticks);
    assert_one_partition_per_symbol(&records);
    assert!(registry.subjects().contains(&value_subject(&topic)), "schema under <topic>-value");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_fills_in_while_websocket_is_down_and_stops_when_it_is_back() {
    let topic = unique("ticks");
    let cluster = mock_cluster(&topic);
    let exchange = FakeBitfinex::start().await;
    let registry = FakeRegistry::start().await;
    exchange.set_accepting(false);
    let running = start(settings(&exchange, &registry, &cluster.bootstrap_servers(), &topic));

    eventually("REST polls while the websocket is refused", WAIT, || exchange.rest_requests() >= 5).await;
    assert_eq!(exchange.ws_connections(), 0);
    exchange.set_accepting(true);
    exchange.wait_subscribed(&SYMBOLS, WAIT).await;
    emit_rounds(&exchange, 5).await;
    // The client covers a symbol once it reads `subscribed`; allow that much, then no more polls.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let polls = exchange.rest_requests();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(exchange.rest_requests(), polls, "REST keeps polling with the websocket back");
    let records = stop_when_delivered(running, &exchange, &cluster.bootstrap_servers(), &topic).await;
    let sent = exchange.sent();
    assert!(sent.iter().any(|s| s.rest) && sent.iter().any(|s| !s.rest));
    let ticks = decode_all(&registry, &records).await;
    assert_exactly_sent(&sent, &ticks);
    for t in ticks.iter().filter(|t| t.source == TickSource::Rest) {
        assert_eq!(t.exchange_time, t.received_at, "REST ticks carry their receive time");
        assert_eq!(t.sequence, None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_mode_never_opens_a_websocket() {
    let topic = unique("ticks");
    let cluster = mock_cluster(&topic);
    let exchange = FakeBitfinex::start().await;
    let registry = FakeRegistry::start().await;
    let mut s = settings(&exchange, &registry, &cluster.bootstrap_servers(), &topic);
    s.bitfinex.mode = ExchangeMode::Rest;
    let running = start(s);
    eventually("three REST polls", WAIT, || exchange.rest_requests() >= 3).await;
    let records = stop_when_delivered(running, &exchange, &cluster.bootstrap_servers(), &topic).await;
    assert_eq!(exchange.ws_connections(), 0);
    let sent = exchange.sent();
    assert_exactly_sent(&sent, &decode_all(&registry, &records).await);
}
