//! Starting the producer in-process and checking what reached Kafka against what the fake
//! exchange sent.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use candlestream::codec::{Decoder, Encoder};
use candlestream::config::Settings;
use candlestream::model::{self, Source, Tick};
use candlestream::producer::{self, ProducerError};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::fake_bitfinex::{FakeBitfinex, Sent};
use super::fake_registry::FakeRegistry;
use super::{Record, SYMBOLS, eventually, java_partition, read_all, topic_size};

pub const WAIT: Duration = Duration::from_secs(20);

/// A producer or consumer running in this process.
pub struct Running {
    pub cancel: CancellationToken,
    pub task: JoinHandle<Result<(), String>>,
}

pub fn start(settings: Settings) -> Running {
    candlestream::telemetry::init_logging(&settings.log);
    let cancel = CancellationToken::new();
    let task = tokio::spawn(producer::run(settings, cancel.clone()));
    let task = tokio::spawn(async move {
        task.await
            .unwrap()
            .map_err(|e: ProducerError| e.to_string())
    });
    Running { cancel, task }
}

impl Running {
    pub async fn stop(self) {
        self.cancel.cancel();
        let result = tokio::time::timeout(WAIT, self.task)
            .await
            .expect("producer stops in time");
        result.expect("no panic").expect("clean shutdown");
    }
}

pub fn start_consumer(settings: Settings, workers: usize) -> Running {
    candlestream::telemetry::init_logging(&settings.log);
    let cancel = CancellationToken::new();
    let task = tokio::spawn(candlestream::consumer::run(
        settings,
        workers,
        cancel.clone(),
    ));
    let task = tokio::spawn(async move { task.await.unwrap().map_err(|e| e.to_string()) });
    Running { cancel, task }
}

/// `n` ticks per symbol with distinct values, `step_ms` apart in exchange time.
pub fn make_ticks(symbols: &[&str], n: usize, start_ms: i64, step_ms: i64) -> Vec<Tick> {
    let mut out = Vec::new();
    for i in 0..n {
        for (j, s) in symbols.iter().enumerate() {
            let price = 100.0 * (j + 1) as f64 + (i % 37) as f64 * 0.37 - (i % 11) as f64 * 0.11;
            let v = candlestream::exchange::bitfinex::message::TickerValues {
                bid: price - 0.5,
                bid_size: 1.0 + i as f64 / 1000.0,
                ask: price + 0.5,
                ask_size: 2.5,
                daily_change: -1.25,
                daily_change_relative: -0.0125,
                last_price: price,
                volume: 1000.0 + i as f64,
                high: price + 10.0,
                low: price - 10.0,
            };
            let t = start_ms + i as i64 * step_ms + j as i64;
            out.push(v.into_tick(s.to_string(), t, Some(i as i64), Source::Websocket, t + 5));
        }
    }
    out
}

/// Encodes ticks through the registry and produces them keyed by symbol, waiting for every ack.
pub async fn produce_ticks(
    brokers: &str,
    topic: &str,
    registry: &FakeRegistry,
    overrides: &BTreeMap<String, String>,
    ticks: &[Tick],
) {
    let encoder = encoder(registry, topic);
    let producer = raw_producer(brokers, overrides);
    for t in ticks {
        let payload = encoder
            .encode(&model::Record::Tick(t.clone()))
            .await
            .unwrap();
        produce_raw(&producer, topic, Some(t.symbol.as_bytes()), &payload).await;
    }
}

/// An encoder that registers the ticker schema under `<topic>-value`.
pub fn encoder(registry: &FakeRegistry, topic: &str) -> Encoder {
    let sr = candlestream::config::SchemaRegistryConfig {
        url: registry.url(),
        ..Default::default()
    };
    let kafka = candlestream::config::KafkaConfig {
        topic: topic.into(),
        ..Default::default()
    };
    Encoder::new(&sr, &kafka).unwrap()
}

pub fn raw_producer(
    brokers: &str,
    overrides: &BTreeMap<String, String>,
) -> rdkafka::producer::FutureProducer {
    let mut cfg = candlestream::config::KafkaConfig {
        brokers: brokers.into(),
        ..Default::default()
    };
    cfg.producer = overrides.clone();
    candlestream::kafka::producer_config(&cfg).create().unwrap()
}

pub async fn produce_raw(
    producer: &rdkafka::producer::FutureProducer,
    topic: &str,
    key: Option<&[u8]>,
    payload: &[u8],
) {
    let mut record = rdkafka::producer::FutureRecord::to(topic).payload(payload);
    if let Some(k) = key {
        record = record.key(k);
    }
    producer
        .send(record, Duration::from_secs(10))
        .await
        .map_err(|(e, _)| e)
        .expect("produce");
}

pub async fn emit_rounds(exchange: &FakeBitfinex, rounds: usize) -> usize {
    let mut n = 0;
    for _ in 0..rounds {
        for s in SYMBOLS {
            n += exchange.emit(s).await.map_or(0, |_| 1);
        }
    }
    n
}

/// Waits until Kafka holds everything the exchange sent so far: a quiet point at which cutting
/// the connection cannot lose frames still on the wire, which no client could save.
pub async fn caught_up(
    exchange: &FakeBitfinex,
    brokers: &str,
    topic: &str,
    overrides: &BTreeMap<String, String>,
) {
    let sent = exchange.sent().len();
    eventually("the client caught up with the exchange", WAIT, || {
        topic_size(brokers, topic, overrides) >= sent
    })
    .await;
}

/// Stops the producer once what was sent so far is in Kafka (frames still unread in the socket at
/// shutdown are given up by design), then returns the whole topic.
pub async fn stop_when_delivered(
    running: Running,
    exchange: &FakeBitfinex,
    brokers: &str,
    topic: &str,
    overrides: &BTreeMap<String, String>,
) -> Vec<Record> {
    caught_up(exchange, brokers, topic, overrides).await;
    running.stop().await;
    read_all(brokers, topic, overrides)
}

/// Decodes every record through the registry and checks that its key is its symbol.
pub async fn decode_records(registry: &FakeRegistry, records: &[Record]) -> Vec<model::Record> {
    let decoder = Decoder::new(&candlestream::config::SchemaRegistryConfig {
        url: registry.url(),
        ..Default::default()
    })
    .unwrap();
    let mut out = Vec::new();
    for r in records {
        let record = decoder
            .decode(&r.payload)
            .await
            .expect("every record decodes through the registry");
        assert_eq!(r.key.as_deref(), Some(record.symbol()), "key is the symbol");
        out.push(record);
    }
    out
}

pub async fn decode_all(registry: &FakeRegistry, records: &[Record]) -> Vec<Tick> {
    let decoded = decode_records(registry, records).await;
    decoded
        .into_iter()
        .map(|r| {
            if let model::Record::Tick(t) = r {
                t
            } else {
                panic!("a trade among the ticks")
            }
        })
        .collect()
}

pub async fn decode_trades(registry: &FakeRegistry, records: &[Record]) -> Vec<model::Trade> {
    let decoded = decode_records(registry, records).await;
    decoded
        .into_iter()
        .map(|r| {
            if let model::Record::Trade(t) = r {
                t
            } else {
                panic!("a tick among the trades")
            }
        })
        .collect()
}

/// (symbol, volume bits, source): volume is unique per symbol and update in the fake.
pub type Identity = (String, u64, bool);

pub fn sent_identity(s: &Sent) -> Identity {
    (s.symbol.clone(), s.values[7].to_bits(), s.rest)
}

pub fn tick_identity(t: &Tick) -> Identity {
    (
        t.symbol.clone(),
        t.volume.to_bits(),
        t.source == Source::Rest,
    )
}

/// Every sent update is in the topic exactly once, with the values and times that were sent.
pub fn assert_exactly_sent(sent: &[Sent], ticks: &[Tick]) {
    let mut want: Vec<Identity> = sent.iter().map(sent_identity).collect();
    let mut got: Vec<Identity> = ticks.iter().map(tick_identity).collect();
    want.sort();
    got.sort();
    assert_eq!(got.len(), want.len(), "record count");
    assert_eq!(got, want, "records differ from what the exchange sent");
    let by_identity: BTreeMap<Identity, &Tick> =
        ticks.iter().map(|t| (tick_identity(t), t)).collect();
    for s in sent {
        let t = by_identity[&sent_identity(s)];
        let got = [
            t.bid,
            t.bid_size,
            t.ask,
            t.ask_size,
            t.daily_change,
            t.daily_change_relative,
            t.last_price,
            t.volume,
            t.high,
            t.low,
        ];
        assert_eq!(got, s.values, "values of {s:?}");
        if let Some(ts) = s.exchange_time {
            // Exact, unless it shared a millisecond with a REST tick and was moved forward.
            assert!(
                (ts..ts + 50).contains(&t.exchange_time),
                "exchange time {} for sent {ts}",
                t.exchange_time
            );
            assert_eq!(t.sequence, s.seq.map(|x| x as i64));
        }
    }
}

pub fn assert_one_partition_per_symbol(records: &[Record], partitions_in_topic: i32) {
    let mut partitions: BTreeMap<String, BTreeSet<i32>> = BTreeMap::new();
    for r in records {
        partitions
            .entry(r.key.clone().unwrap())
            .or_default()
            .insert(r.partition);
    }
    for (symbol, parts) in partitions {
        assert_eq!(parts.len(), 1, "{symbol} spread over {parts:?}");
        let expected = java_partition(symbol.as_bytes(), partitions_in_topic);
        assert_eq!(
            parts.first(),
            Some(&expected),
            "{symbol} not where Java's murmur2 puts it"
        );
    }
}

/// Emits rounds of updates in the background until stopped; the fake records what it sent.
pub struct Emitter {
    stop: CancellationToken,
    task: JoinHandle<usize>,
}

impl Emitter {
    pub fn start(exchange: &FakeBitfinex, pause: Duration) -> Self {
        let stop = CancellationToken::new();
        let token = stop.clone();
        let exchange = exchange.handle();
        let task = tokio::spawn(async move {
            let mut n = 0;
            while !token.is_cancelled() {
                for s in SYMBOLS {
                    n += exchange.emit(s).await.map_or(0, |_| 1);
                }
                tokio::time::sleep(pause).await;
            }
            n
        });
        Self { stop, task }
    }

    /// Stops emitting; returns how many updates reached a subscribed client.
    pub async fn stop(self) -> usize {
        self.stop.cancel();
        self.task.await.unwrap()
    }
}
