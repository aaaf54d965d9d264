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
    /// Stream Bitfinex tickers into Kafka as Avro (Confluent wire format), keyed by symbol.
    ///
    /// Subscribes every `bitfinex.symbols` ticker over websocket (REST polling while a connection
    /// is down, or only REST with `bitfinex.mode = "rest"`), registers schemas/ticker.avsc under
    /// `<kafka.topic>-value` and produces with acks=all and idempotence. SIGINT/SIGTERM stop
    /// reading and flush what is in flight within `producer.shutdown_timeout`, then exit 0.
    Producer,
    /// Write ticks from Kafka to InfluxDB as a consumer group, at-least-once.
    ///
    /// Joins `kafka.group_id` on `kafka.topic`, decodes each record through the Schema Registry
    /// and writes line protocol to InfluxDB (`influx.api` "v2" or "v1") in batches of
    /// `influx.batch_size` or every `influx.flush_interval`. Offsets are committed only after
    /// InfluxDB acknowledged the batch; points are keyed by exchange time, so replays overwrite.
    /// Records that can never be decoded go, unchanged, to `kafka.dlq_topic` with headers saying
    /// why. SIGINT/SIGTERM write the current batch, commit, leave the group and exit 0.
    Consumer {
        /// Group members in this process (default: `consumer.workers`).
        #[arg(long)]
        workers: Option<usize>,
    },
    /// Exit 0 when a running producer or consumer reports healthy on /healthz (for container
    /// healthchecks; the runtime image has no curl).
    Healthcheck {
        /// Defaults to http://127.0.0.1:<port of http.listen>/healthz.
        #[arg(long)]
        url: Option<String>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let settings = Settings::load(cli.config.as_deref()).context("loading configuration")?;
    match cli.command {
        Command::Producer => {
            let cancel = start(&settings);
            candlestream::producer::run(settings, cancel).await.context("producer failed")
        }
        Command::Consumer { workers } => {
            let cancel = start(&settings);
            let workers = workers.unwrap_or(settings.consumer.workers).max(1);
            candlestream::consumer::run(settings, workers, cancel).await.context("consumer failed")
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
    let client = reqwest::Client::builder().timeout(std::time::Duration::from_secs(3)).build()?;
    let resp = client.get(url).send().await.with_context(|| format!("GET {url}"))?;
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    anyhow::ensure!(status.is_success(), "{url}: {status}: {}", body.trim());
    Ok(())
}

async fn cancel_on_signal(cancel: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        _ = term.recv() => tracing::info!("SIGTERM received"),
    }
    cancel.cancel();
}
