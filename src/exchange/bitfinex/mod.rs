//! Bitfinex public market data: the ticker and trades channels of every symbol over websocket
//! shards, REST polling for whatever the websocket does not cover at the moment, and REST trade
//! history to backfill at start and to close the gaps disconnects leave.

pub mod answer;
mod dedupe;
pub mod message;
pub mod pairs;
pub mod rest;
mod shards;
mod trades;
mod ws;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{BitfinexConfig, ExchangeMode};
use crate::model::{Record, now_ms};
use crate::telemetry::{Liveness, metric};

pub use rest::RestClient;

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
    #[error("Bitfinex refused the websocket upgrade with HTTP 429: too many connection opens")]
    UpgradeRateLimited,
    #[error("REST request failed: {0}")]
    Rest(#[source] reqwest::Error),
    #[error("REST answer not understood: {0}")]
    RestBody(String),
    #[error("REST {endpoint} answered HTTP {status}: {body}")]
    RestStatus {
        endpoint: &'static str,
        status: u16,
        body: String,
    },
    #[error("Bitfinex rate-limited REST {0} (HTTP 429 or error 11010)")]
    RateLimited(&'static str),
    #[error("the producer is stopping")]
    Cancelled,
    #[error("the pipeline behind the exchange stopped")]
    Downstream,
}

impl ExchangeError {
    /// Everything but a stopped pipeline (or producer) is worth another try after a backoff.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, ExchangeError::Downstream | ExchangeError::Cancelled)
    }
}

/// The public channels we read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Channel {
    Ticker,
    Trades,
}

impl Channel {
    /// The channel's name in Bitfinex's subscribe and subscribed events.
    pub fn name(self) -> &'static str {
        match self {
            Channel::Ticker => "ticker",
            Channel::Trades => "trades",
        }
    }
}

/// One channel of one symbol: what a websocket subscription or a REST poll covers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sub {
    pub channel: Channel,
    pub symbol: String,
}

/// The subscriptions of `symbols`: the ticker of each, and its trades unless `trades = false`.
/// Each is one of Bitfinex's 25 channels per connection.
pub fn subscriptions<'a>(
    cfg: &BitfinexConfig,
    symbols: impl IntoIterator<Item = &'a String>,
) -> Vec<Sub> {
    let channels: &[Channel] = if cfg.trades {
        &[Channel::Ticker, Channel::Trades]
    } else {
        &[Channel::Ticker]
    };
    symbols
        .into_iter()
        .flat_map(|symbol| {
            channels.iter().map(|&channel| Sub {
                channel,
                symbol: symbol.clone(),
            })
        })
        .collect()
}

/// Subscriptions the websocket currently handles (subscribed, or paused for maintenance); REST
/// covers the rest.
#[derive(Clone)]
pub struct Coverage(watch::Sender<BTreeSet<Sub>>);

impl Coverage {
    fn new() -> Self {
        let coverage = Self(watch::Sender::new(BTreeSet::new()));
        coverage.publish();
        coverage
    }
    fn cover(&self, sub: &Sub) {
        if self.0.send_if_modified(|s| s.insert(sub.clone())) {
            self.publish();
        }
    }
    fn uncover<'a>(&self, subs: impl IntoIterator<Item = &'a Sub>) {
        let subs: Vec<&Sub> = subs.into_iter().collect();
        let changed = self.0.send_if_modified(|s| {
            subs.iter()
                .fold(false, |changed, sub| s.remove(*sub) | changed)
        });
        if changed {
            self.publish();
        }
    }
    /// Sets `candlestream_exchange_channels_subscribed` per channel.
    fn publish(&self) {
        let covered = self.0.borrow();
        for channel in [Channel::Ticker, Channel::Trades] {
            let n = covered.iter().filter(|s| s.channel == channel).count();
            metrics::gauge!(metric::CHANNELS_SUBSCRIBED, "channel" => channel.name()).set(n as f64);
        }
    }
    fn subscribe(&self) -> watch::Receiver<BTreeSet<Sub>> {
        self.0.subscribe()
    }
    fn covers(&self, sub: &Sub) -> bool {
        self.0.borrow().contains(sub)
    }
}

/// A limiter of `n` per rolling minute: calls are spaced evenly, a little over 60/n seconds
/// apart, with no burst. Why no burst: Bitfinex counts per rolling minute, and a GCRA that lets
/// the minute's allowance go at once refills while it is spent, so `n` at once plus one every
/// 60/n seconds made up to 2n-1 calls in the first minute (39 connection opens where 20 are
/// allowed). Why a little over: at exactly 60/n the (n+1)-th call lands exactly a minute after
/// the first, and network jitter could put both in one minute on Bitfinex's side; 1% more puts
/// 0.6 s between them whatever `n`.
fn per_minute(n: u32) -> DefaultDirectRateLimiter {
    let period = Duration::from_secs(60).mul_f64(1.01) / n.max(1);
    RateLimiter::direct(Quota::with_period(period).expect("a positive period"))
}

/// Shared by the tasks of one exchange source.
struct Ctx {
    cfg: BitfinexConfig,
    tx: mpsc::Sender<Record>,
    data: Arc<Liveness>,
    coverage: Coverage,
    /// The symbols streamed now; they change with Bitfinex's listing.
    symbols: pairs::Symbols,
    /// Connection opens, across all shards, under Bitfinex's per-minute limit.
    connects: DefaultDirectRateLimiter,
    /// After Bitfinex answered an upgrade with 429, no shard opens before this.
    opens_held_until: Mutex<Option<tokio::time::Instant>>,
    rest: RestClient,
    book: dedupe::TradeBook,
    fetches: trades::Fetches,
    trade_counters: trades::TradeCounters,
    /// Gap repairs run beside the sockets; shutdown waits for them.
    repairs: TaskTracker,
    cancel: CancellationToken,
}

impl Ctx {
    async fn send(&self, record: Record) -> Result<(), ExchangeError> {
        self.data.beat();
        self.tx
            .send(record)
            .await
            .map_err(|_| ExchangeError::Downstream)
    }
}

/// Streams ticker updates and trades for every symbol selected (see [`pairs`]) into `tx` until
/// `cancel`. `listing`: the list of trading pairs when the caller has just read it (the first
/// selection is made from it instead of reading it again). `resumed`: per symbol, the newest
/// trade (exchange time, id) Kafka already holds, where its backfill starts instead of the
/// horizon when that is later.
/// Returns once every task has stopped, so that dropping `tx` afterwards tells the next stage no
/// more records will come.
pub async fn run(
    cfg: BitfinexConfig,
    rest: RestClient,
    listing: Option<Vec<String>>,
    resumed: HashMap<String, (i64, i64)>,
    tx: mpsc::Sender<Record>,
    data: Arc<Liveness>,
    cancel: CancellationToken,
) {
    let backfill_from =
        (!cfg.backfill.is_zero()).then(|| now_ms() - cfg.backfill.as_millis() as i64);
    let selection = pairs::Selection::new(&cfg.symbols, &cfg.symbols_exclude)
        .expect("symbols were validated with the configuration");
    let ctx = Arc::new(Ctx {
        symbols: pairs::Symbols::new(),
        connects: per_minute(cfg.connections_per_minute as u32),
        opens_held_until: Mutex::new(None),
        coverage: Coverage::new(),
        book: dedupe::TradeBook::new(backfill_from, resumed),
        fetches: trades::Fetches::new(
            cfg.trades && backfill_from.is_some(),
            cfg.rest_trades_per_minute,
        ),
        trade_counters: trades::TradeCounters::register(),
        repairs: TaskTracker::new(),
        rest,
        cfg,
        tx,
        data,
        cancel,
    });
    let mut tasks = JoinSet::new();
    tasks.spawn(pairs::follow_listing(ctx.clone(), selection, listing));
    if ctx.cfg.mode == ExchangeMode::Websocket {
        tasks.spawn(shards::run(ctx.clone()));
    }
    tasks.spawn(rest::poll_uncovered(ctx.clone()));
    while let Some(r) = tasks.join_next().await {
        if let Err(e) = r {
            tracing::error!(error = %e, "exchange task panicked");
        }
    }
    ctx.repairs.close();
    ctx.repairs.wait().await;
}

/// Sleeps for `d` unless cancelled first; returns false when cancelled.
async fn sleep_or_cancel(d: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        biased;
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::per_minute;

    #[test]
    fn a_minute_allowance_never_goes_at_once() {
        // 6 000 a minute is one every 10 ms: of 50 checks in a row, only the first passes.
        let limiter = per_minute(6_000);
        let passed = (0..50).filter(|_| limiter.check().is_ok()).count();
        assert_eq!(passed, 1);
        std::thread::sleep(std::time::Duration::from_millis(25));
        assert!(
            limiter.check().is_ok(),
            "the next slot opens after 60/n seconds"
        );
    }
}
