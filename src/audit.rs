//! `candlestream audit`: are the stored candles the exchange's candles?
//!
//! For each symbol, the closed 1-minute candles computed by InfluxDB from the stored trades (the
//! same InfluxQL aggregation the dashboard runs) are compared with Bitfinex's own `trade:1m`
//! candles. Prices must be equal exactly; volumes within a relative 1e-9, since the two sides
//! add the amounts in different orders.
//!
//! The comparison ([`judge`]) and both readers ([`stored_candles`], [`exchange_candles`]) are
//! shared with `candlestream verify` (crate::verify), which runs them continuously: one
//! implementation, two front ends.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::config::{InfluxConfig, Settings, Timeframe};
use crate::exchange::bitfinex::pairs::{Selection, resolve_once};
use crate::exchange::bitfinex::rest::PAGE;
use crate::exchange::bitfinex::{ExchangeError, RestClient};
use crate::model::Candle;
use crate::sink::influx::InfluxConnection;

const MINUTE_MS: i64 = 60_000;
const VOLUME_TOLERANCE: f64 = 1e-9;
/// Differences listed per symbol; the counts cover all of them.
const SHOWN_DIFFERENCES: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("InfluxDB query failed: {0}")]
    Influx(String),
    #[error("Bitfinex candles unavailable: {0}")]
    Exchange(#[from] ExchangeError),
    #[error("{0}")]
    Symbols(String),
}

/// One field that differs in one minute.
#[derive(Debug, Clone, PartialEq)]
pub struct Difference {
    pub start_ms: i64,
    pub field: &'static str,
    pub ours: f64,
    pub theirs: f64,
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct SymbolReport {
    pub symbol: String,
    pub compared: usize,
    pub equal: usize,
    pub different: usize,
    pub missing_here: Vec<i64>,
    pub missing_at_exchange: Vec<i64>,
    pub differences: Vec<Difference>,
}

impl SymbolReport {
    pub fn is_clean(&self) -> bool {
        self.different == 0 && self.missing_here.is_empty() && self.missing_at_exchange.is_empty()
    }
}

/// The minutes audited: from `since` ago up to, not including, the minute before the current
/// one. The current candle is still open, and trades of the last closed minute may still be on
/// their way through Kafka.
pub fn window(now_ms: i64, since: Duration) -> (i64, i64) {
    let current = now_ms.div_euclid(MINUTE_MS) * MINUTE_MS;
    let start = (now_ms - since.as_millis() as i64).div_euclid(MINUTE_MS) * MINUTE_MS;
    (start, current - MINUTE_MS)
}

/// The verdict on one candle.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Equal,
    /// Both sides have the candle; these fields differ.
    Differs(Vec<Difference>),
    /// The exchange has the candle, InfluxDB has no trade in it.
    MissingHere,
    /// InfluxDB has trades in it, the exchange has no candle.
    MissingThere,
}

/// Compares one candle of both sides; `None` when neither has one (no trades, nothing to say).
pub fn judge(start_ms: i64, ours: Option<&Candle>, theirs: Option<&Candle>) -> Option<Verdict> {
    let (o, t) = match (ours, theirs) {
        (None, None) => return None,
        (None, Some(_)) => return Some(Verdict::MissingHere),
        (Some(_), None) => return Some(Verdict::MissingThere),
        (Some(o), Some(t)) => (o, t),
    };
    let prices = [
        ("open", o.open, t.open),
        ("high", o.high, t.high),
        ("low", o.low, t.low),
        ("close", o.close, t.close),
    ];
    let mut fields: Vec<(&'static str, f64, f64)> =
        prices.into_iter().filter(|(_, a, b)| a != b).collect();
    if (o.volume - t.volume).abs() > VOLUME_TOLERANCE * o.volume.abs().max(t.volume.abs()) {
        fields.push(("volume", o.volume, t.volume));
    }
    if fields.is_empty() {
        return Some(Verdict::Equal);
    }
    Some(Verdict::Differs(
        fields
            .into_iter()
            .map(|(field, ours, theirs)| Difference {
                start_ms,
                field,
                ours,
                theirs,
            })
            .collect(),
    ))
}

/// What differs, for a person: `high ours 97400 theirs 97321.5 (+78.5)`, `; `-separated.
pub fn detail(differences: &[Difference]) -> String {
    differences
        .iter()
        .map(|d| {
            format!(
                "{} ours {} theirs {} ({:+})",
                d.field,
                d.ours,
                d.theirs,
                d.ours - d.theirs
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Compares two candle series of one symbol, candle by candle.
pub fn compare(symbol: &str, ours: &[Candle], theirs: &[Candle]) -> SymbolReport {
    let ours: BTreeMap<i64, &Candle> = ours.iter().map(|c| (c.start_ms, c)).collect();
    let theirs: BTreeMap<i64, &Candle> = theirs.iter().map(|c| (c.start_ms, c)).collect();
    let mut report = SymbolReport {
        symbol: symbol.to_string(),
        ..Default::default()
    };
    let starts: std::collections::BTreeSet<i64> =
        ours.keys().chain(theirs.keys()).copied().collect();
    for start in starts {
        let verdict = judge(
            start,
            ours.get(&start).copied(),
            theirs.get(&start).copied(),
        );
        report.compared += 1;
        match verdict {
            Some(Verdict::Equal) => report.equal += 1,
            Some(Verdict::Differs(d)) => {
                report.different += 1;
                report.differences.extend(d);
            }
            Some(Verdict::MissingHere) => report.missing_here.push(start),
            Some(Verdict::MissingThere) => report.missing_at_exchange.push(start),
            None => unreachable!("a start comes from one side or the other"),
        }
    }
    report
}

/// One candle computed by InfluxDB, with the number of trades behind it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stored {
    pub candle: Candle,
    pub trades: u64,
}

/// The candles of width `timeframe` starting in `[start, end)` that InfluxDB computes from the
/// stored trades, as the dashboard's query does (plus the count of trades behind each).
pub async fn stored_candles(
    influx: &InfluxConnection,
    cfg: &InfluxConfig,
    symbol: &str,
    timeframe: Timeframe,
    start: i64,
    end: i64,
) -> Result<Vec<Stored>, AuditError> {
    let q = format!(
        "SELECT first(\"price\") AS open, max(\"price\") AS high, min(\"price\") AS low, last(\"price\") AS close, \
         sum(\"amount\") AS volume, count(\"price\") AS trades FROM \"{measurement}\" WHERE \"symbol\" = '{symbol}' \
         AND time >= {start}ms AND time < {end}ms GROUP BY time({width}) fill(none)",
        measurement = cfg.trades_measurement,
        symbol = symbol.replace('\'', "\\'"),
        width = timeframe.influxql(),
    );
    let result = influx.query(&q).await.map_err(AuditError::Influx)?;
    let mut candles = Vec::new();
    for series in result["series"].as_array().into_iter().flatten() {
        let columns: Vec<&str> = series["columns"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        for row in series["values"].as_array().into_iter().flatten() {
            let get = |name: &str| {
                columns
                    .iter()
                    .position(|c| *c == name)
                    .and_then(|i| row[i].as_f64())
            };
            let (
                Some(start_ms),
                Some(open),
                Some(high),
                Some(low),
                Some(close),
                Some(volume),
                Some(trades),
            ) = (
                get("time"),
                get("open"),
                get("high"),
                get("low"),
                get("close"),
                get("volume"),
                get("trades"),
            )
            else {
                return Err(AuditError::Influx(format!("unexpected row {row}")));
            };
            candles.push(Stored {
                candle: Candle {
                    start_ms: start_ms as i64,
                    open,
                    high,
                    low,
                    close,
                    volume,
                },
                trades: trades as u64,
            });
        }
    }
    Ok(candles)
}

/// Bitfinex's candles of width `timeframe` starting in `[start, end)`: one request per 10 000
/// candles.
pub async fn exchange_candles(
    rest: &RestClient,
    symbol: &str,
    timeframe: Timeframe,
    start: i64,
    end: i64,
) -> Result<Vec<Candle>, AuditError> {
    let mut out: Vec<Candle> = Vec::new();
    let mut from = start;
    while from < end {
        let page = rest
            .candles(symbol, timeframe.label(), from, end - 1, PAGE)
            .await?;
        let full = page.len() >= PAGE;
        out.extend(
            page.into_iter()
                .filter(|c| c.mts >= from && c.mts < end)
                .map(|c| Candle {
                    start_ms: c.mts,
                    open: c.open,
                    high: c.high,
                    low: c.low,
                    close: c.close,
                    volume: c.volume,
                }),
        );
        match out.last() {
            Some(last) if full => from = last.start_ms + timeframe.width_ms(),
            _ => break,
        }
    }
    Ok(out)
}

/// Audits `symbols` (exact symbols or patterns, minus `bitfinex.symbols_exclude`) over the
/// window ending now. Bitfinex's rate-limit answers are retried until `cancel`, so the caller
/// bounds the run.
pub async fn run(
    settings: &Settings,
    symbols: &[String],
    since: Duration,
    cancel: CancellationToken,
) -> Result<Vec<SymbolReport>, AuditError> {
    let influx =
        InfluxConnection::new(&settings.influx).map_err(|e| AuditError::Influx(e.to_string()))?;
    let rest = RestClient::new(&settings.bitfinex, cancel)?;
    let selection =
        Selection::new(symbols, &settings.bitfinex.symbols_exclude).map_err(AuditError::Symbols)?;
    let symbols = resolve_once(&selection, &rest).await?;
    let (start, end) = window(crate::model::now_ms(), since);
    let mut reports = Vec::new();
    for symbol in &symbols {
        let minute = Timeframe::ONE_MINUTE;
        let ours: Vec<Candle> =
            stored_candles(&influx, &settings.influx, symbol, minute, start, end)
                .await?
                .into_iter()
                .map(|s| s.candle)
                .collect();
        let theirs = exchange_candles(&rest, symbol, minute, start, end).await?;
        reports.push(compare(symbol, &ours, &theirs));
    }
    Ok(reports)
}

/// The report as printed: a table of counts per symbol, then the first differences.
pub fn render(reports: &[SymbolReport], since: Duration) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "1-minute candles over the last {}, closed minutes only",
        humantime::format_duration(since)
    );
    let _ = writeln!(
        out,
        "{:<12} {:>9} {:>7} {:>10} {:>13} {:>22}",
        "symbol", "compared", "equal", "different", "missing here", "missing at exchange"
    );
    for r in reports {
        let _ = writeln!(
            out,
            "{:<12} {:>9} {:>7} {:>10} {:>13} {:>22}",
            r.symbol,
            r.compared,
            r.equal,
            r.different,
            r.missing_here.len(),
            r.missing_at_exchange.len()
        );
    }
    for r in reports.iter().filter(|r| !r.is_clean()) {
        let _ = writeln!(out, "\n{}:", r.symbol);
        for d in r.differences.iter().take(SHOWN_DIFFERENCES) {
            let _ = writeln!(
                out,
                "  {}  {:<6}  ours {}  theirs {}",
                minute(d.start_ms),
                d.field,
                d.ours,
                d.theirs
            );
        }
        for m in r.missing_here.iter().take(SHOWN_DIFFERENCES) {
            let _ = writeln!(
                out,
                "  {}  missing here: the exchange has a candle, InfluxDB has no trade",
                minute(*m)
            );
        }
        for m in r.missing_at_exchange.iter().take(SHOWN_DIFFERENCES) {
            let _ = writeln!(
                out,
                "  {}  missing at the exchange: InfluxDB has trades, the exchange no candle",
                minute(*m)
            );
        }
    }
    out
}

fn minute(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(start_ms: i64, open: f64, volume: f64) -> Candle {
        Candle {
            start_ms,
            open,
            high: open + 1.0,
            low: open - 1.0,
            close: open,
            volume,
        }
    }

    #[test]
    fn window_skips_the_open_candle_and_the_last_closed_minute() {
        let now = 1_763_787_725_000; // 12:02:05
        assert_eq!(
            window(now, Duration::from_secs(3600)),
            (1_763_784_120_000, 1_763_787_660_000)
        );
    }

    #[test]
    fn compare_counts_equal_different_and_missing() {
        let ours = [
            c(0, 1.0, 2.0),
            c(60_000, 2.0, 0.3 + 0.6),
            c(120_000, 3.0, 1.0),
            c(240_000, 5.0, 1.0),
        ];
        let theirs = [
            c(0, 1.0, 2.0),
            c(60_000, 2.0, 0.9),
            c(120_000, 3.5, 1.0),
            c(180_000, 4.0, 1.0),
        ];
        let r = compare("t", &ours, &theirs);
        assert_eq!(
            (r.compared, r.equal, r.different),
            (5, 2, 1),
            "volume 0.3+0.6 vs 0.9 is within tolerance"
        );
        assert_eq!(r.missing_here, [180_000]);
        assert_eq!(r.missing_at_exchange, [240_000]);
        assert_eq!(
            r.differences,
            [
                Difference {
                    start_ms: 120_000,
                    field: "open",
                    ours: 3.0,
                    theirs: 3.5
                },
                Difference {
                    start_ms: 120_000,
                    field: "high",
                    ours: 4.0,
                    theirs: 4.5
                },
                Difference {
                    start_ms: 120_000,
                    field: "low",
                    ours: 2.0,
                    theirs: 2.5
                },
                Difference {
                    start_ms: 120_000,
                    field: "close",
                    ours: 3.0,
                    theirs: 3.5
                },
            ]
        );
        let volume_off = compare("t", &[c(0, 1.0, 1.0)], &[c(0, 1.0, 1.000001)]);
        assert_eq!(volume_off.differences[0].field, "volume");
        assert!(compare("t", &ours[..2], &theirs[..2]).is_clean());
    }
}
