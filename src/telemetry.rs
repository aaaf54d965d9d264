//! Structured logs, Prometheus metrics and the /healthz + /metrics endpoint.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
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
    /// Trade history requests waiting for their turn, per class (repair, backfill).
    pub const TRADE_HISTORY_QUEUED: &str = "candlestream_rest_trades_queued";
    /// How long the oldest of them has waited, per class.
    pub const TRADE_HISTORY_OLDEST_WAIT: &str = "candlestream_rest_trades_oldest_wait_seconds";
    /// Symbols per backfill state (waiting, running, done).
    pub const BACKFILL_SYMBOLS: &str = "candlestream_backfill_symbols";
    /// An estimate of the time the backfill still takes.
    pub const BACKFILL_REMAINING: &str = "candlestream_backfill_remaining_seconds";
    /// Symbols whose backfill starts at the newest trade the trades topic held at start.
    pub const BACKFILL_RESUMED: &str = "candlestream_backfill_resumed_symbols";
    pub const TIME_ADJUSTED: &str = "candlestream_ticks_time_adjusted_total";
    pub const PRODUCED: &str = "candlestream_kafka_produced_total";
    pub const DELIVERY_ERRORS: &str = "candlestream_kafka_delivery_errors_total";
    pub const IN_FLIGHT: &str = "candlestream_kafka_in_flight";
    /// Age of the oldest record handed to Kafka and not yet acknowledged (0 when none).
    pub const OLDEST_UNACKED: &str = "candlestream_producer_oldest_unacked_seconds";
    pub const ENCODE_ERRORS: &str = "candlestream_encode_errors_total";
    pub const CONSUMED: &str = "candlestream_consumer_records_total";
    /// Records the consumer group has not committed yet, per topic and partition.
    pub const CONSUMER_LAG: &str = "candlestream_consumer_lag_records";
    pub const DECODE_RETRIES: &str = "candlestream_consumer_decode_retries_total";
    pub const DEAD_LETTERS: &str = "candlestream_consumer_dead_letters_total";
    pub const POINTS_WRITTEN: &str = "candlestream_influx_points_written_total";
    pub const WRITE_ERRORS: &str = "candlestream_influx_write_errors_total";
    pub const WRITE_SECONDS: &str = "candlestream_influx_write_seconds";
    pub const PIPELINE_LATENCY: &str = "candlestream_pipeline_latency_seconds";
    pub const EXCHANGE_TO_STORE: &str = "candlestream_exchange_to_store_seconds";
    pub const PAUSES: &str = "candlestream_consumer_pauses_total";
    pub const REBALANCES: &str = "candlestream_consumer_rebalances_total";
    pub const CANDLES_CHECKED: &str = "candlestream_candles_checked_total";
    pub const CANDLES_VERIFIED: &str = "candlestream_candles_verified_ratio";
    /// Per timeframe: how long the oldest closed candle the verifier has not checked yet (over
    /// all symbols) has been closed; 0 when every closed candle was checked. At start it is the
    /// lookback until the first check of every series.
    pub const VERIFY_LAG: &str = "candlestream_verify_lag_seconds";
    /// How long the verifier's most overdue work has waited since it became due (a candle closed
    /// plus `verify.grace`, or a re-check), counted from start for the lookback: the scheduler's
    /// backlog. At most about [`VERIFY_ROUND`] while checks succeed; it grows without bound while
    /// they fail.
    pub const VERIFY_OVERDUE: &str = "candlestream_verify_overdue_seconds";
    /// The time one check of every series takes at `verify.rest_candles_per_minute`.
    pub const VERIFY_ROUND: &str = "candlestream_verify_round_seconds";
    /// Symbols the verifier checks now.
    pub const VERIFY_SYMBOLS: &str = "candlestream_verify_symbols";
    /// Symbols the verifier began to check at runtime because a pattern matched a new listing.
    pub const VERIFY_SYMBOLS_ADDED: &str = "candlestream_verify_symbols_added_total";
    /// Symbols the verifier stopped checking at runtime because they were delisted.
    pub const VERIFY_SYMBOLS_REMOVED: &str = "candlestream_verify_symbols_removed_total";
    pub const CANDLES_REPAIRED: &str = "candlestream_candles_repaired_total";
    /// Candles left as they are after `verify.max_repairs` heals (1m) or re-checks (wider): they
    /// still differ from Bitfinex's. Per symbol and timeframe, at 0 from the series' start.
    pub const CANDLES_GIVEN_UP: &str = "candlestream_candles_given_up_total";
    /// Exchange time of the newest trade InfluxDB acknowledged, per symbol (Unix seconds):
    /// `time() - it` is how long a symbol has had no trade stored.
    pub const LAST_TRADE_STORED: &str = "candlestream_trade_last_stored_timestamp_seconds";
    /// When the websocket last connected (Unix seconds).
    pub const LAST_CONNECT: &str = "candlestream_exchange_last_connect_timestamp_seconds";
    /// Symbols streamed now (configured, listed, not excluded, not refused).
    pub const SYMBOLS: &str = "candlestream_exchange_symbols";
    /// Symbols subscribed at runtime because a pattern matched a new listing.
    pub const SYMBOLS_ADDED: &str = "candlestream_exchange_symbols_added_total";
    /// Symbols unsubscribed at runtime: `reason` = delisted, or rejected (error 10300).
    pub const SYMBOLS_REMOVED: &str = "candlestream_exchange_symbols_removed_total";
    /// Channels subscribed on the websocket now, per `channel` (ticker, trades). Beside
    /// [`SYMBOLS`]: a symbol whose channel is not subscribed (its connection down, waiting for an
    /// open, or refused) is polled over REST meanwhile, within the REST budget.
    pub const CHANNELS_SUBSCRIBED: &str = "candlestream_exchange_channels_subscribed";
    /// Websocket shards (connections of up to `channels_per_connection` channels) now.
    pub const SHARDS: &str = "candlestream_exchange_shards";
    /// Age (since the producer received it) of the oldest record of a partition that Kafka holds
    /// and the consumer group has not committed, i.e. not yet stored in InfluxDB; 0 when none.
    /// Per topic and partition, read by every consumer process from the brokers.
    pub const OLDEST_UNSTORED: &str = "candlestream_oldest_unstored_seconds";
    /// Stalls logged (a record older than `pipeline.stall_warning` not stored), by the stage
    /// where it waited: fetch, write or commit.
    pub const STALLS: &str = "candlestream_pipeline_stalls_total";
    /// 1 while /healthz answers 200, 0 while it answers 503.
    pub const HEALTHY: &str = "candlestream_healthy";
}

/// Bucket bounds of the latency histograms, in seconds: from a few milliseconds (a record
/// written at once) to minutes (an outage held the batch).
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Installs the global tracing subscriber. Safe to call more than once (tests do).
pub fn init_logging(cfg: &LogConfig) {
    // The consumer closes before dropping, so rust-rdkafka's drop finds it closed and logs its
    // failed second close as an error; that module has nothing else worth an operator's time.
    let quiet = "rdkafka::consumer::base_consumer=off"
        .parse()
        .expect("directive");
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(&cfg.level).add_directive(quiet));
    // Logs on stderr: stdout is for what a command prints (audit's report), so that
    // `candlestream audit > report.txt` holds the report alone. Docker collects both.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(true);
    let _ = match cfg.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Human => builder.try_init(),
    };
}

/// The process-wide Prometheus recorder; installed on first use.
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        use metrics_exporter_prometheus::Matcher;
        let mut builder = PrometheusBuilder::new();
        // Write latency too: a summary per process cannot be summed over consumers.
        for name in [
            metric::PIPELINE_LATENCY,
            metric::EXCHANGE_TO_STORE,
            metric::WRITE_SECONDS,
        ] {
            builder = builder.set_buckets_for_metric(Matcher::Full(name.into()), LATENCY_BUCKETS).expect("buckets");
        }
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (tests); ours then only renders nothing.
        let _ = metrics::set_global_recorder(recorder);
        metrics::describe_histogram!(
            metric::PIPELINE_LATENCY,
            metrics::Unit::Seconds,
            "From the producer receiving a record to InfluxDB acknowledging its point, per record kind"
        );
        metrics::describe_histogram!(
            metric::WRITE_SECONDS,
            metrics::Unit::Seconds,
            "One InfluxDB write that succeeded, from the request to its acknowledgement"
        );
        metrics::describe_histogram!(
            metric::EXCHANGE_TO_STORE,
            metrics::Unit::Seconds,
            "From the exchange's timestamp to InfluxDB acknowledging the point, per record kind; includes the clock skew between the exchange and this host (can be negative)"
        );
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
        self.last_ms
            .store(self.origin.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Work starts or stops waiting. When work starts waiting after none did, silence is
    /// counted from now: a stream quiet for longer than `max_silence` is not unhealthy the
    /// moment its next record waits, only when that record waits `max_silence` unanswered.
    pub fn add_pending(&self, n: i64) {
        let Some(p) = &self.pending else { return };
        // Beat first: a status read in between must not see waiting work with the old silence.
        if n > 0 && p.load(Ordering::Relaxed) <= 0 {
            self.beat();
        }
        p.fetch_add(n, Ordering::Relaxed);
    }

    pub fn pending(&self) -> i64 {
        self.pending
            .as_ref()
            .map_or(0, |p| p.load(Ordering::Relaxed))
    }

    fn problem(&self) -> Option<String> {
        if self.pending.is_some() && self.pending() <= 0 {
            return None;
        }
        let now = self.origin.elapsed().as_millis() as u64;
        let silent =
            Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)));
        let waiting = self
            .pending
            .as_ref()
            .map_or(String::new(), |_| format!(" while {} wait", self.pending()));
        (silent > self.max_silence)
            .then(|| format!("{}: nothing for {:.0?}{waiting}", self.name, silent))
    }
}

/// A condition someone must fix (bad credentials, a missing database): failing from `set`
/// until `clear`, with the reason /healthz shows.
#[derive(Debug)]
pub struct Fault {
    name: &'static str,
    reason: std::sync::Mutex<Option<String>>,
}

impl Fault {
    /// Returns true when the fault was not set before (a transition worth logging).
    pub fn set(&self, reason: String) -> bool {
        self.reason
            .lock()
            .expect("fault lock")
            .replace(reason)
            .is_none()
    }

    /// Returns true when the fault was set (a recovery worth logging).
    pub fn clear(&self) -> bool {
        self.reason.lock().expect("fault lock").take().is_some()
    }

    fn problem(&self) -> Option<String> {
        self.reason
            .lock()
            .expect("fault lock")
            .as_ref()
            .map(|r| format!("{}: {r}", self.name))
    }
}

/// The set of liveness checks and faults behind /healthz.
#[derive(Debug, Clone, Default)]
pub struct Health {
    checks: Arc<std::sync::Mutex<Vec<Arc<Liveness>>>>,
    faults: Arc<std::sync::Mutex<Vec<Arc<Fault>>>>,
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

    /// Adds a check that fails while a fault is set.
    pub fn fault(&self, name: &'static str) -> Arc<Fault> {
        let fault = Arc::new(Fault {
            name,
            reason: std::sync::Mutex::new(None),
        });
        self.faults.lock().expect("health lock").push(fault.clone());
        fault
    }

    fn add(
        &self,
        name: &'static str,
        max_silence: Duration,
        pending: Option<AtomicI64>,
    ) -> Arc<Liveness> {
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
        let mut problems: Vec<String> = self
            .faults
            .lock()
            .expect("health lock")
            .iter()
            .filter_map(|f| f.problem())
            .collect();
        problems.extend(
            self.checks
                .lock()
                .expect("health lock")
                .iter()
                .filter_map(|c| c.problem()),
        );
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

/// Serves /healthz and /metrics until `cancel`; returns the bound address.
pub async fn serve_http(
    listen: SocketAddr,
    health: Health,
    cancel: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let metrics = prometheus();
    // RSS, CPU, threads and open files of this process, read at each scrape.
    let process = metrics_process::Collector::default();
    process.describe();
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
        .route(
            "/metrics",
            get(move || async move {
                process.collect();
                metrics.render()
            }),
        );
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
        let status = health.status();
        metrics::gauge!(metric::HEALTHY).set(if status.is_ok() { 1.0 } else { 0.0 });
        match (healthy, status) {
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

/// At most the first 200 characters of `text`: enough of a frame, a body or a line to recognise
/// it in a log line.
pub fn truncate(text: &str) -> &str {
    let end = text.char_indices().nth(200).map_or(text.len(), |(i, _)| i);
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_check_only_fails_while_work_waits() {
        let health = Health::default();
        let acks = health.progress("kafka_ack", Duration::ZERO);
        std::thread::sleep(Duration::from_millis(5));
        assert!(
            health.status().is_ok(),
            "nothing pending, nothing to wait for"
        );
        acks.add_pending(1);
        std::thread::sleep(Duration::from_millis(5));
        let err = health.status().unwrap_err();
        assert!(err[0].starts_with("kafka_ack"), "{err:?}");
        acks.add_pending(-1);
        assert!(health.status().is_ok());
    }

    #[test]
    fn silence_counts_from_when_work_started_waiting() {
        let health = Health::default();
        let acks = health.progress("kafka_ack", Duration::from_millis(50));
        std::thread::sleep(Duration::from_millis(80));
        acks.add_pending(1);
        assert!(
            health.status().is_ok(),
            "a record that just started waiting after a quiet spell is not overdue"
        );
        acks.add_pending(1);
        std::thread::sleep(Duration::from_millis(80));
        let err = health.status().unwrap_err();
        assert!(err[0].contains("while 2 wait"), "{err:?}");
    }

    #[test]
    fn a_fault_fails_health_with_its_reason_until_cleared() {
        let health = Health::default();
        let fault = health.fault("influx_writes");
        assert!(health.status().is_ok());
        assert!(fault.set("InfluxDB rejected the credentials (HTTP 401)".into()));
        assert!(
            !fault.set("again".into()),
            "setting a set fault is no transition"
        );
        assert_eq!(health.status().unwrap_err(), ["influx_writes: again"]);
        assert!(fault.clear());
        assert!(!fault.clear());
        assert!(health.status().is_ok());
    }

    #[test]
    fn latency_histograms_render_as_histograms() {
        let handle = prometheus();
        metrics::histogram!(metric::PIPELINE_LATENCY, "kind" => "ticker").record(0.02);
        let text = handle.render();
        if !text.is_empty() {
            // Empty only when another test installed a recorder first.
            assert!(
                text.contains("# TYPE candlestream_pipeline_latency_seconds histogram"),
                "{text}"
            );
            assert!(
                text.contains(
                    "candlestream_pipeline_latency_seconds_bucket{kind=\"ticker\",le=\"0.025\"} 1"
                ),
                "{text}"
            );
        }
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
