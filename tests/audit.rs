//! `candlestream audit` against the fake exchange's own candles, after the pipeline stored its
//! trades in a real InfluxDB 1.6.7: all equal → 0, a planted difference and a missing minute
//! → 1, Bitfinex rate-limiting past --timeout → 2, InfluxDB down → 2.

mod support;

use std::process::Command;
use std::time::Duration;

use support::fake_trades::Trader;
use support::pipeline::WAIT;
use support::rig::MockPipeline;
use support::{SYMBOLS, now_ms, settings_toml};

const MINUTE: i64 = 60_000;

/// Runs the binary; returns its exit code and what it printed.
fn audit(config: &std::path::Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_candlestream"))
        .arg("audit")
        .arg("--config")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

/// The counts row of `symbol`: compared, equal, different, missing here, missing at exchange.
fn counts(output: &str, symbol: &str) -> [usize; 5] {
    let row = output
        .lines()
        .find(|l| l.starts_with(symbol))
        .unwrap_or_else(|| panic!("no row for {symbol}:\n{output}"));
    let n: Vec<usize> = row
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap())
        .collect();
    [n[0], n[1], n[2], n[3], n[4]]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_finds_the_exchange_candles_then_a_planted_difference_then_no_influxdb() {
    let now = now_ms();
    let pipeline = MockPipeline::start(|ex| {
        for s in SYMBOLS {
            ex.preload_history(s, now - 40 * MINUTE, now - 2_000, 300);
        }
    })
    .await;
    let ex = &pipeline.exchange;
    ex.wait_trades_subscribed(&SYMBOLS, WAIT).await;
    let trader = Trader::start(ex, &SYMBOLS, 2, Duration::from_millis(20));
    tokio::time::sleep(Duration::from_secs(1)).await;
    ex.drop_connections().await;
    ex.wait_trades_subscribed(&SYMBOLS, WAIT).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    trader.stop().await;
    pipeline.wait_stored().await;
    let settings = pipeline.settings.clone();
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(config.path(), settings_toml(&settings)).unwrap();

    let (code, out) = audit(config.path(), &["--since", "1h"]);
    println!("{out}");
    assert_eq!(code, 0, "every candle equal:\n{out}");
    let mut total = 0;
    for s in SYMBOLS {
        let [compared, equal, different, missing_here, missing_there] = counts(&out, s);
        assert!(
            compared >= 30,
            "{s}: 40 minutes of history, {compared} compared"
        );
        assert_eq!(
            (equal, different, missing_here, missing_there),
            (compared, 0, 0, 0),
            "{s}"
        );
        total += compared;
    }
    crate::report!(
        "AUDIT | after backfill, live trades and a dropped connection | {total} candles compared, {total} equal"
    );

    // The exchange disagrees about one close and has no candle for a minute we have.
    let candles = ex.candles("tBTCUSD");
    let (&minute, row) = candles
        .iter()
        .find(|(m, _)| **m > now - 30 * MINUTE)
        .unwrap();
    let [open, close, high, low, volume] = *row;
    ex.override_candle(
        "tBTCUSD",
        minute,
        Some([open, close + 0.5, high.max(close + 0.5), low, volume]),
    );
    let hidden = *ex
        .candles("tETHUSD")
        .keys()
        .find(|m| **m > now - 30 * MINUTE)
        .unwrap();
    ex.override_candle("tETHUSD", hidden, None);
    let (code, out) = audit(
        config.path(),
        &["--since", "1h", "--symbols", "tBTCUSD,tETHUSD"],
    );
    println!("{out}");
    assert_eq!(code, 1, "differences found:\n{out}");
    assert_eq!(counts(&out, "tBTCUSD")[2], 1, "one different candle");
    assert_eq!(
        counts(&out, "tETHUSD")[4],
        1,
        "one minute missing at the exchange"
    );
    assert!(
        out.contains("close") && out.contains(&(close + 0.5).to_string()),
        "the difference is shown:\n{out}"
    );
    assert!(!out.contains("tSOLUSD"), "--symbols limits the audit");

    // Bitfinex answers every candles request with its rate limit: the audit backs off, says so
    // in its log, and gives up at --timeout with the failure status.
    ex.set_rate_limit_every(Some(1));
    let started = std::time::Instant::now();
    let (code, out) = audit(config.path(), &["--symbols", "tBTCUSD", "--timeout", "2s"]);
    let took = started.elapsed();
    ex.set_rate_limit_every(None);
    assert_eq!(
        code, 2,
        "rate-limited until the deadline:
{out}"
    );
    assert!(out.contains("not done within --timeout 2s"), "{out}");
    assert!(
        out.contains("Bitfinex rate limit hit"),
        "logged:
{out}"
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");

    pipeline.stop().await;

    // Nothing listens where InfluxDB should be.
    let mut down = settings.clone();
    down.influx.url = format!("http://127.0.0.1:{}", support::rig::free_port());
    std::fs::write(config.path(), settings_toml(&down)).unwrap();
    let (code, out) = audit(config.path(), &[]);
    assert_eq!(code, 2, "InfluxDB down:\n{out}");
    assert!(out.contains("could not run"), "{out}");
}
