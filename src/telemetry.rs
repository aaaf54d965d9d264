//! Structured logs, Prometheus metrics and the /healthz + /metrics endpoint.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Metric names, in one place so dashboards and code agree.
pub mod metric {
    pub const FRAMES: &str = "candlestream_exchange_frames_total";
    pub const FRAME_ERRORS: &str = "candlestream_exchange_frame_errors_total";
    pub const TICKS_RECEIVED: &str = "candlestream_ticks_received_total";
    pub const TICKS_REJECTED: &str = "candlestream_ticks_rejected_total";
    pub const UNKNOWN_CHANNEL: &str = "candlestream_exchange_unknown_channel_total";
    pub const EXCHANGE_ERRORS: &str = "candlestream_exchange_error_events_total";
    pub const RECONNECTS: &str = "candlestream_exchange_reconnects_total";
    pub const SEQUENCE_GAPS: &str = "candlestream_exchange_sequence_gaps_total";
    pub const MISSED_MESSAGES: &str = "candlestream_exchange_missed_messages_total";
    pub const TRADES_RECEIVED: &str = "candlestream_trades_received_total";
    pub const TRADES_DUPLICATE: &str = "candlestream_trades_duplicates_suppressed_total";
    pub const TRADES_REPAIRED: &str = "candlestream_trades_repaired_total";
    pub const TRADES_REJECTED: &str = "candlestream_trades_rejected_total";
    pub const REST_REQUESTS: &str = "candlestream_rest_requests_total";
    pub const RATE_LIMIT_WAITS: &str = "candlestream_rest_rate_limit_waits_total";
    pub const TIME_ADJUSTED: &str = "candlestream_ticks_time_adjusted_total";
    pub const PRODUCED: &str = "candlestream_kafka_produced_total";
    pub const DELIVERY_ERRORS: &str = "candlestream_kafka_delivery_errors_total";
    pub const IN_FLIGHT: &str = "candlestream_kafka_in_flight";
    pub const ENCODE_ERRORS: &str = "candlestream_encode_errors_total";
    pub const CONSUMED: &str = "candlestream_consumer_records_total";
    pub const CONSUMER_LAG: &str = "candlestream_consumer_lag";
    pub const DECODE_RETRIES: &str = "candlestream_consumer_decode_retries_total";
    pub const DEAD_LETTERS: &str = "candlestream_consumer_dead_letters_total";
    pub const POINTS_WRITTEN: &str = "candlestream_influx_points_written_total";
    pub const WRITE_ERRORS: &str = "candlestream_influx_write_errors_total";
    pub const WRITE_SECONDS: &str = "candlestream_influx_write_seconds";
}

/// Installs the global tracing subscriber. Safe to call more than once (tests do).
pub fn init_logging(cfg: &LogConfig) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&cfg.level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(true);
    let _ = match cfg.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Human => builder.try_init(),
    };
}

/// The process-wide Prometheus recorder; installed on first use.
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (tests); ours then only renders nothing.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// Something that must keep happening for the process to be healthy.
#[derive(Debug)]
pub struct Liveness {
    name: &'static str,
    max_silence: Duration,
    origin: Instant,
    last_ms: AtomicU64,
    /// When set, silence only counts while work is waiting (e.g. unacknowledged messages).
    pending: Option<AtomicI64>,
}

impl Liveness {
    pub fn beat(&self) {
        self.last_ms.store(self.origin.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    pub fn add_pending(&self, n: i64) {
        if let Some(p) = &self.pending {
            p.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub fn pending(&self) -> i64 {
        self.pending.as_ref().map_or(0, |p| p.load(Ordering::Relaxed))
    }

    fn problem(&self) -> Option<String> {
        if self.pending.is_some() && self.pending() <= 0 {
            return None;
        }
        let now = self.origin.elapsed().as_millis() as u64;
        let silent = Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)));
        let waiting = self.pending.as_ref().map_or(String::new(), |_| format!(" while {} wait", self.pending()));
        (silent > self.max_silence).then(|| format!("{}: nothing for {:.0?}{waiting}", self.name, silent))
    }
}

/// The set of liveness checks behind /healthz.
#[derive(Debug, Clone, Default)]
pub struct Health {
    checks: Arc<std::sync::Mutex<Vec<Arc<Liveness>>>>,
}

impl Health {
    /// Adds a check that fails after `max_silence` without a beat.
    pub fn liveness(&self, name: &'static str, max_silence: Duration) -> Arc<Liveness> {
        self.add(name, max_silence, None)
    }

    /// Adds a check that fails after `max_silence` without a beat while work is pending.
    pub fn progress(&self, name: &'static str, max_silence: Duration) -> Arc<Liveness> {
        self.add(name, max_silence, Some(AtomicI64::new(0)))
    }

    fn add(&self, name: &'static str, max_silence: Duration, pending: Option<AtomicI64>) -> Arc<Liveness> {
        let check = Arc::new(Liveness {
            name,
            max_silence,
            origin: Instant::now(),
            last_ms: AtomicU64::new(0),
            pending,
        });
        self.checks.lock().expect("health lock").push(check.clone());
        check
    }

    /// `Ok` when healthy, otherwise every failing check.
    pub fn status(&self) -> Result<(), Vec<String>> {
        let problems: Vec<String> =
            self.checks.lock().expect("health lock").iter().filter_map(|c| c.problem()).collect();
        if problems.is_empty() { Ok(()) } else { Err(problems) }
    }
}

/// Serves /healthz and /metrics until `cancel`; returns the bound address.
pub async fn serve_http(
    listen: SocketAddr,
    health: Health,
    cancel: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let metrics = prometheus();
    let checks = health.clone();
    let app = Router::new()
        .route(
            "/healthz",
            get(move || {
                let health = checks.clone();
                async move {
                    match health.status() {
                        Ok(()) => (StatusCode::OK, "ok\n".to_string()),
                        Err(p) => (StatusCode::SERVICE_UNAVAILABLE, p.join("\n") + "\n"),
                    }
                }
            }),
        )
        .route("/metrics", get(move || async move { metrics.render() }));
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(log_transitions(health.clone(), cancel.clone()));
    tokio::spawn(async move {
        let server = axum::serve(listener, app).with_graceful_shutdown(cancel.cancelled_owned());
        if let Err(e) = server.await {
            tracing::error!(error = %e, "health/metrics server failed");
        }
    });
    tracing::info!(%addr, "serving /healthz and /metrics");
    Ok(addr)
}

/// Logs every change of health, so that an operator reading logs sees what /healthz says.
async fn log_transitions(health: Health, cancel: CancellationToken) {
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let mut healthy = true;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        match (healthy, health.status()) {
            (true, Err(problems)) => {
                tracing::error!(?problems, "unhealthy");
                healthy = false;
            }
            (false, Ok(())) => {
                tracing::info!("healthy again");
                healthy = true;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_check_only_fails_while_work_waits() {
        let health = Health::default();
        let acks = health.progress("kafka_ack", Duration::ZERO);
        std::thread::sleep(Duration::from_millis(5));
        assert!(health.status().is_ok(), "nothing pending, nothing to wait for");
        acks.add_pending(1);
        let err = health.status().unwrap_err();
        assert!(err[0].starts_with("kafka_ack"), "{err:?}");
        acks.add_pending(-1);
        assert!(health.status().is_ok());
    }

    #[test]
    fn liveness_fails_after_silence_and_recovers_on_beat() {
        let health = Health::default();
        let data = health.liveness("exchange", Duration::from_millis(20));
        assert!(health.status().is_ok());
        std::thread::sleep(Duration::from_millis(30));
        assert!(health.status().is_err());
        data.beat();
        assert!(health.status().is_ok());
    }
}
