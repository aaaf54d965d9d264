//! `candlestream verify`: every closed candle checked against Bitfinex's, healed when it differs.
//!
//! The work is one series per symbol and timeframe. A check of a series compares its candles that
//! closed at least `verify.grace` ago and were not checked yet (plus those it re-checks) with
//! Bitfinex's (crate::audit's readers and [`audit::judge`], the same as `candlestream audit`):
//! one InfluxDB query and one candles request, however many candles it covers. The first check
//! of a series covers `verify.lookback`.
//!
//! Scheduling: one check at a time, always of the series most behind, i.e. the one whose oldest
//! owed work became due first: a candle that closed (plus grace) and was never checked, or a
//! re-check (a heal waiting for its trades, a candle whose minutes are being healed). A series is
//! checked at most once per `verify.interval`. So a new listing, a pending heal or a due re-check
//! never waits behind a full round over every series, and the REST limiter
//! (`verify.rest_*_per_minute`) spaces every request: at 300 pairs the checks spread over time
//! instead of coming in passes.
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
//!
//! Symbols: with a pattern in `bitfinex.symbols`, Bitfinex's listing is read again every
//! `bitfinex.symbols_refresh` (by a task of its own, through the same REST client) and series are
//! added for new listings and dropped for delisted pairs, each logged and counted.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::audit::{self, AuditError, Stored, Verdict};
use crate::codec::{CodecError, Encoder};
use crate::config::{BitfinexConfig, Settings, Timeframe};
use crate::exchange::bitfinex::message::TradeValues;
use crate::exchange::bitfinex::pairs::{Selection, read_listing, resolve_once};
use crate::exchange::bitfinex::rest::{PAGE, next_trades_page};
use crate::exchange::bitfinex::{ExchangeError, RestClient};
use crate::kafka::producer_config;
use crate::model::{Candle, Record, RecordKind, Source, Trade, now_ms};
use crate::producer::delivery::{DeliveryTracker, KafkaStageError, Outgoing};
use crate::retry::Shutdown;
use crate::sink::influx::{InfluxConnection, InfluxSink, SinkError, escape, time_ns};
use crate::telemetry::{Health, Liveness, metric, serve_http};

const DAY_MS: i64 = 86_400_000;

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

/// Why a check of one series gave no verdicts; the series is tried again after
/// `verify.interval`.
#[derive(Debug, thiserror::Error)]
enum CheckError {
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

/// A candle not settled yet: checked again by later checks of its series.
#[derive(Debug, Default)]
struct Open {
    /// The last verdict written; `None` while it could not be judged.
    last: Option<Status>,
    /// Trade fetches (1-minute candles wrong here) or re-checks (the others) so far.
    attempts: u32,
    /// After a repair: the trades InfluxDB must hold in the candle before it is checked again,
    /// and when they were sent (Unix ms).
    awaiting: Option<(u64, i64)>,
}

/// How long a healed candle waits for its trades to be stored before it is judged on what is
/// stored. Healed trades take seconds through Kafka and the consumer; one that never arrives (a
/// record the producer gave up or the consumer dead-lettered) must not keep the candle unjudged,
/// and the series' checks reading from that minute, for ever. Judged, it is healed again or
/// given up after `verify.max_repairs`. An outage longer than this is on /healthz meanwhile.
const HEALED_TRADES_WAIT_MS: i64 = 15 * 60_000;

impl Open {
    /// Whether the candle still waits for healed trades, with `stored` of them in InfluxDB.
    fn waits_for_trades(&self, stored: u64, now: i64) -> bool {
        self.awaiting
            .is_some_and(|(n, sent)| stored < n && now - sent < HEALED_TRADES_WAIT_MS)
    }
}

/// One symbol in one timeframe.
struct Series {
    symbol: String,
    timeframe: Timeframe,
    /// Candles starting before this were checked (or are in `open`).
    cursor: i64,
    open: BTreeMap<i64, Open>,
    /// Not checked again before this (ms): its last check, or failed attempt, plus
    /// `verify.interval`.
    not_before: i64,
    /// When its last check succeeded; at first, `since`.
    checked_at: i64,
    /// When the verifier began to follow it: at start, or the refresh that found it listed.
    since: i64,
}

impl Series {
    fn new(symbol: String, timeframe: Timeframe, from: i64, now: i64) -> Self {
        let width = timeframe.width_ms();
        Self {
            symbol,
            timeframe,
            cursor: from.div_euclid(width) * width,
            open: BTreeMap::new(),
            not_before: now,
            checked_at: now,
            since: now,
        }
    }

    /// When its oldest owed work became (or becomes) due: the close plus `grace` of its oldest
    /// candle never checked, or, with candles to check again, `interval` after its last check.
    /// The series with the smallest value is the one most behind. A failed check changes nothing
    /// here, so an outage shows as work owed for longer and longer.
    fn owed(&self, grace: i64, interval: i64) -> i64 {
        let fresh = self.cursor + self.timeframe.width_ms() + grace;
        if self.open.is_empty() {
            fresh
        } else {
            fresh.min(self.checked_at + interval)
        }
    }

    /// When it may be checked next: when its work is owed, not before `not_before`.
    fn due(&self, grace: i64, interval: i64) -> i64 {
        self.owed(grace, interval).max(self.not_before)
    }

    /// How long its owed work has waited; a series owes nothing from before the verifier began
    /// to follow it (the lookback it starts with is no backlog). Negative: not owed yet.
    fn overdue(&self, now: i64, grace: i64, interval: i64) -> i64 {
        now - self.owed(grace, interval).max(self.since)
    }

    /// How long the oldest closed candle never checked has been closed; 0 when none.
    fn lag(&self, now: i64) -> i64 {
        (now - (self.cursor + self.timeframe.width_ms())).max(0)
    }
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
    rest: Arc<RestClient>,
    sink: InfluxSink,
    encoder: Encoder,
    tracker: DeliveryTracker,
    /// Candle widths checked, narrowest first.
    timeframes: Vec<Timeframe>,
    /// Where a series added now starts: `verify.lookback` ago.
    lookback: Duration,
    series: Vec<Series>,
    /// 1-minute verdicts of the last 24 h per symbol, for the verified ratio.
    minutes: HashMap<String, BTreeMap<i64, Status>>,
    /// Whether the last check read and wrote everything, to log transitions only.
    healthy: bool,
}

/// Checks the series due, one at a time, until `cancel`; then waits up to
/// `producer.shutdown_timeout` for healed trades still on their way to Kafka.
pub async fn run(settings: Settings, cancel: CancellationToken) -> Result<(), VerifyError> {
    let health = Health::default();
    // A healthy verifier beats after every check, and while nothing is due; between two beats it
    // waits at most for one slot of its slower REST limiter, plus what any role may take to hear
    // from the exchange. Many symbols make rounds longer, not this.
    let slowest_slot = Duration::from_secs(60)
        / settings
            .verify
            .rest_candles_per_minute
            .min(settings.verify.rest_trades_per_minute);
    let checks = health.liveness(
        "verify_checks",
        settings.health.max_exchange_silence + slowest_slot,
    );
    let acks = health.progress("kafka_acks", settings.health.max_ack_silence);
    let http_stop = CancellationToken::new();
    let _http_guard = http_stop.clone().drop_guard();
    serve_http(settings.http.listen, health, http_stop).await?;

    // The verifier's own share of Bitfinex's per-IP limits; the listing is read under its
    // tickers limit.
    let rest = Arc::new(RestClient::new(
        &BitfinexConfig {
            rest_trades_per_minute: settings.verify.rest_trades_per_minute,
            rest_candles_per_minute: settings.verify.rest_candles_per_minute,
            ..settings.bitfinex.clone()
        },
        cancel.clone(),
    )?);
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
    let selection = Selection::new(
        &settings.bitfinex.symbols,
        &settings.bitfinex.symbols_exclude,
    )
    .expect("symbols were validated with the configuration");
    let symbols: BTreeSet<String> = resolve_once(&selection, &rest).await?.into_iter().collect();
    let (listing_tx, mut listing) = watch::channel(symbols.clone());
    if selection.needs_listing() {
        tokio::spawn(follow_listing(
            selection,
            rest.clone(),
            settings.bitfinex.clone(),
            listing_tx,
            cancel.clone(),
        ));
    }
    let mut verifier = Verifier {
        sink: InfluxSink::new(&settings.influx)?,
        encoder: Encoder::new(&settings.schema_registry, &settings.kafka)?,
        tracker,
        rest,
        http,
        timeframes,
        lookback,
        series: Vec::new(),
        minutes: HashMap::new(),
        healthy: true,
        settings,
    };
    verifier.follow(&symbols, true);
    tracing::info!(
        symbols = symbols.len(),
        timeframes = ?verifier.timeframes.iter().map(|t| t.label()).collect::<Vec<_>>(),
        ?lookback,
        measurement = %verifier.settings.verify.measurement,
        "verifier running"
    );

    let grace = verifier.settings.verify.grace.as_millis() as i64;
    let interval = verifier.settings.verify.interval;
    let interval_ms = interval.as_millis() as i64;
    // How long a failed check holds the next one back: the slot a request would have taken, so
    // that an outage is retried no faster than checks would run.
    let candle_slot = Duration::from_secs(60) / verifier.settings.verify.rest_candles_per_minute;
    let idle_beat = verifier.settings.health.max_exchange_silence / 2;
    loop {
        if listing.has_changed().unwrap_or(false) {
            let symbols = listing.borrow_and_update().clone();
            verifier.follow(&symbols, false);
        }
        let now = now_ms();
        let i = match most_behind(&verifier.series, grace, interval_ms, now) {
            Ok(i) => i,
            Err(next) => {
                // Nothing due: idle, not stuck, unless the last check failed (then only a check
                // that succeeds beats again). Wake when the next series is due, a listing change
                // arrives, or in time for the next beat.
                if verifier.healthy {
                    checks.beat();
                }
                verifier.publish_lag(now, grace);
                let wait = next.map_or(idle_beat, |due| {
                    Duration::from_millis((due - now) as u64).min(idle_beat)
                });
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => break,
                    // `changed` marks the new symbols seen: they are taken here.
                    Ok(()) = listing.changed() => {
                        let symbols = listing.borrow_and_update().clone();
                        verifier.follow(&symbols, false);
                    }
                    _ = tokio::time::sleep(wait) => {}
                }
                continue;
            }
        };
        // A check can wait on the REST limiter or a slow InfluxDB; shutdown does not wait for it.
        let checked = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            r = verifier.check(i, now, &checks) => r,
        };
        let series = &mut verifier.series[i];
        let done = now_ms();
        series.not_before = done + interval_ms;
        if checked.is_ok() {
            series.checked_at = done;
        }
        let failed = checked.map_err(|e| {
            format!(
                "{} {} (owed for {} s): {e}",
                series.symbol,
                series.timeframe.label(),
                series.overdue(now, grace, interval_ms).max(0) / 1000
            )
        });
        verifier.publish_gauges(i, done, grace);
        match failed {
            Ok(()) => {
                if !verifier.healthy {
                    tracing::info!("verifier reads and writes again; catching up");
                }
                verifier.healthy = true;
                checks.beat();
            }
            Err(failure) => {
                if verifier.healthy {
                    // Once per outage: every check of it fails the same way.
                    tracing::warn!(%failure, retry_after = ?interval, "verify check failed: no verdict on what could not be read; each series is tried again after verify.interval");
                } else {
                    tracing::debug!(%failure, "verify check failed");
                }
                verifier.healthy = false;
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(candle_slot) => {}
                }
            }
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

/// What the candles budget (`verify.rest_candles_per_minute`) allows.
#[derive(Debug, PartialEq)]
struct Budget {
    /// One check of every series, one request each: what the first round after start takes
    /// (every series owes its lookback).
    round: Duration,
    /// Checks a minute that keep up: each series once per candle, no more than once per
    /// `verify.interval`.
    needed_per_minute: f64,
    /// When the budget is short of that: how often a series of the narrowest timeframe is
    /// checked instead of once per candle.
    narrowest_every: Option<Duration>,
}

impl Budget {
    /// For `symbols` symbols in `timeframes` (narrowest first, not empty).
    fn of(symbols: usize, timeframes: &[Timeframe], interval: Duration, per_minute: u32) -> Self {
        let per_minute = f64::from(per_minute);
        let series = symbols * timeframes.len();
        let period = |t: &Timeframe| Duration::from_millis(t.width_ms() as u64).max(interval);
        let needed_per_minute = symbols as f64
            * timeframes
                .iter()
                .map(|t| 60.0 / period(t).as_secs_f64())
                .sum::<f64>();
        Self {
            round: Duration::from_secs_f64(series as f64 * 60.0 / per_minute),
            needed_per_minute,
            narrowest_every: (needed_per_minute > per_minute)
                .then(|| period(&timeframes[0]).mul_f64(needed_per_minute / per_minute)),
        }
    }
}

/// The series to check now: of those due, the one most behind (whose owed work became due
/// first). `Err` with when the next one is due when none is due now (`None`: no series).
fn most_behind(
    series: &[Series],
    grace: i64,
    interval: i64,
    now: i64,
) -> Result<usize, Option<i64>> {
    series
        .iter()
        .enumerate()
        .filter(|(_, s)| s.due(grace, interval) <= now)
        .min_by_key(|(i, s)| (s.owed(grace, interval), *i))
        .map(|(i, _)| i)
        .ok_or_else(|| series.iter().map(|s| s.due(grace, interval)).min())
}

/// Reads Bitfinex's listing every `bitfinex.symbols_refresh` and sends the symbols `selection`
/// stands for. A listing that cannot be read is retried with the REST backoff; meanwhile the
/// symbols stay as they are (a failed read is no reason to stop verifying anything).
async fn follow_listing(
    selection: Selection,
    rest: Arc<RestClient>,
    cfg: BitfinexConfig,
    symbols: watch::Sender<BTreeSet<String>>,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(cfg.symbols_refresh) => {}
        }
        let Some(listing) = read_listing(&rest, &cfg, &cancel).await else {
            return;
        };
        symbols.send_if_modified(|current| {
            let next = selection.resolve(&listing);
            let changed = *current != next;
            *current = next;
            changed
        });
    }
}

impl Verifier {
    /// Verifies `symbols` from now on: a series per timeframe for each new one (due at once,
    /// since it owes its lookback), none any more for those gone. After start, each symbol added
    /// or removed is logged and counted.
    fn follow(&mut self, symbols: &BTreeSet<String>, first: bool) {
        let current: BTreeSet<String> = self.series.iter().map(|s| s.symbol.clone()).collect();
        if !first && &current == symbols {
            return;
        }
        let now = now_ms();
        let from = now - self.lookback.as_millis() as i64;
        for symbol in symbols.difference(&current) {
            if !first {
                metrics::counter!(metric::VERIFY_SYMBOLS_ADDED).increment(1);
                tracing::info!(%symbol, "new listing; verifying it");
            }
            for &timeframe in &self.timeframes {
                self.series
                    .push(Series::new(symbol.clone(), timeframe, from, now));
                // At 0 from the start: the alert on it sees the first candle given up.
                metrics::counter!(metric::CANDLES_GIVEN_UP, "symbol" => symbol.clone(), "timeframe" => timeframe.label())
                    .increment(0);
            }
        }
        for symbol in current.difference(symbols) {
            metrics::counter!(metric::VERIFY_SYMBOLS_REMOVED).increment(1);
            tracing::info!(%symbol, "delisted; no longer verified");
            self.minutes.remove(symbol);
            // The exporter removes no single series on demand, and the last ratio would stay on
            // the charts as if the pair were still checked. NaN is Prometheus's "no value": an
            // average over it is NaN, which compares false, and panels show a gap.
            metrics::gauge!(metric::CANDLES_VERIFIED, "symbol" => symbol.clone()).set(f64::NAN);
        }
        self.series.retain(|s| symbols.contains(&s.symbol));
        metrics::gauge!(metric::VERIFY_SYMBOLS).set(symbols.len() as f64);
        self.report_budget();
    }

    /// Logs what the candles budget allows for the series now, and warns when it cannot check
    /// each series as often as it gets a new candle (and `verify.interval` allows).
    fn report_budget(&self) {
        let cfg = &self.settings.verify;
        let symbols = self.series.len() / self.timeframes.len();
        let b = Budget::of(
            symbols,
            &self.timeframes,
            cfg.interval,
            cfg.rest_candles_per_minute,
        );
        metrics::gauge!(metric::VERIFY_ROUND).set(b.round.as_secs_f64());
        let timeframes: Vec<&str> = self.timeframes.iter().map(|t| t.label()).collect();
        match b.narrowest_every {
            Some(every) => tracing::warn!(
                series = self.series.len(),
                ?timeframes,
                round = ?b.round,
                checks_needed_per_minute = b.needed_per_minute.round(),
                rest_candles_per_minute = cfg.rest_candles_per_minute,
                narrowest_checked_every = ?every,
                "the candles budget cannot keep up: each series is checked less often than it gets a new candle, and verdicts lag by about that much; \
                 check fewer series (verify.timeframes, bitfinex.symbols, bitfinex.symbols_exclude) or give the verifier more of Bitfinex's ~30 candles requests a minute per IP (verify.rest_candles_per_minute, taken from audit's bitfinex.rest_candles_per_minute)"
            ),
            None => tracing::info!(
                series = self.series.len(),
                ?timeframes,
                round = ?b.round,
                checks_needed_per_minute = b.needed_per_minute.round(),
                rest_candles_per_minute = cfg.rest_candles_per_minute,
                "verify budget: a round over every series takes this long; each series is checked once per candle"
            ),
        }
    }

    /// Checks one series; nothing changes unless its candles were read and the verdicts written.
    async fn check(&mut self, i: usize, now: i64, progress: &Liveness) -> Result<(), CheckError> {
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
            let stored = o.map_or(0, |s| s.trades);
            if open.is_some_and(|e| e.waits_for_trades(stored, now)) {
                continue; // the healed trades are not all stored yet
            }
            if let Some(&Open {
                awaiting: Some((n, _)),
                ..
            }) = open
                && stored < n
            {
                tracing::warn!(%symbol, start, stored, healed = n, wait = ?Duration::from_millis(HEALED_TRADES_WAIT_MS as u64), "healed trades not all stored in time; judging what is stored");
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
            // Equal while its minutes are being healed: equal thanks to the heal, maybe before
            // the minutes are declared repaired. It waits for them (see wrong_before_repair).
            if status == Status::Equal
                && timeframe != Timeframe::ONE_MINUTE
                && healing.range(start..start + width).next().is_some()
            {
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

        tracing::debug!(%symbol, timeframe = timeframe.label(), from, end, verdicts = checked.len(), unjudged = unjudged.len(), waiting = series.open.len(), "series checked");
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
        let mut repaired = Vec::new();
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
                            repaired.push(c.start);
                        }
                    }
                }
                Next::GiveUp => {
                    series.open.remove(&c.start);
                    metrics::counter!(metric::CANDLES_GIVEN_UP, "symbol" => symbol.clone(), "timeframe" => label)
                        .increment(1);
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
        self.wrong_before_repair(&symbol, &repaired, end);
        self.heal(i, &repairs, progress).await
    }

    /// `minutes` of `symbol` were repaired: the wider candles holding them were wrong here
    /// before, even those not checked yet (a wider series may come to a candle only after its
    /// minutes healed). Those closed by `closed_by` are marked so, so that their check, equal
    /// now, says `repaired`; a verdict they already have stands.
    fn wrong_before_repair(&mut self, symbol: &str, minutes: &[i64], closed_by: i64) {
        for series in &mut self.series {
            if series.symbol != symbol || series.timeframe == Timeframe::ONE_MINUTE {
                continue;
            }
            let width = series.timeframe.width_ms();
            for &m in minutes {
                let start = m.div_euclid(width) * width;
                if start + width > closed_by {
                    continue;
                }
                if start >= series.cursor || series.open.contains_key(&start) {
                    let e = series.open.entry(start).or_default();
                    e.last.get_or_insert(Status::MissingHere);
                }
            }
        }
    }

    /// Fetches the trades of the oldest run of consecutive minutes among `minutes` (one request,
    /// more only past 10 000 trades), produces them to the trades topic and marks each of its
    /// minutes as waiting for them. One run per check: trade requests are the scarcest (3 a
    /// minute), and a symbol with many gaps must not hold every other series' checks for a slot
    /// each. Its other minutes stay open, due again after `verify.interval`; the next checks of the
    /// series heal them, oldest first.
    async fn heal(
        &mut self,
        i: usize,
        minutes: &[i64],
        progress: &Liveness,
    ) -> Result<(), CheckError> {
        let symbol = self.series[i].symbol.clone();
        let width = self.series[i].timeframe.width_ms();
        let Some((&first, rest)) = minutes.split_first() else {
            return Ok(());
        };
        let run = rest
            .iter()
            .zip(1..)
            .take_while(|&(&m, n)| m == first + n * width)
            .count();
        let last = first + run as i64 * width;
        let trades = fetch_trades(&self.rest, &symbol, first, last + width - 1).await?;
        progress.beat();
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
                e.awaiting = Some((per_minute.get(&m).copied().unwrap_or(0), received_at));
            }
        }
        Ok(())
    }

    /// After a check of series `i`: its symbol's verified ratio, and the lag.
    fn publish_gauges(&mut self, i: usize, now: i64, grace: i64) {
        let symbol = &self.series[i].symbol;
        if let Some(minutes) = self.minutes.get_mut(symbol) {
            *minutes = minutes.split_off(&(now - DAY_MS));
            if !minutes.is_empty() {
                let good = minutes.values().filter(|s| s.verified()).count();
                metrics::gauge!(metric::CANDLES_VERIFIED, "symbol" => symbol.clone())
                    .set(good as f64 / minutes.len() as f64);
            }
        }
        self.publish_lag(now, grace);
    }

    /// How far behind the checks are, over all series: after every check, and while idle (a
    /// candle closing during `grace` makes the lag grow with nothing to check yet).
    fn publish_lag(&self, now: i64, grace: i64) {
        for &timeframe in &self.timeframes {
            let lag = self
                .series
                .iter()
                .filter(|s| s.timeframe == timeframe)
                .map(|s| s.lag(now))
                .max()
                .unwrap_or(0);
            metrics::gauge!(metric::VERIFY_LAG, "timeframe" => timeframe.label())
                .set(lag as f64 / 1000.0);
        }
        // The work owed longest: what an alert watches (lag includes the lookback at start).
        let interval = self.settings.verify.interval.as_millis() as i64;
        let overdue = self
            .series
            .iter()
            .map(|s| s.overdue(now, grace, interval))
            .max()
            .unwrap_or(0)
            .max(0);
        metrics::gauge!(metric::VERIFY_OVERDUE).set(overdue as f64 / 1000.0);
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
    let _ = writeln!(out, " {}", time_ns(c.start, 0));
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
        // Trades of the next page's first millisecond already taken are skipped by id.
        match next_trades_page(start, full, last) {
            Some(next) => start = next,
            None => return Ok(out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heal_waits_for_its_trades_but_not_for_ever() {
        let sent = 1_700_000_000_000;
        let healed = Open {
            awaiting: Some((5, sent)),
            ..Open::default()
        };
        assert!(healed.waits_for_trades(4, sent + 60_000), "one trade short");
        assert!(!healed.waits_for_trades(5, sent + 60_000), "all stored");
        assert!(
            !healed.waits_for_trades(4, sent + HEALED_TRADES_WAIT_MS),
            "a trade that never arrives does not keep the candle unjudged"
        );
        assert!(!Open::default().waits_for_trades(0, sent), "nothing healed");
    }

    #[test]
    fn the_series_most_behind_goes_first_and_a_failure_shows_as_overdue() {
        const MIN: i64 = 60_000;
        let (grace, interval) = (2 * MIN, MIN);
        let now = 1_000 * 24 * 60 * MIN;
        let tf = |label: &str| Timeframe::try_from(label.to_string()).unwrap();
        // Two pairs checked up to the last closed minute a minute ago, one with a heal waiting.
        let checked = |symbol: &str| {
            let mut s = Series::new(symbol.into(), tf("1m"), now - 3 * MIN, now - 10 * MIN);
            s.checked_at = now - MIN;
            s.not_before = now;
            s
        };
        let steady = checked("tAUSD");
        let mut healing = checked("tBUSD");
        healing.open.insert(now - 5 * MIN, Open::default());
        healing.cursor += MIN;
        // A pair listed now owes its lookback: due at once, first in line.
        let listed = Series::new("tCUSD".into(), tf("1m"), now - 6 * 60 * MIN, now);
        let hour = Series::new("tAUSD".into(), tf("1h"), now - 30 * MIN, now - 10 * MIN);
        let mut series = vec![steady, healing, hour, listed];
        assert_eq!(most_behind(&series, grace, interval, now), Ok(3));
        assert_eq!(series[3].overdue(now, grace, interval), 0, "no backlog yet");
        assert_eq!(
            series[3].lag(now) / MIN,
            6 * 60 - 1,
            "the lookback is unchecked"
        );
        series.pop();
        // Then the heal's re-check (owed a minute after its check: now) and the minute that
        // closed `grace` ago (owed now too): equally behind, taken in order.
        assert_eq!(series[1].due(grace, interval), now);
        assert_eq!(series[0].due(grace, interval), now);
        assert_eq!(
            series[1].owed(grace, interval),
            now - MIN + interval,
            "checked a minute ago"
        );
        assert_eq!(
            most_behind(&series, grace, interval, now),
            Ok(0),
            "equal: in order"
        );
        assert_eq!(
            most_behind(&series, grace, interval, now - 1),
            Err(Some(now))
        );
        // The hour closes in 30 min: not due.
        assert!(series[2].due(grace, interval) > now);
        assert_eq!(series[2].lag(now), 0);
        // A failed check holds the series back for `interval`, but its work stays owed: the
        // overdue time keeps growing through an outage.
        let before = series[0].overdue(now, grace, interval);
        series[0].not_before = now + interval;
        assert_eq!(series[0].due(grace, interval), now + interval);
        assert_eq!(
            series[0].overdue(now + 5 * MIN, grace, interval),
            before + 5 * MIN
        );
    }

    #[test]
    fn the_budget_at_300_pairs_is_a_45_minute_round_and_a_check_every_15() {
        let tf = |labels: &[&str]| -> Vec<Timeframe> {
            labels
                .iter()
                .map(|l| Timeframe::try_from(l.to_string()).unwrap())
                .collect()
        };
        let minute = Duration::from_secs(60);
        let b = Budget::of(300, &tf(&["1m", "1h", "1D"]), minute, 20);
        assert_eq!(b.round, Duration::from_secs(45 * 60));
        assert!((b.needed_per_minute - 300.0 * (1.0 + 1.0 / 60.0 + 1.0 / 1440.0)).abs() < 1e-9);
        let every = b.narrowest_every.expect("20 a minute cannot keep up");
        assert_eq!(every.as_secs(), 915, "{every:?}: about every 15 minutes");
        // The defaults keep up: 6.1 of 20 a minute, a round of 54 s.
        let b = Budget::of(6, &tf(&["1m", "1h", "1D"]), minute, 20);
        assert_eq!(
            (b.round, b.narrowest_every),
            (Duration::from_secs(54), None)
        );
        assert!((b.needed_per_minute - 6.1).abs() < 0.01);
        // verify.interval bounds how often a series is checked: 1m at 5m is checked every 5m.
        let b = Budget::of(300, &tf(&["1m"]), 5 * minute, 20);
        assert_eq!(
            (b.needed_per_minute, b.narrowest_every),
            (60.0, Some(15 * minute))
        );
    }

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
