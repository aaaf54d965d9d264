//! Trades: every executed trade exactly once per arrival path, and no gaps.
//!
//! The websocket sends a trade as `te`, repeats it as `tu`, and a (re)subscribe sends only a
//! snapshot of the most recent trades. The [`TradeBook`](super::dedupe::TradeBook) drops what
//! this process already sent and remembers the newest trade per symbol; whatever lies between
//! that trade (or, at start, the backfill horizon) and the oldest trade of a new snapshot is
//! fetched from REST history.
//! Duplicates that still get through (a restart forgets the book) are harmless: a trade's
//! InfluxDB point is keyed by its own time and id, so a second write overwrites the first.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use metrics::Counter;

use super::dedupe::{Admitted, Fetch, complete_until};
use super::message::{TradeEntry, TradeValues};
use super::rest::PAGE;
use super::{Ctx, ExchangeError, now_ms};
use crate::model::{Record, Source, Trade};
use crate::retry::{Verdict, retry_letting_attempts_finish};
use crate::telemetry::metric;

/// Trade counters by source (and symbol), registered once: a registry lookup per trade builds
/// and hashes the key and allocates the symbol's label.
pub(super) struct TradeCounters {
    /// symbol → received by [`Source`] (websocket, rest).
    received: Mutex<HashMap<String, [Counter; 2]>>,
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

    fn received(&self, symbol: &str, source: Source) {
        let mut received = self.received.lock().unwrap_or_else(|p| p.into_inner());
        // Symbols are bounded by bitfinex.symbols.
        let counters = match received.get(symbol) {
            Some(c) => c,
            None => received.entry(symbol.to_string()).or_insert(SOURCES.map(|s| {
                metrics::counter!(metric::TRADES_RECEIVED, "source" => s.label(), "symbol" => symbol.to_string())
            })),
        };
        counters[index(source)].increment(1);
    }

    /// Counts trades dropped because this process already sent them.
    fn repeats(&self, source: Source, n: usize) {
        if n > 0 {
            self.repeats[index(source)].increment(n as u64);
        }
    }
}

/// Index order of the counters in [`TradeCounters`].
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
    source: Source,
    sequence: Option<u64>,
    received_at: i64,
) -> Result<(), ExchangeError> {
    ctx.trade_counters.received(symbol, source);
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
        send(ctx, symbol, t, Source::Websocket, sequence, now_ms()).await?;
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
        send(ctx, symbol, t, Source::Websocket, sequence, received_at).await?;
    }
    let Some(Fetch { from_ms, until_ms }) = gap else {
        return Ok(());
    };
    let (ctx, symbol) = (ctx.clone(), symbol.to_string());
    ctx.repairs
        .clone()
        .spawn(async move { repair(&ctx, &symbol, from_ms, until_ms).await });
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
        let complete = complete_until(start, until_ms, full, last);
        let Admitted { new, repeats } =
            ctx.book
                .admit_page(symbol, start, complete, valid(symbol, rows));
        ctx.trade_counters.repeats(Source::Rest, repeats);
        for t in new {
            send(ctx, symbol, t, Source::Rest, None, received_at).await?;
            recovered += 1;
            metrics::counter!(metric::TRADES_REPAIRED, "symbol" => symbol.to_string()).increment(1);
        }
        match last {
            // The next page starts at the last millisecond seen: trades sharing it may have been
            // cut off.
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
