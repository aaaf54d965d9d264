//! Bitfinex public tickers: websocket shards with REST polling for whatever the websocket does
//! not cover at the moment.

pub mod message;
pub mod rest;
mod ws;

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, Mutex};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::candles::Tick;
use crate::config::{BitfinexConfig, ExchangeMode};
use crate::telemetry::Liveness;

#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("websocket connect failed: {0}")]
    Connect(#[source] Box<tokio_tungstenite::tungstenite::Error>),
    #[error("websocket failed: {0}")]
    Socket(#[source] Box<tokio_tungstenite::tungstenite::Error>),
    #[error("server closed the connection ({0})")]
    Closed(String),
    #[error("no frame for {0:?}; connection presumed dead")]
    Stale(Duration),
    #[error("timed out connecting after {0:?}")]
    ConnectTimeout(Duration),
    #[error("REST request failed: {0}")]
    Rest(#[source] reqwest::Error),
    #[error("REST answer not understood: {0}")]
    RestBody(String),
    #[error("the pipeline behind the exchange stopped")]
    Downstream,
}

impl ExchangeError {
    /// Everything but a stopped pipeline is worth another try after a backoff.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, ExchangeError::Downstream)
    }
}

/// Symbols the websocket currently handles (subscribed, or paused for maintenance); REST covers
/// the rest.
#[derive(Clone)]
pub struct Coverage(watch::Sender<BTreeSet<String>>);

impl Coverage {
    fn new() -> Self {
        Self(watch::Sender::new(BTreeSet::new()))
    }
    fn cover(&self, symbol: &str) {
        self.0.send_if_modified(|s| s.insert(symbol.to_string()));
    }
    fn uncover<'a>(&self, symbols: impl IntoIterator<Item = &'a String>) {
        let symbols: Vec<&String> = symbols.into_iter().collect();
        self.0.send_if_modified(|s| symbols.iter().fold(false, |changed, sym| s.remove(*sym) | changed));
    }
    fn subscribe(&self) -> watch::Receiver<BTreeSet<String>> {
        self.0.subscribe()
    }
}

/// Keeps connection opens under Bitfinex's per-minute limit, across all shards.
struct ConnectLimiter {
    per_minute: usize,
    opened: Mutex<VecDeque<Instant>>,
}

impl ConnectLimiter {
    async fn acquire(&self) {
        let window = Duration::from_secs(60);
        let mut opened = self.opened.lock().await;
        while opened.front().is_some_and(|t| t.elapsed() >= window) {
            opened.pop_front();
        }
        if opened.len() >= self.per_minute {
            let wait = window.saturating_sub(opened[0].elapsed());
            tracing::warn!(?wait, "connection rate limit reached; waiting before reconnecting");
            tokio::time::sleep(wait).await;
            opened.pop_front();
        }
        opened.push_back(Instant::now());
    }
}

/// Shared by the tasks of one exchange source.
struct Ctx {
    cfg: BitfinexConfig,
    tx: mpsc::Sender<Tick>,
    data: Arc<Liveness>,
    coverage: Coverage,
    limiter: ConnectLimiter,
    cancel: CancellationToken,
}

/// Streams ticks for every configured symbol into `tx` until `cancel`. Returns once every task
/// has stopped, so that dropping `tx` afterwards tells the next stage no more ticks will come.
pub async fn run(cfg: BitfinexConfig, tx: mpsc::Sender<Tick>, data: Arc<Liveness>, cancel: CancellationToken) {
    let ctx = Arc::new(Ctx {
        limiter: ConnectLimiter { per_minute: cfg.connections_per_minute, opened: Mutex::new(VecDeque::new()) },
        coverage: Coverage::new(),
        cfg,
        tx,
        data,
        cancel,
    });
    let mut tasks = JoinSet::new();
    if ctx.cfg.mode == ExchangeMode::Websocket {
        for (shard, symbols) in ctx.cfg.symbols.chunks(ctx.cfg.channels_per_connection).enumerate() {
            tasks.spawn(ws::supervise(ctx.clone(), shard, symbols.to_vec()));
        }
    }
    tasks.spawn(rest::poll_uncovered(ctx.clone()));
    while let Some(r) = tasks.join_next().await {
        if let Err(e) = r {
            tracing::error!(error = %e, "exchange task panicked");
        }
    }
}

/// Sleeps for `d` unless cancelled first; returns false when cancelled.
async fn sleep_or_cancel(d: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        biased;
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
