use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use candlestream::config::Settings;

/// Real-time crypto candlesticks: Bitfinex → Kafka (Avro) → InfluxDB → Grafana.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Config file layered over the built-in defaults (see config/default.toml). Environment
    /// variables CANDLESTREAM__SECTION__KEY override both.
    #[arg(long, short, global = true, env = "CANDLESTREAM_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Stream Bitfinex ticker updates and trades into Kafka as Avro (Confluent wire format),
    /// keyed by symbol.
    ///
    /// Subscribes the ticker and trades channels of every `bitfinex.symbols` over websocket (REST
    /// polling while a connection is down, or only REST with `bitfinex.mode = "rest"`), registers
    /// schemas/ticker.avsc under `<kafka.topic>-value` and schemas/trade.avsc under
    /// `<kafka.trades_topic>-value`, and produces with acks=all and idempotence. SIGINT/SIGTERM
    /// stop reading and deliver what is in flight within `producer.shutdown_timeout`, then exit 0.
    Producer,
    /// Write ticker updates and trades from Kafka to InfluxDB as a consumer group,
    /// at-least-once.
    ///
    /// Joins `kafka.group_id` on `kafka.topic` and `kafka.trades_topic`, decodes each record through the Schema Registry
    /// and writes line protocol to InfluxDB (`influx.api` "v2" or "v1") as soon as records arrive,
    /// up to `influx.batch_size` per write. Offsets are committed only after
    /// InfluxDB acknowledged the batch; points are keyed by exchange time, so replays overwrite.
    /// Records that can never be decoded go, unchanged, to `kafka.dlq_topic` with headers saying
    /// why. SIGINT/SIGTERM write the current batch, commit, leave the group and exit within
    /// `consumer.shutdown_timeout`; what could not be written by then is not committed.
    Consumer {
        /// Group members in this process (default: `consumer.workers`).
        #[arg(long)]
        workers: Option<usize>,
    },
    /// Compare the stored candles with Bitfinex's own, minute by minute.
    ///
    /// For each symbol, InfluxDB computes the 1-minute OHLCV candles from the stored trades (the
    /// dashboard's query), and Bitfinex's `/v2/candles/trade:1m:{symbol}/hist` gives its own.
    /// Only closed minutes are compared: the open candle and the minute before it, whose trades
    /// may still be on their way, are skipped. Prices must be equal; volumes within a relative
    /// 1e-9. Prints a table per symbol (compared, equal, different, missing here, missing at the
    /// exchange) and the first differences. Candles requests keep under
    /// `bitfinex.rest_candles_per_minute`, the audit's share of Bitfinex's per-IP limit, with a
    /// limiter of its own; a rate-limit answer is retried with backoff until `--timeout`.
    ///
    /// Exit status: 0 when every compared candle is equal, 1 when any differs or is missing on
    /// one side, 2 when the audit could not run (InfluxDB or Bitfinex unreachable, bad config,
    /// not done within `--timeout`, SIGINT/SIGTERM).
    Audit {
        /// How far back to look, e.g. "30m", "6h", "2d".
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        since: std::time::Duration,
        /// Give up (exit 2) when not done by then. One candles request covers a symbol's
        /// `--since` up to 10 000 minutes, so many symbols take symbols / rest_candles_per_minute
        /// minutes: raise it for those.
        #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        /// Symbols to audit, comma-separated (default: `bitfinex.symbols`).
        #[arg(long, value_delimiter = ',')]
        symbols: Vec<String>,
    },
    /// Check every closed candle against Bitfinex's, continuously, and heal what differs.
    ///
    /// Every `verify.interval`, for each symbol and each of `verify.timeframes`, the candles that
    /// closed at least `verify.grace` ago are compared like `audit` does (InfluxDB's candles from
    /// the stored trades against `/v2/candles/trade:{TF}:{symbol}/hist`); the first pass covers
    /// `verify.lookback`. Each verdict is a point in `verify.measurement` (string field `status`:
    /// equal, differs, missing_here, missing_there, repaired). A 1-minute candle that differs or is
    /// missing here gets its trades from `/v2/trades/{symbol}/hist` produced to the trades topic
    /// (duplicates overwrite), and is checked again once they are stored, at most
    /// `verify.max_repairs` times. Never deletes data. Serves /healthz and /metrics like the other
    /// roles. SIGINT/SIGTERM stop at once and exit 0 after delivering healed trades in flight.
    Verify,
    /// Exit 0 when a running producer, consumer or verifier reports healthy on /healthz (for container
    /// healthchecks; the runtime image has no curl).
    Healthcheck {
        /// Defaults to http://127.0.0.1:<port of http.listen>/healthz.
        #[arg(long)]
        url: Option<String>,
    },
}

/// Exit status of `audit` when it could not run at all.
const AUDIT_FAILED: i32 = 2;

/// How long the exit waits for blocking work still running when a role has returned. A role
/// returns within its shutdown budget, but a blocking librdkafka call it no longer waits for (the
/// producer's consumer-lag read, a metadata request to brokers that are down) can take seconds
/// more, and dropping a tokio runtime waits for every blocking task without a bound.
const EXIT_GRACE: std::time::Duration = std::time::Duration::from_millis(300);

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(run());
    runtime.shutdown_timeout(EXIT_GRACE);
    result
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let settings = Settings::load(cli.config.as_deref());
    if let (Command::Audit { .. }, Err(e)) = (&cli.command, &settings) {
        eprintln!("error: loading configuration: {e:#}");
        std::process::exit(AUDIT_FAILED);
    }
    let settings = settings.context("loading configuration")?;
    match cli.command {
        Command::Audit {
            since,
            symbols,
            timeout,
        } => {
            let cancel = start(&settings);
            let symbols = if symbols.is_empty() {
                settings.bitfinex.symbols.clone()
            } else {
                symbols
            };
            let audit = candlestream::audit::run(&settings, &symbols, since, cancel.clone());
            let done = tokio::select! {
                biased;
                () = cancel.cancelled() => Err("stopped by a signal".to_string()),
                done = tokio::time::timeout(timeout, audit) => match done {
                    Ok(done) => done.map_err(|e| e.to_string()),
                    Err(_) => Err(format!(
                        "not done within --timeout {}",
                        humantime::format_duration(timeout)
                    )),
                },
            };
            match done {
                Ok(reports) => {
                    print!("{}", candlestream::audit::render(&reports, since));
                    std::process::exit(if reports.iter().all(|r| r.is_clean()) {
                        0
                    } else {
                        1
                    });
                }
                Err(e) => {
                    eprintln!("error: the audit could not run: {e}");
                    std::process::exit(AUDIT_FAILED);
                }
            }
        }
        Command::Producer => {
            let cancel = start(&settings);
            candlestream::producer::run(settings, cancel)
                .await
                .context("producer failed")
        }
        Command::Consumer { workers } => {
            let cancel = start(&settings);
            let workers = workers.unwrap_or(settings.consumer.workers).max(1);
            candlestream::consumer::run(settings, workers, cancel)
                .await
                .context("consumer failed")
        }
        Command::Verify => {
            let cancel = start(&settings);
            candlestream::verify::run(settings, cancel)
                .await
                .context("verifier failed")
        }
        Command::Healthcheck { url } => {
            let port = settings.http.listen.port();
            healthcheck(&url.unwrap_or_else(|| format!("http://127.0.0.1:{port}/healthz"))).await
        }
    }
}

/// Logging, and one cancellation token that SIGINT/SIGTERM trip.
fn start(settings: &Settings) -> CancellationToken {
    candlestream::telemetry::init_logging(&settings.log);
    let cancel = CancellationToken::new();
    tokio::spawn(cancel_on_signal(cancel.clone()));
    cancel
}

async fn healthcheck(url: &str) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(3))
        .build()?;
    let resp = client
        .get(url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    anyhow::ensure!(status.is_success(), "{url}: {status}: {}", body.trim());
    Ok(())
}

async fn cancel_on_signal(cancel: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        _ = term.recv() => tracing::info!("SIGTERM received"),
    }
    cancel.cancel();
}
