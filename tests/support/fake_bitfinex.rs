//! A local exchange speaking Bitfinex's public v2 protocol: the info event, conf,
//! subscribe/subscribed/unsubscribe, ticker updates with SEQ_ALL + TIMESTAMP, heartbeats,
//! info 20051/20060/20061, abrupt closes and garbage, plus `GET /v2/tickers` and
//! `GET /v2/conf/pub:list:pair:exchange` on a second port.
//!
//! Bitfinex's websocket limits are enforced and every refusal counted: the subscribe beyond
//! `channels_per_connection` (25) channels of one connection gets error 10305, and an upgrade
//! beyond `upgrades` per rolling `window` (600 per minute unless a test sets Bitfinex's 20, or a
//! scaled equivalent) gets HTTP 429. Once a test sets a listing, a subscribe to a symbol it does
//! not hold gets error 10300.
//! Trades channels, the trade ledger and the trade/candle history endpoints are in
//! [`super::fake_trades`].

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_util::sync::CancellationToken;

use super::fake_trades::{self, TradeBook, TradeSettings};
// Re-exported so that tests find the trading types next to the exchange.
#[allow(unused_imports)]
pub use super::fake_trades::{Trade, Trader};

/// An update the exchange put on the wire for a subscribed client (or answered over REST).
#[derive(Debug, Clone, PartialEq)]
pub struct Sent {
    pub symbol: String,
    pub values: [f64; 10],
    /// Exchange time for websocket updates; `None` for REST answers (they carry none).
    pub exchange_time: Option<i64>,
    pub seq: Option<u64>,
    pub rest: bool,
}

impl Sent {
    pub fn last_price(&self) -> f64 {
        self.values[6]
    }

    /// What tells this update apart from every other: its volume is unique per symbol and update.
    pub fn key(&self) -> (String, u64) {
        (self.symbol.clone(), self.values[7].to_bits())
    }
}

enum Command {
    Update {
        symbol: String,
        done: oneshot::Sender<Option<Sent>>,
    },
    Raw(String),
    Info(u32, oneshot::Sender<()>),
    /// Closes TCP without a websocket close frame, after flushing what was sent.
    Drop(oneshot::Sender<()>),
    /// Skips sequence numbers, as if messages were lost on the way.
    SkipSeq(u64, oneshot::Sender<()>),
    /// Keeps the socket open but sends nothing more, not even heartbeats.
    Silence(oneshot::Sender<()>),
    /// `te` frames for trades just executed, on trades channel `chan`; answers whether they went
    /// out.
    TradesExecuted {
        chan: u64,
        trades: Vec<Trade>,
        done: oneshot::Sender<bool>,
    },
    /// The deferred `tu` frames repeating trades already sent as `te` on `chan`.
    TradesUpdated {
        chan: u64,
        trades: Vec<Trade>,
    },
}

/// The kind of a channel a client subscribed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Channel {
    Ticker,
    Trades,
}

impl Channel {
    fn name(self) -> &'static str {
        match self {
            Channel::Ticker => "ticker",
            Channel::Trades => "trades",
        }
    }
}

pub(super) struct Subscription {
    pub(super) conn: u64,
    pub(super) chan_id: u64,
}

#[derive(Default)]
pub(super) struct Exchange {
    conns: HashMap<u64, mpsc::Sender<Command>>,
    /// Ticker subscriptions by symbol.
    subs: HashMap<String, Subscription>,
    /// Trades subscriptions by symbol.
    pub(super) trade_subs: HashMap<String, Subscription>,
    paused: bool,
    sent: Vec<Sent>,
    /// Latest values per symbol, served over REST too.
    prices: HashMap<String, u64>,
    /// Every executed trade, and what went out as `te`.
    pub(super) book: TradeBook,
}

pub(super) struct Inner {
    pub(super) exchange: Mutex<Exchange>,
    accepting: AtomicBool,
    next_conn: AtomicU64,
    next_chan: AtomicU64,
    ws_connections: AtomicU64,
    /// When set, updates carry fields the documentation does not list yet.
    extra_fields: AtomicBool,
    rest_requests: AtomicU64,
    /// Last exchange time handed out.
    clock: AtomicU64,
    /// `Some(step)`: synthetic time advancing by `step` per frame; `None`: wall clock, kept
    /// strictly increasing like the real exchange's.
    time_step_ms: Option<u64>,
    heartbeat: Duration,
    /// Trades settings and counters (snapshot length, `tu` delay, rate limiting).
    pub(super) trades: TradeSettings,
    /// Bitfinex's websocket limits and what they refused.
    limits: Mutex<WsLimits>,
    /// Trading pairs (`BTCUSD`, without the `t`) served by the listing endpoint; `None`: no
    /// listing, and every symbol may be subscribed.
    listing: Mutex<Option<BTreeSet<String>>>,
    listing_requests: AtomicU64,
    /// How long each subscribe waits before it is handled (on its connection, in order).
    subscribe_delay: Mutex<Duration>,
    /// The symbol of every subscribe received, before the delay, in order.
    subscribes_received: Mutex<Vec<String>>,
}

/// Bitfinex's websocket limits, as enforced by the fake, and the refusals they made.
pub struct WsLimits {
    pub channels_per_connection: usize,
    /// At most this many upgrades (refused ones included) per rolling `window`.
    pub upgrades: usize,
    pub window: Duration,
    /// When each upgrade was asked for, oldest first, and whether it was admitted.
    upgrade_times: Vec<(Instant, bool)>,
    refused_upgrades: u64,
    refused_channels: u64,
    /// Subscribes refused with 10300 (symbol not listed).
    refused_symbols: u64,
}

impl Default for WsLimits {
    /// Bitfinex's 25 channels per connection; 600 upgrades a minute, what the tests' settings
    /// let the producer open (Bitfinex's 20 a minute, scaled as the tests scale time).
    fn default() -> Self {
        Self {
            channels_per_connection: 25,
            upgrades: 600,
            window: Duration::from_secs(60),
            upgrade_times: Vec::new(),
            refused_upgrades: 0,
            refused_channels: 0,
            refused_symbols: 0,
        }
    }
}

impl WsLimits {
    /// Records an upgrade asked for now; true when it is within the limit.
    fn admit_upgrade(&mut self) -> bool {
        let now = Instant::now();
        let in_window = self
            .upgrade_times
            .iter()
            .rev()
            .take_while(|(t, _)| now.duration_since(*t) < self.window)
            .count();
        let admitted = in_window < self.upgrades;
        self.upgrade_times.push((now, admitted));
        if !admitted {
            self.refused_upgrades += 1;
        }
        admitted
    }

    /// The most upgrades asked for within any `window` (refused ones included).
    fn most_upgrades_within(&self, window: Duration) -> usize {
        let t = &self.upgrade_times;
        (0..t.len())
            .map(|i| {
                t[i..]
                    .iter()
                    .take_while(|(x, _)| x.duration_since(t[i].0) < window)
                    .count()
            })
            .max()
            .unwrap_or(0)
    }
}

pub struct FakeBitfinex {
    pub ws_addr: SocketAddr,
    pub rest_addr: SocketAddr,
    pub(super) inner: Arc<Inner>,
    stop: CancellationToken,
}

impl FakeBitfinex {
    /// Wall-clock exchange times; heartbeats every second (Bitfinex: 15 s) so that the short
    /// watchdogs of tests only fire on real faults.
    pub async fn start() -> Self {
        Self::start_with(None, Duration::from_secs(1)).await
    }

    /// Synthetic exchange times from `start_ms`, advancing `step_ms` per frame.
    pub async fn start_synthetic(start_ms: u64, step_ms: u64) -> Self {
        Self::start_with(Some((start_ms, step_ms)), Duration::from_secs(1)).await
    }

    pub async fn start_with(synthetic: Option<(u64, u64)>, heartbeat: Duration) -> Self {
        let inner = Arc::new(Inner {
            exchange: Mutex::new(Exchange::default()),
            accepting: AtomicBool::new(true),
            next_conn: AtomicU64::new(1),
            next_chan: AtomicU64::new(100_000),
            ws_connections: AtomicU64::new(0),
            extra_fields: AtomicBool::new(false),
            rest_requests: AtomicU64::new(0),
            clock: AtomicU64::new(synthetic.map_or(0, |(start, step)| start - step)),
            time_step_ms: synthetic.map(|(_, step)| step),
            heartbeat,
            trades: TradeSettings::default(),
            limits: Mutex::new(WsLimits::default()),
            listing: Mutex::new(None),
            listing_requests: AtomicU64::new(0),
            subscribe_delay: Mutex::new(Duration::ZERO),
            subscribes_received: Mutex::new(Vec::new()),
        });
        let stop = CancellationToken::new();
        let ws = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ws_addr = ws.local_addr().unwrap();
        tokio::spawn(accept_loop(ws, inner.clone(), stop.clone()));
        let rest = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let rest_addr = rest.local_addr().unwrap();
        let app = Router::new()
            .route("/v2/tickers", get(tickers))
            .route("/v2/conf/pub:list:pair:exchange", get(pair_list))
            .route("/v2/trades/{symbol}/hist", get(fake_trades::trades_hist))
            .route("/v2/candles/{key}/hist", get(fake_trades::candles_hist))
            .with_state(inner.clone());
        let token = stop.clone();
        tokio::spawn(async move {
            axum::serve(rest, app)
                .with_graceful_shutdown(token.cancelled_owned())
                .await
                .unwrap();
        });
        Self {
            ws_addr,
            rest_addr,
            inner,
            stop,
        }
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws/2", self.ws_addr)
    }

    pub fn rest_url(&self) -> String {
        format!("http://{}", self.rest_addr)
    }

    /// When false, websocket handshakes are answered with HTTP 503.
    pub fn set_accepting(&self, accepting: bool) {
        self.inner.accepting.store(accepting, Ordering::SeqCst);
    }

    /// Appends undocumented fields to every update array and frame from now on.
    pub fn set_extra_fields(&self, on: bool) {
        self.inner.extra_fields.store(on, Ordering::SeqCst);
    }

    pub fn ws_connections(&self) -> u64 {
        self.inner.ws_connections.load(Ordering::SeqCst)
    }

    /// Enforces `channels` per connection and `upgrades` per rolling `window` from now on.
    pub fn set_ws_limits(&self, channels: usize, upgrades: usize, window: Duration) {
        let mut l = self.inner.limits.lock().unwrap();
        l.channels_per_connection = channels;
        l.upgrades = upgrades;
        l.window = window;
    }

    /// Upgrades answered with HTTP 429.
    pub fn refused_upgrades(&self) -> u64 {
        self.inner.limits.lock().unwrap().refused_upgrades
    }

    /// Subscribes answered with error 10305 (beyond the channels of a connection).
    pub fn refused_channels(&self) -> u64 {
        self.inner.limits.lock().unwrap().refused_channels
    }

    /// Subscribes answered with error 10300 (a symbol not listed).
    pub fn refused_symbols(&self) -> u64 {
        self.inner.limits.lock().unwrap().refused_symbols
    }

    /// Upgrades asked for so far, refused ones included.
    pub fn upgrades(&self) -> usize {
        self.inner.limits.lock().unwrap().upgrade_times.len()
    }

    /// Every upgrade asked for so far, oldest first: when, and whether it was admitted.
    pub fn upgrade_log(&self) -> Vec<(Instant, bool)> {
        self.inner.limits.lock().unwrap().upgrade_times.clone()
    }

    /// The most upgrades asked for within any `window`.
    pub fn most_upgrades_within(&self, window: Duration) -> usize {
        self.inner
            .limits
            .lock()
            .unwrap()
            .most_upgrades_within(window)
    }

    /// Channels subscribed on each open connection.
    pub fn channels_per_open_connection(&self) -> Vec<usize> {
        let ex = self.inner.exchange.lock().unwrap();
        let mut per: HashMap<u64, usize> = ex.conns.keys().map(|&c| (c, 0)).collect();
        for s in ex.subs.values().chain(ex.trade_subs.values()) {
            *per.entry(s.conn).or_default() += 1;
        }
        per.into_values().collect()
    }

    /// Serves `symbols` (`tBTCUSD`, …) as the list of trading pairs; from now on a subscribe
    /// to a symbol not listed is refused with error 10300.
    pub fn set_listing(&self, symbols: &[&str]) {
        let pairs = symbols.iter().map(|s| pair_of(s)).collect();
        *self.inner.listing.lock().unwrap() = Some(pairs);
    }

    /// A new pair is listed.
    pub fn list(&self, symbol: &str) {
        let mut listing = self.inner.listing.lock().unwrap();
        listing.get_or_insert_default().insert(pair_of(symbol));
    }

    /// A pair is delisted: gone from the listing; its channels stay until the client leaves.
    pub fn delist(&self, symbol: &str) {
        if let Some(listing) = self.inner.listing.lock().unwrap().as_mut() {
            listing.remove(&pair_of(symbol));
        }
    }

    /// Each subscribe from now on is handled `delay` after it arrived, as on a busy server.
    pub fn set_subscribe_delay(&self, delay: Duration) {
        *self.inner.subscribe_delay.lock().unwrap() = delay;
    }

    /// Subscribes received for `symbol` so far, handled or still waiting.
    pub fn subscribes_received(&self, symbol: &str) -> usize {
        let received = self.inner.subscribes_received.lock().unwrap();
        received.iter().filter(|s| *s == symbol).count()
    }

    /// Requests to the listing endpoint.
    pub fn listing_requests(&self) -> u64 {
        self.inner.listing_requests.load(Ordering::SeqCst)
    }

    /// Requests to `GET /v2/tickers` (see [`FakeBitfinex::rest_requests_by`] for the others).
    pub fn rest_requests(&self) -> u64 {
        self.inner.rest_requests.load(Ordering::SeqCst)
    }

    /// Symbols with a live ticker subscription, sorted.
    pub fn subscribed(&self) -> Vec<String> {
        let mut s: Vec<String> = self
            .inner
            .exchange
            .lock()
            .unwrap()
            .subs
            .keys()
            .cloned()
            .collect();
        s.sort();
        s
    }

    /// Waits until every symbol has a live ticker subscription.
    pub async fn wait_subscribed(&self, symbols: &[&str], timeout: Duration) {
        let what = format!("ticker subscriptions of {symbols:?}");
        super::eventually(&what, timeout, || covers(&self.subscribed(), symbols)).await;
    }

    /// Sends one ticker update to the client subscribed to `symbol`; `None` when nobody is.
    pub async fn emit(&self, symbol: &str) -> Option<Sent> {
        self.handle().emit(symbol).await
    }

    /// A cheap handle for emitting from other tasks.
    pub fn handle(&self) -> ExchangeHandle {
        ExchangeHandle(self.inner.clone())
    }

    /// Everything sent so far, in order.
    pub fn sent(&self) -> Vec<Sent> {
        self.inner.exchange.lock().unwrap().sent.clone()
    }

    async fn broadcast(&self, make: impl Fn(oneshot::Sender<()>) -> Command) {
        let conns: Vec<_> = self
            .inner
            .exchange
            .lock()
            .unwrap()
            .conns
            .values()
            .cloned()
            .collect();
        for conn in conns {
            let (tx, rx) = oneshot::channel();
            if conn.send(make(tx)).await.is_ok() {
                let _ = rx.await;
            }
        }
    }

    /// Info 20051 on every connection; their subscriptions end there, as the server stops.
    pub async fn restart(&self) {
        self.inner.exchange.lock().unwrap().clear_subs();
        self.broadcast(|tx| Command::Info(20051, tx)).await;
    }

    /// Info 20060: no updates until [`FakeBitfinex::maintenance_end`].
    pub async fn maintenance_start(&self) {
        self.inner.exchange.lock().unwrap().paused = true;
        self.broadcast(|tx| Command::Info(20060, tx)).await;
    }

    /// Info 20061: clients are expected to unsubscribe and subscribe again.
    pub async fn maintenance_end(&self) {
        self.inner.exchange.lock().unwrap().paused = false;
        self.broadcast(|tx| Command::Info(20061, tx)).await;
    }

    /// Closes every connection without a websocket close frame.
    pub async fn drop_connections(&self) {
        self.inner.exchange.lock().unwrap().clear_subs();
        self.broadcast(Command::Drop).await;
    }

    /// The next frames on every connection skip `n` sequence numbers.
    pub async fn skip_sequence(&self, n: u64) {
        self.broadcast(|tx| Command::SkipSeq(n, tx)).await;
    }

    /// Every connection goes quiet without closing: only the client's watchdog can notice.
    pub async fn go_silent(&self) {
        self.inner.exchange.lock().unwrap().clear_subs();
        self.broadcast(Command::Silence).await;
    }

    /// Sends a raw text frame on every connection.
    pub async fn send_raw(&self, text: &str) {
        let conns: Vec<_> = self
            .inner
            .exchange
            .lock()
            .unwrap()
            .conns
            .values()
            .cloned()
            .collect();
        for conn in conns {
            let _ = conn.send(Command::Raw(text.to_string())).await;
        }
    }
}

impl Exchange {
    fn clear_subs(&mut self) {
        self.subs.clear();
        self.trade_subs.clear();
    }
}

#[derive(Clone)]
pub struct ExchangeHandle(Arc<Inner>);

impl ExchangeHandle {
    /// See [`FakeBitfinex::emit`].
    pub async fn emit(&self, symbol: &str) -> Option<Sent> {
        let conn = {
            let ex = self.0.exchange.lock().unwrap();
            if ex.paused {
                return None;
            }
            let sub = ex.subs.get(symbol)?;
            ex.conns.get(&sub.conn)?.clone()
        };
        let (done, rx) = oneshot::channel();
        conn.send(Command::Update {
            symbol: symbol.into(),
            done,
        })
        .await
        .ok()?;
        rx.await.ok().flatten()
    }

    /// See [`FakeBitfinex::execute`].
    pub async fn execute(&self, symbol: &str, count: usize) -> Vec<Trade> {
        // Held until the `te` command is queued, so that concurrent callers' frames go out in
        // execution order.
        let order = self.0.trades.execution.lock().await;
        let (trades, target) = {
            let mut ex = self.0.exchange.lock().unwrap();
            let trades = ex.book.execute(symbol, count, super::now_ms());
            // The ledger and the subscription are read under one lock, so that a trade is
            // either in a new subscriber's snapshot or sent to it as `te`, never both or neither.
            let target = if ex.paused {
                None
            } else {
                ex.trade_subs
                    .get(symbol)
                    .and_then(|sub| Some((sub.chan_id, ex.conns.get(&sub.conn)?.clone())))
            };
            (trades, target)
        };
        let Some((chan, conn)) = target.filter(|_| !trades.is_empty()) else {
            return trades;
        };
        let (done, rx) = oneshot::channel();
        let cmd = Command::TradesExecuted {
            chan,
            trades: trades.clone(),
            done,
        };
        let queued = conn.send(cmd).await.is_ok();
        drop(order);
        if queued && rx.await.unwrap_or(false) {
            let delay = self.0.trades.tu_delay();
            let again = trades.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                // Fails when the connection is gone by then: the `tu` is simply not sent.
                let _ = conn
                    .send(Command::TradesUpdated {
                        chan,
                        trades: again,
                    })
                    .await;
            });
        }
        trades
    }
}

impl Drop for FakeBitfinex {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Inner {
    fn next_time(&self) -> u64 {
        let step = self.time_step_ms;
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let prev = self
            .clock
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |last| {
                Some(step.map_or(wall.max(last + 1), |s| last + s))
            })
            .unwrap();
        step.map_or(wall.max(prev + 1), |s| prev + s)
    }
}

/// Deterministic, distinct ticker values for the n-th update of a symbol.
fn values(symbol: &str, n: u64) -> [f64; 10] {
    let base = match symbol {
        "tBTCUSD" => 97_000.0,
        "tETHUSD" => 3_500.0,
        _ => 100.0,
    };
    let last = base + (n % 97) as f64 * 1.5 - (n % 13) as f64 * 0.25;
    [
        last - 0.5,
        1.0 + n as f64 * 0.01,
        last + 0.5,
        2.0,
        -12.5,
        -0.0012,
        last,
        1000.0 + n as f64,
        base + 200.0,
        base - 200.0,
    ]
}

async fn accept_loop(listener: TcpListener, inner: Arc<Inner>, stop: CancellationToken) {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
            _ = stop.cancelled() => return,
        };
        tokio::spawn(serve_connection(stream, inner.clone(), stop.clone()));
    }
}

async fn serve_connection(stream: TcpStream, inner: Arc<Inner>, stop: CancellationToken) {
    let accepting = inner.accepting.load(Ordering::SeqCst);
    // The signature is tungstenite's handshake callback; its error is a whole HTTP response.
    #[allow(clippy::result_large_err)]
    let callback = |_: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        if !inner.limits.lock().unwrap().admit_upgrade() {
            let mut e = ErrorResponse::new(Some("rate limited".into()));
            *e.status_mut() = axum::http::StatusCode::TOO_MANY_REQUESTS;
            Err(e)
        } else if accepting {
            Ok(resp)
        } else {
            let mut e = ErrorResponse::new(Some("maintenance".into()));
            *e.status_mut() = axum::http::StatusCode::SERVICE_UNAVAILABLE;
            Err(e)
        }
    };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
        return;
    };
    inner.ws_connections.fetch_add(1, Ordering::SeqCst);
    let conn = inner.next_conn.fetch_add(1, Ordering::SeqCst);
    let (tx, mut rx) = mpsc::channel(64);
    inner.exchange.lock().unwrap().conns.insert(conn, tx);
    let mut c = Conn {
        inner: inner.clone(),
        conn,
        seq: 0,
        flags: 0,
        chans: HashMap::new(),
        silent: false,
    };
    let hello = json!({"event":"info","version":2,"serverId":"fake-0001","platform":{"status":1}});
    let _ = ws.send(Message::text(hello.to_string())).await;
    let mut hb = tokio::time::interval(inner.heartbeat);
    hb.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(t))) => {
                    let answered = c.on_client(t.as_str(), &mut ws).await;
                    if answered.is_err() { break }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                _ => {}
            },
            cmd = rx.recv() => match cmd {
                Some(Command::Update { symbol, done }) => {
                    let _ = done.send(c.update(&symbol, &mut ws).await);
                }
                Some(Command::Raw(text)) => { let _ = ws.send(Message::text(text)).await; }
                Some(Command::Info(code, done)) => {
                    let _ = ws.send(Message::text(json!({"event":"info","code":code,"msg":"fake"}).to_string())).await;
                    let _ = done.send(());
                }
                Some(Command::SkipSeq(n, done)) => {
                    c.seq += n;
                    let _ = done.send(());
                }
                Some(Command::Silence(done)) => {
                    c.silent = true;
                    let _ = done.send(());
                }
                Some(Command::TradesExecuted { chan, trades, done }) => {
                    let _ = done.send(c.trades(chan, "te", &trades, &mut ws).await);
                }
                Some(Command::TradesUpdated { chan, trades }) => {
                    c.trades(chan, "tu", &trades, &mut ws).await;
                }
                Some(Command::Drop(done)) => {
                    let _ = ws.flush().await;
                    let _ = ws.get_mut().shutdown().await;
                    let _ = done.send(());
                    break;
                }
                None => break,
            },
            _ = hb.tick(), if !c.silent => {
                let chans: Vec<u64> = c.chans.keys().copied().collect();
                for chan in chans {
                    let frame = c.with_trailer(json!([chan, "hb"]));
                    let _ = ws.send(Message::text(frame.to_string())).await;
                }
            }
        }
    }
    let mut ex = inner.exchange.lock().unwrap();
    ex.conns.remove(&conn);
    ex.subs.retain(|_, s| s.conn != conn);
    ex.trade_subs.retain(|_, s| s.conn != conn);
}

struct Conn {
    inner: Arc<Inner>,
    conn: u64,
    seq: u64,
    flags: u64,
    /// chan id → channel kind and symbol
    chans: HashMap<u64, (Channel, String)>,
    silent: bool,
}

type Ws = WebSocketStream<TcpStream>;

impl Conn {
    /// Appends SEQ and TIMESTAMP when the client asked for them with conf.
    fn with_trailer(&mut self, mut frame: Value) -> Value {
        self.seq += 1;
        let ts = self.inner.next_time();
        let arr = frame.as_array_mut().unwrap();
        if self.flags & 65_536 != 0 {
            arr.push(json!(self.seq));
        }
        if self.flags & 32_768 != 0 {
            arr.push(json!(ts));
        }
        frame
    }

    async fn update(&mut self, symbol: &str, ws: &mut Ws) -> Option<Sent> {
        if self.silent {
            return None;
        }
        let chan = *self
            .chans
            .iter()
            .find(|(_, (k, s))| *k == Channel::Ticker && *s == symbol)?
            .0;
        let n = {
            let mut ex = self.inner.exchange.lock().unwrap();
            let n = ex.prices.entry(symbol.to_string()).or_insert(0);
            *n += 1;
            *n
        };
        let v = values(symbol, n);
        let mut payload: Vec<Value> = v.iter().map(|x| json!(x)).collect();
        let extra = self.inner.extra_fields.load(Ordering::SeqCst);
        if extra {
            payload.extend([json!(null), json!("NEW_FIELD"), json!([1, 2])]);
        }
        let mut frame = self.with_trailer(json!([chan, payload]));
        if extra {
            frame
                .as_array_mut()
                .unwrap()
                .extend([json!({"added": true}), json!(42)]);
        }
        let arr = frame.as_array().unwrap();
        ws.send(Message::text(frame.to_string())).await.ok()?;
        let sent = Sent {
            symbol: symbol.to_string(),
            values: v,
            exchange_time: arr.get(3).and_then(Value::as_i64),
            seq: arr.get(2).and_then(Value::as_u64),
            rest: false,
        };
        self.inner.exchange.lock().unwrap().sent.push(sent.clone());
        Some(sent)
    }

    /// Sends trades on trades channel `chan` as `te` or `tu` frames, one frame per trade; false
    /// when the channel is no longer subscribed, the connection is silent or the send failed.
    async fn trades(&mut self, chan: u64, kind: &str, trades: &[Trade], ws: &mut Ws) -> bool {
        if self.silent || !matches!(self.chans.get(&chan), Some((Channel::Trades, _))) {
            return false;
        }
        let extra = self.inner.extra_fields.load(Ordering::SeqCst);
        for trade in trades {
            let mut frame = self.with_trailer(json!([chan, kind, trade.to_json(extra)]));
            if extra {
                frame
                    .as_array_mut()
                    .unwrap()
                    .extend([json!({"added": true}), json!(42)]);
            }
            if ws.send(Message::text(frame.to_string())).await.is_err() {
                return false;
            }
            self.inner.trades.count_frame(kind);
            if kind == "te" {
                self.inner
                    .exchange
                    .lock()
                    .unwrap()
                    .book
                    .record_sent(trade.clone());
            }
        }
        true
    }

    async fn on_client(&mut self, text: &str, ws: &mut Ws) -> Result<(), ()> {
        let Ok(msg) = serde_json::from_str::<Value>(text) else {
            return Ok(());
        };
        // Whether the symbol is listed is judged when the subscribe arrives.
        let symbol = msg["symbol"].as_str().unwrap_or_default().to_string();
        let listed = self
            .inner
            .listing
            .lock()
            .unwrap()
            .as_ref()
            .is_none_or(|l| l.contains(&pair_of(&symbol)));
        if msg["event"] == "subscribe" {
            self.inner
                .subscribes_received
                .lock()
                .unwrap()
                .push(symbol.clone());
            let delay = *self.inner.subscribe_delay.lock().unwrap();
            tokio::time::sleep(delay).await;
        }
        let mut snapshot = None;
        let reply = match msg["event"].as_str() {
            Some("conf") => {
                self.flags = msg["flags"].as_u64().unwrap_or(0);
                json!({"event":"conf","status":"OK","flags":self.flags})
            }
            Some("subscribe") if msg["channel"] == "ticker" || msg["channel"] == "trades" => {
                let kind = if msg["channel"] == "ticker" {
                    Channel::Ticker
                } else {
                    Channel::Trades
                };
                let name = kind.name();
                let full = {
                    let mut limits = self.inner.limits.lock().unwrap();
                    let full = self.chans.len() >= limits.channels_per_connection;
                    limits.refused_channels += u64::from(full);
                    limits.refused_symbols += u64::from(!full && !listed);
                    full
                };
                if self.chans.values().any(|(k, s)| *k == kind && *s == symbol) {
                    json!({"event":"error","msg":"subscribe: dup","code":10301,"channel":name,"symbol":symbol})
                } else if full {
                    json!({"event":"error","msg":"subscribe: limit","code":10305,"channel":name,"symbol":symbol})
                } else if !listed {
                    json!({"event":"error","msg":"symbol: invalid","code":10300,"channel":name,"symbol":symbol})
                } else {
                    let chan = self.inner.next_chan.fetch_add(1, Ordering::SeqCst);
                    self.chans.insert(chan, (kind, symbol.clone()));
                    let sub = Subscription {
                        conn: self.conn,
                        chan_id: chan,
                    };
                    let mut ex = self.inner.exchange.lock().unwrap();
                    match kind {
                        Channel::Ticker => {
                            ex.subs.insert(symbol.clone(), sub);
                        }
                        Channel::Trades => {
                            // Under the same lock as the subscription: see `ExchangeHandle::execute`.
                            snapshot = Some((
                                chan,
                                ex.book.snapshot(&symbol, self.inner.trades.snapshot_len()),
                            ));
                            ex.trade_subs.insert(symbol.clone(), sub);
                        }
                    }
                    let pair = symbol.trim_start_matches('t').to_string();
                    json!({"event":"subscribed","channel":name,"chanId":chan,"symbol":symbol,"pair":pair})
                }
            }
            Some("unsubscribe") => {
                let chan = msg["chanId"].as_u64().unwrap_or(0);
                if let Some((kind, symbol)) = self.chans.remove(&chan) {
                    let mut ex = self.inner.exchange.lock().unwrap();
                    let subs = match kind {
                        Channel::Ticker => &mut ex.subs,
                        Channel::Trades => &mut ex.trade_subs,
                    };
                    if subs
                        .get(&symbol)
                        .is_some_and(|s| s.chan_id == chan && s.conn == self.conn)
                    {
                        subs.remove(&symbol);
                    }
                    json!({"event":"unsubscribed","status":"OK","chanId":chan})
                } else {
                    json!({"event":"error","msg":"unsubscribe: invalid","code":10400})
                }
            }
            Some("ping") => json!({"event":"pong","ts":0,"cid":msg["cid"]}),
            _ => json!({"event":"error","msg":"unknown event","code":10000}),
        };
        ws.send(Message::text(reply.to_string()))
            .await
            .map_err(|_| ())?;
        if let Some((chan, trades)) = snapshot
            && !self.silent
        {
            let extra = self.inner.extra_fields.load(Ordering::SeqCst);
            let rows: Vec<Value> = trades.iter().map(|t| t.to_json(extra)).collect();
            let mut frame = self.with_trailer(json!([chan, rows]));
            if extra {
                frame
                    .as_array_mut()
                    .unwrap()
                    .extend([json!({"added": true}), json!(42)]);
            }
            ws.send(Message::text(frame.to_string()))
                .await
                .map_err(|_| ())?;
        }
        Ok(())
    }
}

#[derive(serde::Deserialize)]
struct TickersQuery {
    symbols: String,
}

async fn tickers(State(inner): State<Arc<Inner>>, Query(q): Query<TickersQuery>) -> Json<Value> {
    inner.rest_requests.fetch_add(1, Ordering::SeqCst);
    let mut ex = inner.exchange.lock().unwrap();
    let mut out = Vec::new();
    for symbol in q.symbols.split(',') {
        let n = {
            let n = ex.prices.entry(symbol.to_string()).or_insert(0);
            *n += 1;
            *n
        };
        let v = values(symbol, n);
        ex.sent.push(Sent {
            symbol: symbol.to_string(),
            values: v,
            exchange_time: None,
            seq: None,
            rest: true,
        });
        let mut row = vec![json!(symbol)];
        row.extend(v.iter().map(|x| json!(x)));
        out.push(Value::Array(row));
    }
    Json(Value::Array(out))
}

/// `GET /v2/conf/pub:list:pair:exchange`: `[["BTCUSD","ETHUSD",…]]`, or 404 with no listing.
async fn pair_list(State(inner): State<Arc<Inner>>) -> axum::response::Response {
    use axum::response::IntoResponse;
    inner.listing_requests.fetch_add(1, Ordering::SeqCst);
    match inner.listing.lock().unwrap().as_ref() {
        Some(pairs) => Json(json!([pairs.iter().collect::<Vec<_>>()])).into_response(),
        None => axum::http::StatusCode::NOT_FOUND.into_response(),
    }
}

/// `tBTCUSD` → `BTCUSD`.
fn pair_of(symbol: &str) -> String {
    symbol.strip_prefix('t').unwrap_or(symbol).to_string()
}

/// True when every one of `symbols` is in `subscribed`.
pub(super) fn covers(subscribed: &[String], symbols: &[&str]) -> bool {
    symbols.iter().all(|s| subscribed.iter().any(|x| x == s))
}
