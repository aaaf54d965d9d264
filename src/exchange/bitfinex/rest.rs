//! Bitfinex's public REST API: tickers, trade history and candle history, each behind its own
//! rate limiter shared by every caller in the process, and the polling of whatever the
//! websocket does not cover (everything in `mode = "rest"`).
//!
//! Trade history is the scarce one (about 15 requests a minute per IP for hundreds of symbols),
//! so its requests also wait in a fair queue, [`TradeQueue`]: gap repairs first, then backfill
//! pages and polls one symbol after another.

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use governor::DefaultDirectRateLimiter;
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::answer::{
    CandleValues, ERROR_RATE_LIMIT, RestAnswer, RestTicker, parse_pair_list, parse_rest,
};
use super::message::{TickerValues, TradeEntry, TradeValues};
use super::{
    Channel, Ctx, ExchangeError, Sub, now_ms, per_minute, sleep_or_cancel, subscriptions, trades,
};
use crate::config::BitfinexConfig;
use crate::model::{Record, Source, Tick};
use crate::retry::{Backoff, GaveUp, Verdict, retry, retry_letting_attempts_finish};
use crate::telemetry::{metric, truncate};

/// The REST endpoints we call; Bitfinex limits each on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Tickers,
    /// Trade history, asked for by a caller of this class (see [`TradeQueue`]).
    Trades(Class),
    Candles,
    /// The list of trading pairs, read once an hour or so: under the tickers' budget.
    Pairs,
}

impl Endpoint {
    fn label(self) -> &'static str {
        match self {
            Endpoint::Tickers => "tickers",
            Endpoint::Trades(_) => "trades",
            Endpoint::Candles => "candles",
            Endpoint::Pairs => "pairs",
        }
    }
}

/// Who asks for a page of trade history, which decides when it is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Trades a reconnect left out (a gap between the newest trade seen and a new snapshot), or
    /// the heal of a 1-minute candle (`candlestream verify`, in its own client): rare and short,
    /// so served first, oldest first.
    Repair,
    /// Work that goes on for as long as it must: the pages of a symbol's backfill, the polls of a
    /// symbol without a websocket. Served when no repair waits. Each symbol asks for its next
    /// page only once it has its last, so first come first served takes the symbols in turn: no
    /// symbol waits behind another's whole backfill, and polls do not starve backfills.
    Routine,
}

impl Class {
    fn label(self) -> &'static str {
        match self {
            Class::Repair => "repair",
            Class::Routine => "routine",
        }
    }
}

/// A request waiting for its turn.
struct Waiter {
    since: Instant,
    turn: oneshot::Sender<()>,
}

/// Requests waiting for trade history, per class, first come first.
#[derive(Default)]
struct Waiting {
    repairs: VecDeque<Waiter>,
    routine: VecDeque<Waiter>,
}

impl Waiting {
    fn is_empty(&self) -> bool {
        self.repairs.is_empty() && self.routine.is_empty()
    }

    /// The next in line: repairs first.
    fn pop(&mut self) -> Option<Waiter> {
        self.repairs
            .pop_front()
            .or_else(|| self.routine.pop_front())
    }

    /// The queue as gauges: how many wait, and for how long the oldest has.
    fn report(&self) {
        for (class, queue) in [
            (Class::Repair, &self.repairs),
            (Class::Routine, &self.routine),
        ] {
            let oldest = queue
                .front()
                .map_or(0.0, |w| w.since.elapsed().as_secs_f64());
            metrics::gauge!(metric::TRADE_HISTORY_QUEUED, "class" => class.label())
                .set(queue.len() as f64);
            metrics::gauge!(metric::TRADE_HISTORY_OLDEST_WAIT, "class" => class.label())
                .set(oldest);
        }
    }
}

/// The trade history budget (`bitfinex.rest_trades_per_minute`), handed out in order: one
/// dispatcher waits for each slot of the limiter and gives it to the next request in line (see
/// [`Class`]). Each waiting request is one entry (a start time and a channel), and a caller
/// waits with at most one request at a time, so the queue holds at most one entry per running
/// repair or backfill: bounded by the symbols and their open gaps, whatever the backfill size.
pub(crate) struct TradeQueue {
    limiter: DefaultDirectRateLimiter,
    waiting: Mutex<Waiting>,
    wake: Notify,
    /// The dispatcher starts with the first request (a runtime is there then).
    dispatcher: OnceLock<()>,
    cancel: CancellationToken,
}

impl TradeQueue {
    pub(crate) fn new(per_minute_limit: u32, cancel: CancellationToken) -> Arc<Self> {
        Arc::new(Self {
            limiter: per_minute(per_minute_limit),
            waiting: Mutex::default(),
            wake: Notify::new(),
            dispatcher: OnceLock::new(),
            cancel,
        })
    }

    /// Waits for this request's turn; false when the client is cancelled first. A request asked
    /// `again` (Bitfinex refused it: 429) goes first in its class: it had its turn, and the next
    /// in line would otherwise overtake it every time the refusals fall on its slot.
    pub(crate) async fn turn(self: &Arc<Self>, class: Class, again: bool) -> bool {
        self.dispatcher.get_or_init(|| {
            tokio::spawn(self.clone().dispatch());
        });
        let (tx, rx) = oneshot::channel();
        {
            let mut waiting = self.waiting.lock().expect("trade queue lock");
            let queue = match class {
                Class::Repair => &mut waiting.repairs,
                Class::Routine => &mut waiting.routine,
            };
            let waiter = Waiter {
                since: Instant::now(),
                turn: tx,
            };
            if again {
                queue.push_front(waiter);
            } else {
                queue.push_back(waiter);
            }
            waiting.report();
        }
        self.wake.notify_one();
        // A caller that stops waiting drops `rx`; the dispatcher then passes its turn on.
        tokio::select! {
            biased;
            _ = self.cancel.cancelled() => false,
            got = rx => got.is_ok(),
        }
    }

    async fn dispatch(self: Arc<Self>) {
        loop {
            while self.waiting.lock().expect("trade queue lock").is_empty() {
                tokio::select! {
                    _ = self.cancel.cancelled() => return,
                    _ = self.wake.notified() => {}
                }
            }
            if self.limiter.check().is_err() {
                metrics::counter!(metric::RATE_LIMIT_WAITS, "endpoint" => "trades").increment(1);
                tokio::select! {
                    _ = self.cancel.cancelled() => return,
                    _ = self.limiter.until_ready() => {}
                }
            }
            let mut waiting = self.waiting.lock().expect("trade queue lock");
            while let Some(next) = waiting.pop() {
                if next.turn.send(()).is_ok() {
                    break;
                }
            }
            waiting.report();
        }
    }
}

/// A REST client that keeps under Bitfinex's per-minute limits and backs off when told it did
/// not (HTTP 429, or error 11010 in the body).
pub struct RestClient {
    http: reqwest::Client,
    base: String,
    tickers: DefaultDirectRateLimiter,
    trades: Arc<TradeQueue>,
    candles: DefaultDirectRateLimiter,
    backoff: Backoff,
    cancel: CancellationToken,
}

/// Bitfinex's maximum rows per history call (`/v2/trades/…/hist`, `/v2/candles/…/hist`).
pub const PAGE: usize = 10_000;

/// Where the next page of trade history starts, after a page asked from `start` whose newest
/// trade is at `newest` and which held [`PAGE`] rows (`full`); `None` when the range is done. It
/// starts at that same millisecond, because trades sharing it may have been cut off (the caller
/// skips those it has); one later when the whole page shared `start`, so that paging moves on.
pub fn next_trades_page(start: i64, full: bool, newest: Option<i64>) -> Option<i64> {
    match newest {
        Some(mts) if full => Some(if mts > start { mts } else { start + 1 }),
        _ => None,
    }
}

impl RestClient {
    pub fn new(cfg: &BitfinexConfig, cancel: CancellationToken) -> Result<Self, ExchangeError> {
        Ok(Self {
            http: reqwest::Client::builder()
                .timeout(cfg.request_timeout)
                .build()
                .map_err(ExchangeError::Rest)?,
            base: cfg.rest_url.trim_end_matches('/').to_string(),
            tickers: per_minute(cfg.rest_tickers_per_minute),
            trades: TradeQueue::new(cfg.rest_trades_per_minute, cancel.clone()),
            candles: per_minute(cfg.rest_candles_per_minute),
            backoff: cfg.rest_backoff(),
            cancel,
        })
    }

    /// Waits until `endpoint`'s limiter (and, for trade history, the fair queue) lets a request
    /// go.
    async fn wait_turn(&self, endpoint: Endpoint, again: bool) -> Result<(), ExchangeError> {
        let limiter = match endpoint {
            Endpoint::Trades(class) => {
                return match self.trades.turn(class, again).await {
                    true => Ok(()),
                    false => Err(ExchangeError::Cancelled),
                };
            }
            Endpoint::Tickers | Endpoint::Pairs => &self.tickers,
            Endpoint::Candles => &self.candles,
        };
        if limiter.check().is_err() {
            metrics::counter!(metric::RATE_LIMIT_WAITS, "endpoint" => endpoint.label())
                .increment(1);
            limiter.until_ready().await;
        }
        Ok(())
    }

    /// One GET, after waiting for the endpoint's limiter; rate-limit answers are retried with
    /// backoff until they pass or the client is cancelled.
    async fn get(
        &self,
        endpoint: Endpoint,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<String, ExchangeError> {
        let label = endpoint.label();
        let asked = AtomicBool::new(false);
        let got = retry(
            self.backoff,
            &self.cancel,
            || self.get_once(endpoint, path, query, asked.swap(true, Ordering::Relaxed)),
            |e, wait| match e {
                ExchangeError::RateLimited(_) => {
                    tracing::warn!(
                        endpoint = label,
                        ?wait,
                        "Bitfinex rate limit hit; backing off"
                    );
                    Verdict::Retry
                }
                _ => Verdict::Fail,
            },
        )
        .await;
        match got {
            Ok(body) => Ok(body),
            Err(GaveUp::Failed(e)) => Err(e),
            Err(GaveUp::Stopped) => Err(ExchangeError::Cancelled),
        }
    }

    async fn get_once(
        &self,
        endpoint: Endpoint,
        path: &str,
        query: &[(&str, String)],
        again: bool,
    ) -> Result<String, ExchangeError> {
        let label = endpoint.label();
        self.wait_turn(endpoint, again).await?;
        let sent = self
            .http
            .get(format!("{}{path}", self.base))
            .query(query)
            .send()
            .await;
        let response = match sent {
            Ok(r) => r,
            Err(e) => {
                metrics::counter!(metric::REST_REQUESTS, "endpoint" => label, "outcome" => "error")
                    .increment(1);
                return Err(ExchangeError::Rest(e));
            }
        };
        let status = response.status();
        let body = response.text().await.map_err(ExchangeError::Rest)?;
        let rate_limited = status == reqwest::StatusCode::TOO_MANY_REQUESTS
            || matches!(
                parse_rest(&body),
                Ok(RestAnswer::Error {
                    code: Some(ERROR_RATE_LIMIT),
                    ..
                })
            );
        if rate_limited {
            metrics::counter!(metric::REST_REQUESTS, "endpoint" => label, "outcome" => "rate_limited").increment(1);
            return Err(ExchangeError::RateLimited(label));
        }
        if !status.is_success() {
            metrics::counter!(metric::REST_REQUESTS, "endpoint" => label, "outcome" => "error")
                .increment(1);
            return Err(ExchangeError::RestStatus {
                endpoint: label,
                status: status.as_u16(),
                body: truncate(&body).to_string(),
            });
        }
        metrics::counter!(metric::REST_REQUESTS, "endpoint" => label, "outcome" => "ok")
            .increment(1);
        Ok(body)
    }

    /// Rows of a history endpoint.
    async fn history(
        &self,
        endpoint: Endpoint,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<Vec<Vec<Option<f64>>>, ExchangeError> {
        let body = self.get(endpoint, path, query).await?;
        match parse_rest(&body) {
            Ok(RestAnswer::Rows(rows)) => Ok(rows),
            Ok(RestAnswer::Error { code, msg }) => {
                Err(ExchangeError::RestBody(format!("error {code:?}: {msg}")))
            }
            Err(e) => Err(ExchangeError::RestBody(format!("{e}: {}", truncate(&body)))),
        }
    }

    /// The current tickers of `symbols`; they carry no exchange time, so both times are the
    /// receive time.
    pub async fn tickers(&self, symbols: &[String]) -> Result<Vec<Tick>, ExchangeError> {
        let body = self
            .get(
                Endpoint::Tickers,
                "/v2/tickers",
                &[("symbols", symbols.join(","))],
            )
            .await?;
        let received_at = now_ms();
        let tickers: Vec<RestTicker> = serde_json::from_str(&body)
            .map_err(|e| ExchangeError::RestBody(format!("{e}: {}", truncate(&body))))?;
        let mut ticks = Vec::with_capacity(tickers.len());
        for t in tickers.into_iter().filter(|t| symbols.contains(&t.symbol)) {
            match TickerValues::from_raw(&t.values) {
                Ok(v) => {
                    ticks.push(v.into_tick(t.symbol, received_at, None, Source::Rest, received_at))
                }
                Err(e) => {
                    metrics::counter!(metric::TICKS_REJECTED).increment(1);
                    tracing::warn!(symbol = %t.symbol, error = %e, "REST ticker rejected");
                }
            }
        }
        Ok(ticks)
    }

    /// Every trading symbol Bitfinex lists (`tBTCUSD`, …).
    pub async fn pairs(&self) -> Result<Vec<String>, ExchangeError> {
        let body = self
            .get(Endpoint::Pairs, "/v2/conf/pub:list:pair:exchange", &[])
            .await?;
        parse_pair_list(&body)
            .map_err(|e| ExchangeError::RestBody(format!("{e}: {}", truncate(&body))))
    }

    /// Up to `limit` trades of `symbol` with `start_ms <= MTS <= end_ms`, oldest first, served
    /// as [`Class::Repair`]: what the verifier's heals use.
    pub async fn trades(
        &self,
        symbol: &str,
        start_ms: i64,
        end_ms: i64,
        limit: usize,
    ) -> Result<Vec<TradeEntry>, ExchangeError> {
        self.trades_as(Class::Repair, symbol, start_ms, end_ms, limit)
            .await
    }

    /// [`RestClient::trades`], served in turn as `class`.
    pub async fn trades_as(
        &self,
        class: Class,
        symbol: &str,
        start_ms: i64,
        end_ms: i64,
        limit: usize,
    ) -> Result<Vec<TradeEntry>, ExchangeError> {
        let path = format!("/v2/trades/{symbol}/hist");
        let query = window(start_ms, end_ms, limit);
        let rows = self.history(Endpoint::Trades(class), &path, &query).await?;
        Ok(rows.iter().map(|r| TradeValues::from_raw(r)).collect())
    }

    /// Bitfinex's own trade candles of `symbol` of width `timeframe` ("1m", "1h", "1D", …)
    /// starting in `[start_ms, end_ms]`, oldest first; windows without trades have none.
    pub async fn candles(
        &self,
        symbol: &str,
        timeframe: &str,
        start_ms: i64,
        end_ms: i64,
        limit: usize,
    ) -> Result<Vec<CandleValues>, ExchangeError> {
        let path = format!("/v2/candles/trade:{timeframe}:{symbol}/hist");
        let rows = self
            .history(Endpoint::Candles, &path, &window(start_ms, end_ms, limit))
            .await?;
        rows.iter()
            .map(|r| {
                CandleValues::from_row(r)
                    .ok_or_else(|| ExchangeError::RestBody(format!("candle row {r:?}")))
            })
            .collect()
    }
}

fn window(start_ms: i64, end_ms: i64, limit: usize) -> Vec<(&'static str, String)> {
    vec![
        ("start", start_ms.to_string()),
        ("end", end_ms.to_string()),
        ("limit", limit.to_string()),
        ("sort", "1".into()),
    ]
}

/// Polls REST for every subscription of the streamed symbols that the websocket does not cover
/// (all of them in `mode = "rest"`; at start, those still waiting for a connection): tickers in
/// one request, trades per symbol from the newest one seen (or the backfill horizon).
pub(super) async fn poll_uncovered(ctx: Arc<Ctx>) {
    let cfg = &ctx.cfg;
    let mut symbols = ctx.symbols.subscribe();
    let mut coverage = ctx.coverage.subscribe();
    let uncovered = |covered: &BTreeSet<Sub>| -> Vec<Sub> {
        subscriptions(cfg, ctx.symbols.current().iter())
            .into_iter()
            .filter(|s| !covered.contains(s))
            .collect()
    };
    // A failed poll is not repeated sooner than a regular one would be.
    let after_failure = Backoff::new(cfg.rest_poll_interval, cfg.rest_backoff_max);
    // The first wait gives the websocket time to subscribe before REST steps in.
    let mut polling = false;
    loop {
        if !sleep_or_cancel(cfg.rest_poll_interval, &ctx.cancel).await {
            return;
        }
        symbols.mark_unchanged();
        if uncovered(&coverage.borrow_and_update()).is_empty() {
            if polling {
                tracing::info!("websocket covers every channel again; REST polling stops");
                polling = false;
            }
            let all: BTreeSet<Sub> = subscriptions(cfg, ctx.symbols.current().iter())
                .into_iter()
                .collect();
            tokio::select! {
                biased;
                _ = ctx.cancel.cancelled() => return,
                _ = coverage.wait_for(|covered| !all.is_subset(covered)) => {}
                // New symbols: the websocket gets its poll interval to take them first.
                _ = symbols.changed() => continue,
            }
        }
        // Records fetched are sent even when the producer stops meanwhile.
        let polled = retry_letting_attempts_finish(
            after_failure,
            &ctx.cancel,
            || {
                // Each attempt polls what is uncovered now: the websocket may have come back.
                let subs = uncovered(&coverage.borrow());
                if !polling && !subs.is_empty() {
                    tracing::info!(
                        channels = subs.len(),
                        first = ?subs.first(),
                        "polling REST for channels without a websocket"
                    );
                    polling = true;
                }
                let ctx = &ctx;
                async move { poll_once(ctx, &subs).await }
            },
            |e, wait| {
                if !e.is_retryable() {
                    return Verdict::Fail;
                }
                tracing::warn!(error = %e, ?wait, "REST poll failed");
                Verdict::Retry
            },
        )
        .await;
        if polled.is_err() {
            // Stopped, or the pipeline behind the exchange stopped.
            return;
        }
    }
}

async fn poll_once(ctx: &Arc<Ctx>, uncovered: &[Sub]) -> Result<(), ExchangeError> {
    let tickers: Vec<String> = uncovered
        .iter()
        .filter(|s| s.channel == Channel::Ticker)
        .map(|s| s.symbol.clone())
        .collect();
    if !tickers.is_empty() {
        for tick in ctx.rest.tickers(&tickers).await? {
            metrics::counter!(metric::TICKS_RECEIVED, "source" => "rest").increment(1);
            ctx.send(Record::Tick(tick)).await?;
        }
    }
    // Each symbol's trades on their own: one symbol's backfill must not hold up the others' polls.
    // A poll of hundreds of symbols takes minutes under the trades limit: those a connection
    // took over, or that were delisted, meanwhile are skipped.
    let streamed = ctx.symbols.current();
    for sub in uncovered.iter().filter(|s| s.channel == Channel::Trades) {
        if ctx.coverage.covers(sub) || !streamed.contains(&sub.symbol) {
            continue;
        }
        trades::poll_beside(ctx, sub.symbol.clone());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Issue 18: one symbol with a huge backfill and five with small ones share the budget.
    /// Backfill pages go round the symbols, and a gap repair that comes up meanwhile takes the
    /// next slot.
    #[tokio::test]
    async fn backfill_pages_take_turns_and_a_repair_goes_first() {
        let cancel = CancellationToken::new();
        // One slot every 5 ms.
        let queue = TradeQueue::new(12_000, cancel.clone());
        let served: Arc<Mutex<Vec<String>>> = Arc::default();
        let mut backfills = tokio::task::JoinSet::new();
        for (symbol, pages) in [
            ("tHUGE", 60),
            ("tA", 3),
            ("tB", 3),
            ("tC", 3),
            ("tD", 3),
            ("tE", 3),
        ] {
            let (queue, served) = (queue.clone(), served.clone());
            backfills.spawn(async move {
                for _ in 0..pages {
                    assert!(queue.turn(Class::Routine, false).await);
                    served.lock().unwrap().push(symbol.to_string());
                    // The page's request and its trades.
                    tokio::task::yield_now().await;
                }
            });
        }
        while served.lock().unwrap().len() < 8 {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let before = served.lock().unwrap().len();
        assert!(queue.turn(Class::Repair, false).await);
        let waited_behind = served.lock().unwrap().len() - before;
        served.lock().unwrap().push("repair".into());
        while backfills.join_next().await.is_some() {}
        cancel.cancel();

        let served = served.lock().unwrap().clone();
        assert!(
            waited_behind <= 1,
            "the repair waited behind {waited_behind} backfill pages: {served:?}"
        );
        // Three rounds of all six symbols (the repair took one slot among them); then the huge
        // backfill alone.
        let rounds: Vec<String> = served.iter().filter(|s| *s != "repair").cloned().collect();
        for (i, round) in rounds[..18].chunks(6).enumerate() {
            let symbols: BTreeSet<&String> = round.iter().collect();
            assert_eq!(
                symbols.len(),
                6,
                "round {i} serves every symbol once: {served:?}"
            );
        }
        assert!(rounds[18..].iter().all(|s| s == "tHUGE"));
        assert_eq!(rounds.len(), 60 + 5 * 3);
        assert_eq!(size_of::<Waiter>(), 24, "the figure in the README");
    }

    #[tokio::test]
    async fn a_request_bitfinex_refused_goes_first_in_its_class() {
        let cancel = CancellationToken::new();
        // One slot every 50 ms.
        let queue = TradeQueue::new(1_200, cancel.clone());
        assert!(queue.turn(Class::Routine, false).await);
        let served: Arc<Mutex<Vec<&str>>> = Arc::default();
        let mut waiting = tokio::task::JoinSet::new();
        for (name, again) in [("next in line", false), ("refused, asked again", true)] {
            let (queue, served) = (queue.clone(), served.clone());
            waiting.spawn(async move {
                assert!(queue.turn(Class::Routine, again).await);
                served.lock().unwrap().push(name);
            });
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        while waiting.join_next().await.is_some() {}
        cancel.cancel();
        assert_eq!(
            *served.lock().unwrap(),
            ["refused, asked again", "next in line"]
        );
    }

    #[tokio::test]
    async fn a_caller_that_stops_waiting_passes_its_turn_on() {
        let cancel = CancellationToken::new();
        // One slot a second: the first passes at once, the next waits.
        let queue = TradeQueue::new(60, cancel.clone());
        assert!(queue.turn(Class::Routine, false).await);
        let gave_up = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            queue.turn(Class::Routine, false),
        )
        .await;
        assert!(gave_up.is_err(), "the second slot is a second away");
        let started = Instant::now();
        assert!(queue.turn(Class::Repair, false).await);
        let waited = started.elapsed();
        assert!(
            waited < std::time::Duration::from_millis(1_100),
            "the slot went to the next in line: {waited:?}"
        );
        cancel.cancel();
        assert!(
            !queue.turn(Class::Repair, false).await,
            "cancelled: no turn, no wait"
        );
    }
}
