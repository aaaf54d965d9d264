//! Every Bitfinex pair: symbol patterns resolved against the listing, listing changes followed at
//! runtime, refused symbols, and Bitfinex's websocket limits (25 channels per connection, 20
//! connection opens per rolling minute) held at start, on listing changes and in reconnect
//! storms, enforced by the fake exchange, which counts every refusal.
//!
//! Time is scaled so that the tests take seconds: the fake allows 10 upgrades per rolling second
//! (600 a minute) and the producer opens at most 500 a minute, one every 120 ms, the same
//! mechanism as 20 a minute, one every 3 s, against Bitfinex's 20 per minute. A burst (24
//! connections at once at start, or all of them again in a storm) or a hot retry would exceed 10
//! in a second and be refused with 429, and the tests would fail.

// The cluster lock is held across awaits on purpose: it keeps whole tests, each on its own
// runtime, from running two clusters at once.
#![allow(clippy::await_holding_lock)]

mod support;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candlestream::config::BitfinexConfig;
use candlestream::exchange::bitfinex::pairs::{Selection, resolve_once};
use candlestream::exchange::bitfinex::{self, RestClient};
use candlestream::model::Record;
use candlestream::telemetry::Health;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use support::eventually;
use support::fake_bitfinex::FakeBitfinex;
use support::pipeline::{WAIT, start, start_consumer};
use support::rig::{CLUSTER, Rig};

/// Scheduling on two shared cores, beyond the refresh, for a change to be followed.
const SLACK: Duration = Duration::from_millis(1500);
/// The fake's upgrade limit, scaled: 10 per rolling second.
const UPGRADES: usize = 10;
const WINDOW: Duration = Duration::from_secs(1);
/// The producer's, below it: one open every 120 ms.
const OPENS_PER_MINUTE: usize = 500;

/// `n` USD pairs, `tP000USD`…, as Bitfinex would list them.
fn usd_pairs(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("tP{i:03}USD")).collect()
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The exchange source alone, in this process, on the fake: what it sends is collected.
struct Source {
    cancel: CancellationToken,
    task: JoinHandle<()>,
    records: Arc<Mutex<Vec<Record>>>,
}

impl Source {
    fn start(cfg: BitfinexConfig) -> Self {
        let cancel = CancellationToken::new();
        let rest = RestClient::new(&cfg, cancel.clone()).unwrap();
        let (tx, mut rx) = mpsc::channel(1024);
        let data = Health::default().liveness("exchange_data", Duration::from_secs(60));
        let records = Arc::new(Mutex::new(Vec::new()));
        let sink = records.clone();
        tokio::spawn(async move {
            while let Some(r) = rx.recv().await {
                sink.lock().unwrap().push(r);
            }
        });
        let task = tokio::spawn(bitfinex::run(
            cfg,
            rest,
            None,
            Default::default(),
            tx,
            data,
            cancel.clone(),
        ));
        Self {
            cancel,
            task,
            records,
        }
    }

    fn trades_of(&self, symbol: &str) -> usize {
        self.records
            .lock()
            .unwrap()
            .iter()
            .filter(|r| matches!(r, Record::Trade(t) if t.symbol == symbol))
            .count()
    }

    async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("the exchange source stops in time")
            .unwrap();
    }
}

/// Trading skewed like a real market: 3 hot pairs carry most trades (12 per round each), 27 warm
/// ones trade every other round, and the 270 others take turns, 10 per round, so that each
/// trades now and then. Returns how many trades were executed once stopped.
struct SkewedTrader {
    stop: CancellationToken,
    task: JoinHandle<usize>,
}

impl SkewedTrader {
    fn start(ex: &FakeBitfinex, symbols: &[String]) -> Self {
        let stop = CancellationToken::new();
        let token = stop.clone();
        let ex = ex.handle();
        let (hot, rest) = symbols.split_at(3);
        let (warm, cold) = rest.split_at(27);
        let (hot, warm, cold) = (hot.to_vec(), warm.to_vec(), cold.to_vec());
        let task = tokio::spawn(async move {
            let (mut n, mut round) = (0, 0usize);
            while !token.is_cancelled() {
                for s in &hot {
                    n += ex.execute(s, 12).await.len();
                }
                if round % 2 == 0 {
                    for s in &warm {
                        n += ex.execute(s, 1).await.len();
                    }
                }
                for i in 0..10 {
                    n += ex
                        .execute(&cold[(round * 10 + i) % cold.len()], 1)
                        .await
                        .len();
                }
                round += 1;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    _ = token.cancelled() => {}
                }
            }
            n
        });
        Self { stop, task }
    }

    async fn stop(self) -> usize {
        self.stop.cancel();
        self.task.await.unwrap()
    }
}

/// 300 pairs from one pattern on real parts (Kafka 0.9, 3 brokers; InfluxDB 1.6.7), skewed
/// trading, then a reconnect storm (20051 on every connection at once) and a drop of every
/// connection at once: every trade of every pair is stored exactly once, and the fake refused
/// nothing (no 429, no channel beyond 25 on a connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_pairs_within_the_limits_through_storms() {
    let _one = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let mut rig = Rig::new().await;
    let cluster_up = started.elapsed();
    let ex = &rig.exchange;
    let pairs = usd_pairs(300);
    let mut listing = refs(&pairs);
    listing.extend(["tBTCEUR", "tETHBTC", "tTESTBTC:TESTUSDT"]);
    ex.set_listing(&listing);
    ex.set_ws_limits(25, UPGRADES, WINDOW);
    let b = &mut rig.settings.bitfinex;
    b.symbols = vec!["t*USD".into()];
    b.connections_per_minute = OPENS_PER_MINUTE;
    let consumer = start_consumer(rig.settings.clone(), 2);
    let producer = start(rig.producer_settings());
    let ex = &rig.exchange;

    // Ramp-up: 600 channels, 24 connections, one open every 120 ms; REST covers the waiting.
    let ramp = Instant::now();
    ex.wait_trades_subscribed(&refs(&pairs), WAIT).await;
    ex.wait_subscribed(&refs(&pairs), WAIT).await;
    let ramp = ramp.elapsed();
    assert_eq!(ex.channels_per_open_connection().len(), 24);
    assert_eq!(
        ex.listing_requests(),
        1,
        "one listing read at start: the resume read and the listing follower share it"
    );
    let polled: BTreeSet<String> = ex
        .sent()
        .into_iter()
        .filter(|s| s.rest)
        .map(|s| s.symbol)
        .collect();
    assert!(
        polled.len() > 200,
        "REST polled the tickers of pairs waiting for a connection: {}",
        polled.len()
    );

    let trader = SkewedTrader::start(ex, &pairs);
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Storm: the server restarts under every connection at once.
    ex.restart().await;
    ex.wait_trades_subscribed(&refs(&pairs), WAIT).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Storm: every connection drops at once.
    ex.drop_connections().await;
    ex.wait_trades_subscribed(&refs(&pairs), WAIT).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let live = trader.stop().await;

    let stored = rig
        .assert_trades_exact(
            &format!(
                "300 pairs from t*USD, skewed: {live} trades; 20051 and a drop on all 24 connections"
            ),
            None,
        )
        .await;
    assert_eq!(stored, live);
    let (refused_upgrades, refused_channels) = (ex.refused_upgrades(), ex.refused_channels());
    assert_eq!(
        (refused_upgrades, refused_channels),
        (0, 0),
        "the fake refused nothing"
    );
    let most = ex.most_upgrades_within(WINDOW);
    assert!(most <= UPGRADES, "{most} upgrades within {WINDOW:?}");
    report!(
        "PAIRS | 300 pairs | trades {live} stored {stored} | connections 24 | upgrades {} | most in a window {most}/{UPGRADES} | refused 429 {refused_upgrades} 10305 {refused_channels} | ramp {:.1}s | cluster {:.1}s",
        ex.upgrades(),
        ramp.as_secs_f64(),
        cluster_up.as_secs_f64()
    );
    producer.stop().await;
    consumer.stop().await;
}

/// The symbols the fake has both channels of subscribed, sorted.
fn fully_subscribed(ex: &FakeBitfinex) -> Vec<String> {
    let trades: BTreeSet<String> = ex.trades_subscribed().into_iter().collect();
    ex.subscribed()
        .into_iter()
        .filter(|s| trades.contains(s))
        .collect()
}

/// Patterns and excludes select from the listing; an exact symbol Bitfinex refuses (10300) is
/// asked for once and the others go on; a new listing is subscribed and a delisted pair
/// unsubscribed within one refresh, on the connection already open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_changes_are_followed_within_one_refresh() {
    let ex = FakeBitfinex::start().await;
    ex.set_ws_limits(25, UPGRADES, WINDOW);
    ex.set_listing(&[
        "tBTCUSD",
        "tETHUSD",
        "tSOLUSD",
        "tBTCEUR",
        "tTESTBTC:TESTUSD",
    ]);
    let refresh = Duration::from_millis(300);
    let mut cfg = source_config(&ex, &["t*USD", "tNOPEUSD"]);
    cfg.symbols_exclude = vec!["tTEST*".into()];
    cfg.symbols_refresh = refresh;
    let source = Source::start(cfg);

    let first = ["tBTCUSD", "tETHUSD", "tSOLUSD"];
    eventually("the USD pairs subscribed", WAIT, || {
        fully_subscribed(&ex) == first
    })
    .await;
    // Both channels of the refused symbol were asked for once, then never again.
    eventually("tNOPEUSD refused", WAIT, || ex.refused_symbols() == 2).await;
    assert_eq!(ex.ws_connections(), 1, "8 channels: one connection");

    // A new listing: subscribed within one refresh, on the open connection.
    ex.list("tXRPUSD");
    let listed = Instant::now();
    eventually("the new listing subscribed", WAIT, || {
        fully_subscribed(&ex).contains(&"tXRPUSD".to_string())
    })
    .await;
    let followed = listed.elapsed();
    assert!(
        followed < refresh + SLACK,
        "followed in {followed:?}, refresh {refresh:?}"
    );
    assert_eq!(ex.ws_connections(), 1, "what fits costs no connection open");
    let executed = ex.execute("tXRPUSD", 7).await.len();
    eventually("the new pair's trades arrive", WAIT, || {
        source.trades_of("tXRPUSD") == executed
    })
    .await;

    // A delisting: both channels unsubscribed within one refresh.
    ex.delist("tBTCUSD");
    let delisted = Instant::now();
    eventually("the delisted pair unsubscribed", WAIT, || {
        !ex.subscribed().contains(&"tBTCUSD".to_string())
            && !ex.trades_subscribed().contains(&"tBTCUSD".to_string())
    })
    .await;
    let followed = delisted.elapsed();
    assert!(followed < refresh + SLACK, "followed in {followed:?}");

    // A server restart: the same set comes back; the refused and the delisted stay away.
    ex.restart().await;
    let now = ["tETHUSD", "tSOLUSD", "tXRPUSD"];
    eventually("resubscribed after 20051", WAIT, || {
        fully_subscribed(&ex) == now
    })
    .await;
    tokio::time::sleep(refresh * 2).await;
    assert_eq!(fully_subscribed(&ex), now);
    assert_eq!(
        ex.refused_symbols(),
        2,
        "a refused symbol is asked for once"
    );
    assert_eq!((ex.refused_upgrades(), ex.refused_channels()), (0, 0));
    assert!(
        ex.listing_requests() >= 3,
        "the listing is read every refresh"
    );
    source.stop().await;

    // The roles that take their symbols once (audit, verify) resolve the same way.
    let cfg = source_config(&ex, &["t*USD", "tNOPEUSD"]);
    let selection = Selection::new(&cfg.symbols, &["tTEST*".to_string()]).unwrap();
    let rest = RestClient::new(&cfg, CancellationToken::new()).unwrap();
    assert_eq!(
        resolve_once(&selection, &rest).await.unwrap(),
        ["tETHUSD", "tNOPEUSD", "tSOLUSD", "tXRPUSD"]
    );
}

/// The tests' short timers (as `support::settings` sets them), on `cfg`.
fn quick(cfg: &mut BitfinexConfig) {
    cfg.rest_poll_interval = Duration::from_millis(100);
    cfg.heartbeat_timeout = Duration::from_secs(3);
    cfg.reconnect_backoff_min = Duration::from_millis(50);
    cfg.reconnect_backoff_max = Duration::from_secs(1);
    cfg.rest_backoff_min = Duration::from_millis(100);
    cfg.rest_backoff_max = Duration::from_secs(1);
    cfg.repair_backoff_min = Duration::from_millis(100);
    cfg.repair_backoff_max = Duration::from_secs(1);
    cfg.request_timeout = Duration::from_secs(2);
    cfg.rest_trades_per_minute = 6_000;
    cfg.rest_tickers_per_minute = 6_000;
    cfg.connections_per_minute = OPENS_PER_MINUTE;
}

fn source_config(ex: &FakeBitfinex, symbols: &[&str]) -> BitfinexConfig {
    let mut cfg = BitfinexConfig {
        ws_url: ex.ws_url(),
        rest_url: ex.rest_url(),
        symbols: symbols.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    quick(&mut cfg);
    cfg
}

/// A 429 on the upgrade holds every shard's opens for `reconnect_backoff_max`: no open follows a
/// refusal within the hold, and every symbol is subscribed in the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_upgrade_holds_every_open() {
    let ex = FakeBitfinex::start().await;
    // The producer opens up to 10 a second (600 a minute), the fake allows 3: refusals follow.
    ex.set_ws_limits(2, 3, WINDOW);
    let symbols: Vec<String> = (0..8).map(|i| format!("tQ{i}USD")).collect();
    let mut cfg = source_config(&ex, &refs(&symbols));
    cfg.channels_per_connection = 2;
    cfg.connections_per_minute = 600;
    let hold = cfg.reconnect_backoff_max;
    let source = Source::start(cfg);
    ex.wait_trades_subscribed(&refs(&symbols), WAIT).await;
    ex.wait_subscribed(&refs(&symbols), WAIT).await;
    let log = ex.upgrade_log();
    let refusals: Vec<Instant> = log.iter().filter(|(_, ok)| !ok).map(|(t, _)| *t).collect();
    assert!(!refusals.is_empty(), "the test provoked no 429");
    for r in &refusals {
        // Shards that were already connecting when the 429 came may land just after it.
        let soon = log
            .iter()
            .filter(|(t, _)| {
                *t > *r + Duration::from_millis(50) && *t < *r + hold - Duration::from_millis(50)
            })
            .count();
        assert_eq!(soon, 0, "an open within the hold after a 429: {log:?}");
    }
    assert_eq!(ex.refused_channels(), 0);
    assert_eq!(ex.listing_requests(), 0, "exact symbols need no listing");
    report!(
        "PAIRS | 429 | {} upgrades, {} refused; no open within {hold:?} after a refusal",
        log.len(),
        refusals.len()
    );
    source.stop().await;
}

/// A pair delisted while its subscribe is still pending, and a new one listed: the pending
/// channel still counts on Bitfinex's side (it is unsubscribed once subscribed), so the new one
/// waits for room instead of being the connection's 5th channel of 4 (refused with 10305).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_while_subscribing_stays_within_the_channels_of_a_connection() {
    let ex = FakeBitfinex::start().await;
    ex.set_ws_limits(4, UPGRADES, WINDOW);
    ex.set_listing(&["tBBBUSD"]);
    let mut cfg = source_config(&ex, &["t*USD"]);
    cfg.channels_per_connection = 4;
    cfg.symbols_refresh = Duration::from_millis(100);
    let source = Source::start(cfg);
    eventually("tBBBUSD subscribed", WAIT, || {
        fully_subscribed(&ex) == ["tBBBUSD"]
    })
    .await;
    // tAAAUSD's two subscribes take a second each to be answered; while they wait, it is
    // delisted and tCCCUSD listed.
    ex.set_subscribe_delay(Duration::from_secs(1));
    ex.list("tAAAUSD");
    eventually("tAAAUSD asked for", WAIT, || {
        ex.subscribes_received("tAAAUSD") == 1
    })
    .await;
    ex.delist("tAAAUSD");
    ex.list("tCCCUSD");
    eventually("the swap followed", WAIT, || {
        fully_subscribed(&ex) == ["tBBBUSD", "tCCCUSD"]
    })
    .await;
    assert_eq!(ex.ws_connections(), 1, "the freed room took the new pair");
    assert!(ex.channels_per_open_connection().iter().all(|&n| n <= 4));
    assert_eq!((ex.refused_channels(), ex.refused_upgrades()), (0, 0));
    source.stop().await;
}

/// A connection Bitfinex holds to fewer channels than configured: the channel it refuses (10305)
/// is not asked for again at once (it would be refused again), its symbol's trades come over
/// REST meanwhile, and it is subscribed as soon as a channel leaves the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_refused_for_the_limit_waits_for_room_and_loses_nothing() {
    let ex = FakeBitfinex::start().await;
    ex.set_ws_limits(3, UPGRADES, WINDOW);
    ex.set_listing(&["tAAAUSD", "tBBBUSD"]);
    let mut cfg = source_config(&ex, &["t*USD"]);
    cfg.channels_per_connection = 4;
    cfg.symbols_refresh = Duration::from_millis(100);
    let source = Source::start(cfg);
    // Tickers first, then trades: tBBBUSD's trades are the 4th channel.
    eventually("the 4th channel refused", WAIT, || {
        ex.refused_channels() == 1
    })
    .await;
    assert_eq!(fully_subscribed(&ex), ["tAAAUSD"]);
    let executed = ex.execute("tBBBUSD", 5).await.len();
    eventually("tBBBUSD's trades arrive over REST", WAIT, || {
        source.trades_of("tBBBUSD") == executed
    })
    .await;
    assert_eq!(
        ex.refused_channels(),
        1,
        "not asked for again while no channel left the connection"
    );
    ex.delist("tAAAUSD");
    eventually(
        "the refused channel subscribed once there is room",
        WAIT,
        || fully_subscribed(&ex) == ["tBBBUSD"],
    )
    .await;
    let more = ex.execute("tBBBUSD", 5).await.len();
    eventually("every trade once", WAIT, || {
        source.trades_of("tBBBUSD") == executed + more
    })
    .await;
    assert_eq!((ex.refused_channels(), ex.ws_connections()), (1, 1));
    source.stop().await;
}
