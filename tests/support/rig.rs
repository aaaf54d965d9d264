//! A whole pipeline on real parts for the reliability and trade suites: a Kafka 0.9 cluster of
//! 3 brokers (ticker, trades and dead-letter topics with replication 3 and min.insync.replicas=2),
//! InfluxDB 1.6.7, the fake exchange and the fake Schema Registry, and exact-count checks of what
//! InfluxDB holds against what the exchange sent or executed.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use candlestream::config::Settings;

use super::fake_bitfinex::FakeBitfinex;
use super::fake_registry::FakeRegistry;
use super::influx1::Influx1;
use super::kafka09::{KafkaCluster, client_overrides, producer_overrides};
use super::{eventually_async, high_watermarks, settings, topic_size, unique};

/// One cluster at a time: each is four JVMs on a two-core machine.
pub static CLUSTER: Mutex<()> = Mutex::new(());

pub const STORE_WAIT: Duration = Duration::from_secs(90);

pub struct Rig {
    pub cluster: KafkaCluster,
    pub topic: String,
    pub influx: Influx1,
    pub db: String,
    pub exchange: FakeBitfinex,
    // Kept alive for the pipeline; tests reach it through the settings.
    _registry: FakeRegistry,
    pub settings: Settings,
    pub producer_port: u16,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Rig {
    pub async fn new() -> Self {
        Self::with_registry(FakeRegistry::start().await).await
    }

    pub async fn with_registry(registry: FakeRegistry) -> Self {
        let cluster = tokio::task::spawn_blocking(|| KafkaCluster::start(3))
            .await
            .unwrap();
        Self::on_cluster(cluster, registry).await
    }

    /// The rig on a 3-broker cluster the test started itself (with TLS, say).
    pub async fn on_cluster(cluster: KafkaCluster, registry: FakeRegistry) -> Self {
        let topic = unique("ticks");
        cluster.create_topic(&topic, 3, 3, 2);
        cluster.create_topic(&format!("{topic}-trades"), 3, 3, 2);
        cluster.create_topic(&format!("{topic}-dlq"), 1, 3, 2);
        let influx = tokio::task::spawn_blocking(Influx1::start).await.unwrap();
        let db = topic.replace('-', "_");
        influx.create_database(&db).await;
        let exchange = FakeBitfinex::start().await;
        let mut s = settings(&exchange, &registry, &cluster.bootstrap(), &topic);
        s.kafka.producer = producer_overrides();
        s.kafka.consumer = client_overrides();
        s.kafka
            .consumer
            .insert("session.timeout.ms".into(), "6000".into());
        s.kafka
            .consumer
            .insert("heartbeat.interval.ms".into(), "500".into());
        s.health.max_ack_silence = Duration::from_secs(3);
        influx.configure(&mut s, &db);
        s.consumer.retry_backoff_max = Duration::from_secs(1);
        Self {
            cluster,
            topic,
            influx,
            db,
            exchange,
            _registry: registry,
            settings: s,
            producer_port: free_port(),
        }
    }

    pub fn producer_settings(&self) -> Settings {
        let mut s = self.settings.clone();
        s.http.listen = ([127, 0, 0, 1], self.producer_port).into();
        s
    }

    pub async fn health(&self) -> (u16, String) {
        match reqwest::get(format!("http://127.0.0.1:{}/healthz", self.producer_port)).await {
            Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
            Err(e) => (0, e.to_string()),
        }
    }

    pub async fn metrics(&self) -> String {
        self.try_metrics().await.unwrap()
    }

    /// The producer's /metrics, or why there is none (the producer may be what failed).
    async fn try_metrics(&self) -> Result<String, reqwest::Error> {
        reqwest::get(format!("http://127.0.0.1:{}/metrics", self.producer_port))
            .await?
            .text()
            .await
    }

    /// Records Kafka acknowledged to the producer, from its /metrics.
    pub async fn produced(&self) -> u64 {
        let metrics = self.metrics().await;
        let line = metrics
            .lines()
            .find(|l| l.starts_with("candlestream_kafka_produced_total"))
            .unwrap_or("x 0");
        line.rsplit(' ')
            .next()
            .unwrap()
            .parse::<f64>()
            .unwrap_or(0.0) as u64
    }

    /// The ticker topic's high watermark per partition (see [`high_watermarks`]).
    pub async fn high_watermarks(&self) -> Vec<i64> {
        let (brokers, topic) = (self.cluster.bootstrap(), self.topic.clone());
        tokio::task::spawn_blocking(move || high_watermarks(&brokers, &topic, &client_overrides()))
            .await
            .unwrap()
    }

    /// Waits, after a broker was killed, until every partition of the ticker topic that held
    /// records (`held`: its high watermarks before the kill) has taken a write on its leader of
    /// now: its followers have fetched from that leader since its election. Panics after
    /// `timeout`.
    ///
    /// Why: Kafka before 0.11 loses a write it acknowledged when the leader elected after a
    /// broker's death dies before its followers fetched from it (KIP-101). A follower of a new
    /// leader first cuts its log back to the high watermark it last heard of, which can lie below
    /// the newest acknowledged record, and fetches the rest again; elected before that, it leads
    /// without those records. One run lost 2 ticks so: acknowledged 17 ms before the first kill,
    /// gone after a second kill that raced the first election (in-sync sets shrink after 5 s,
    /// the dead broker's session ends after 6 s). The Kafka of the compose file (3.9, leader
    /// epochs) does not truncate so; the producer and consumer under test cannot help it.
    pub async fn wait_refetched(&self, held: &[i64], timeout: Duration) {
        // Read from each partition's leader once it answers: for a partition the dead broker
        // led, after the election.
        let elected = self.high_watermarks().await;
        let refetched = until(timeout, || async {
            let now = self.high_watermarks().await;
            held.iter()
                .zip(&elected)
                .zip(&now)
                .all(|((&held, &elected), &now)| held == 0 || now > elected)
        })
        .await;
        if let Some(waited) = refetched {
            eprintln!("rig: every partition took a write on its leader of now after {waited:?}");
        }
        assert!(
            refetched.is_some(),
            "a partition took no write on its new leader within {timeout:?} of the election: held {held:?}, at the election {elected:?}, now {:?}",
            self.high_watermarks().await
        );
    }

    pub async fn stored(&self) -> usize {
        self.influx.count(&self.db, "ticker").await
    }

    /// Waits until InfluxDB holds as many points as the exchange sent, then checks that each
    /// websocket update is there exactly once with its price, and returns the outcome.
    /// `injected` counts records the test wrote to the topic itself (poison), not duplicates.
    pub async fn assert_exact(&self, scenario: &str, recovery: Option<Duration>, injected: usize) {
        let sent = self.exchange.sent();
        let all_stored = until(STORE_WAIT, || async { self.stored().await >= sent.len() }).await;
        if all_stored.is_none() {
            // Where the missing ones stopped: never produced, or in Kafka and not stored.
            let in_kafka = topic_size(&self.cluster.bootstrap(), &self.topic, &client_overrides());
            let state = self.cluster.state(&self.topic);
            let rows = self
                .influx
                .rows(&self.db, "SELECT symbol, volume FROM ticker")
                .await;
            let keys: std::collections::BTreeSet<(String, u64)> =
                rows.iter().map(stored_key).collect();
            let missing: Vec<String> = sent
                .iter()
                .filter(|s| !keys.contains(&s.key()))
                .take(5)
                .map(|s| {
                    format!(
                        "{} at exchange time {:?} (seq {:?})",
                        s.symbol, s.exchange_time, s.seq
                    )
                })
                .collect();
            let scraped = self
                .try_metrics()
                .await
                .unwrap_or_else(|e| format!("no /metrics: {e}"));
            let producer: Vec<String> = scraped
                .lines()
                .filter(|l| l.starts_with("candlestream_kafka_") || l.starts_with("no /metrics"))
                .map(String::from)
                .collect();
            // The counts last: a CI log keeps the end of a long failure.
            panic!(
                "{state}the producer's Kafka metrics: {producer:#?}\nmissing: {missing:#?}\n{scenario}: timed out waiting for every sent tick to be stored: sent {}, stored {}, in Kafka {in_kafka}",
                sent.len(),
                self.stored().await
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rows = self
            .influx
            .rows(&self.db, "SELECT symbol, last_price, volume FROM ticker")
            .await;
        let stored: BTreeMap<(String, u64), (i64, f64)> = rows
            .iter()
            .map(|r| {
                (
                    stored_key(r),
                    (
                        r["time"].as_i64().unwrap(),
                        r["last_price"].as_f64().unwrap(),
                    ),
                )
            })
            .collect();
        for s in &sent {
            let (time, price) = *stored
                .get(&s.key())
                .unwrap_or_else(|| panic!("{scenario}: {s:?} not in InfluxDB"));
            assert_eq!(price, s.last_price(), "{s:?}");
            if let Some(t) = s.exchange_time {
                // Exact, unless it shared a millisecond with a REST tick and moved forward.
                assert!((t..t + 50).contains(&time), "{s:?} stored at {time}");
            }
        }
        assert_eq!(rows.len(), sent.len(), "{scenario}: stored vs sent");
        let in_kafka = topic_size(&self.cluster.bootstrap(), &self.topic, &client_overrides());
        crate::report!(
            "RELIABILITY | {scenario} | sent {} | stored {} | duplicates in Kafka {} | duplicates in InfluxDB 0 | recovery {}",
            sent.len(),
            rows.len(),
            in_kafka.saturating_sub(sent.len() + injected),
            recovery.map_or("-".into(), |d| format!("{:.1}s", d.as_secs_f64())),
        );
    }
}

/// A stored ticker point's identity, as [`Sent::key`](super::fake_bitfinex::Sent::key) gives a
/// sent update's.
fn stored_key(row: &serde_json::Map<String, serde_json::Value>) -> (String, u64) {
    (
        row["symbol"].as_str().unwrap().to_string(),
        row["volume"].as_f64().unwrap().to_bits(),
    )
}

pub async fn until<F, Fut>(timeout: Duration, mut cond: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while started.elapsed() < timeout {
        if cond().await {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

impl Rig {
    pub fn trades_topic(&self) -> String {
        self.settings.kafka.trades_topic.clone()
    }

    /// Waits until InfluxDB holds as many trades as the exchange executed, then checks that the
    /// points are exactly the ledger: same ids, each once, with the exchange's symbol, side,
    /// price, absolute amount and millisecond. Prints a `RELIABILITY |` line; returns the count.
    pub async fn assert_trades_exact(&self, scenario: &str, recovery: Option<Duration>) -> usize {
        let ledger = self.exchange.ledger();
        let wait = STORE_WAIT * 2;
        eventually_async("every executed trade stored", wait, || async {
            self.influx.count_trades(&self.db).await >= ledger.len()
        })
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rows = self
            .influx
            .rows(
                &self.db,
                "SELECT symbol, side, id, price, amount FROM trades",
            )
            .await;
        let stored: BTreeMap<i64, &serde_json::Map<String, serde_json::Value>> = rows
            .iter()
            .map(|r| (r["id"].as_i64().expect("integer id"), r))
            .collect();
        assert_eq!(
            stored.len(),
            rows.len(),
            "{scenario}: two points share a trade id"
        );
        for t in &ledger {
            let r = stored
                .get(&t.id)
                .unwrap_or_else(|| panic!("{scenario}: {t:?} not in InfluxDB"));
            let side = if t.amount < 0.0 { "sell" } else { "buy" };
            assert_eq!(r["symbol"].as_str(), Some(t.symbol.as_str()), "{t:?}");
            assert_eq!(r["side"].as_str(), Some(side), "{t:?}");
            assert_eq!(r["price"].as_f64(), Some(t.price), "{t:?}");
            assert_eq!(r["amount"].as_f64(), Some(t.amount.abs()), "{t:?}");
            assert_eq!(
                r["time"].as_i64(),
                Some(t.mts),
                "{t:?}: stored in the exchange's millisecond"
            );
        }
        assert_eq!(rows.len(), ledger.len(), "{scenario}: stored vs executed");
        let in_kafka = topic_size(
            &self.cluster.bootstrap(),
            &self.trades_topic(),
            &client_overrides(),
        );
        crate::report!(
            "RELIABILITY | {scenario} | executed {} | stored {} | duplicates in Kafka {} | duplicates in InfluxDB 0 | recovery {}",
            ledger.len(),
            rows.len(),
            in_kafka.saturating_sub(ledger.len()),
            recovery.map_or("-".into(), |d| format!("{:.1}s", d.as_secs_f64())),
        );
        ledger.len()
    }
}

/// The whole pipeline on librdkafka's mock cluster and a real InfluxDB 1.6.7, in this process:
/// quick, for tests about what ends up in InfluxDB rather than about Kafka's faults.
pub struct MockPipeline {
    _cluster: rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    pub influx: Influx1,
    pub db: String,
    pub exchange: FakeBitfinex,
    _registry: FakeRegistry,
    pub settings: Settings,
    producer: super::pipeline::Running,
    consumer: super::pipeline::Running,
}

impl MockPipeline {
    /// Starts the fakes, lets `history` put trades into the exchange's past, then starts the
    /// producer (whose backfill fetches that past) and one consumer.
    pub async fn start(history: impl FnOnce(&FakeBitfinex)) -> Self {
        let topic = unique("pipe");
        let cluster = rdkafka::mocking::MockCluster::new(3).unwrap();
        for t in [
            topic.clone(),
            format!("{topic}-trades"),
            format!("{topic}-dlq"),
        ] {
            cluster.create_topic(&t, 3, 3).unwrap();
        }
        let influx = tokio::task::spawn_blocking(Influx1::start).await.unwrap();
        let db = topic.replace('-', "_");
        influx.create_database(&db).await;
        let exchange = FakeBitfinex::start().await;
        history(&exchange);
        let registry = FakeRegistry::start().await;
        let mut s = settings(&exchange, &registry, &cluster.bootstrap_servers(), &topic);
        influx.configure(&mut s, &db);
        let consumer = super::pipeline::start_consumer(s.clone(), 1);
        let producer = super::pipeline::start(s.clone());
        Self {
            _cluster: cluster,
            influx,
            db,
            exchange,
            _registry: registry,
            settings: s,
            producer,
            consumer,
        }
    }

    /// Waits until InfluxDB holds every trade executed and every ticker update sent so far.
    pub async fn wait_stored(&self) {
        let (trades, ticks) = (self.exchange.ledger().len(), self.exchange.sent().len());
        eventually_async(
            "every trade and ticker update stored",
            STORE_WAIT,
            || async {
                self.influx.count_trades(&self.db).await >= trades
                    && self.influx.count(&self.db, "ticker").await >= ticks
            },
        )
        .await;
    }

    pub async fn stop(self) {
        self.producer.stop().await;
        self.consumer.stop().await;
    }
}
