//! Trades: every executed trade exactly once per arrival path, and no gaps.
//!
//! The websocket sends a trade as `te`, repeats it as `tu`, and a (re)subscribe sends only a
//! snapshot of the most recent trades. The [`TradeBook`](super::dedupe::TradeBook) drops what
//! this process already sent and remembers the newest trade per symbol; whatever lies between
//! that trade (or, at start, the backfill horizon) and the oldest trade of a new snapshot is
//! fetched from REST history.
//! At start the book begins each symbol at the newest trade the trades topic held (see
//! `producer::resume`), or at the backfill horizon, whichever is later.
//! Duplicates that still get through are harmless: a trade's InfluxDB point is keyed by its own
//! time and id, so a second write overwrites the first.
//!
//! Every fetch from REST history waits its turn in the client's fair queue (see [`Class`]): the
//! repair of a gap a reconnect left as [`Class::Repair`], backfill pages and REST polls as
//! [`Class::Routine`]. [`Fetches`] follows each symbol's backfill for the progress log and
//! metrics.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use metrics::Counter;

use super::dedupe::{Admitted, Fetch, complete_until};
use super::message::{TradeEntry, TradeValues};
use super::rest::{Class, PAGE, next_trades_page};
use super::{Ctx, ExchangeError, now_ms};
use crate::model::{Record, Source, Trade};
use crate::retry::{Verdict, retry_letting_attempts_finish};
use crate::telemetry::metric;

/// Where a symbol's backfill stands.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Backfill {
    /// Not started: no snapshot or poll of the symbol yet.
    Waiting,
    /// Fetching `[from_ms, until_ms]`; the pages fetched so far cover it up to `at_ms`.
    Running {
        from_ms: i64,
        until_ms: i64,
        at_ms: i64,
        pages: u32,
    },
    Done {
        pages: u32,
    },
}

/// Per symbol: its backfill's progress, and whether a REST poll of it runs. A few dozen bytes a
/// symbol (the map entry, its name, a 32-byte [`Backfill`]), whatever the backfill size.
pub(super) struct Fetches {
    /// Symbols get a backfill: `bitfinex.backfill` is on and trades are streamed.
    backfill: bool,
    backfills: Mutex<HashMap<String, Backfill>>,
    started: Instant,
    /// Trade history requests per minute: what the time left is estimated from.
    per_minute: u32,
    polling: Mutex<HashSet<String>>,
}

impl Fetches {
    /// No symbol has a backfill when `backfill` is off (no backfill, or no trades streamed).
    pub(super) fn new(backfill: bool, per_minute: u32) -> Self {
        Self {
            backfill,
            backfills: Mutex::default(),
            started: Instant::now(),
            per_minute: per_minute.max(1),
            polling: Mutex::default(),
        }
    }

    /// Follows the symbols streamed: a new one waits for its backfill, a delisted one's progress
    /// is forgotten, so that done / total counts the symbols streamed now.
    pub(super) fn follow(&self, symbols: &BTreeSet<String>) {
        if !self.backfill {
            return;
        }
        let mut backfills = self.backfills.lock().expect("fetches lock");
        backfills.retain(|symbol, _| symbols.contains(symbol));
        for symbol in symbols {
            if !backfills.contains_key(symbol) {
                backfills.insert(symbol.clone(), Backfill::Waiting);
            }
        }
        self.report(&backfills);
    }

    fn update(&self, symbol: &str, change: impl FnOnce(&mut Backfill)) -> Option<Progress> {
        let mut backfills = self.backfills.lock().expect("fetches lock");
        change(backfills.get_mut(symbol)?);
        Some(self.report(&backfills))
    }

    fn started(&self, symbol: &str, from_ms: i64, until_ms: i64) {
        self.update(symbol, |b| {
            let pages = match *b {
                Backfill::Running { pages, .. } | Backfill::Done { pages } => pages,
                Backfill::Waiting => 0,
            };
            *b = Backfill::Running {
                from_ms,
                until_ms,
                at_ms: from_ms,
                pages,
            };
        });
    }

    fn paged(&self, symbol: &str, complete_ms: i64) {
        self.update(symbol, |b| {
            if let Backfill::Running { at_ms, pages, .. } = b {
                *at_ms = complete_ms.max(*at_ms);
                *pages += 1;
            }
        });
    }

    fn finished(&self, symbol: &str) {
        let mut pages = 0;
        let progress = self.update(symbol, |b| {
            if let Backfill::Running { pages: p, .. } = *b {
                pages = p;
                *b = Backfill::Done { pages };
            }
        });
        let Some(p) = progress else { return };
        tracing::info!(
            %symbol,
            pages,
            done = p.done,
            total = p.total,
            remaining_seconds = p.remaining_seconds,
            "backfill of a symbol done"
        );
        if p.done == p.total {
            tracing::info!(
                symbols = p.total,
                elapsed = ?self.started.elapsed(),
                "backfill done for every symbol"
            );
        }
    }

    /// The symbol needs no backfill (its first snapshot reached back to where it starts), unless
    /// one is running.
    fn settled(&self, symbol: &str) {
        self.update(symbol, |b| {
            if *b == Backfill::Waiting {
                *b = Backfill::Done { pages: 0 };
            }
        });
    }

    /// Sets the gauges from `backfills` and returns what they say.
    fn report(&self, backfills: &HashMap<String, Backfill>) -> Progress {
        let progress = Progress::of(backfills.values(), self.per_minute);
        for (state, n) in [
            ("waiting", progress.waiting),
            ("running", progress.running),
            ("done", progress.done),
        ] {
            metrics::gauge!(metric::BACKFILL_SYMBOLS, "state" => state).set(n as f64);
        }
        metrics::gauge!(metric::BACKFILL_REMAINING).set(progress.remaining_seconds);
        progress
    }
}

/// Symbols per backfill state, and the time left.
#[derive(Debug, PartialEq)]
struct Progress {
    waiting: usize,
    running: usize,
    done: usize,
    total: usize,
    /// An estimate: the requests still needed, at the limiter's pace. A running backfill needs as
    /// many pages again as the part of its range still to fetch is to the part fetched; one that
    /// has not fetched a page yet, or has not started, as many as the others needed on average
    /// (one, before any finished). Repairs, served first, stretch it.
    remaining_seconds: f64,
}

impl Progress {
    fn of<'a>(backfills: impl Iterator<Item = &'a Backfill> + Clone, per_minute: u32) -> Self {
        // Pages a whole backfill takes, as far as one can tell yet.
        let projected = |b: &Backfill| match *b {
            Backfill::Done { pages } => Some(f64::from(pages)),
            Backfill::Running {
                from_ms,
                until_ms,
                at_ms,
                pages,
            } if at_ms > from_ms && pages > 0 => {
                let share = (at_ms - from_ms) as f64 / (until_ms - from_ms).max(1) as f64;
                Some(f64::from(pages) / share.min(1.0))
            }
            _ => None,
        };
        let known: Vec<f64> = backfills.clone().filter_map(projected).collect();
        let typical = if known.is_empty() {
            1.0
        } else {
            (known.iter().sum::<f64>() / known.len() as f64).max(1.0)
        };
        let (mut waiting, mut running, mut done, mut requests) = (0, 0, 0, 0.0);
        for b in backfills {
            match *b {
                Backfill::Waiting => {
                    waiting += 1;
                    requests += typical;
                }
                Backfill::Running { pages, .. } => {
                    running += 1;
                    // The last page is the one that comes back short.
                    requests +=
                        projected(b).map_or(typical, |all| (all - f64::from(pages)).max(1.0));
                }
                Backfill::Done { .. } => done += 1,
            }
        }
        Self {
            waiting,
            running,
            done,
            total: waiting + running + done,
            remaining_seconds: requests * 60.0 / f64::from(per_minute),
        }
    }
}

/// Why trades are fetched from REST history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Purpose {
    /// A gap a reconnect left, between the newest trade seen and a new snapshot.
    Gap,
    /// The symbol's backfill at start.
    Backfill,
    /// A poll of a symbol the websocket does not cover.
    Poll,
}

impl Purpose {
    /// Gaps are rare and short, and what they hold is live: first. Backfill pages and polls go
    /// on for as long as they must: in turn across symbols, so that neither starves the other.
    fn class(self) -> Class {
        match self {
            Purpose::Gap => Class::Repair,
            Purpose::Backfill | Purpose::Poll => Class::Routine,
        }
    }
}

/// How a trade reached the producer, as the `source` label of `candlestream_trades_received_total`
/// tells it: the record's [`Source`], with REST history fetched for a backfill told apart from
/// REST polls and gap repairs. Why: polls and repairs bring trades of the last moments, which
/// the websocket would have brought, while a backfill brings hours of history at start; the
/// stale-feed alert takes a symbol's live trades of the last hour for how active it is, and a
/// quiet pair's backfilled history made it look active right after a cold start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arrival {
    Websocket,
    /// REST polls (websocket down, or `mode = "rest"`) and repairs of a reconnect's gap.
    Rest,
    /// REST history from the backfill horizon (or the newest trade Kafka held) up to the stream.
    Backfill,
}

impl Arrival {
    /// Index order of the counters in [`TradeCounters`].
    const ALL: [Arrival; 3] = [Arrival::Websocket, Arrival::Rest, Arrival::Backfill];

    fn label(self) -> &'static str {
        match self {
            Arrival::Websocket => "websocket",
            Arrival::Rest => "rest",
            Arrival::Backfill => "backfill",
        }
    }

    /// What the record says: REST history is REST history, whatever fetched it.
    fn source(self) -> Source {
        match self {
            Arrival::Websocket => Source::Websocket,
            Arrival::Rest | Arrival::Backfill => Source::Rest,
        }
    }
}

/// Trade counters by source (and symbol), registered once: a registry lookup per trade builds
/// and hashes the key and allocates the symbol's label.
pub(super) struct TradeCounters {
    /// symbol → received by [`Arrival`] (websocket, rest, backfill).
    received: Mutex<HashMap<String, [Counter; 3]>>,
    repeats: [Counter; 2],
}

impl TradeCounters {
    pub(super) fn register() -> Self {
        Self {
            received: Mutex::default(),
            repeats: SOURCES
                .map(|s| metrics::counter!(metric::TRADES_DUPLICATE, "source" => s.label())),
        }
    }

    fn received(&self, symbol: &str, arrival: Arrival) {
        let mut received = self.received.lock().unwrap_or_else(|p| p.into_inner());
        // Symbols are bounded by the pairs Bitfinex lists.
        let counters = match received.get(symbol) {
            Some(c) => c,
            None => received.entry(symbol.to_string()).or_insert(Arrival::ALL.map(|a| {
                metrics::counter!(metric::TRADES_RECEIVED, "source" => a.label(), "symbol" => symbol.to_string())
            })),
        };
        counters[arrival as usize].increment(1);
    }

    /// Counts trades dropped because this process already sent them.
    fn repeats(&self, source: Source, n: usize) {
        if n > 0 {
            self.repeats[index(source)].increment(n as u64);
        }
    }
}

/// Index order of the duplicate counters in [`TradeCounters`].
const SOURCES: [Source; 2] = [Source::Websocket, Source::Rest];

fn index(source: Source) -> usize {
    match source {
        Source::Websocket => 0,
        Source::Rest => 1,
    }
}

/// Sends a trade the book admitted as new.
async fn send(
    ctx: &Ctx,
    symbol: &str,
    t: TradeValues,
    arrival: Arrival,
    sequence: Option<u64>,
    received_at: i64,
) -> Result<(), ExchangeError> {
    ctx.trade_counters.received(symbol, arrival);
    let trade = Trade {
        symbol: symbol.to_string(),
        id: t.id,
        exchange_time: t.mts,
        amount: t.amount,
        price: t.price,
        source: arrival.source(),
        sequence: sequence.map(|s| s as i64),
        received_at,
    };
    ctx.send(Record::Trade(trade)).await
}

/// Keeps the valid entries, logging and counting the others one by one.
fn valid(symbol: &str, entries: Vec<TradeEntry>) -> Vec<TradeValues> {
    entries
        .into_iter()
        .filter_map(|e| checked(symbol, e))
        .collect()
}

/// The trade, or `None` after logging and counting why it is not one.
fn checked(symbol: &str, entry: TradeEntry) -> Option<TradeValues> {
    match entry {
        Ok(t) => Some(t),
        Err(e) => {
            metrics::counter!(metric::TRADES_REJECTED).increment(1);
            tracing::warn!(%symbol, error = %e, "trade rejected");
            None
        }
    }
}

/// A `te` or `tu` update: the trade, once.
pub(super) async fn on_update(
    ctx: &Ctx,
    symbol: &str,
    entry: TradeEntry,
    sequence: Option<u64>,
) -> Result<(), ExchangeError> {
    let Some(t) = checked(symbol, entry) else {
        return Ok(());
    };
    if ctx.book.admit(symbol, &t) {
        send(ctx, symbol, t, Arrival::Websocket, sequence, now_ms()).await?;
    } else {
        ctx.trade_counters.repeats(Source::Websocket, 1);
    }
    Ok(())
}

/// The snapshot sent on (re)subscribe: sends what is new, then fetches whatever lies between
/// the last trade seen before and the snapshot's oldest from REST, beside the socket.
pub(super) async fn on_snapshot(
    ctx: &Arc<Ctx>,
    symbol: &str,
    entries: Vec<TradeEntry>,
    sequence: Option<u64>,
) -> Result<(), ExchangeError> {
    let received_at = now_ms();
    let (Admitted { new, repeats }, gap) =
        ctx.book
            .admit_snapshot(symbol, valid(symbol, entries), received_at);
    ctx.trade_counters.repeats(Source::Websocket, repeats);
    for t in new {
        send(ctx, symbol, t, Arrival::Websocket, sequence, received_at).await?;
    }
    match gap {
        Some(f) if f.backfill => ctx.fetches.started(symbol, f.from_ms, f.until_ms),
        // The symbol's first snapshot reached back to where its backfill starts, or this is a
        // later one: no backfill waits any more.
        _ => ctx.fetches.settled(symbol),
    }
    let Some(fetch) = gap else {
        return Ok(());
    };
    let (ctx, symbol) = (ctx.clone(), symbol.to_string());
    ctx.repairs
        .clone()
        .spawn(async move { repair(&ctx, &symbol, fetch).await });
    Ok(())
}

/// Closes one gap (or backfills), retrying until it is closed or the producer stops: the book
/// has already moved past it, so nothing else would ever fetch these trades.
async fn repair(ctx: &Ctx, symbol: &str, fetch: Fetch) {
    let Fetch {
        from_ms: from,
        until_ms: until,
        backfill,
    } = fetch;
    let purpose = if backfill {
        Purpose::Backfill
    } else {
        Purpose::Gap
    };
    // Trades fetched are sent even when the producer stops meanwhile.
    let repaired = retry_letting_attempts_finish(
        ctx.cfg.repair_backoff(),
        &ctx.cancel,
        || catch_up(ctx, symbol, from, until, purpose),
        |e, wait| {
            if !e.is_retryable() {
                return Verdict::Fail;
            }
            tracing::warn!(%symbol, from, until, error = %e, ?wait, "trade gap repair failed; retrying");
            Verdict::Retry
        },
    )
    .await;
    if let Ok(n) = repaired {
        tracing::info!(%symbol, from, until, recovered = n, backfill, "trade gap closed from REST history");
        if backfill {
            ctx.fetches.finished(symbol);
        }
    }
}

/// Fetches `symbol`'s trades with `from_ms <= MTS <= until_ms` from REST history, oldest first,
/// page by page, each in turn for its `purpose`, and sends those not sent yet. Returns how many were
/// new.
pub(super) async fn catch_up(
    ctx: &Ctx,
    symbol: &str,
    from_ms: i64,
    until_ms: i64,
    purpose: Purpose,
) -> Result<usize, ExchangeError> {
    let arrival = if purpose == Purpose::Backfill {
        Arrival::Backfill
    } else {
        Arrival::Rest
    };
    let mut start = from_ms;
    let mut recovered = 0;
    loop {
        // A long backfill must not hold up shutdown: the restart's backfill fetches the rest.
        if ctx.cancel.is_cancelled() {
            return Err(ExchangeError::Cancelled);
        }
        let rows = ctx
            .rest
            .trades_as(purpose.class(), symbol, start, until_ms, PAGE)
            .await?;
        let received_at = now_ms();
        let full = rows.len() >= PAGE;
        let last = rows
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .map(|t| t.mts)
            .max();
        let complete = complete_until(start, until_ms, full, last);
        let Admitted { new, repeats } =
            ctx.book
                .admit_page(symbol, start, complete, valid(symbol, rows));
        ctx.trade_counters.repeats(Source::Rest, repeats);
        if purpose == Purpose::Backfill {
            ctx.fetches.paged(symbol, complete);
        }
        for t in new {
            send(ctx, symbol, t, arrival, None, received_at).await?;
            recovered += 1;
            metrics::counter!(metric::TRADES_REPAIRED, "symbol" => symbol.to_string()).increment(1);
        }
        match next_trades_page(start, full, last) {
            Some(next) => start = next,
            None => return Ok(recovered),
        }
    }
}

/// One REST poll of a symbol the websocket does not cover: everything since the newest trade,
/// or its backfill before any.
async fn poll(ctx: &Ctx, symbol: &str) -> Result<usize, ExchangeError> {
    let now = now_ms();
    match ctx.book.cursor(symbol) {
        Some(c) if c.backfill => {
            ctx.fetches.started(symbol, c.at.0, now);
            let n = catch_up(ctx, symbol, c.at.0, now, Purpose::Backfill).await?;
            ctx.fetches.finished(symbol);
            Ok(n)
        }
        Some(c) => catch_up(ctx, symbol, c.at.0, now, Purpose::Poll).await,
        // No backfill and nothing seen yet: the recent trades, like a snapshot would give.
        None => catch_up(ctx, symbol, now - 60_000, now, Purpose::Poll).await,
    }
}

/// Polls `symbol`'s trades beside the caller, unless a poll of it still runs; a failed poll is
/// tried again by the next.
pub(super) fn poll_beside(ctx: &Arc<Ctx>, symbol: String) {
    if !ctx
        .fetches
        .polling
        .lock()
        .expect("fetches lock")
        .insert(symbol.clone())
    {
        return;
    }
    let ctx = ctx.clone();
    ctx.repairs.clone().spawn(async move {
        let polled = poll(&ctx, &symbol).await;
        ctx.fetches
            .polling
            .lock()
            .expect("fetches lock")
            .remove(&symbol);
        if let Err(e) = polled
            && e.is_retryable()
        {
            tracing::warn!(%symbol, error = %e, "REST poll of trades failed; the next poll tries again");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_left_is_estimated_from_the_pages_so_far() {
        let running = |at_ms, pages| Backfill::Running {
            from_ms: 0,
            until_ms: 1_000,
            at_ms,
            pages,
        };
        // Nothing known yet: a page each, at 12 a minute (5 s).
        let all = [Backfill::Waiting, Backfill::Waiting, running(0, 0)];
        let p = Progress::of(all.iter(), 12);
        assert_eq!((p.waiting, p.running, p.done, p.total), (2, 1, 0, 3));
        assert_eq!(p.remaining_seconds, 15.0);
        // A quarter in 2 pages: 6 more; the one done took 4; the waiting one the average (6).
        let all = [
            Backfill::Waiting,
            running(250, 2),
            Backfill::Done { pages: 4 },
        ];
        let p = Progress::of(all.iter(), 12);
        assert_eq!(p.remaining_seconds, (6.0 + 6.0) * 5.0);
        let all = [Backfill::Done { pages: 1 }];
        assert_eq!(Progress::of(all.iter(), 12).remaining_seconds, 0.0);
        assert_eq!(size_of::<Backfill>(), 32, "the figure in the README");
    }
}
