//! One record per trade, whatever the backfill size: fake Bitfinex → producer → librdkafka's
//! mock cluster (3 brokers), with the fake Schema Registry. A 100 000-trade REST backfill of one
//! symbol runs while `te` and, 1.5 s after each, `tu` frames flow on every symbol; afterwards the
//! trades topic holds each trade of the exchange's ledger exactly once, counted by trade id.
//!
//! Alone in its test binary on purpose: it reads the producer's counters from the process-wide
//! metrics recorder, which no other producer may add to.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use rdkafka::mocking::MockCluster;

use support::fake_bitfinex::FakeBitfinex;
use support::fake_registry::FakeRegistry;
use support::fake_trades::Trader;
use support::pipeline::{WAIT, decode_trades, start};
use support::{SYMBOLS, eventually, settings, unique};

/// Ten full REST pages of history for the backfill to bring.
const BACKFILL: usize = 100_000;
const BACKFILLED: &str = "tBTCUSD";
/// Bitfinex repeats a trade as `tu` 1–2 s after its `te`.
const TU_DELAY: Duration = Duration::from_millis(1_500);
const BACKFILL_WAIT: Duration = Duration::from_secs(60);

/// Sum of the producer's counter `name` over the series whose labels contain `label`.
fn counter(name: &str, label: &str) -> f64 {
    candlestream::telemetry::prometheus()
        .render()
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_trade_once_across_a_100_000_trade_backfill_under_te_and_tu() {
    let topic = unique("dedupe");
    let cluster = MockCluster::new(3).unwrap();
    cluster.create_topic(&topic, 3, 3).unwrap();
    let trades_topic = format!("{topic}-trades");
    cluster.create_topic(&trades_topic, 3, 3).unwrap();
    let brokers = cluster.bootstrap_servers();
    let ex = FakeBitfinex::start().await;
    let registry = FakeRegistry::start().await;
    let mut settings = settings(&ex, &registry, &brokers, &topic);
    settings.bitfinex.backfill = Duration::from_secs(3600);

    let now = support::now_ms();
    ex.preload_history(BACKFILLED, now - 30 * 60_000, now - 1_000, BACKFILL);
    ex.set_tu_delay(TU_DELAY);
    let running = start(settings);
    ex.wait_trades_subscribed(&SYMBOLS, WAIT).await;
    // The first snapshot starts the backfill; live trades flow on every symbol while its pages
    // come in, each repeated as `tu` well after pages of history arrived in between.
    let trader = Trader::start(&ex, &SYMBOLS, 2, Duration::from_millis(10));
    let snapshot = 30;
    eventually_counter(
        "the backfill brought every trade the snapshot did not",
        "candlestream_trades_repaired_total",
        BACKFILLED,
        (BACKFILL - snapshot) as f64,
    )
    .await;
    // Live trading outlasts the backfill by more than a `tu` delay.
    tokio::time::sleep(2 * TU_DELAY).await;
    let live = trader.stop().await;

    // Every `tu` sent, then one more trade whose `te` comes after all of them on the one
    // connection: once the producer has read that frame, it has handled every `tu` before it.
    eventually("every tu sent", WAIT, || {
        let (te, tu) = ex.trade_frames_sent();
        te == tu
    })
    .await;
    ex.set_tu_delay(Duration::from_secs(3600));
    ex.execute(BACKFILLED, 1).await;
    let (te, tu) = ex.trade_frames_sent();
    eventually_counter(
        "the producer read every te and tu",
        "candlestream_exchange_frames_total",
        "kind=\"te\"",
        te as f64,
    )
    .await;
    let ledger = ex.ledger();
    support::eventually_async("every trade in Kafka", WAIT, || async {
        support::topic_size(&brokers, &trades_topic, &BTreeMap::new()) >= ledger.len()
    })
    .await;
    running.stop().await;

    let records = support::read_all(&brokers, &trades_topic, &BTreeMap::new());
    let trades = decode_trades(&registry, &records).await;
    let mut copies: HashMap<i64, usize> = HashMap::new();
    for t in &trades {
        *copies.entry(t.id).or_default() += 1;
    }
    let doubled = copies.values().filter(|&&n| n > 1).count();
    let missing = ledger
        .iter()
        .filter(|t| !copies.contains_key(&t.id))
        .count();
    let suppressed = counter(
        "candlestream_trades_duplicates_suppressed_total",
        "source=\"websocket\"",
    );
    crate::report!(
        "dedupe: backfill {BACKFILL} + {live} live trades ({te} te, {tu} tu frames); ledger {}, \
         records {}, distinct ids {}, ids doubled {doubled}, missing {missing}; \
         websocket repeats suppressed {suppressed}",
        ledger.len(),
        trades.len(),
        copies.len(),
    );
    assert!(live > 1_000, "trading went on during the backfill ({live})");
    assert_eq!(doubled, 0, "trades sent more than once");
    assert_eq!(missing, 0, "trades never sent");
    assert_eq!(trades.len(), ledger.len(), "one record per executed trade");
    let mut want: Vec<(String, i64, i64)> = ledger
        .iter()
        .map(|t| (t.symbol.clone(), t.id, t.mts))
        .collect();
    let mut got: Vec<(String, i64, i64)> = trades
        .iter()
        .map(|t| (t.symbol.clone(), t.id, t.exchange_time))
        .collect();
    want.sort();
    got.sort();
    assert_eq!(got, want, "the trades topic holds exactly the ledger");
}

async fn eventually_counter(what: &str, name: &str, label: &str, at_least: f64) {
    let deadline = tokio::time::Instant::now() + BACKFILL_WAIT;
    loop {
        let now = counter(name, label);
        if now >= at_least {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what} ({name}{{{label}}} = {now}, want {at_least})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
