//! `candlestream verify` on real parts: the fake exchange's history and live trades → producer →
//! Kafka 0.9 (3 brokers) → consumer → InfluxDB 1.6.7, with the verifier binary checking the
//! candles against the fake's own. One rig, four scenarios in turn:
//! - clean run: every closed 1m and 1h candle is `equal`; SIGTERM exits 0 at once;
//! - loss: two minutes deleted from InfluxDB end `repaired`, and InfluxDB equals the ledger;
//! - exchange-side difference: a wrong HIGH reported for one minute is `differs` naming HIGH,
//!   fetched `max_repairs` times and no more, and nothing else changes;
//! - outage: InfluxDB down across a minute's close gives no verdict while down, no
//!   `missing_here`, and the minute is `equal` once it is back.
//!
//! A second test runs the verifier at scale (60 pairs from a pattern) on InfluxDB 1.6.7 and the
//! fake exchange alone: see its comment.

// The cluster lock is held across awaits on purpose: one cluster at a time.
#![allow(clippy::await_holding_lock)]

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use support::fake_trades::Trader;
use support::pipeline::{start, start_consumer};
use support::rig::{CLUSTER, Rig, free_port};
use support::{Process, SYMBOLS, eventually_async, now_ms, settings_toml};

const MINUTE: i64 = 60_000;
const HOUR: i64 = 3_600_000;
const GRACE: Duration = Duration::from_secs(2);
const MAX_REPAIRS: usize = 3;
const WAIT: Duration = Duration::from_secs(90);

/// The start of the minute holding `ms`.
fn minute_of(ms: i64) -> i64 {
    ms.div_euclid(MINUTE) * MINUTE
}

/// (symbol, timeframe, candle start) → the check's columns.
type Checks = BTreeMap<(String, String, i64), Map<String, Value>>;

async fn checks(rig: &Rig) -> Checks {
    rig.influx
        .rows(&rig.db, "SELECT * FROM candle_checks")
        .await
        .into_iter()
        .map(|r| {
            let key = (
                r["symbol"].as_str().unwrap().to_string(),
                r["timeframe"].as_str().unwrap().to_string(),
                r["time"].as_i64().unwrap(),
            );
            (key, r)
        })
        .collect()
}

fn status(checks: &Checks, symbol: &str, timeframe: &str, start: i64) -> Option<String> {
    checks
        .get(&(symbol.to_string(), timeframe.to_string(), start))
        .map(|r| r["status"].as_str().unwrap().to_string())
}

/// Candles of the ledger that closed at least the grace period ago, as the verifier must see them.
fn closed_candles(rig: &Rig, width: i64) -> Vec<(String, i64)> {
    let closed_by = now_ms() - GRACE.as_millis() as i64;
    SYMBOLS
        .iter()
        .flat_map(|s| {
            rig.exchange
                .candles_of(s, width)
                .into_keys()
                .filter(|start| start + width <= closed_by)
                .map(|start| (s.to_string(), start))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The verifier's /metrics: the sum of the samples of `name` whose labels contain every one of
/// `labels`.
async fn metric(port: u16, name: &str, labels: &[&str]) -> f64 {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Equal within the comparison's relative 1e-9: InfluxDB adds the amounts in another order.
fn assert_same_volume(row: &Map<String, Value>) {
    let (ours, theirs) = (
        row["volume"].as_f64().unwrap(),
        row["ex_volume"].as_f64().unwrap(),
    );
    assert!((ours - theirs).abs() <= 1e-9 * theirs, "{row:?}");
}

fn rest_requests(rig: &Rig) -> u64 {
    rig.exchange.rest_requests_by("candles") + rig.exchange.rest_requests_by("trades")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verifier_checks_heals_and_rides_out_an_influx_outage() {
    let _one = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let mut rig = Rig::new().await;
    // History over the last 110 minutes, up to the last closed minute.
    let t0 = now_ms();
    let last_closed = minute_of(t0) - 1;
    for s in SYMBOLS {
        rig.exchange
            .preload_history(s, t0 - 110 * MINUTE, last_closed, 300);
    }
    // After an outage the consumer waits out its backoff before writing again: the window in
    // which a verifier that judged what it could read would see the last minute missing.
    let mut consumer_settings = rig.settings.clone();
    consumer_settings.consumer.retry_backoff_max = Duration::from_secs(10);
    let consumer = start_consumer(consumer_settings, 1);
    let producer = start(rig.producer_settings());
    let history = rig.exchange.ledger().len();
    eventually_async("the backfilled history stored", WAIT, || async {
        rig.influx.count_trades(&rig.db).await >= history
    })
    .await;

    let port = free_port();
    let mut s = rig.settings.clone();
    s.http.listen = ([127, 0, 0, 1], port).into();
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        config.path(),
        settings_toml(&s)
            + &format!(
                "[verify]\ninterval = \"1s\"\ngrace = \"{}ms\"\nlookback = \"2h\"\n\
                 timeframes = [\"1m\", \"1h\", \"1D\"]\nmax_repairs = {MAX_REPAIRS}\n\
                 rest_trades_per_minute = 6000\nrest_candles_per_minute = 6000\n",
                GRACE.as_millis()
            ),
    )
    .unwrap();

    // Clean run.
    let requests_before = rest_requests(&rig);
    let mut verifier = Process::spawn("verify", config.path());
    let (minutes, hours) = (closed_candles(&rig, MINUTE), closed_candles(&rig, HOUR));
    assert!(!hours.is_empty(), "110 minutes span a closed hour");
    eventually_async("every closed candle checked", WAIT, || async {
        let c = checks(&rig).await;
        minutes
            .iter()
            .all(|(s, m)| status(&c, s, "1m", *m).is_some())
            && hours.iter().all(|(s, h)| status(&c, s, "1h", *h).is_some())
    })
    .await;
    let clean = checks(&rig).await;
    for ((symbol, timeframe, start), row) in &clean {
        assert_eq!(
            row["status"], "equal",
            "{symbol} {timeframe} {start}: {row:?}"
        );
        assert_eq!(row["detail"], "");
        for field in ["open", "high", "low", "close"] {
            assert_eq!(row[field], row[&format!("ex_{field}")], "{row:?}");
        }
        assert_same_volume(row);
    }
    let in_1m = clean.keys().filter(|k| k.1 == "1m").count();
    assert_eq!(
        in_1m,
        minutes.len(),
        "a point per minute with trades, no more"
    );
    let clean_requests = rest_requests(&rig) - requests_before;
    let stopping = Instant::now();
    let exit = verifier.terminate();
    let stopped_in = stopping.elapsed();
    assert!(exit.success(), "SIGTERM exits 0: {exit:?}");
    assert!(stopped_in < Duration::from_secs(5), "{stopped_in:?}");
    crate::report!(
        "VERIFY | clean run | 1m checked {in_1m} | 1h checked {} | all equal | REST requests {clean_requests} | SIGTERM → exit 0 in {:.2}s",
        clean.len() - in_1m,
        stopped_in.as_secs_f64()
    );

    // Loss: two consecutive minutes of tBTCUSD, inside a closed hour, deleted from InfluxDB.
    let btc = rig.exchange.candles("tBTCUSD");
    let (_, lost_hour) = hours.iter().rev().find(|(s, _)| s == "tBTCUSD").unwrap();
    let lost_hour = *lost_hour;
    let lost = *btc
        .keys()
        .find(|m| {
            **m >= lost_hour + 10 * MINUTE
                && **m + 2 * MINUTE <= lost_hour + HOUR
                && btc.contains_key(&(**m + MINUTE))
        })
        .unwrap();
    let lost_trades = rig
        .exchange
        .ledger()
        .iter()
        .filter(|t| t.symbol == "tBTCUSD" && (lost..lost + 2 * MINUTE).contains(&t.mts))
        .count();
    rig.influx
        .query(
            &rig.db,
            &format!(
                "DELETE FROM trades WHERE \"symbol\" = 'tBTCUSD' AND time >= {lost}ms AND time < {}ms",
                lost + 2 * MINUTE
            ),
        )
        .await;
    assert_eq!(
        rig.influx.count_trades(&rig.db).await,
        history - lost_trades,
        "{lost_trades} trades deleted"
    );
    // Exchange-side difference: a wrong HIGH for one minute of tETHUSD.
    let eth = rig.exchange.candles("tETHUSD");
    let (&wrong, row) = eth.iter().nth(eth.len() / 2).unwrap();
    let true_high = row[2];
    rig.exchange
        .report_wrong_high("tETHUSD", wrong, true_high + 1.5);

    let queries_before = rig.exchange.trades_queries().len();
    let requests_before = rest_requests(&rig);
    let _verifier = Process::spawn("verify", config.path());
    eventually_async("both lost minutes repaired", WAIT, || async {
        let c = checks(&rig).await;
        [lost, lost + MINUTE]
            .iter()
            .all(|m| status(&c, "tBTCUSD", "1m", *m).as_deref() == Some("repaired"))
    })
    .await;
    let ethereum = [
        "symbol=\"tETHUSD\"",
        "timeframe=\"1m\"",
        "status=\"differs\"",
    ];
    eventually_async("the wrong HIGH given up on", WAIT, || async {
        metric(port, "candlestream_candles_checked_total", &ethereum).await
            >= (MAX_REPAIRS + 1) as f64
    })
    .await;
    eventually_async("the hour of the lost minutes repaired", WAIT, || async {
        status(&checks(&rig).await, "tBTCUSD", "1h", lost_hour).as_deref() == Some("repaired")
    })
    .await;
    // A few more passes: nothing is fetched again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = checks(&rig).await;
    let differs = &after[&("tETHUSD".to_string(), "1m".to_string(), wrong)];
    assert_eq!(differs["status"], "differs");
    let detail = differs["detail"].as_str().unwrap();
    assert!(detail.starts_with("high ours "), "{detail}");
    assert!(
        detail.contains(&format!("theirs {}", true_high + 1.5)),
        "{detail}"
    );
    assert_eq!(differs["ex_high"].as_f64(), Some(true_high + 1.5));
    assert_eq!(differs["high"].as_f64(), Some(true_high));
    let fetches = |symbol: &str, from: i64, until: i64| {
        rig.exchange.trades_queries()[queries_before..]
            .iter()
            .filter(|(s, start, end)| {
                s == symbol && *start == Some(from) && *end == Some(until - 1)
            })
            .count()
    };
    assert_eq!(
        fetches("tETHUSD", wrong, wrong + MINUTE),
        MAX_REPAIRS,
        "the differing minute is fetched max_repairs times, then left alone"
    );
    assert_eq!(
        fetches("tBTCUSD", lost, lost + 2 * MINUTE),
        1,
        "the two lost minutes are one range request"
    );
    assert_eq!(
        rig.exchange.trades_queries().len() - queries_before,
        MAX_REPAIRS + 1,
        "no other trades were fetched"
    );
    for (key, row) in &after {
        let healed = key.0 == "tBTCUSD"
            && ((key.1 == "1m" && (key.2 == lost || key.2 == lost + MINUTE))
                || (key.1 == "1h" && key.2 == lost_hour));
        let forged = key.0 == "tETHUSD" && key.1 == "1m" && key.2 == wrong;
        match clean.get(key) {
            Some(before) if !healed && !forged => assert_eq!(row, before, "{key:?} changed"),
            // A candle that closed since the clean run.
            None => assert_eq!(row["status"], "equal", "{key:?}"),
            _ => {}
        }
    }
    for m in [lost, lost + MINUTE] {
        let row = &after[&("tBTCUSD".to_string(), "1m".to_string(), m)];
        assert_same_volume(row);
        assert_eq!(row["detail"], "");
    }
    rig.assert_trades_exact(
        "verify: two minutes of trades deleted from InfluxDB, healed from REST through Kafka",
        None,
    )
    .await;
    assert_eq!(
        metric(port, "candlestream_candles_repaired_total", &["tBTCUSD"]).await,
        2.0
    );
    let ratio = metric(port, "candlestream_candles_verified_ratio", &["tETHUSD"]).await;
    let eth_minutes = minutes.iter().filter(|(s, _)| s == "tETHUSD").count() as f64;
    assert!(
        (ratio - (eth_minutes - 1.0) / eth_minutes).abs() < 1e-9,
        "{ratio}"
    );
    let heal_requests = rest_requests(&rig) - requests_before;

    // Outage: InfluxDB down from 10 s before a minute closes until 5 s after.
    let to_next = MINUTE - now_ms().rem_euclid(MINUTE);
    let lead = (to_next - 10_000).rem_euclid(MINUTE);
    tokio::time::sleep(Duration::from_millis(lead as u64)).await;
    let trader = Trader::start(&rig.exchange, &SYMBOLS, 1, Duration::from_millis(200));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let outage_minute = minute_of(now_ms());
    let missing_before = metric(
        port,
        "candlestream_candles_checked_total",
        &["missing_here"],
    )
    .await;
    let differs_before = metric(port, "candlestream_candles_checked_total", &["differs"]).await;
    let requests_before = rest_requests(&rig);
    rig.influx.stop();
    tokio::time::sleep(Duration::from_secs(15)).await;
    rig.influx.start_again();
    let back = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let live = trader.stop().await;
    assert!(live > 0);
    eventually_async(
        "the minute that closed during the outage checked",
        WAIT,
        || async {
            let c = checks(&rig).await;
            SYMBOLS
                .iter()
                .all(|s| status(&c, s, "1m", outage_minute).is_some())
        },
    )
    .await;
    let caught_up = back.elapsed();
    let c = checks(&rig).await;
    for s in SYMBOLS {
        assert_eq!(
            status(&c, s, "1m", outage_minute).as_deref(),
            Some("equal"),
            "{s}: the minute of the outage"
        );
    }
    for ((symbol, timeframe, start), row) in &c {
        if *start >= outage_minute {
            assert_eq!(row["status"], "equal", "{symbol} {timeframe} {start}");
        }
    }
    assert_eq!(
        metric(
            port,
            "candlestream_candles_checked_total",
            &["missing_here"]
        )
        .await,
        missing_before,
        "no missing_here while InfluxDB was down or catching up"
    );
    assert_eq!(
        metric(port, "candlestream_candles_checked_total", &["differs"]).await,
        differs_before
    );
    let lag = metric(
        port,
        "candlestream_verify_lag_seconds",
        &["timeframe=\"1m\""],
    )
    .await;
    assert!(lag <= GRACE.as_secs_f64() + 5.0, "lag {lag}s");
    rig.assert_trades_exact(
        "verify: InfluxDB down 15 s across a minute's close while trading",
        Some(caught_up),
    )
    .await;
    let outage_requests = rest_requests(&rig) - requests_before;

    let all = checks(&rig).await;
    let one_minute: Vec<&Map<String, Value>> = all
        .iter()
        .filter(|(k, _)| k.1 == "1m")
        .map(|(_, r)| r)
        .collect();
    let count = |s: &str| one_minute.iter().filter(|r| r["status"] == s).count();
    crate::report!(
        "VERIFY | one run | 1m checked {} | equal {} | repaired {} | differs {} | missing_here {} | missing_there {} | REST requests: clean {clean_requests}, heal {heal_requests}, outage {outage_requests} | caught up {:.1}s after InfluxDB returned",
        one_minute.len(),
        count("equal"),
        count("repaired"),
        count("differs"),
        count("missing_here"),
        count("missing_there"),
        caught_up.as_secs_f64()
    );
    assert_eq!(
        (count("repaired"), count("differs"), count("missing_here")),
        (2, 1, 0)
    );
    producer.stop().await;
    consumer.stop().await;
}

/// The verifier at exchange scale, on InfluxDB 1.6.7 and the fake exchange (no Kafka cluster:
/// every candle is equal, so nothing is healed; librdkafka's mock cluster stands in): `t*USD`
/// matches 60 of the fake's 61 listed pairs, each with 10 minutes of history that InfluxDB
/// holds too, checked in 1m and 1h at 600 candles requests a minute. A round of the 60 due 1m
/// series takes longer than the liveness window, and yet /healthz stays 200 throughout; every
/// closed minute of every pair gets its verdict; the 1m lag starts at the lookback and falls to
/// the grace period once the round is through; no 6 s saw more candles requests than 6 s of the
/// budget allows; a pair listed at runtime is checked, and a delisted one no longer asked about,
/// within one `symbols_refresh`; with InfluxDB down while a new listing is due, /healthz turns
/// red within the liveness window and the overdue work grows, and it is green once InfluxDB is
/// back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verifier_over_60_pairs_stays_healthy_fair_and_follows_the_listing() {
    const PAIRS: usize = 60;
    const CANDLES_PER_MINUTE: u32 = 600;
    const REFRESH: Duration = Duration::from_secs(1);
    const SILENCE: Duration = Duration::from_secs(2);
    const LOOKBACK_MINUTES: i64 = 10;
    let mut influx = tokio::task::spawn_blocking(support::influx1::Influx1::start)
        .await
        .unwrap();
    let db = support::unique("verify_scale").replace('-', "_");
    influx.create_database(&db).await;
    let exchange = support::fake_bitfinex::FakeBitfinex::start().await;
    let registry = support::fake_registry::FakeRegistry::start().await;
    let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
    let topic = support::unique("verify-scale");
    let mut s = support::settings(&exchange, &registry, &cluster.bootstrap_servers(), &topic);
    influx.configure(&mut s, &db);
    let port = free_port();
    s.http.listen = ([127, 0, 0, 1], port).into();
    s.bitfinex.symbols = vec!["t*USD".into()];

    let pair = |i: usize| format!("tC{i:02}USD");
    let mut listed: Vec<String> = (0..PAIRS).map(pair).collect();
    listed.push("tC00EUR".into());
    exchange.set_listing(&listed.iter().map(String::as_str).collect::<Vec<_>>());
    // Nine whole minutes of history up to the last closed minute, in the exchange and in
    // InfluxDB. Why whole minutes starting one after `now - lookback`'s: a series starts at the
    // minute of `now - lookback` when it is added, so the first minute stays in the lookback of
    // a pair added up to a minute later (the listing below), whenever in its minute `t0` falls.
    let t0 = now_ms();
    let last_closed = minute_of(t0) - 1;
    let first_minute = minute_of(t0 - LOOKBACK_MINUTES * MINUTE) + MINUTE;
    let store = |trades: Vec<support::fake_trades::Trade>| {
        let mut lines = String::new();
        for t in trades {
            let record = candlestream::model::Record::Trade(candlestream::model::Trade {
                symbol: t.symbol,
                id: t.id,
                exchange_time: t.mts,
                amount: t.amount,
                price: t.price,
                source: candlestream::model::Source::Rest,
                sequence: None,
                received_at: t.mts,
            });
            candlestream::sink::influx::write_line(&mut lines, "trades", &record);
        }
        lines
    };
    let mut lines = String::new();
    for symbol in listed.iter().chain([&pair(PAIRS)]) {
        let history = exchange.preload_history(symbol, first_minute, last_closed, 20);
        lines += &store(history);
    }
    let http = reqwest::Client::new();
    let wrote = http
        .post(format!("{}/write?db={db}", influx.url()))
        .body(lines)
        .send()
        .await
        .unwrap();
    assert!(wrote.status().is_success(), "{:?}", wrote.text().await);

    let config = tempfile::NamedTempFile::new().unwrap();
    let toml = settings_toml(&s).replace(
        "[bitfinex]\n",
        &format!(
            "[bitfinex]\nsymbols_refresh = \"{}ms\"\n",
            REFRESH.as_millis()
        ),
    ) + &format!(
        "[health]\nmax_exchange_silence = \"{}ms\"\n\
         [verify]\ninterval = \"1s\"\ngrace = \"1s\"\nlookback = \"{LOOKBACK_MINUTES}m\"\n\
         timeframes = [\"1m\", \"1h\"]\nrest_trades_per_minute = {CANDLES_PER_MINUTE}\n\
         rest_candles_per_minute = {CANDLES_PER_MINUTE}\n",
        SILENCE.as_millis()
    );
    std::fs::write(config.path(), toml).unwrap();
    let started = Instant::now();
    let _verifier = Process::spawn("verify", config.path());

    // /healthz every 100 ms from its first answer to the end of the test.
    let answers: Arc<Mutex<Vec<(u16, String)>>> = Arc::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let polling = tokio::spawn({
        let (answers, stop) = (answers.clone(), stop.clone());
        async move {
            let url = format!("http://127.0.0.1:{port}/healthz");
            while !stop.is_cancelled() {
                let answer = match reqwest::get(&url).await {
                    Ok(r) => Some((r.status().as_u16(), r.text().await.unwrap_or_default())),
                    Err(e) => Some((0, e.to_string())),
                };
                {
                    let mut answers = answers.lock().unwrap();
                    if answer.as_ref().is_some_and(|a| a.0 != 0) || !answers.is_empty() {
                        answers.extend(answer);
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    let lag_1m = || {
        metric(
            port,
            "candlestream_verify_lag_seconds",
            &["timeframe=\"1m\""],
        )
    };
    eventually_async("the first check", WAIT, || async {
        reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
            .await
            .is_ok_and(|r| r.status().is_success())
            && lag_1m().await > 0.0
    })
    .await;
    let lag_at_start = lag_1m().await;
    assert!(
        lag_at_start >= 8.0 * 60.0,
        "the 1m lag starts at the lookback: {lag_at_start} s"
    );

    let closed = |symbols: &[String]| -> Vec<(String, i64)> {
        symbols
            .iter()
            .flat_map(|s| {
                exchange
                    .candles_of(s, MINUTE)
                    .into_keys()
                    .map(move |m| (s.clone(), m))
            })
            .collect()
    };
    let usd: Vec<String> = (0..PAIRS).map(pair).collect();
    let expected = closed(&usd);
    assert_eq!(expected.len(), PAIRS * 9, "nine minutes of each pair");
    let checks_of = |db: &str| {
        let (influx, db) = (&influx, db.to_string());
        async move {
            influx
                .rows(&db, "SELECT symbol, timeframe, status FROM candle_checks")
                .await
                .into_iter()
                .map(|r| {
                    (
                        (
                            r["symbol"].as_str().unwrap().to_string(),
                            r["timeframe"].as_str().unwrap().to_string(),
                            r["time"].as_i64().unwrap(),
                        ),
                        r["status"].as_str().unwrap().to_string(),
                    )
                })
                .collect::<BTreeMap<_, _>>()
        }
    };
    eventually_async(
        "every closed minute of every pair checked",
        WAIT,
        || async {
            let c = checks_of(&db).await;
            expected
                .iter()
                .all(|(s, m)| c.contains_key(&(s.clone(), "1m".to_string(), *m)))
        },
    )
    .await;
    let round = started.elapsed();
    assert!(
        round > SILENCE * 2,
        "the round ({round:?}) outlasts the liveness window (about {SILENCE:?})"
    );
    let c = checks_of(&db).await;
    assert!(c.values().all(|s| s == "equal"), "{c:?}");
    assert!(
        !c.keys().any(|k| k.0 == "tC00EUR"),
        "t*USD leaves tC00EUR out"
    );
    let lag_after = lag_1m().await;
    assert!(
        lag_after < 20.0,
        "the 1m lag after the round: {lag_after} s (was {lag_at_start} s)"
    );

    // A listing and a delisting.
    let (new, gone) = (pair(PAIRS), pair(5));
    exchange.list(&new);
    exchange.delist(&gone);
    let changed = Instant::now();
    // What the new pair's lookback holds: it is added within a refresh (asserted below), so a
    // minute that began before `now + refresh + 1 s - lookback` may be out of it under load.
    let lookback_from = minute_of(
        now_ms() + (REFRESH + Duration::from_secs(1)).as_millis() as i64
            - LOOKBACK_MINUTES * MINUTE,
    );
    let new_minutes: Vec<(String, i64)> = closed(std::slice::from_ref(&new))
        .into_iter()
        .filter(|(_, m)| *m >= lookback_from)
        .collect();
    assert!(
        !new_minutes.is_empty(),
        "the new pair has minutes in its lookback"
    );
    eventually_async(
        "the new listing checked",
        Duration::from_secs(10),
        || async {
            let c = checks_of(&db).await;
            new_minutes.iter().all(|(s, m)| {
                c.get(&(s.clone(), "1m".to_string(), *m))
                    .map(String::as_str)
                    == Some("equal")
            })
        },
    )
    .await;
    let candles = exchange.rest_arrivals("candles");
    let first_new = candles
        .iter()
        .find(|(_, s)| *s == new)
        .map(|(t, _)| t.duration_since(changed))
        .unwrap();
    assert!(
        first_new <= REFRESH + Duration::from_secs(1),
        "the new listing asked for {first_new:?} after it was listed"
    );
    // Two more refreshes: nothing is asked about the delisted pair after the first.
    tokio::time::sleep(REFRESH * 2).await;
    let last_gone = exchange
        .rest_arrivals("candles")
        .iter()
        .rev()
        .find(|(_, s)| *s == gone)
        .map(|(t, _)| *t)
        .unwrap();
    let after = last_gone.saturating_duration_since(changed);
    assert!(
        after <= REFRESH + Duration::from_secs(1),
        "the delisted pair was asked about {after:?} after it was delisted"
    );
    assert_eq!(
        metric(port, "candlestream_verify_symbols ", &[]).await,
        PAIRS as f64
    );
    assert_eq!(
        metric(port, "candlestream_verify_symbols_added_total", &[]).await,
        1.0
    );
    assert_eq!(
        metric(port, "candlestream_verify_symbols_removed_total", &[]).await,
        1.0
    );
    let gone_label = format!("symbol=\"{gone}\"");
    let ratio = metric(port, "candlestream_candles_verified_ratio", &[&gone_label]).await;
    assert!(
        ratio.is_nan(),
        "the delisted pair's verified ratio is no value any more: {ratio}"
    );

    // Never more than the budget: 6 s of it is 60 candles requests; nothing needed trades.
    let window = Duration::from_secs(6);
    let allowed = CANDLES_PER_MINUTE as usize * 6 / 60;
    let busiest = exchange.most_rest_requests_within("candles", window);
    assert!(
        busiest <= allowed,
        "{busiest} candles requests within {window:?}"
    );
    assert_eq!(exchange.rest_requests_by("trades"), 0);
    let requests = exchange.rest_requests_by("candles");

    stop.cancel();
    polling.await.unwrap();
    let answers = answers.lock().unwrap().clone();
    let red: Vec<&(u16, String)> = answers
        .iter()
        .filter(|(status, _)| *status != 200)
        .collect();
    assert!(
        answers.len() > 10 * round.as_secs() as usize / 2,
        "polled /healthz throughout: {} answers",
        answers.len()
    );
    assert!(red.is_empty(), "/healthz not 200: {red:?}");
    // InfluxDB down while a new listing is due: its checks fail, /healthz turns red within the
    // liveness window and names the check, the overdue work grows; back up, green again.
    let healthz = || async move {
        let r = reqwest::get(format!("http://127.0.0.1:{port}/healthz"))
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    influx.stop();
    let down = Instant::now();
    exchange.list(&pair(PAIRS + 1));
    eventually_async("/healthz red", WAIT, || async { healthz().await.0 == 503 }).await;
    let red_after = down.elapsed();
    let (_, why) = healthz().await;
    assert!(why.starts_with("verify_checks: nothing for"), "{why}");
    assert!(
        red_after <= REFRESH + SILENCE + Duration::from_secs(3),
        "red {red_after:?} after InfluxDB stopped"
    );
    let overdue = || metric(port, "candlestream_verify_overdue_seconds", &[]);
    let first = overdue().await;
    eventually_async("the overdue work grows", WAIT, || async {
        overdue().await >= first + 1.0
    })
    .await;
    influx.start_again();
    let up = Instant::now();
    eventually_async("/healthz green", WAIT, || async {
        healthz().await.0 == 200
    })
    .await;
    let green_after = up.elapsed();

    crate::report!(
        "VERIFY | {PAIRS} pairs x 1m,1h at {CANDLES_PER_MINUTE} candles/min | first 1m round {:.1}s (liveness window {:.1}s), /healthz 200 in {} of {} polls | lag 1m {lag_at_start:.0}s -> {lag_after:.0}s | candles requests {requests}, busiest 6 s {busiest} (allowed {allowed}) | new listing asked after {:.2}s | InfluxDB down: /healthz red after {:.1}s, green {:.1}s after it was back",
        round.as_secs_f64(),
        SILENCE.as_secs_f64() + 0.1,
        answers.len(),
        answers.len(),
        first_new.as_secs_f64(),
        red_after.as_secs_f64(),
        green_after.as_secs_f64()
    );
}
