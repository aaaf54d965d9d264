//! Producer integration tests: fake Bitfinex → producer → librdkafka's mock cluster (3 brokers),
//! with the fake Schema Registry.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use candlestream::candles::Source;
use candlestream::codec::value_subject;
use candlestream::config::ExchangeMode;
use rdkafka::mocking::MockCluster;

use support::fake_bitfinex::FakeBitfinex;
use support::fake_registry::FakeRegistry;
use support::pipeline::*;
use support::{eventually, settings, unique, SYMBOLS};

const PARTITIONS: i32 = 3;

/// A fresh topic on a 3-broker mock cluster, the fakes, and settings pointing at them.
struct Setup {
    topic: String,
    cluster: MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    exchange: FakeBitfinex,
    registry: FakeRegistry,
    settings: candlestream::config::Settings,
}

impl Setup {
    async fn new() -> Self {
        let topic = unique("ticks");
        let cluster = MockCluster::new(3).unwrap();
        cluster.create_topic(&topic, PARTITIONS, 3).unwrap();
        let exchange = FakeBitfinex::start().await;
        let registry = FakeRegistry::start().await;
        let settings = settings(&exchange, &registry, &cluster.bootstrap_servers(), &topic);
        Self { topic, cluster, exchange, registry, settings }
    }

    /// Stops the producer once everything sent is in Kafka; checks the topic holds exactly that.
    async fn finish(&self, running: Running) -> Vec<support::Record> {
        let brokers = self.cluster.bootstrap_servers();
        let records = stop_when_delivered(running, &self.exchange, &brokers, &self.topic, &BTreeMap::new()).await;
        assert_exactly_sent(&self.exchange.sent(), &decode_all(&self.registry, &records).await);
        records
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_update_arrives_across_restart_and_abrupt_close() {
    let t = Setup::new().await;
    let running = start(t.settings.clone());
    let ex = &t.exchange;
    ex.wait_subscribed(&SYMBOLS, WAIT).await;
    let brokers = t.cluster.bootstrap_servers();
    let mut emitted = emit_rounds(ex, 20).await;
    // 20051 ends the subscriptions at once on the exchange's side: nothing is in flight after it.
    ex.restart().await;
    ex.wait_subscribed(&SYMBOLS, WAIT).await;
    emitted += emit_rounds(ex, 20).await;
    caught_up(ex, &brokers, &t.topic, &BTreeMap::new()).await;
    ex.drop_connections().await;
    ex.wait_subscribed(&SYMBOLS, WAIT).await;
    emitted += emit_rounds(ex, 20).await;
    assert_eq!(emitted, 180, "every emit reached a subscribed client");
    assert!(ex.ws_connections() >= 3, "reconnected after 20051 and after the close");
    let records = t.finish(running).await;
    assert_one_partition_per_symbol(&records, PARTITIONS);
    assert!(t.registry.subjects().contains(&value_subject(&t.topic)), "schema under <topic>-value");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_fills_in_while_websocket_is_down_and_stops_when_it_is_back() {
    let t = Setup::new().await;
    let ex = &t.exchange;
    ex.set_accepting(false);
    let running = start(t.settings.clone());
    eventually("REST polls while the websocket is refused", WAIT, || ex.rest_requests() >= 5).await;
    assert_eq!(ex.ws_connections(), 0);
    ex.set_accepting(true);
    ex.wait_subscribed(&SYMBOLS, WAIT).await;
    emit_rounds(ex, 5).await;
    // The client covers a symbol once it reads `subscribed`; allow that much, then no more polls.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let polls = ex.rest_requests();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(ex.rest_requests(), polls, "REST keeps polling with the websocket back");
    let sent = ex.sent();
    assert!(sent.iter().any(|s| s.rest) && sent.iter().any(|s| !s.rest));
    let records = t.finish(running).await;
    for tick in decode_all(&t.registry, &records).await.iter().filter(|t| t.source == Source::Rest) {
        assert_eq!(tick.exchange_time, tick.received_at, "REST ticks carry their receive time");
        assert_eq!(tick.sequence, None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_mode_never_opens_a_websocket() {
    let mut t = Setup::new().await;
    t.settings.bitfinex.mode = ExchangeMode::Rest;
    let running = start(t.settings.clone());
    eventually("three REST polls", WAIT, || t.exchange.rest_requests() >= 3).await;
    t.finish(running).await;
    assert_eq!(t.exchange.ws_connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics_follow_the_exchange() {
    let mut t = Setup::new().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    t.settings.http.listen = ([127, 0, 0, 1], port).into();
    t.settings.health.max_exchange_silence = Duration::from_millis(800);
    t.settings.bitfinex.rest_url = "http://127.0.0.1:9".into();
    let running = start(t.settings.clone());
    let ex = &t.exchange;
    let get = |path: &'static str| async move {
        let r = reqwest::get(format!("http://127.0.0.1:{port}{path}")).await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    let until_status = |want: u16| async move {
        let mut last = (0, String::new());
        for _ in 0..100 {
            last = get("/healthz").await;
            if last.0 == want {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        last
    };

    ex.wait_subscribed(&SYMBOLS, WAIT).await;
    emit_rounds(ex, 3).await;
    let brokers = t.cluster.bootstrap_servers();
    eventually("ticks acknowledged", WAIT, || support::topic_size(&brokers, &t.topic, &BTreeMap::new()) >= 9).await;
    assert_eq!(get("/healthz").await.0, 200);
    let (status, metrics) = get("/metrics").await;
    assert_eq!(status, 200);
    for name in ["candlestream_kafka_produced_total", "candlestream_exchange_frames_total", "candlestream_ticks_received_total"] {
        assert!(metrics.contains(name), "{name} missing from /metrics:\n{metrics}");
    }

    // The websocket is refused and REST answers nothing: no exchange data, so unhealthy.
    ex.set_accepting(false);
    ex.drop_connections().await;
    let last = until_status(503).await;
    assert_eq!(last.0, 503, "{last:?}");
    assert!(last.1.contains("exchange_data"), "{last:?}");

    ex.set_accepting(true);
    ex.wait_subscribed(&SYMBOLS, WAIT).await;
    emit_rounds(ex, 1).await;
    assert_eq!(until_status(200).await.0, 200);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_garbage_and_oversized_frames_lose_nothing() {
    let t = Setup::new().await;
    let running = start(t.settings.clone());
    let ex = &t.exchange;
    ex.wait_subscribed(&SYMBOLS, WAIT).await;
    emit_rounds(ex, 5).await;

    // Garbage and odd frames do not cost the connection.
    for raw in include_str!("fixtures/bitfinex/ws-odd-frames.jsonl").lines() {
        let v: serde_json::Value = serde_json::from_str(raw).unwrap();
        let text = v.get("raw").map_or_else(|| v["frame"].to_string(), |r| r.as_str().unwrap().to_string());
        ex.send_raw(&text).await;
    }
    emit_rounds(ex, 5).await;
    assert_eq!(ex.ws_connections(), 1, "odd frames must not force a reconnect");

    // 20060 pauses, 20061 makes the client unsubscribe and subscribe again on the same socket.
    ex.maintenance_start().await;
    assert_eq!(ex.emit("tBTCUSD").await, None);
    ex.maintenance_end().await;
    ex.wait_subscribed(&SYMBOLS, WAIT).await;
    emit_rounds(ex, 5).await;
    assert_eq!(ex.ws_connections(), 1);

    // An oversized frame is refused by the client, which reconnects.
    caught_up(ex, &t.cluster.bootstrap_servers(), &t.topic, &BTreeMap::new()).await;
    ex.send_raw(&format!("[1,\"{}\"]", "x".repeat(2 << 20))).await;
    eventually("reconnect after an oversized frame", WAIT, || ex.ws_connections() == 2).await;
    ex.wait_subscribed(&SYMBOLS, WAIT).await;
    emit_rounds(ex, 5).await;
    t.finish(running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symbols_beyond_25_channels_get_their_own_connection() {
    let mut t = Setup::new().await;
    t.settings.bitfinex.symbols = (0..30).map(|i| format!("tC{i:02}USD")).collect();
    let symbols: Vec<String> = t.settings.bitfinex.symbols.clone();
    let symbols: Vec<&str> = symbols.iter().map(String::as_str).collect();
    let running = start(t.settings.clone());
    t.exchange.wait_subscribed(&symbols, WAIT).await;
    assert_eq!(t.exchange.ws_connections(), 2, "30 channels need two connections of at most 25");
    for sym in &symbols {
        assert!(t.exchange.emit(sym).await.is_some());
    }
    t.finish(running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_under_load_delivers_everything_the_exchange_sent() {
    let t = Setup::new().await;
    let running = start(t.settings.clone());
    t.exchange.wait_subscribed(&SYMBOLS, WAIT).await;
    let emitter = Emitter::start(&t.exchange, Duration::from_millis(2));
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Stop while updates keep coming: the producer unsubscribes and reads until the exchange
    // confirms, so nothing the exchange sent is left in the socket.
    running.stop().await;
    let emitted = emitter.stop().await;
    assert!(emitted > 50, "under load ({emitted} updates)");
    let records = support::read_all(&t.cluster.bootstrap_servers(), &t.topic, &BTreeMap::new());
    assert_exactly_sent(&t.exchange.sent(), &decode_all(&t.registry, &records).await);
}
