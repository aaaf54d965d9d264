//! The fake exchange's trading: a ledger of every executed trade (whether or not anybody is
//! subscribed), the trades channel's snapshot, `GET /v2/trades/{symbol}/hist` and
//! `GET /v2/candles/trade:{TF}:{symbol}/hist` (1m to 1D) computed from the ledger, rate-limit
//! refusals now and then, 1-minute candle overrides for audit and verify tests, a log of trade
//! history requests, and a background [`Trader`].
//!
//! Values are exact decimals: prices are whole cents, amounts whole 1e-8 units, so every value
//! prints and parses back to the same `f64`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::fake_bitfinex::{FakeBitfinex, Inner};

/// One executed trade. A negative `amount` is a sell; `mts` is the execution time in ms.
#[derive(Debug, Clone, PartialEq)]
pub struct Trade {
    pub symbol: String,
    pub id: i64,
    pub mts: i64,
    pub amount: f64,
    pub price: f64,
}

impl Trade {
    /// `[ID, MTS, AMOUNT, PRICE]`, with undocumented trailing fields when `extra`.
    pub fn to_json(&self, extra: bool) -> Value {
        let mut row = json!([self.id, self.mts, number(self.amount), number(self.price)]);
        if extra {
            row.as_array_mut()
                .unwrap()
                .extend([json!(null), json!("NEW_FIELD"), json!([1, 2])]);
        }
        row
    }

    fn key(&self) -> (i64, i64) {
        (self.mts, self.id)
    }
}

/// A whole value as a JSON integer, as Bitfinex writes it (`97321`, not `97321.0`).
fn number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 9.0e15 {
        json!(x as i64)
    } else {
        json!(x)
    }
}

/// Trade ids start here (the fixtures' ids are about 1.78e9).
const FIRST_ID: i64 = 1_790_000_001;
/// How many trades one taker order fills, in turn: some orders fill 2-4 makers in one ms.
const GROUP_SIZES: [usize; 8] = [1, 3, 1, 2, 1, 4, 1, 2];
/// Amount magnitudes in 1e-8 units: 0.0125, 2.05031, 0.3, 0.00062, 1.5, 0.01, 0.104, 0.00001,
/// 0.0481, 0.2, 0.000731, 0.12345678.
const AMOUNT_UNITS: [i64; 12] = [
    1_250_000,
    205_031_000,
    30_000_000,
    62_000,
    150_000_000,
    1_000_000,
    10_400_000,
    1_000,
    4_810_000,
    20_000_000,
    73_100,
    12_345_678,
];
const MINUTE_MS: i64 = 60_000;
/// Bitfinex's candle timeframes of fixed width, aligned to the epoch (UTC midnight).
const TIMEFRAMES: [(&str, i64); 9] = [
    ("1m", MINUTE_MS),
    ("5m", 5 * MINUTE_MS),
    ("15m", 15 * MINUTE_MS),
    ("30m", 30 * MINUTE_MS),
    ("1h", 60 * MINUTE_MS),
    ("3h", 180 * MINUTE_MS),
    ("6h", 360 * MINUTE_MS),
    ("12h", 720 * MINUTE_MS),
    ("1D", 1440 * MINUTE_MS),
];
pub const HIST_LIMIT_MAX: usize = 10_000;
pub const TRADES_LIMIT_DEFAULT: usize = 125;
pub const CANDLES_LIMIT_DEFAULT: usize = 100;

/// The ledger and everything derived from it; lives under the exchange's lock.
#[derive(Default)]
pub(super) struct TradeBook {
    ledger: Vec<Trade>,
    /// Trades sent as `te` to a subscribed client, in order.
    sent: Vec<Trade>,
    next_id: i64,
    last_mts: i64,
    /// Taker orders so far (picks group sizes and sides).
    orders: u64,
    /// Trades so far per symbol (picks prices and amounts).
    per_symbol: HashMap<String, u64>,
    live: bool,
    overrides: HashMap<(String, i64), Option<[f64; 5]>>,
}

impl TradeBook {
    fn next_id(&mut self) -> i64 {
        if self.next_id == 0 {
            self.next_id = FIRST_ID;
        }
        self.next_id += 1;
        self.next_id - 1
    }

    /// Executes `count` trades of `symbol` as taker orders of 1-4 fills each; every order gets
    /// its own millisecond, from `mts_of(order index, order count)` but never earlier than the
    /// previous trade's.
    fn generate(
        &mut self,
        symbol: &str,
        count: usize,
        mut mts_of: impl FnMut(usize, usize) -> i64,
    ) -> Vec<Trade> {
        let mut sizes = Vec::new();
        let mut left = count;
        let mut order = self.orders;
        while left > 0 {
            let size = GROUP_SIZES[(order % GROUP_SIZES.len() as u64) as usize].min(left);
            sizes.push(size);
            left -= size;
            order += 1;
        }
        // Base price, distance between order price levels and between the fills of one order,
        // in cents.
        let (base_cents, level_step, fill_step): (i64, i64, i64) = match symbol {
            "tBTCUSD" => (9_700_000, 500, 50),
            "tETHUSD" => (350_000, 100, 10),
            "tSOLUSD" => (20_000, 100, 10),
            _ => (10_000, 100, 10),
        };
        let mut out = Vec::with_capacity(count);
        for (g, size) in sizes.iter().enumerate() {
            let order = self.orders;
            self.orders += 1;
            let sell = (order * 7 + 3) % 5 < 2;
            let mts = mts_of(g, sizes.len()).max(self.last_mts + 1);
            self.last_mts = mts;
            let n0 = *self.per_symbol.get(symbol).unwrap_or(&0);
            // 97 order price levels (buys walk up the book from theirs, sells down), plus a few
            // cents so that neighbours differ.
            let level = (n0 * 37 % 97) as i64 - 48;
            let order_cents = base_cents + level * level_step + (n0 % 10) as i64;
            for j in 0..*size {
                let n = self.per_symbol.entry(symbol.to_string()).or_insert(0);
                let k = *n;
                *n += 1;
                let units = AMOUNT_UNITS[(k % AMOUNT_UNITS.len() as u64) as usize]
                    + (k / AMOUNT_UNITS.len() as u64 % 100) as i64 * 1_000;
                let step = if sell { -fill_step } else { fill_step };
                let cents = order_cents + j as i64 * step;
                let signed_units = if sell { -units } else { units };
                let trade = Trade {
                    symbol: symbol.to_string(),
                    id: self.next_id(),
                    mts,
                    amount: signed_units as f64 / 1e8,
                    price: cents as f64 / 100.0,
                };
                self.ledger.push(trade.clone());
                out.push(trade);
            }
        }
        out
    }

    pub(super) fn execute(&mut self, symbol: &str, count: usize, now_ms: i64) -> Vec<Trade> {
        self.live = true;
        self.generate(symbol, count, |_, _| now_ms)
    }

    fn preload(&mut self, symbol: &str, from_ms: i64, to_ms: i64, count: usize) -> Vec<Trade> {
        assert!(
            !self.live,
            "preload_history must be called before live trading"
        );
        assert!(
            from_ms <= to_ms,
            "preload_history: from_ms {from_ms} > to_ms {to_ms}"
        );
        let span = to_ms - from_ms;
        // `generate` keeps MTS from going backwards; history is put in as if it had happened
        // apart, so ask for the window's own times here.
        let last = self.last_mts;
        self.last_mts = from_ms - 1;
        let trades = self.generate(symbol, count, |g, groups| {
            if groups <= 1 {
                from_ms
            } else {
                from_ms + (span as i128 * g as i128 / (groups as i128 - 1)) as i64
            }
        });
        self.last_mts = self.last_mts.max(last);
        trades
    }

    fn load(&mut self, trades: Vec<Trade>) {
        self.next_id = trades
            .iter()
            .map(|t| t.id + 1)
            .max()
            .unwrap_or(0)
            .max(self.next_id);
        self.last_mts = trades
            .iter()
            .map(|t| t.mts)
            .max()
            .unwrap_or(0)
            .max(self.last_mts);
        self.ledger = trades;
    }

    pub(super) fn record_sent(&mut self, trade: Trade) {
        self.sent.push(trade);
    }

    /// The most recent `n` trades of `symbol`, newest first.
    pub(super) fn snapshot(&self, symbol: &str, n: usize) -> Vec<Trade> {
        let mut mine: Vec<&Trade> = self.ledger.iter().filter(|t| t.symbol == symbol).collect();
        mine.sort_by_key(|t| std::cmp::Reverse(t.key()));
        mine.into_iter().take(n).cloned().collect()
    }

    fn trades_hist(&self, symbol: &str, q: &HistQuery) -> Vec<Value> {
        let mut mine: Vec<&Trade> = self
            .ledger
            .iter()
            .filter(|t| t.symbol == symbol && q.contains(t.mts))
            .collect();
        mine.sort_by_key(|t| t.key());
        if !q.oldest_first() {
            mine.reverse();
        }
        mine.into_iter()
            .take(q.limit(TRADES_LIMIT_DEFAULT))
            .map(|t| t.to_json(false))
            .collect()
    }

    /// Candles `[OPEN, CLOSE, HIGH, LOW, VOLUME]` of `width_ms` by start, computed from the
    /// ledger; 1-minute ones with the overrides applied.
    fn candles(&self, symbol: &str, width_ms: i64) -> BTreeMap<i64, [f64; 5]> {
        let mut mine: Vec<&Trade> = self.ledger.iter().filter(|t| t.symbol == symbol).collect();
        mine.sort_by_key(|t| t.key());
        let mut minutes: BTreeMap<i64, ([f64; 4], i64)> = BTreeMap::new();
        for t in mine {
            let minute = t.mts - t.mts.rem_euclid(width_ms);
            // Volume summed in whole 1e-8 units, so it is the exact decimal sum.
            let units = (t.amount.abs() * 1e8).round() as i64;
            let e = minutes
                .entry(minute)
                .or_insert(([t.price, t.price, t.price, t.price], 0));
            e.0[1] = t.price;
            e.0[2] = e.0[2].max(t.price);
            e.0[3] = e.0[3].min(t.price);
            e.1 += units;
        }
        let mut rows: BTreeMap<i64, [f64; 5]> = minutes
            .into_iter()
            .map(|(m, (p, units))| (m, [p[0], p[1], p[2], p[3], units as f64 / 1e8]))
            .collect();
        for ((s, minute), row) in &self.overrides {
            if s == symbol && width_ms == MINUTE_MS {
                match row {
                    Some(row) => rows.insert(*minute, *row),
                    None => rows.remove(minute),
                };
            }
        }
        rows
    }

    fn candles_hist(&self, symbol: &str, width_ms: i64, q: &HistQuery) -> Vec<Value> {
        let rows = self.candles(symbol, width_ms);
        let mut rows: Vec<(i64, [f64; 5])> =
            rows.into_iter().filter(|(m, _)| q.contains(*m)).collect();
        if !q.oldest_first() {
            rows.reverse();
        }
        rows.into_iter()
            .take(q.limit(CANDLES_LIMIT_DEFAULT))
            .map(|(m, r)| {
                json!([
                    m,
                    number(r[0]),
                    number(r[1]),
                    number(r[2]),
                    number(r[3]),
                    number(r[4])
                ])
            })
            .collect()
    }
}

/// (symbol, start, end) of one history request.
pub type HistRequest = (String, Option<i64>, Option<i64>);

/// Trades settings and REST counters, outside the lock.
pub(super) struct TradeSettings {
    snapshot_len: AtomicUsize,
    tu_delay_ns: AtomicU64,
    /// 0: no rate limiting.
    rate_limit_every: AtomicU64,
    hist_requests: AtomicU64,
    trades_requests: AtomicU64,
    candles_requests: AtomicU64,
    /// (symbol, start, end) of every trades history request, in order.
    trades_queries: std::sync::Mutex<Vec<HistRequest>>,
    /// When each hist request arrived: (time, "trades" or "candles", symbol), in order.
    arrivals: std::sync::Mutex<Vec<(Instant, &'static str, String)>>,
    rate_limited: AtomicU64,
    te_frames: AtomicU64,
    tu_frames: AtomicU64,
    /// Serialises [`FakeBitfinex::execute`] callers up to queueing their `te` frames.
    pub(super) execution: tokio::sync::Mutex<()>,
}

impl Default for TradeSettings {
    fn default() -> Self {
        Self {
            snapshot_len: AtomicUsize::new(30),
            tu_delay_ns: AtomicU64::new(100_000_000),
            rate_limit_every: AtomicU64::new(0),
            hist_requests: AtomicU64::new(0),
            trades_requests: AtomicU64::new(0),
            candles_requests: AtomicU64::new(0),
            trades_queries: std::sync::Mutex::new(Vec::new()),
            arrivals: std::sync::Mutex::new(Vec::new()),
            rate_limited: AtomicU64::new(0),
            te_frames: AtomicU64::new(0),
            tu_frames: AtomicU64::new(0),
            execution: tokio::sync::Mutex::new(()),
        }
    }
}

impl TradeSettings {
    pub(super) fn snapshot_len(&self) -> usize {
        self.snapshot_len.load(Ordering::SeqCst)
    }

    pub(super) fn tu_delay(&self) -> Duration {
        Duration::from_nanos(self.tu_delay_ns.load(Ordering::SeqCst))
    }

    pub(super) fn count_frame(&self, kind: &str) {
        let counter = if kind == "te" {
            &self.te_frames
        } else {
            &self.tu_frames
        };
        counter.fetch_add(1, Ordering::SeqCst);
    }

    fn arrived(&self, endpoint: &'static str, symbol: &str) {
        self.arrivals
            .lock()
            .unwrap()
            .push((Instant::now(), endpoint, symbol.to_string()));
    }

    /// Counts a hist request; `Some(refusal)` when this one is to be refused.
    fn refuse(&self) -> Option<Response> {
        let n = self.hist_requests.fetch_add(1, Ordering::SeqCst) + 1;
        let every = self.rate_limit_every.load(Ordering::SeqCst);
        if every == 0 || !n.is_multiple_of(every) {
            return None;
        }
        let refusal = self.rate_limited.fetch_add(1, Ordering::SeqCst) + 1;
        // Bitfinex answers its rate limit with either status; the 11010 body is what counts.
        let status = if refusal % 2 == 1 {
            StatusCode::TOO_MANY_REQUESTS
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        };
        Some((status, Json(json!(["error", 11010, "ratelimit: error"]))).into_response())
    }
}

impl FakeBitfinex {
    /// Executes `count` trades of `symbol` now: wall-clock MTS (never earlier than the previous
    /// trade), taker orders of 1-4 fills sharing one millisecond with consecutive ids, buys and
    /// sells, distinct deterministic prices and amounts. Appends them to the ledger and sends
    /// each as `te` (then, after [`FakeBitfinex::set_tu_delay`], as `tu`) to the client
    /// subscribed to `symbol`'s trades channel, if any and not in maintenance. Returns them all,
    /// sent or not.
    pub async fn execute(&self, symbol: &str, count: usize) -> Vec<Trade> {
        self.handle().execute(symbol, count).await
    }

    /// Puts `count` trades of `symbol` spread over `[from_ms, to_ms]` into the ledger, as history
    /// from before the test; nothing is sent. Panics once live trading ([`FakeBitfinex::execute`])
    /// has begun. Ids increase with MTS within each call; preloading a second symbol over the
    /// same window gives it higher ids than the first symbol's.
    pub fn preload_history(
        &self,
        symbol: &str,
        from_ms: i64,
        to_ms: i64,
        count: usize,
    ) -> Vec<Trade> {
        self.inner
            .exchange
            .lock()
            .unwrap()
            .book
            .preload(symbol, from_ms, to_ms, count)
    }

    /// Replaces the ledger with exactly these trades (e.g. a fixture's); later trades get higher
    /// ids and no earlier MTS.
    pub fn load_ledger(&self, trades: Vec<Trade>) {
        self.inner.exchange.lock().unwrap().book.load(trades);
    }

    /// Every executed trade, in execution order (preloaded history first).
    pub fn ledger(&self) -> Vec<Trade> {
        self.inner.exchange.lock().unwrap().book.ledger.clone()
    }

    /// Trades that went out as `te` to a subscribed client, in order.
    pub fn trades_sent(&self) -> Vec<Trade> {
        self.inner.exchange.lock().unwrap().book.sent.clone()
    }

    /// Symbols with a live trades subscription, sorted.
    pub fn trades_subscribed(&self) -> Vec<String> {
        let mut s: Vec<String> = self
            .inner
            .exchange
            .lock()
            .unwrap()
            .trade_subs
            .keys()
            .cloned()
            .collect();
        s.sort();
        s
    }

    /// Waits until every symbol has a live trades subscription.
    pub async fn wait_trades_subscribed(&self, symbols: &[&str], timeout: Duration) {
        let what = format!("trades subscriptions of {symbols:?}");
        super::eventually(&what, timeout, || {
            super::fake_bitfinex::covers(&self.trades_subscribed(), symbols)
        })
        .await;
    }

    /// How many trades a trades snapshot holds at most (default 30).
    pub fn set_snapshot_len(&self, n: usize) {
        self.inner.trades.snapshot_len.store(n, Ordering::SeqCst);
    }

    /// How long after `te` the same trade is sent again as `tu` (default 100 ms).
    pub fn set_tu_delay(&self, d: Duration) {
        self.inner
            .trades
            .tu_delay_ns
            .store(d.as_nanos() as u64, Ordering::SeqCst);
    }

    /// `Some(n)`: every n-th request to the two hist endpoints (counted together) is refused with
    /// `["error",11010,"ratelimit: error"]`, as HTTP 429 for the 1st, 3rd, … refusal and HTTP 500
    /// for the 2nd, 4th, …. `None` (or `Some(0)`): never.
    pub fn set_rate_limit_every(&self, n: Option<u64>) {
        self.inner
            .trades
            .rate_limit_every
            .store(n.unwrap_or(0), Ordering::SeqCst);
    }

    /// Requests received by `"tickers"`, `"trades"` or `"candles"` (refused ones included); 0 for
    /// anything else.
    pub fn rest_requests_by(&self, endpoint: &str) -> u64 {
        match endpoint {
            "tickers" => self.rest_requests(),
            "trades" => self.inner.trades.trades_requests.load(Ordering::SeqCst),
            "candles" => self.inner.trades.candles_requests.load(Ordering::SeqCst),
            _ => 0,
        }
    }

    /// When each request to `"trades"` or `"candles"` history arrived, with its symbol, in order
    /// (candles requests with a key that names no symbol are left out).
    pub fn rest_arrivals(&self, endpoint: &str) -> Vec<(Instant, String)> {
        self.inner
            .trades
            .arrivals
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, e, _)| *e == endpoint)
            .map(|(t, _, s)| (*t, s.clone()))
            .collect()
    }

    /// The most requests to `"trades"` or `"candles"` history that arrived within any `window`.
    pub fn most_rest_requests_within(&self, endpoint: &str, window: Duration) -> usize {
        let times: Vec<Instant> = self
            .rest_arrivals(endpoint)
            .into_iter()
            .map(|(t, _)| t)
            .collect();
        (0..times.len())
            .map(|i| {
                times[i..]
                    .iter()
                    .take_while(|t| **t - times[i] < window)
                    .count()
            })
            .max()
            .unwrap_or(0)
    }

    /// Hist requests refused with 11010 so far.
    pub fn rate_limited(&self) -> u64 {
        self.inner.trades.rate_limited.load(Ordering::SeqCst)
    }

    /// `Some([open, close, high, low, volume])`: the candles endpoint answers this row for the
    /// minute (even one without trades) instead of the computed one; `None`: it hides the
    /// minute's row. `minute_ms` is rounded down to its minute.
    pub fn override_candle(&self, symbol: &str, minute_ms: i64, row: Option<[f64; 5]>) {
        let minute = minute_ms - minute_ms.rem_euclid(MINUTE_MS);
        self.inner
            .exchange
            .lock()
            .unwrap()
            .book
            .overrides
            .insert((symbol.to_string(), minute), row);
    }

    /// The 1-minute candles the endpoint would answer for `symbol`, overrides applied, by minute:
    /// `[open, close, high, low, volume]`.
    pub fn candles(&self, symbol: &str) -> BTreeMap<i64, [f64; 5]> {
        self.candles_of(symbol, MINUTE_MS)
    }

    /// Like [`FakeBitfinex::candles`] for candles of `width_ms` (1-minute overrides apply only to
    /// 1-minute candles).
    pub fn candles_of(&self, symbol: &str, width_ms: i64) -> BTreeMap<i64, [f64; 5]> {
        self.inner
            .exchange
            .lock()
            .unwrap()
            .book
            .candles(symbol, width_ms)
    }

    /// From now on the 1-minute candle of `symbol` at `minute_ms` reports `high` instead of its
    /// own; the trades and every other candle stay as executed.
    pub fn report_wrong_high(&self, symbol: &str, minute_ms: i64, high: f64) {
        let minute = minute_ms - minute_ms.rem_euclid(MINUTE_MS);
        let [open, close, _, low, volume] = *self
            .candles(symbol)
            .get(&minute)
            .expect("a minute with trades");
        self.override_candle(symbol, minute, Some([open, close, high, low, volume]));
    }

    /// (symbol, start, end) of every `/v2/trades/{symbol}/hist` request so far, in order.
    pub fn trades_queries(&self) -> Vec<HistRequest> {
        self.inner.trades.trades_queries.lock().unwrap().clone()
    }

    /// Numbers of `te` and `tu` frames sent over websocket so far.
    pub fn trade_frames_sent(&self) -> (u64, u64) {
        let t = &self.inner.trades;
        (
            t.te_frames.load(Ordering::SeqCst),
            t.tu_frames.load(Ordering::SeqCst),
        )
    }
}

#[derive(Debug, Default, serde::Deserialize)]
pub(super) struct HistQuery {
    start: Option<i64>,
    end: Option<i64>,
    limit: Option<i64>,
    sort: Option<i64>,
}

impl HistQuery {
    fn contains(&self, mts: i64) -> bool {
        self.start.is_none_or(|s| s <= mts) && self.end.is_none_or(|e| mts <= e)
    }

    fn oldest_first(&self) -> bool {
        self.sort == Some(1)
    }

    fn limit(&self, default: usize) -> usize {
        self.limit
            .map_or(default, |l| l.clamp(1, HIST_LIMIT_MAX as i64) as usize)
    }
}

/// `GET /v2/trades/{symbol}/hist?start=&end=&limit=&sort=`
pub(super) async fn trades_hist(
    State(inner): State<Arc<Inner>>,
    Path(symbol): Path<String>,
    Query(q): Query<HistQuery>,
) -> Response {
    inner.trades.trades_requests.fetch_add(1, Ordering::SeqCst);
    inner.trades.arrived("trades", &symbol);
    inner
        .trades
        .trades_queries
        .lock()
        .unwrap()
        .push((symbol.clone(), q.start, q.end));
    if let Some(refusal) = inner.trades.refuse() {
        return refusal;
    }
    let rows = inner.exchange.lock().unwrap().book.trades_hist(&symbol, &q);
    Json(Value::Array(rows)).into_response()
}

/// `GET /v2/candles/trade:{TF}:{symbol}/hist?start=&end=&limit=&sort=`
pub(super) async fn candles_hist(
    State(inner): State<Arc<Inner>>,
    Path(key): Path<String>,
    Query(q): Query<HistQuery>,
) -> Response {
    inner.trades.candles_requests.fetch_add(1, Ordering::SeqCst);
    if let Some(refusal) = inner.trades.refuse() {
        return refusal;
    }
    let width = |tf: &str| TIMEFRAMES.iter().find(|(t, _)| *t == tf).map(|(_, w)| *w);
    let (symbol, width_ms) = match key.split(':').collect::<Vec<_>>()[..] {
        ["trade", tf, symbol] if !symbol.is_empty() && width(tf).is_some() => {
            (symbol.to_string(), width(tf).unwrap())
        }
        ["trade", _, _] => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!(["error", 10020, "time_interval: invalid"])),
            )
                .into_response();
        }
        _ => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!(["error", 10020, "key: invalid"])),
            )
                .into_response();
        }
    };
    inner.trades.arrived("candles", &symbol);
    let rows = inner
        .exchange
        .lock()
        .unwrap()
        .book
        .candles_hist(&symbol, width_ms, &q);
    Json(Value::Array(rows)).into_response()
}

/// Background trading, like `pipeline::Emitter` for tickers: `per_round` trades per symbol every
/// `pause` until stopped.
pub struct Trader {
    stop: CancellationToken,
    task: JoinHandle<usize>,
}

impl Trader {
    pub fn start(
        exchange: &FakeBitfinex,
        symbols: &[&str],
        per_round: usize,
        pause: Duration,
    ) -> Self {
        let stop = CancellationToken::new();
        let token = stop.clone();
        let exchange = exchange.handle();
        let symbols: Vec<String> = symbols.iter().map(|s| s.to_string()).collect();
        let task = tokio::spawn(async move {
            let mut n = 0;
            while !token.is_cancelled() {
                for s in &symbols {
                    n += exchange.execute(s, per_round).await.len();
                }
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = token.cancelled() => {}
                }
            }
            n
        });
        Self { stop, task }
    }

    /// Stops trading; returns how many trades it executed (sent to a client or not).
    pub async fn stop(self) -> usize {
        self.stop.cancel();
        self.task.await.unwrap()
    }
}
