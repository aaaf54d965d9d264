//! Bitfinex's public REST API: tickers, trade history and candle history, each behind its own
//! rate limiter shared by every caller in the process, and the polling of whatever the
//! websocket does not cover (everything in `mode = "rest"`).

use std::collections::BTreeSet;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio_util::sync::CancellationToken;

use super::answer::{CandleValues, ERROR_RATE_LIMIT, RestAnswer, RestTicker, parse_rest};
use super::message::{TickerValues, TradeEntry, TradeValues};
use super::{Channel, Ctx, ExchangeError, Sub, now_ms, sleep_or_cancel, subscriptions, trades};
use crate::config::BitfinexConfig;
use crate::model::{Record, Source, Tick};
use crate::retry::backoff;
use crate::telemetry::metric;

/// The REST endpoints we call; Bitfinex limits each on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Tickers,
    Trades,
    Candles,
}

impl Endpoint {
    fn label(self) -> &'static str {
        match self {
            Endpoint::Tickers => "tickers",
            Endpoint::Trades => "trades",
            Endpoint::Candles => "candles",
        }
    }
}

/// A REST client that keeps under Bitfinex's per-minute limits and backs off when told it did
/// not (HTTP 429, or error 11010 in the body).
pub struct RestClient {
    http: reqwest::Client,
    base: String,
    tickers: DefaultDirectRateLimiter,
    trades: DefaultDirectRateLimiter,
    candles: DefaultDirectRateLimiter,
    backoff: (Duration, Duration),
    cancel: CancellationToken,
}

fn per_minute(n: u32) -> DefaultDirectRateLimiter {
    // The full minute's allowance may go at once (a backfill of several symbols); after that,
    // requests are spaced evenly.
    RateLimiter::direct(Quota::per_minute(
        NonZeroU32::new(n.max(1)).expect("positive"),
    ))
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
            trades: per_minute(cfg.rest_trades_per_minute),
            candles: per_minute(cfg.rest_candles_per_minute),
            backoff: (cfg.reconnect_backoff_min, cfg.reconnect_backoff_max),
            cancel,
        })
    }

    fn limiter(&self, endpoint: Endpoint) -> &DefaultDirectRateLimiter {
        match endpoint {
            Endpoint::Tickers => &self.tickers,
            Endpoint::Trades => &self.trades,
            Endpoint::Candles => &self.candles,
        }
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
        let mut delays = backoff(
            self.backoff.0.max(Duration::from_millis(100)),
            self.backoff.1,
        );
        loop {
            let limiter = self.limiter(endpoint);
            if limiter.check().is_err() {
                metrics::counter!(metric::RATE_LIMIT_WAITS, "endpoint" => label).increment(1);
                tokio::select! {
                    _ = limiter.until_ready() => {}
                    _ = self.cancel.cancelled() => return Err(ExchangeError::Cancelled),
                }
            }
            let sent = self
                .http
                .get(format!("{}{path}", self.base))
                .query(query)
                .send()
                .await;
            let response = match sent {
                Ok(r) => r,
                Err(e) => {
                    metrics::counter!(metric::REST_REQUESTS, "endpoint" => label, "outcome" => "error").increment(1);
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
                let wait = delays.next().unwrap_or(self.backoff.1);
                tracing::warn!(endpoint = label, %status, ?wait, "Bitfinex rate limit hit; backing off");
                if !sleep_or_cancel(wait, &self.cancel).await {
                    return Err(ExchangeError::Cancelled);
                }
                continue;
            }
            if !status.is_success() {
                metrics::counter!(metric::REST_REQUESTS, "endpoint" => label, "outcome" => "error")
                    .increment(1);
                return Err(ExchangeError::RestStatus {
                    endpoint: label,
                    status: status.as_u16(),
                    body: truncate(&body),
                });
            }
            metrics::counter!(metric::REST_REQUESTS, "endpoint" => label, "outcome" => "ok")
                .increment(1);
            return Ok(body);
        }
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

    /// Up to `limit` trades of `symbol` with `start_ms <= MTS <= end_ms`, oldest first.
    pub async fn trades(
        &self,
        symbol: &str,
        start_ms: i64,
        end_ms: i64,
        limit: usize,
    ) -> Result<Vec<TradeEntry>, ExchangeError> {
        let path = format!("/v2/trades/{symbol}/hist");
        let query = window(start_ms, end_ms, limit);
        let rows = self.history(Endpoint::Trades, &path, &query).await?;
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

fn truncate(body: &str) -> String {
    body.chars().take(200).collect()
}

/// Polls REST for every subscription the websocket does not cover: tickers in one request,
/// trades per symbol from the newest one seen (or the backfill horizon).
pub(super) async fn poll_uncovered(ctx: Arc<Ctx>) {
    let cfg = &ctx.cfg;
    let all: BTreeSet<Sub> = subscriptions(cfg).into_iter().collect();
    let mut coverage = ctx.coverage.subscribe();
    let new_backoff = || {
        backoff(
            cfg.rest_poll_interval,
            cfg.reconnect_backoff_max.max(cfg.rest_poll_interval),
        )
    };
    let mut delays = new_backoff();
    // The first wait gives the websocket time to subscribe before REST steps in.
    let mut wait = cfg.rest_poll_interval;
    let mut polling = false;
    loop {
        if !sleep_or_cancel(wait, &ctx.cancel).await {
            return;
        }
        let uncovered: Vec<Sub> = all
            .difference(&coverage.borrow_and_update())
            .cloned()
            .collect();
        if uncovered.is_empty() {
            if polling {
                tracing::info!("websocket covers every channel again; REST polling stops");
                polling = false;
            }
            tokio::select! {
                biased;
                _ = ctx.cancel.cancelled() => return,
                _ = coverage.wait_for(|covered| !all.is_subset(covered)) => {}
            }
            wait = Duration::ZERO;
            continue;
        }
        if !polling {
            tracing::info!(subscriptions = ?uncovered, "polling REST for channels without a websocket");
            polling = true;
        }
        match poll_once(&ctx, &uncovered).await {
            Ok(()) => {
                delays = new_backoff();
                wait = cfg.rest_poll_interval;
            }
            Err(ExchangeError::Downstream | ExchangeError::Cancelled) => return,
            Err(e) => {
                wait = delays.next().unwrap_or(cfg.reconnect_backoff_max);
                tracing::warn!(error = %e, ?wait, "REST poll failed");
            }
        }
    }
}

async fn poll_once(ctx: &Ctx, uncovered: &[Sub]) -> Result<(), ExchangeError> {
    let of = |channel: Channel| {
        uncovered
            .iter()
            .filter(move |s| s.channel == channel)
            .map(|s| s.symbol.clone())
    };
    let tickers: Vec<String> = of(Channel::Ticker).collect();
    if !tickers.is_empty() {
        for tick in ctx.rest.tickers(&tickers).await? {
            metrics::counter!(metric::TICKS_RECEIVED, "source" => "rest").increment(1);
            ctx.send(Record::Tick(tick)).await?;
        }
    }
    for symbol in of(Channel::Trades) {
        trades::poll(ctx, &symbol).await?;
    }
    Ok(())
}
