//! REST polling of `/v2/tickers`: the only source in `mode = "rest"`, and the fallback for
//! symbols whose websocket is down in `mode = "websocket"`.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::message::{RestTicker, TickerValues};
use super::{now_ms, sleep_or_cancel, Ctx, ExchangeError};
use crate::candles::{Tick, TickSource};
use crate::retry::backoff;
use crate::telemetry::metric;

/// Fetches the current tickers of `symbols`; they carry no exchange time, so both times are the
/// receive time.
pub async fn fetch_tickers(
    client: &reqwest::Client,
    rest_url: &str,
    symbols: &[String],
) -> Result<Vec<Tick>, ExchangeError> {
    let url = format!("{}/v2/tickers", rest_url.trim_end_matches('/'));
    let response = client
        .get(url)
        .query(&[("symbols", symbols.join(","))])
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(ExchangeError::Rest)?;
    let received_at = now_ms();
    let body = response.text().await.map_err(ExchangeError::Rest)?;
    let tickers: Vec<RestTicker> =
        serde_json::from_str(&body).map_err(|e| ExchangeError::RestBody(format!("{e}: {body:.200}")))?;
    let mut ticks = Vec::with_capacity(tickers.len());
    for t in tickers.into_iter().filter(|t| symbols.contains(&t.symbol)) {
        match TickerValues::from_raw(&t.values) {
            Ok(v) => ticks.push(Tick::new(t.symbol, v, received_at, None, TickSource::Rest, received_at)),
            Err(e) => {
                metrics::counter!(metric::TICKS_REJECTED).increment(1);
                tracing::warn!(symbol = %t.symbol, error = %e, "REST ticker rejected");
            }
        }
    }
    Ok(ticks)
}

pub(super) async fn poll_uncovered(ctx: Arc<Ctx>) {
    let cfg = &ctx.cfg;
    let client = match reqwest::Client::builder().timeout(cfg.request_timeout).build() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build HTTP client; REST polling disabled");
            return;
        }
    };
    let all: BTreeSet<String> = cfg.symbols.iter().cloned().collect();
    let mut coverage = ctx.coverage.subscribe();
    let new_backoff = || backoff(cfg.rest_poll_interval, cfg.reconnect_backoff_max.max(cfg.rest_poll_interval));
    let mut delays = new_backoff();
    // The first wait gives the websocket time to subscribe before REST steps in.
    let mut wait = cfg.rest_poll_interval;
    let mut polling = false;
    loop {
        if !sleep_or_cancel(wait, &ctx.cancel).await {
            return;
        }
        let uncovered: Vec<String> = all.difference(&coverage.borrow_and_update()).cloned().collect();
        if uncovered.is_empty() {
            if polling {
                tracing::info!("websocket covers every symbol again; REST polling stops");
                polling = false;
            }
            tokio::select! {
                biased;
                _ = ctx.cancel.cancelled() => return,
                _ = coverage.wait_for(|covered| !all.is_subset(covered)) => {}
            }
            wait = std::time::Duration::ZERO;
            continue;
        }
        if !polling {
            tracing::info!(symbols = ?uncovered, "polling REST for symbols without a websocket");
            polling = true;
        }
        match fetch_tickers(&client, &cfg.rest_url, &uncovered).await {
            Ok(ticks) => {
                metrics::counter!(metric::REST_POLLS, "outcome" => "ok").increment(1);
                for tick in ticks {
                    metrics::counter!(metric::TICKS_RECEIVED, "source" => "rest").increment(1);
                    ctx.data.beat();
                    if ctx.tx.send(tick).await.is_err() {
                        return;
                    }
                }
                delays = new_backoff();
                wait = cfg.rest_poll_interval;
            }
            Err(e) => {
                metrics::counter!(metric::REST_POLLS, "outcome" => "error").increment(1);
                wait = delays.next().unwrap_or(cfg.reconnect_backoff_max);
                tracing::warn!(error = %e, ?wait, "REST poll failed");
            }
        }
    }
}
