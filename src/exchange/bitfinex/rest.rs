//! Bitfinex's public REST API: tickers, trade history and candle history, each behind its own
//! rate limiter shared by every caller in the process, and the polling of whatever the
//! websocket does not cover (everything in `mode = "rest"`).

use std::collections::BTreeSet;
use std::sync::Arc;

use governor::DefaultDirectRateLimiter;
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
    Trades,
    Candles,
    /// The list of trading pairs, read once an hour or so: under the tickers' budget.
    Pairs,
}

impl Endpoint {
    fn label(self) -> &'static str {
        match self {
            Endpoint::Tickers => "tickers",
            Endpoint::Trades => "trades",
            Endpoint::Candles => "candles",
            Endpoint::Pairs => "pairs",
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
    backoff: Backoff,
    cancel: CancellationToken,
}

/// Bitfinex's maximum rows per history call (`/v2/trades/…/hist`, `/v2/candles/…/hist`).
pub const PAGE: usize = 10_000;

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
            backoff: cfg.rest_backoff(),
            cancel,
        })
    }

    fn limiter(&self, endpoint: Endpoint) -> &DefaultDirectRateLimiter {
        match endpoint {
            Endpoint::Tickers | Endpoint::Pairs => &self.tickers,
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
        let got = retry(
            self.backoff,
            &self.cancel,
            || self.get_once(endpoint, path, query),
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
    ) -> Result<String, ExchangeError> {
        let label = endpoint.label();
        let limiter = self.limiter(endpoint);
        if limiter.check().is_err() {
            metrics::counter!(metric::RATE_LIMIT_WAITS, "endpoint" => label).increment(1);
            limiter.until_ready().await;
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

async fn poll_once(ctx: &Ctx, uncovered: &[Sub]) -> Result<(), ExchangeError> {
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
    for sub in uncovered.iter().filter(|s| s.channel == Channel::Trades) {
        // A poll of hundreds of symbols takes minutes under the trades limit: skip those a
        // connection took over, or that were delisted, meanwhile.
        if ctx.coverage.covers(sub) || !ctx.symbols.current().contains(&sub.symbol) {
            continue;
        }
        trades::poll(ctx, &sub.symbol).await?;
    }
    Ok(())
}
