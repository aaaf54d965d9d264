//! Producer integration tests: fake Bitfinex → producer → librdkafka's mock cluster (3 brokers),
//! with the fake Schema Registry.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use candlestream::codec::value_subject;
use candlestream::config::ExchangeMode;
use candlestream::model::Source;
use rdkafka::mocking::MockCluster;

use support::fake_bitfinex::FakeBitfinex;
use support::fake_registry::FakeRegistry;
use support::fake_trades::Trader;
use support::pipeline::*;
use support::{SYMBOLS, eventually, settings, unique};

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
        cluster
            .create_topic(&format!("{topic}-trades"), PARTITIONS, 3)
            .unwrap();
        let exchange = FakeBitfinex::start().await;
        let registry = FakeRegistry::start().await;
        let settings = settings(&exchange, &registry, &cluster.bootstrap_servers(), &topic);
        Self {
            topic,
            cluster,
            exchange,
            registry,
            settings,
        }
    }

    /// Stops the producer once everything sent is in Kafka; checks the topic holds exactly that.
    async fn finish(&self, running: Running) -> Vec<support::Record> {
        let brokers = self.cluster.bootstrap_servers();
        let records = stop_when_delivered(
            running,
            &self.exchange,
            &brokers,
            &self.topic,
            &BTreeMap::new(),
        )
        .await;
        assert_exactly_sent(
            &self.exchange.sent(),
            &decode_all(&self.registry, &records).await,
        );
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
    assert!(
        ex.ws_connections() >= 3,
        "reconnected after 20051 and after the close"
    );
    let records = t.finish(running).await;
    assert_one_partition_per_symbol(&records, PARTITIONS);
    assert!(
        t.registry.subjects().contains(&value_subject(&t.topic)),
        "schema under <topic>-value"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_fills_in_while_websocket_is_down_and_stops_when_it_is_back() {
    let t = Setup::new().await;
    let ex = &t.exchange;
    ex.set_accepting(false);
    let running = start(t.settings.clone());
    eventually("REST polls while the websocket is refused", WAIT, || {
        ex.rest_requests() >= 5
    })
    .await;
    assert_eq!(ex.ws_connections(), 0);
    ex.set_accepting(true);
    ex.wait_subscribed(&SYMBOLS, WAIT).await;
    emit_rounds(ex, 5).await;
    // The client covers a symbol once it reads `subscribed`; allow that much, then no more polls.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let polls = ex.rest_requests();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        ex.rest_requests(),
        polls,
        "REST keeps polling with the websocket back"
    );
    let sent = ex.sent();
    assert!(sent.iter().any(|s| s.rest) && sent.iter().any(|s| !s.rest));
    let records = t.finish(running).await;
    for tick in decode_all(&t.registry, &records)
        .await
        .iter()
        .filter(|t| t.source == Source::Rest)
    {
        assert_eq!(
            tick.exchange_time, tick.received_at,
            "REST ticks carry their receive time"
        );
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
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    t.settings.http.listen = ([127, 0, 0, 1], port).into();
    t.settings.health.max_exchange_silence = Duration::from_millis(800);
    t.settings.bitfinex.rest_url = "http://127.0.0.1:9".into();
    let running = start(t.settings.clone());
    let ex = &t.exchange;
    let get = |path: &'static str| async move {
        let r = reqwest::get(format!("http://127.0.0.1:{port}{path}"))
            .await
            .unwrap();
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
    eventually("ticks acknowledged", WAIT, || {
        support::topic_size(&brokers, &t.topic, &BTreeMap::new()) >= 9
    })
    .await;
    assert_eq!(get("/healthz").await.0, 200);
    let (status, metrics) = get("/metrics").await;
    assert_eq!(status, 200);
    for name in [
        "candlestream_kafka_produced_total",
        "candlestream_exchange_frames_total",
        "candlestream_ticks_received_total",
    ] {
        assert!(
            metrics.contains(name),
            "{name} missing from /metrics:\n{metrics}"
        );
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
        let text = v.get("raw").map_or_else(
            || v["frame"].to_string(),
            |r| r.as_str().unwrap().to_string(),
        );
        ex.send_raw(&text).await;
    }
    emit_rounds(ex, 5).await;
    assert_eq!(
        ex.ws_connections(),
        1,
        "odd frames must not force a reconnect"
    );

    // 20060 pauses, 20061 makes the client unsubscribe and subscribe again on the same socket.
    ex.maintenance_start().await;
    assert_eq!(ex.emit("tBTCUSD").await, None);
    ex.maintenance_end().await;
    ex.wait_subscribed(&SYMBOLS, WAIT).await;
    emit_rounds(ex, 5).await;
    assert_eq!(ex.ws_connections(), 1);

    // An oversized frame is refused by the client, which reconnects.
    caught_up(
        ex,
        &t.cluster.bootstrap_servers(),
        &t.topic,
        &BTreeMap::new(),
    )
    .await;
    ex.send_raw(&format!("[1,\"{}\"]", "x".repeat(2 << 20)))
        .await;
    eventually("reconnect after an oversized frame", WAIT, || {
        ex.ws_connections() == 2
    })
    .await;
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
    t.exchange.wait_trades_subscribed(&symbols, WAIT).await;
    assert_eq!(
        t.exchange.ws_connections(),
        3,
        "60 channels (ticker and trades of 30 symbols) need three connections of at most 25"
    );
    for sym in &symbols {
        assert!(t.exchange.emit(sym).await.is_some());
    }
    t.finish(running).await;
}

/// `bitfinex.trades = false`: tickers only, as before trades existed: one channel per symbol,
/// no trade history requests, nothing in the trades topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trades_off_streams_tickers_only() {
    let mut t = Setup::new().await;
    t.settings.bitfinex.trades = false;
    t.settings.bitfinex.symbols = (0..25).map(|i| format!("tC{i:02}USD")).collect();
    let symbols: Vec<String> = t.settings.bitfinex.symbols.clone();
    let symbols: Vec<&str> = symbols.iter().map(String::as_str).collect();
    let now = support::now_ms();
    t.exchange
        .preload_history("tC00USD", now - 60_000, now - 1_000, 10);
    let running = start(t.settings.clone());
    t.exchange.wait_subscribed(&symbols, WAIT).await;
    t.exchange.execute("tC00USD", 5).await;
    assert!(t.exchange.emit("tC00USD").await.is_some());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        t.exchange.ws_connections(),
        1,
        "25 ticker channels fit one connection"
    );
    assert!(t.exchange.trades_subscribed().is_empty());
    assert_eq!(t.exchange.rest_requests_by("trades"), 0);
    t.finish(running).await;
    let trades_topic = t.settings.kafka.trades_topic.clone();
    assert_eq!(
        support::topic_size(
            &t.cluster.bootstrap_servers(),
            &trades_topic,
            &BTreeMap::new()
        ),
        0
    );
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

/// Trades on the mock cluster: `te` then `tu`, snapshots after every reconnect, REST polling
/// while the websocket is refused, and gap repair after it; within one producer's life each
/// trade the exchange executed is in the trades topic exactly once, keyed by its symbol.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_trade_once_across_te_tu_snapshots_and_reconnects() {
    let mut t = Setup::new().await;
    let ex = &t.exchange;
    // History from before the start: the backfill must bring it.
    let now = support::now_ms();
    for s in SYMBOLS {
        ex.preload_history(s, now - 20 * 60_000, now - 1_000, 200);
    }
    t.settings.bitfinex.backfill = Duration::from_secs(3600);
    let running = start(t.settings.clone());
    ex.wait_trades_subscribed(&SYMBOLS, WAIT).await;
    let trader = Trader::start(ex, &SYMBOLS, 2, Duration::from_millis(10));
    tokio::time::sleep(Duration::from_millis(500)).await;
    ex.restart().await;
    ex.wait_trades_subscribed(&SYMBOLS, WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    ex.drop_connections().await;
    ex.wait_trades_subscribed(&SYMBOLS, WAIT).await;
    // Refused for a while: trading goes on far past what a snapshot holds.
    ex.set_accepting(false);
    ex.drop_connections().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    ex.set_accepting(true);
    ex.wait_trades_subscribed(&SYMBOLS, WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let live = trader.stop().await;
    let ledger = ex.ledger();
    assert!(live > 300, "trading went on ({live} trades)");
    let (te, tu) = ex.trade_frames_sent();
    assert!(te > 0 && tu > 0, "te and tu were both sent ({te}, {tu})");

    let brokers = t.cluster.bootstrap_servers();
    let topic = t.settings.kafka.trades_topic.clone();
    support::eventually_async("every trade in Kafka", WAIT, || async {
        support::topic_size(&brokers, &topic, &BTreeMap::new()) >= ledger.len()
    })
    .await;
    running.stop().await;
    let records = support::read_all(&brokers, &topic, &BTreeMap::new());
    let trades = decode_trades(&t.registry, &records).await;
    let mut got: Vec<(String, i64, i64, u64, u64)> = trades
        .iter()
        .map(|x| {
            (
                x.symbol.clone(),
                x.id,
                x.exchange_time,
                x.amount.to_bits(),
                x.price.to_bits(),
            )
        })
        .collect();
    let mut want: Vec<(String, i64, i64, u64, u64)> = ledger
        .iter()
        .map(|x| {
            (
                x.symbol.clone(),
                x.id,
                x.mts,
                x.amount.to_bits(),
                x.price.to_bits(),
            )
        })
        .collect();
    got.sort();
    want.sort();
    assert_eq!(got.len(), want.len(), "trades in Kafka vs executed");
    assert_eq!(got, want, "the trades topic holds exactly the ledger");
    assert!(
        trades.iter().any(|x| x.source == Source::Rest)
            && trades.iter().any(|x| x.source == Source::Websocket)
    );
    assert_one_partition_per_symbol(&records, PARTITIONS);
    assert!(
        t.registry.subjects().contains(&value_subject(&topic)),
        "trade schema under <trades_topic>-value"
    );
}

/// Bitfinex answers 429 or error 11010 when a client asks too often: the producer waits and asks
/// again, and no trade is lost for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_rest_backs_off_and_loses_nothing() {
    let mut t = Setup::new().await;
    let ex = &t.exchange;
    let now = support::now_ms();
    for s in SYMBOLS {
        ex.preload_history(s, now - 10 * 60_000, now - 1_000, 100);
    }
    ex.set_rate_limit_every(Some(3));
    t.settings.bitfinex.mode = ExchangeMode::Rest;
    t.settings.bitfinex.rest_poll_interval = Duration::from_millis(200);
    // Four times Bitfinex's limit for trade history, to keep the test short: one request a
    // second, never a burst.
    t.settings.bitfinex.rest_trades_per_minute = 60;
    let running = start(t.settings.clone());
    let trader = Trader::start(ex, &SYMBOLS, 1, Duration::from_millis(100));
    eventually("refusals", WAIT, || ex.rate_limited() >= 3).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    trader.stop().await;
    let ledger = ex.ledger();
    let brokers = t.cluster.bootstrap_servers();
    let topic = t.settings.kafka.trades_topic.clone();
    support::eventually_async("every trade in Kafka", WAIT, || async {
        support::topic_size(&brokers, &topic, &BTreeMap::new()) >= ledger.len()
    })
    .await;
    // Polling wants 15 requests/s (3 symbols every 200 ms); the limiter lets one a second
    // through, so 4 s see at most 5 (both ends of the interval).
    let requests_before = ex.rest_requests_by("trades");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let in_4s = ex.rest_requests_by("trades") - requests_before;
    assert!(
        (3..=5).contains(&in_4s),
        "the limiter keeps trade requests at 1/s, saw {in_4s} in 4 s"
    );
    running.stop().await;
    let trades = decode_trades(
        &t.registry,
        &support::read_all(&brokers, &topic, &BTreeMap::new()),
    )
    .await;
    let mut got: Vec<i64> = trades.iter().map(|x| x.id).collect();
    got.sort();
    let mut want: Vec<i64> = ledger.iter().map(|x| x.id).collect();
    want.sort();
    assert_eq!(
        got,
        want,
        "every trade once, despite {} refusals",
        ex.rate_limited()
    );
}

/// Issue 18: at start the producer reads each symbol's newest trade from the tail of the trades
/// topic, backwards a chunk (5 000 records) at a time until every symbol is found. Here one
/// partition holds a quiet symbol's single trade behind 12 000 of a busy one (three chunks back),
/// and a repair's older trades after a newer websocket trade; a symbol with no trade is not found,
/// and a deadline too short for the read leaves symbols out rather than wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trades_topics_tail_gives_each_symbols_newest_trade() {
    use std::collections::HashMap;

    use candlestream::codec::Encoder;
    use candlestream::model::{Record, RecordKind, Trade, now_ms};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use tokio_util::sync::CancellationToken;

    let topic = unique("resume");
    let cluster = MockCluster::new(1).unwrap();
    cluster
        .create_topic(&format!("{topic}-trades"), 1, 1)
        .unwrap();
    let exchange = FakeBitfinex::start().await;
    let registry = FakeRegistry::start().await;
    let mut s = settings(&exchange, &registry, &cluster.bootstrap_servers(), &topic);
    s.bitfinex.symbols = ["tQUIET", "tBUSY", "tREPAIRED", "tNONE"]
        .map(String::from)
        .to_vec();
    let encoder = Encoder::new(&s.schema_registry, &s.kafka).unwrap();
    encoder.register(RecordKind::Trade).await.unwrap();
    let producer: FutureProducer = candlestream::kafka::producer_config(&s.kafka)
        .create()
        .unwrap();
    let now = now_ms();
    let trade = |symbol: &str, id: i64, ago_ms: i64, source: Source| Trade {
        symbol: symbol.into(),
        id,
        exchange_time: now - ago_ms,
        amount: 1.0,
        price: 1.0,
        source,
        sequence: None,
        received_at: now - ago_ms.min(60_000),
    };
    let mut trades = vec![
        trade("tQUIET", 1, 3 * 3_600_000, Source::Websocket),
        trade("tREPAIRED", 500, 600_000, Source::Websocket),
    ];
    trades.extend((0..12_000).map(|i| trade("tBUSY", 1_000 + i, 500_000 - i, Source::Websocket)));
    // The repair of the gap before trade 500, sent after it.
    trades.extend((400..500).map(|id| trade("tREPAIRED", id, 700_000 - id, Source::Rest)));
    let topic_of_trades = s.kafka.trades_topic.clone();
    let sends: Vec<_> = futures::future::join_all(trades.iter().map(|t| async {
        let payload = encoder.encode(&Record::Trade(t.clone())).await.unwrap();
        producer
            .send(
                FutureRecord::to(&topic_of_trades)
                    .key(&t.symbol)
                    .payload(&payload),
                Duration::from_secs(10),
            )
            .await
    }))
    .await;
    assert!(sends.iter().all(Result::is_ok), "every trade in Kafka");

    let expected: HashMap<String, (i64, i64)> = [
        (
            "tQUIET",
            trade("tQUIET", 1, 3 * 3_600_000, Source::Websocket),
        ),
        (
            "tBUSY",
            trade("tBUSY", 12_999, 500_000 - 11_999, Source::Websocket),
        ),
        (
            "tREPAIRED",
            trade("tREPAIRED", 500, 600_000, Source::Websocket),
        ),
    ]
    .into_iter()
    .map(|(s, t)| (s.to_string(), (t.exchange_time, t.id)))
    .collect();
    let cancel = CancellationToken::new();
    let found =
        candlestream::producer::resume::newest_trades(&s, &s.bitfinex.symbols, &cancel).await;
    assert_eq!(found, expected);

    s.bitfinex.resume_timeout = Duration::from_millis(1);
    let started = std::time::Instant::now();
    let cut_short =
        candlestream::producer::resume::newest_trades(&s, &s.bitfinex.symbols, &cancel).await;
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(
        cut_short.iter().all(|(s, at)| at <= &expected[s]),
        "a read cut short finds at most the newest: {cut_short:?}"
    );

    // No broker answers: the deadline holds, and every symbol gets the full backfill.
    s.kafka.brokers = format!("127.0.0.1:{}", support::rig::free_port());
    s.bitfinex.resume_timeout = Duration::from_secs(1);
    let started = std::time::Instant::now();
    let unreachable =
        candlestream::producer::resume::newest_trades(&s, &s.bitfinex.symbols, &cancel).await;
    let took = started.elapsed();
    assert!(unreachable.is_empty());
    assert!(
        took < Duration::from_secs(2),
        "took {took:?} with a 1 s deadline"
    );
}

/// Issue 18, fairness through the whole producer: 17 symbols share a trade-history budget of one
/// request every 200 ms. One has a backfill of 3 pages (of 10 000 trades), the others of one.
/// Every symbol's first page comes before the big backfill's second, and the gap a reconnect
/// leaves in a small symbol is repaired with the next request, ahead of a dozen backfill pages
/// still waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_pages_take_turns_and_a_reconnect_gap_is_repaired_first() {
    let mut t = Setup::new().await;
    let ex = &t.exchange;
    let now = support::now_ms();
    let small: Vec<String> = (0..16).map(|i| format!("tS{i:02}")).collect();
    ex.preload_history("tHUGE", now - 5 * 3_600_000, now - 60_000, 25_000);
    for s in &small {
        ex.preload_history(s, now - 3_600_000, now - 60_000, 50);
    }
    // A snapshot of one trade: whatever the socket misses leaves a gap.
    ex.set_snapshot_len(1);
    let mut symbols = vec!["tHUGE".to_string()];
    symbols.extend(small.iter().cloned());
    t.settings.bitfinex.symbols = symbols.clone();
    t.settings.bitfinex.rest_trades_per_minute = 300;
    // Only the gap repair can close the gap.
    t.settings.bitfinex.rest_poll_interval = Duration::from_secs(3600);
    let running = start(t.settings.clone());
    let symbols: Vec<&str> = symbols.iter().map(String::as_str).collect();
    ex.wait_trades_subscribed(&symbols, WAIT).await;

    // Early in the backfill, a small symbol whose one page was served first misses 5 trades
    // while the socket is down. Why the first served and not a fixed one: symbols subscribe in
    // the order their connections come up, and a symbol whose backfill page is still in flight
    // at the drop has its gap folded into that backfill rather than repaired.
    eventually("the first backfill pages", WAIT, || {
        ex.trades_queries().len() >= 3
    })
    .await;
    let victim = ex
        .trades_queries()
        .iter()
        .map(|(s, ..)| s.clone())
        .find(|s| s != "tHUGE")
        .expect("a small symbol's page among the first three");
    ex.set_accepting(false);
    ex.drop_connections().await;
    ex.execute(&victim, 5).await;
    ex.set_accepting(true);
    ex.wait_trades_subscribed(&symbols, WAIT).await;
    // The victim's new snapshot is out: its gap is known from here on.
    let snapshot_at = ex.trades_queries().len();
    // Every backfill page, and the repair.
    let requests = 3 + small.len() + 1;
    eventually("every backfill page and the repair", WAIT, || {
        ex.trades_queries().len() >= requests
    })
    .await;
    let queries = ex.trades_queries();
    running.stop().await;

    let order: Vec<&str> = queries.iter().map(|(s, ..)| s.as_str()).collect();
    let pages_of =
        |symbol: &str| -> Vec<usize> { (0..order.len()).filter(|&i| order[i] == symbol).collect() };
    let victim_pages = pages_of(&victim);
    assert_eq!(
        victim_pages.len(),
        2,
        "{victim}'s backfill and its repair: {order:?}"
    );
    let repair = victim_pages[1];
    assert!(
        repair <= snapshot_at + 1,
        "{victim}'s repair waited behind {} backfill pages: {order:?}",
        repair.saturating_sub(snapshot_at)
    );
    assert!(
        order.len() - repair > 5,
        "backfill pages were still waiting: {order:?}"
    );
    let huge = pages_of("tHUGE");
    assert_eq!(huge.len(), 3, "{order:?}");
    let last_small = small.iter().map(|s| pages_of(s)[0]).max().unwrap();
    assert!(
        last_small < huge[1],
        "every small symbol's page before tHUGE's second: {order:?}"
    );
}
