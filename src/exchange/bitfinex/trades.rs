//! Trades: every executed trade exactly once per arrival path, and no gaps.
//!
//! The websocket sends a trade as `te`, repeats it as `tu`, and a (re)subscribe sends only a
//! snapshot of the most recent trades. [`TradeBook`] drops what this process already sent and
//! remembers the newest trade per symbol; whatever lies between that trade (or, at start, the
//! backfill horizon) and the oldest trade of a new snapshot is fetched from REST history.
//! Duplicates that still get through (a restart forgets the book) are harmless: a trade's
//! InfluxDB point is keyed by its own time and id, so a second write overwrites the first.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use super::message::{TradeEntry, TradeValues};
use super::rest::PAGE;
use super::{Ctx, ExchangeError, now_ms};
use crate::model::{Record, Source, Trade};
use crate::retry::{Verdict, retry_letting_attempts_finish};
use crate::telemetry::metric;

/// Trade ids remembered per symbol for dropping duplicates. Overlaps are at most a snapshot or
/// a REST page boundary, far fewer than this.
const REMEMBERED_IDS: usize = 10_000;

/// Execution order of trades: exchange time, then id.
pub type Position = (i64, i64);

#[derive(Default)]
struct Seen {
    ids: HashSet<i64>,
    order: VecDeque<i64>,
    newest: Option<Position>,
}

pub struct TradeBook {
    symbols: Mutex<HashMap<String, Seen>>,
    /// Before any trade of a symbol was seen, gaps start here: the backfill horizon.
    horizon: Option<Position>,
}

impl TradeBook {
    pub fn new(backfill_from_ms: Option<i64>) -> Self {
        Self {
            symbols: Mutex::new(HashMap::new()),
            horizon: backfill_from_ms.map(|ms| (ms, 0)),
        }
    }

    /// Where a gap in `symbol`'s trades would start: its newest trade seen, or the backfill
    /// horizon before any. `None`: nothing to catch up on.
    pub fn cursor(&self, symbol: &str) -> Option<Position> {
        let symbols = self.symbols.lock().expect("trade book lock");
        symbols.get(symbol).and_then(|s| s.newest).or(self.horizon)
    }

    /// Records the trade; false when it was seen before.
    pub fn admit(&self, symbol: &str, t: &TradeValues) -> bool {
        let mut symbols = self.symbols.lock().expect("trade book lock");
        let seen = symbols.entry(symbol.to_string()).or_default();
        if !seen.ids.insert(t.id) {
            return false;
        }
        seen.order.push_back(t.id);
        if seen.order.len() > REMEMBERED_IDS
            && let Some(old) = seen.order.pop_front()
        {
            seen.ids.remove(&old);
        }
        seen.newest = seen.newest.max(Some((t.mts, t.id)));
        true
    }
}

/// Sends a trade unless this process already sent it. True when it was new.
async fn forward(
    ctx: &Ctx,
    symbol: &str,
    t: TradeValues,
    source: Source,
    sequence: Option<u64>,
    received_at: i64,
) -> Result<bool, ExchangeError> {
    if !ctx.book.admit(symbol, &t) {
        metrics::counter!(metric::TRADES_DUPLICATE, "source" => source.label()).increment(1);
        return Ok(false);
    }
    metrics::counter!(metric::TRADES_RECEIVED, "source" => source.label()).increment(1);
    let trade = Trade {
        symbol: symbol.to_string(),
        id: t.id,
        exchange_time: t.mts,
        amount: t.amount,
        price: t.price,
        source,
        sequence: sequence.map(|s| s as i64),
        received_at,
    };
    ctx.send(Record::Trade(trade)).await?;
    Ok(true)
}

/// Keeps the valid entries, logging and counting the others one by one.
fn valid(symbol: &str, entries: Vec<TradeEntry>) -> Vec<TradeValues> {
    entries
        .into_iter()
        .filter_map(|e| match e {
            Ok(t) => Some(t),
            Err(e) => {
                metrics::counter!(metric::TRADES_REJECTED).increment(1);
                tracing::warn!(%symbol, error = %e, "trade rejected");
                None
            }
        })
        .collect()
}

/// A `te` or `tu` update: the trade, once.
pub(super) async fn on_update(
    ctx: &Ctx,
    symbol: &str,
    entry: TradeEntry,
    sequence: Option<u64>,
) -> Result<(), ExchangeError> {
    let received_at = now_ms();
    for t in valid(symbol, vec![entry]) {
        forward(ctx, symbol, t, Source::Websocket, sequence, received_at).await?;
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
    let gap_from = ctx.book.cursor(symbol);
    let mut trades = valid(symbol, entries);
    trades.sort_by_key(|t| (t.mts, t.id));
    let oldest = trades.first().map(|t| (t.mts, t.id));
    for t in trades {
        forward(ctx, symbol, t, Source::Websocket, sequence, received_at).await?;
    }
    let Some(from) = gap_from else { return Ok(()) };
    // A snapshot that reaches back to what we saw leaves no gap.
    if oldest.is_some_and(|o| o <= from) {
        return Ok(());
    }
    let until = oldest.map_or_else(now_ms, |(mts, _)| mts);
    let (ctx, symbol) = (ctx.clone(), symbol.to_string());
    ctx.repairs
        .clone()
        .spawn(async move { repair(&ctx, &symbol, from.0, until).await });
    Ok(())
}

/// Closes one gap, retrying until it is closed or the producer stops: the book has already
/// moved past it, so nothing else would ever fetch these trades.
async fn repair(ctx: &Ctx, symbol: &str, from: i64, until: i64) {
    // Trades fetched are sent even when the producer stops meanwhile.
    let repaired = retry_letting_attempts_finish(
        ctx.cfg.repair_backoff(),
        &ctx.cancel,
        || catch_up(ctx, symbol, from, until),
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
        tracing::info!(%symbol, from, until, recovered = n, "trade gap closed from REST history");
    }
}

/// Fetches `symbol`'s trades with `from_ms <= MTS <= until_ms` from REST history, oldest first,
/// page by page, and sends those not sent yet. Returns how many were new.
pub(super) async fn catch_up(
    ctx: &Ctx,
    symbol: &str,
    from_ms: i64,
    until_ms: i64,
) -> Result<usize, ExchangeError> {
    let mut start = from_ms;
    let mut recovered = 0;
    loop {
        // A long backfill must not hold up shutdown: the restart's backfill fetches the rest.
        if ctx.cancel.is_cancelled() {
            return Err(ExchangeError::Cancelled);
        }
        let rows = ctx.rest.trades(symbol, start, until_ms, PAGE).await?;
        let received_at = now_ms();
        let full = rows.len() >= PAGE;
        let last = rows
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .map(|t| t.mts)
            .max();
        for t in valid(symbol, rows) {
            if forward(ctx, symbol, t, Source::Rest, None, received_at).await? {
                recovered += 1;
                metrics::counter!(metric::TRADES_REPAIRED, "symbol" => symbol.to_string())
                    .increment(1);
            }
        }
        match last {
            // The next page starts at the last millisecond seen: trades sharing it may have been
            // cut off, and those already sent are dropped as duplicates.
            Some(mts) if full => start = if mts > start { mts } else { start + 1 },
            _ => return Ok(recovered),
        }
    }
}

/// One REST poll of a symbol the websocket does not cover: everything since the newest trade.
pub(super) async fn poll(ctx: &Ctx, symbol: &str) -> Result<usize, ExchangeError> {
    match ctx.book.cursor(symbol) {
        Some((from, _)) => catch_up(ctx, symbol, from, now_ms()).await,
        // No backfill and nothing seen yet: the recent trades, like a snapshot would give.
        None => catch_up(ctx, symbol, now_ms() - 60_000, now_ms()).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(id: i64, mts: i64) -> TradeValues {
        TradeValues {
            id,
            mts,
            amount: 1.0,
            price: 1.0,
        }
    }

    #[test]
    fn book_drops_repeats_and_tracks_the_newest_trade() {
        let book = TradeBook::new(Some(1_000));
        assert_eq!(
            book.cursor("tBTCUSD"),
            Some((1_000, 0)),
            "the backfill horizon before any trade"
        );
        assert!(book.admit("tBTCUSD", &t(5, 2_000)));
        assert!(book.admit("tBTCUSD", &t(6, 2_000)));
        assert!(!book.admit("tBTCUSD", &t(5, 2_000)), "te then tu");
        assert!(
            book.admit("tBTCUSD", &t(3, 1_500)),
            "an older trade from a repair is still new"
        );
        assert!(book.admit("tETHUSD", &t(5, 2_000)), "books are per symbol");
        assert_eq!(book.cursor("tBTCUSD"), Some((2_000, 6)));
        assert_eq!(TradeBook::new(None).cursor("tBTCUSD"), None);
    }

    #[test]
    fn book_forgets_the_oldest_ids_only() {
        let book = TradeBook::new(None);
        for id in 0..(REMEMBERED_IDS as i64 + 10) {
            assert!(book.admit("s", &t(id, id)));
        }
        assert!(book.admit("s", &t(0, 0)), "forgotten");
        assert!(!book.admit("s", &t(REMEMBERED_IDS as i64, 0)), "remembered");
    }
}
