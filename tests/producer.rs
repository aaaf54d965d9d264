//! Producer integration tests: fake Bitfinex → producer → librdkafka's mock cluster (3 brokers),
//! with the fake Schema Registry.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use candlestream::candles::TickSource;
use candlestream::codec::value_subject;
use candlestream::config::ExchangeMode;
use rdkafka::mocking::MockCluster;

use support::fake_bitfinex::FakeBitfinex;
use support::fake_registry::FakeRegistry;
use support::pipeline::*;
use support::{eventually, settings, unique, SYMBOLS};

const PARTITIONS: i32 = 3;

fn mock_cluster(topic: &str) -> MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
    let cluster = MockCluster::new(3).unwrap();
    cluster.create_topic(topic, PARTITIONS, 3).unwrap();
    cluster
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
    let records = stop_when_delivered(running, &exchange, &cluster.bootstrap_servers(), &topic, &BTreeMap::new()).await;
    let sent = exchange.sent();
    let ticks = decode_all(&registry, &records).await;
    assert_exactly_sent(&sent, &ticks);
    assert_one_partition_per_symbol(&records, PARTITIONS);
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
    let records = stop_when_delivered(running, &exchange, &cluster.bootstrap_servers(), &topic, &BTreeMap::new()).await;
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
    let records = stop_when_delivered(running, &exchange, &cluster.bootstrap_servers(), &topic, &BTreeMap::new()).await;
    assert_eq!(exchange.ws_connections(), 0);
    let sent = exchange.sent();
    assert_exactly_sent(&sent, &decode_all(&registry, &records).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics_follow_the_exchange() {
    let topic = unique("ticks");
    let cluster = mock_cluster(&topic);
    let exchange = FakeBitfinex::start().await;
    let registry = FakeRegistry::start().await;
    let mut s = settings(&exchange, &registry, &cluster.bootstrap_servers(), &topic);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    s.http.listen = ([127, 0, 0, 1], port).into();
    s.health.max_exchange_silence = Duration::from_millis(800);
    s.bitfinex.rest_url = "http://127.0.0.1:9".into();
    let running = start(s);
    let http = reqwest::Client::new();
    let get = |path: &'static str| {
        let http = http.clone();
        async move {
            let r = http.get(format!("http://127.0.0.1:{port}{path}")).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };

    exchange.wait_subscribed(&SYMBOLS, WAIT).await;
    emit_rounds(&exchange, 3).await;
    eventually("ticks acknowledged", WAIT, || support::topic_size(&cluster.bootstrap_servers(), &topic, &BTreeMap::new()) >= 9).await;
    assert_eq!(get("/healthz").await.0, 200);
    let (status, metrics) = get("/metrics").await;
    assert_eq!(status, 200);
    for name in ["candlestream_kafka_produced_total", "candlestream_exchange_frames_total", "candlestream_ticks_received_total"] {
        assert!(metrics.contains(name), "{name} missing from /metrics:\n{metrics}");
    }

    // The websocket is refused and REST answers nothing: no exchange data, so unhealthy.
    exchange.set_accepting(false);
    exchange.drop_connections().await;
    let mut last = (0, String::new());
    for _ in 0..100 {
        last = get("/healthz").await;
        if last.0 == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(last.0, 503, "{last:?}");
    assert!(last.1.contains("exchange_data"), "{last:?}");

    exchange.set_accepting(true);
    exchange.wait_subscribed(&SYMBOLS, WAIT).await;
    emit_rounds(&exchange, 1).await;
    eventually("healthy again", WAIT, || exchange.sent().len() >= 12).await;
    let mut status = 0;
    for _ in 0..100 {
        status = get("/healthz").await.0;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, 200);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_garbage_and_oversized_frames_lose_nothing() {
    let topic = unique("ticks");
    let cluster = mock_cluster(&topic);
    let exchange = FakeBitfinex::start().await;
    let registry = FakeRegistry::start().await;
    let running = start(settings(&exchange, &registry, &cluster.bootstrap_servers(), &topic));
    exchange.wait_subscribed(&SYMBOLS, WAIT).await;
    emit_rounds(&exchange, 5).await;

    // Garbage and odd frames do not cost the connection.
    for raw in include_str!("fixtures/bitfinex/ws-odd-frames.jsonl").lines() {
        let v: serde_json::Value = serde_json::from_str(raw).unwrap();
        let text = v.get("raw").map_or_else(|| v["frame"].to_string(), |r| r.as_str().unwrap().to_string());
        exchange.send_raw(&text).await;
    }
    emit_rounds(&exchange, 5).await;
    assert_eq!(exchange.ws_connections(), 1, "odd frames must not force a reconnect");

    // 20060 pauses, 20061 makes the client unsubscribe and subscribe again on the same socket.
    exchange.maintenance_start().await;
    assert_eq!(exchange.emit("tBTCUSD").await, None);
    exchange.maintenance_end().await;
    exchange.wait_subscribed(&SYMBOLS, WAIT).await;
    emit_rounds(&exchange, 5).await;
    assert_eq!(exchange.ws_connections(), 1);

    // An oversized frame is refused by the client, which reconnects.
    exchange.send_raw(&format!("[1,\"{}\"]", "x".repeat(2 << 20))).await;
    eventually("reconnect after an oversized frame", WAIT, || exchange.ws_connections() == 2).await;
    exchange.wait_subscribed(&SYMBOLS, WAIT).await;
    emit_rounds(&exchange, 5).await;

    let records = stop_when_delivered(running, &exchange, &cluster.bootstrap_servers(), &topic, &BTreeMap::new()).await;
    assert_exactly_sent(&exchange.sent(), &decode_all(&registry, &records).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symbols_beyond_25_channels_get_their_own_connection() {
    let topic = unique("ticks");
    let cluster = mock_cluster(&topic);
    let exchange = FakeBitfinex::start().await;
    let registry = FakeRegistry::start().await;
    let mut s = settings(&exchange, &registry, &cluster.bootstrap_servers(), &topic);
    s.bitfinex.symbols = (0..30).map(|i| format!("tC{i:02}USD")).collect();
    let symbols: Vec<&str> = s.bitfinex.symbols.iter().map(String::as_str).collect();
    let running = start(s.clone());
    exchange.wait_subscribed(&symbols, WAIT).await;
    assert_eq!(exchange.ws_connections(), 2, "30 channels need two connections of at most 25");
    for sym in &symbols {
        assert!(exchange.emit(sym).await.is_some());
    }
    let records = stop_when_delivered(running, &exchange, &cluster.bootstrap_servers(), &topic, &BTreeMap::new()).await;
    assert_exactly_sent(&exchange.sent(), &decode_all(&registry, &records).await);
}
