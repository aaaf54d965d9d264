//! `candlestream verify`: every closed candle checked against Bitfinex's, healed when it differs.
//!
//! Every `verify.interval`, for each symbol and timeframe, the candles that closed at least
//! `verify.grace` ago are compared with Bitfinex's (crate::audit's readers and [`audit::judge`],
//! the same as `candlestream audit`). The first pass covers `verify.lookback`; later passes cover
//! what closed since, plus re-checks of candles that are not settled yet. One range request per
//! symbol and timeframe answers a whole pass.
//!
//! Each verdict is a point in `verify.measurement`, time = candle start, with `status` as a
//! string field so that a re-check overwrites the point. A 1-minute candle that `differs` or is
//! `missing_here` is healed: its trades are fetched from REST history and produced to the trades
//! topic like the producer's (same record, same identity, so duplicates overwrite), and once the
//! consumers stored them it is checked again, at most `verify.max_repairs` times. Nothing is ever
//! deleted.
//!
//! What is not a verdict: a candle that cannot be read (InfluxDB or Bitfinex unreachable), and a
//! candle that looks wrong here while InfluxDB holds no trade of the symbol after it yet. Trades
//! of one symbol go through one partition in order, so a later stored trade means the pipeline is
//! past the candle; without one, its trades may still be in Kafka (the end of an outage).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;

use tokio_util::sync::CancellationToken;

use crate::audit::{self, AuditError, Stored, Verdict};
use crate::codec::{CodecError, Encoder};
use crate::config::{BitfinexConfig, Settings, Timeframe};
use crate::exchange::bitfinex::message::TradeValues;
use crate::exchange::bitfinex::pairs::{Selection, resolve_once};
use crate::exchange::bitfinex::rest::PAGE;
use crate::exchange::bitfinex::{ExchangeError, RestClient};
use crate::kafka::producer_config;
use crate::model::{Candle, Record, RecordKind, Source, Trade, now_ms};
use crate::producer::delivery::{DeliveryTracker, KafkaStageError, Outgoing};
use crate::retry::Shutdown;
use crate::sink::influx::{InfluxConnection, InfluxSink, SinkError, escape};
use crate::telemetry::{Health, Liveness, metric, serve_http};

const DAY_MS: i64 = 86_400_000;
const NS_PER_MS: i64 = 1_000_000;

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error(transparent)]
    Kafka(#[from] KafkaStageError),
    #[error(transparent)]
    Exchange(#[from] ExchangeError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("cannot serve /healthz and /metrics: {0}")]
    Http(#[from] std::io::Error),
}

/// Why one symbol's timeframe got no verdicts this pass; the next pass tries again.
#[derive(Debug, thiserror::Error)]
enum PassError {
    #[error("reading candles: {0}")]
    Read(#[from] AuditError),
    #[error("writing verdicts: {0}")]
    Write(#[from] SinkError),
    #[error("fetching trades to heal: {0}")]
    Fetch(#[from] ExchangeError),
    #[error("encoding healed trades: {0}")]
    Encode(#[from] CodecError),
}

/// The `status` field of a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Equal,
    Differs,
    /// Bitfinex has the candle, InfluxDB has no trade in it.
    MissingHere,
    /// InfluxDB has trades in it, Bitfinex has no candle.
    MissingThere,
    /// It was wrong or missing here, and is now equal.
    Repaired,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Equal => "equal",
            Status::Differs => "differs",
            Status::MissingHere => "missing_here",
            Status::MissingThere => "missing_there",
            Status::Repaired => "repaired",
        }
    }

    /// Wrong here: what a repair can fix.
    fn wrong_here(self) -> bool {
        matches!(self, Status::Differs | Status::MissingHere)
    }

    fn verified(self) -> bool {
        matches!(self, Status::Equal | Status::Repaired)
    }
}

/// A candle not settled yet: checked again on later passes.
#[derive(Debug, Default)]
struct Open {
    /// The last verdict written; `None` while it could not be judged.
    last: Option<Status>,
    /// Trade fetches (1-minute candles wrong here) or re-checks (the others) so far.
    attempts: u32,
    /// After a repair: the trades InfluxDB must hold in the candle before it is checked again.
    awaiting: Option<u64>,
}

/// One symbol in one timeframe.
struct Series {
    symbol: String,
    timeframe: Timeframe,
    /// Candles starting before this were checked (or are in `open`).
    cursor: i64,
    open: BTreeMap<i64, Open>,
}

/// What happens to a candle after its verdict is written.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Next {
    Settle,
    Repair,
    Recheck { counts: bool },
    GiveUp,
}

struct Checked {
    start: i64,
    status: Status,
    ours: Option<Candle>,
    theirs: Option<Candle>,
    detail: String,
    next: Next,
}

struct Verifier {
    settings: Settings,
    http: InfluxConnection,
    rest: RestClient,
    sink: InfluxSink,
    encoder: Encoder,
    tracker: DeliveryTracker,
    series: Vec<Series>,
    /// 1-minute verdicts of the last 24 h per symbol, for the verified ratio.
    minutes: HashMap<String, BTreeMap<i64, Status>>,
    /// Whether the last pass read and wrote everything, to log transitions only.
    healthy: bool,
}

/// Runs passes until `cancel`, then waits up to `producer.shutdown_timeout` for healed trades
/// still on their way to Kafka.
pub async fn run(settings: Settings, cancel: CancellationToken) -> Result<(), VerifyError> {
    let health = Health::default();
    let passes = health.liveness(
        "verify_passes",
        settings.verify.interval + settings.health.max_exchange_silence,
    );
    let acks = health.progress("kafka_acks", settings.health.max_ack_silence);
    let http_stop = CancellationToken::new();
    let _http_guard = http_stop.clone().drop_guard();
    serve_http(settings.http.listen, health, http_stop).await?;

    // The verifier's own share of Bitfinex's per-IP limits.
    let rest = RestClient::new(
        &BitfinexConfig {
            rest_trades_per_minute: settings.verify.rest_trades_per_minute,
            rest_candles_per_minute: settings.verify.rest_candles_per_minute,
            ..settings.bitfinex.clone()
        },
        cancel.clone(),
    )?;
    let shutdown = Shutdown::new(cancel.clone(), settings.producer.shutdown_timeout);
    let tracker = DeliveryTracker::new(
        &producer_config(&settings.kafka),
        acks,
        shutdown.expired.clone(),
    )?;
    let http = InfluxConnection::new(&settings.influx)?;
    let mut timeframes = settings.verify.timeframes.clone();
    // Minutes first: a wider candle waits for the repairs of its minutes.
    timeframes.sort_by_key(|t| t.width_ms());
    timeframes.dedup();
    let lookback = settings.verify.lookback_or(settings.bitfinex.backfill);
    let from = now_ms() - lookback.as_millis() as i64;
    // Patterns are resolved once, at start: the verifier does not follow listing changes.
    let selection = Selection::new(
        &settings.bitfinex.symbols,
        &settings.bitfinex.symbols_exclude,
    )
    .expect("symbols were validated with the configuration");
    let symbols = resolve_once(&selection, &rest).await?;
    let series = symbols
        .iter()
        .flat_map(|symbol| {
            timeframes.iter().map(move |&timeframe| Series {
                symbol: symbol.clone(),
                timeframe,
                cursor: from.div_euclid(timeframe.width_ms()) * timeframe.width_ms(),
                open: BTreeMap::new(),
            })
        })
        .collect();
    let mut verifier = Verifier {
        sink: InfluxSink::new(&settings.influx)?,
        encoder: Encoder::new(&settings.schema_registry, &settings.kafka)?,
        tracker,
        rest,
        http,
        series,
        minutes: HashMap::new(),
        healthy: true,
        settings,
    };
    tracing::info!(
        symbols = symbols.len(),
        timeframes = ?timeframes.iter().map(|t| t.label()).collect::<Vec<_>>(),
        ?lookback,
        measurement = %verifier.settings.verify.measurement,
        "verifier running"
    );

    let mut ticker = tokio::time::interval(verifier.settings.verify.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            _ = ticker.tick() => {}
        }
        // A pass can wait on the REST limiter or a slow InfluxDB; shutdown does not wait for it.
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            _ = verifier.pass(&passes) => {}
        }
    }

    tracing::info!("shutting down: delivering healed trades still in flight");
    let timeout = verifier.settings.producer.shutdown_timeout;
    if verifier.tracker.close(timeout).await.is_err() {
        tracing::error!("verifier stopped before Kafka acknowledged every healed trade");
    } else {
        tracing::info!("verifier stopped");
    }
    Ok(())
}

impl Verifier {
    async fn pass(&mut self, passes: &Liveness) {
        let now = now_ms();
        let mut failures = Vec::new();
        for i in 0..self.series.len() {
            if let Err(e) = self.check(i, now).await {
                let s = &self.series[i];
                failures.push(format!("{} {}: {e}", s.symbol, s.timeframe.label()));
            }
        }
        self.publish_gauges(now);
        match (failures.is_empty(), self.healthy) {
            (true, _) => {
                if !self.healthy {
                    tracing::info!("verifier reads and writes again; catching up");
                }
                self.healthy = true;
                passes.beat();
            }
            (false, true) => {
                // Once per outage: every pass of it fails the same way.
                tracing::warn!(
                    ?failures,
                    "verify pass incomplete: no verdict on what could not be read; retrying next pass"
                );
                self.healthy = false;
            }
            (false, false) => tracing::debug!(?failures, "verify pass incomplete"),
        }
    }

    /// Checks one series; nothing changes unless its candles were read and the verdicts written.
    async fn check(&mut self, i: usize, now: i64) -> Result<(), PassError> {
        let grace = self.settings.verify.grace.as_millis() as i64;
        let max = self.settings.verify.max_repairs;
        let (symbol, timeframe) = (self.series[i].symbol.clone(), self.series[i].timeframe);
        let width = timeframe.width_ms();
        // Candles starting before `end` closed at least `grace` ago.
        let end = (now - grace).div_euclid(width) * width;
        let series = &self.series[i];
        let from = series
            .open
            .keys()
            .next()
            .map_or(series.cursor, |&o| o.min(series.cursor));
        if from >= end {
            return Ok(());
        }
        // Ours up to now: a later bucket shows InfluxDB holds trades after a candle.
        let ours = audit::stored_candles(
            &self.http,
            &self.settings.influx,
            &symbol,
            timeframe,
            from,
            now,
        )
        .await?;
        let theirs = audit::exchange_candles(&self.rest, &symbol, timeframe, from, end).await?;
        let newest_stored = ours.last().map(|s| s.candle.start_ms);
        let ours: BTreeMap<i64, &Stored> = ours.iter().map(|s| (s.candle.start_ms, s)).collect();
        let theirs: BTreeMap<i64, &Candle> = theirs.iter().map(|c| (c.start_ms, c)).collect();
        // Minutes of this symbol still being healed.
        let healing: BTreeSet<i64> = self
            .series
            .iter()
            .filter(|s| s.symbol == symbol && s.timeframe == Timeframe::ONE_MINUTE)
            .flat_map(|s| s.open.keys().copied())
            .collect();

        let series = &self.series[i];
        let starts: BTreeSet<i64> = ours
            .keys()
            .chain(theirs.keys())
            .copied()
            .filter(|s| *s < end && (*s >= series.cursor || series.open.contains_key(s)))
            .chain(series.open.keys().copied())
            .collect();
        let mut checked = Vec::new();
        let mut unjudged = Vec::new();
        let mut vanished = Vec::new();
        for start in starts {
            let o = ours.get(&start).copied();
            let t = theirs.get(&start).copied();
            let open = series.open.get(&start);
            if let Some(n) = open.and_then(|e| e.awaiting)
                && o.map_or(0, |s| s.trades) < n
            {
                continue; // the healed trades are not all stored yet
            }
            let Some(verdict) = audit::judge(start, o.map(|s| &s.candle), t) else {
                vanished.push(start);
                continue;
            };
            let (status, detail) = match verdict {
                Verdict::Equal => (Status::Equal, String::new()),
                Verdict::Differs(d) => (Status::Differs, audit::detail(&d)),
                Verdict::MissingHere => (
                    Status::MissingHere,
                    "no trade stored; the exchange has a candle".into(),
                ),
                Verdict::MissingThere => (
                    Status::MissingThere,
                    "trades stored; the exchange has no candle".into(),
                ),
            };
            if status.wrong_here() && newest_stored.is_none_or(|n| n < start + width) {
                unjudged.push(start);
                continue;
            }
            let prev = open.and_then(|e| e.last);
            let attempts = open.map_or(0, |e| e.attempts);
            let (status, next) = match status {
                Status::Equal if prev.is_some_and(Status::wrong_here) => {
                    (Status::Repaired, Next::Settle)
                }
                Status::Equal => (Status::Equal, Next::Settle),
                s if timeframe == Timeframe::ONE_MINUTE && s.wrong_here() && attempts < max => {
                    (s, Next::Repair)
                }
                // Its minutes are still being healed: wait for them before counting.
                s if timeframe != Timeframe::ONE_MINUTE
                    && healing.range(start..start + width).next().is_some() =>
                {
                    (s, Next::Recheck { counts: false })
                }
                s if attempts < max => (s, Next::Recheck { counts: true }),
                s => (s, Next::GiveUp),
            };
            checked.push(Checked {
                start,
                status,
                ours: o.map(|s| s.candle),
                theirs: t.copied(),
                detail,
                next,
            });
        }

        let mut lines = String::new();
        for c in &checked {
            point(
                &mut lines,
                &self.settings.verify.measurement,
                &symbol,
                timeframe,
                c,
            );
        }
        if !lines.is_empty() {
            self.sink.write(&lines).await?;
        }

        let series = &mut self.series[i];
        series.cursor = series.cursor.max(end);
        for start in vanished {
            series.open.remove(&start);
        }
        for start in unjudged {
            series.open.entry(start).or_default();
        }
        let label = timeframe.label();
        let mut repairs = Vec::new();
        for c in &checked {
            metrics::counter!(metric::CANDLES_CHECKED, "symbol" => symbol.clone(), "timeframe" => label, "status" => c.status.as_str())
                .increment(1);
            if timeframe == Timeframe::ONE_MINUTE {
                self.minutes
                    .entry(symbol.clone())
                    .or_default()
                    .insert(c.start, c.status);
            }
            match c.next {
                Next::Settle => {
                    series.open.remove(&c.start);
                    if c.status == Status::Repaired {
                        tracing::info!(%symbol, timeframe = label, start = c.start, "candle repaired");
                        if timeframe == Timeframe::ONE_MINUTE {
                            metrics::counter!(metric::CANDLES_REPAIRED, "symbol" => symbol.clone())
                                .increment(1);
                        }
                    }
                }
                Next::GiveUp => {
                    series.open.remove(&c.start);
                    tracing::warn!(%symbol, timeframe = label, start = c.start, status = c.status.as_str(), detail = %c.detail, attempts = max, "candle stays as it is; not checked again");
                }
                Next::Recheck { counts } => {
                    let e = series.open.entry(c.start).or_default();
                    e.last = Some(c.status);
                    e.awaiting = None;
                    e.attempts += u32::from(counts);
                }
                Next::Repair => {
                    let e = series.open.entry(c.start).or_default();
                    e.last = Some(c.status);
                    e.awaiting = None;
                    repairs.push(c.start);
                }
            }
        }
        self.heal(i, &repairs).await
    }

    /// Fetches the trades of `minutes` (one request per run of consecutive minutes), produces
    /// them to the trades topic and marks each minute as waiting for them.
    async fn heal(&mut self, i: usize, minutes: &[i64]) -> Result<(), PassError> {
        let symbol = self.series[i].symbol.clone();
        let width = self.series[i].timeframe.width_ms();
        let mut runs: Vec<(i64, i64)> = Vec::new();
        for &m in minutes {
            match runs.last_mut() {
                Some((_, last)) if *last + width == m => *last = m,
                _ => runs.push((m, m)),
            }
        }
        for (first, last) in runs {
            let trades = fetch_trades(&self.rest, &symbol, first, last + width - 1).await?;
            let mut per_minute: BTreeMap<i64, u64> = BTreeMap::new();
            let received_at = now_ms();
            for t in &trades {
                let record = Record::Trade(Trade {
                    symbol: symbol.clone(),
                    id: t.id,
                    exchange_time: t.mts,
                    amount: t.amount,
                    price: t.price,
                    source: Source::Rest,
                    sequence: None,
                    received_at,
                });
                let payload = self.encoder.encode(&record).await?;
                let out = Outgoing {
                    topic: self.settings.kafka.topic_of(RecordKind::Trade),
                    key: &symbol,
                    payload,
                };
                self.tracker.send(&out).await;
                *per_minute
                    .entry(t.mts.div_euclid(width) * width)
                    .or_default() += 1;
            }
            tracing::info!(%symbol, from = first, until = last + width, trades = trades.len(), "healing: trades fetched from REST and sent to Kafka");
            let series = &mut self.series[i];
            for (&m, e) in series.open.range_mut(first..=last) {
                if minutes.contains(&m) {
                    e.attempts += 1;
                    e.awaiting = Some(per_minute.get(&m).copied().unwrap_or(0));
                }
            }
        }
        Ok(())
    }

    fn publish_gauges(&mut self, now: i64) {
        let since = now - DAY_MS;
        for (symbol, minutes) in &mut self.minutes {
            *minutes = minutes.split_off(&since);
            if !minutes.is_empty() {
                let good = minutes.values().filter(|s| s.verified()).count();
                metrics::gauge!(metric::CANDLES_VERIFIED, "symbol" => symbol.clone())
                    .set(good as f64 / minutes.len() as f64);
            }
        }
        // The narrowest timeframe says how far behind the checks are.
        let narrowest = self.series.iter().map(|s| s.timeframe.width_ms()).min();
        let newest_checked = self
            .series
            .iter()
            .filter(|s| Some(s.timeframe.width_ms()) == narrowest)
            .map(|s| s.cursor)
            .min();
        if let Some(checked_until) = newest_checked {
            metrics::gauge!(metric::VERIFY_LAG).set((now - checked_until) as f64 / 1000.0);
        }
    }
}

/// One verdict in line protocol: tags symbol and timeframe, time = candle start.
fn point(out: &mut String, measurement: &str, symbol: &str, timeframe: Timeframe, c: &Checked) {
    escape(out, measurement, &[',', ' ']);
    out.push_str(",symbol=");
    escape(out, symbol, &[',', '=', ' ']);
    let _ = write!(
        out,
        ",timeframe={} status=\"{}\",detail=\"",
        timeframe.label(),
        c.status.as_str()
    );
    escape(out, &c.detail, &['"']);
    out.push('"');
    for (prefix, candle) in [("", c.ours), ("ex_", c.theirs)] {
        if let Some(k) = candle {
            // Display: the shortest text that parses back to the same f64, never an exponent.
            let _ = write!(
                out,
                ",{prefix}open={},{prefix}high={},{prefix}low={},{prefix}close={},{prefix}volume={}",
                k.open, k.high, k.low, k.close, k.volume
            );
        }
    }
    let _ = writeln!(out, " {}", c.start * NS_PER_MS);
}

/// Every trade of `symbol` with `from_ms <= MTS <= until_ms`, oldest first, page by page.
async fn fetch_trades(
    rest: &RestClient,
    symbol: &str,
    from_ms: i64,
    until_ms: i64,
) -> Result<Vec<TradeValues>, ExchangeError> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut start = from_ms;
    loop {
        let rows = rest.trades(symbol, start, until_ms, PAGE).await?;
        let full = rows.len() >= PAGE;
        let mut last = None;
        for row in rows {
            match row {
                Ok(t) => {
                    last = last.max(Some(t.mts));
                    if seen.insert(t.id) {
                        out.push(t);
                    }
                }
                Err(e) => {
                    metrics::counter!(metric::TRADES_REJECTED).increment(1);
                    tracing::warn!(%symbol, error = %e, "trade rejected");
                }
            }
        }
        match last {
            // The next page starts at the last millisecond seen: trades sharing it may have been
            // cut off; those already taken are skipped by id.
            Some(mts) if full => start = if mts > start { mts } else { start + 1 },
            _ => return Ok(out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_the_documented_strings() {
        let all = [
            Status::Equal,
            Status::Differs,
            Status::MissingHere,
            Status::MissingThere,
            Status::Repaired,
        ];
        let names: Vec<&str> = all.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            names,
            [
                "equal",
                "differs",
                "missing_here",
                "missing_there",
                "repaired"
            ]
        );
        assert_eq!(
            all.iter().filter(|s| s.verified()).count(),
            2,
            "equal and repaired count as verified"
        );
    }

    #[test]
    fn a_verdict_is_one_point_with_status_as_a_string_field() {
        let c = |open: f64| Candle {
            start_ms: 1_763_787_600_000,
            open,
            high: 97_400.0,
            low: 97_300.5,
            close: 97_350.0,
            volume: 0.30000001,
        };
        let checked = Checked {
            start: 1_763_787_600_000,
            status: Status::Differs,
            ours: Some(c(97_321.5)),
            theirs: Some(c(97_321.0)),
            detail: audit::detail(&[audit::Difference {
                start_ms: 0,
                field: "open",
                ours: 97_321.5,
                theirs: 97_321.0,
            }]),
            next: Next::Repair,
        };
        let mut out = String::new();
        point(
            &mut out,
            "candle_checks",
            "tBTCUSD",
            Timeframe::ONE_MINUTE,
            &checked,
        );
        assert_eq!(
            out,
            "candle_checks,symbol=tBTCUSD,timeframe=1m status=\"differs\",detail=\"open ours 97321.5 theirs 97321 (+0.5)\",\
             open=97321.5,high=97400,low=97300.5,close=97350,volume=0.30000001,\
             ex_open=97321,ex_high=97400,ex_low=97300.5,ex_close=97350,ex_volume=0.30000001 1763787600000000000\n"
        );
        let missing = Checked {
            status: Status::MissingHere,
            ours: None,
            detail: "say \"no\"".into(),
            ..checked
        };
        let mut out = String::new();
        point(
            &mut out,
            "candle_checks",
            "tBTCUSD",
            Timeframe::ONE_MINUTE,
            &missing,
        );
        assert!(
            out.contains("status=\"missing_here\",detail=\"say \\\"no\\\"\",ex_open=97321,"),
            "{out}"
        );
    }
}
