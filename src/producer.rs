//! `candlestream producer`: Bitfinex → Avro (Schema Registry) → Kafka.

pub(crate) mod delivery;
pub mod resume;

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::codec::{CodecError, Encoder};
use crate::config::Settings;
use crate::exchange::bitfinex;
use crate::kafka::producer_config;
use crate::model::{MonotonicClock, Record, RecordKind};
use crate::retry::{Backoff, GaveUp, Shutdown, Verdict, retry};
use crate::telemetry::{Health, metric, serve_http};
use delivery::{DeliveryTracker, KafkaStageError, Outgoing};

#[derive(Debug, thiserror::Error)]
pub enum ProducerError {
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error(transparent)]
    Kafka(#[from] KafkaStageError),
    #[error(transparent)]
    Exchange(#[from] bitfinex::ExchangeError),
    #[error("cannot serve /healthz and /metrics: {0}")]
    Http(#[from] std::io::Error),
}

/// Runs until `cancel`, then drains what was read and flushes it to Kafka; the whole shutdown
/// takes at most `producer.shutdown_timeout`, counted from the cancellation.
pub async fn run(settings: Settings, cancel: CancellationToken) -> Result<(), ProducerError> {
    let shutdown = Shutdown::new(cancel.clone(), settings.producer.shutdown_timeout);
    let health = Health::default();
    let data = health.liveness("exchange_data", settings.health.max_exchange_silence);
    let acks = health.progress("kafka_acks", settings.health.max_ack_silence);
    let http_stop = CancellationToken::new();
    let _http_guard = http_stop.clone().drop_guard();
    serve_http(settings.http.listen, health, http_stop.clone()).await?;

    let encoder = Encoder::new(&settings.schema_registry, &settings.kafka)?;
    for kind in RecordKind::ALL {
        let Some(schema_id) = register_schema(&encoder, kind, &settings, &cancel).await? else {
            return Ok(());
        };
        let subject = crate::codec::value_subject(settings.kafka.topic_of(kind));
        tracing::info!(schema_id, %subject, "schema registered");
    }

    let tracker = DeliveryTracker::new(
        &producer_config(&settings.kafka),
        acks,
        shutdown.expired.clone(),
    )?;
    // Consumer lag is read here, where it survives every consumer being stopped.
    let topics = RecordKind::ALL.map(|k| settings.kafka.topic_of(k).to_string());
    tokio::spawn(crate::kafka::report_group_lag(
        settings.kafka.clone(),
        topics.to_vec(),
        http_stop.clone(),
    ));
    let (tx, mut rx) = mpsc::channel(settings.producer.buffer);
    let rest = bitfinex::RestClient::new(&settings.bitfinex, cancel.clone())?;
    // Before the exchange starts, so that backfills start where Kafka's copy ends. Patterns are
    // resolved against the listing for this (only when resuming: no listing request otherwise),
    // and the listing follower starts from the same listing instead of asking again. When it
    // cannot be read now, every symbol gets the full backfill (a trade sent twice is harmless:
    // its point is keyed by the exchange's id) and the follower reads it with retries.
    let mut listing = None;
    let resumed = if resume::enabled(&settings) {
        let selection = bitfinex::pairs::Selection::new(
            &settings.bitfinex.symbols,
            &settings.bitfinex.symbols_exclude,
        )
        .expect("symbols were validated with the configuration");
        if selection.needs_listing() {
            match rest.pairs().await {
                Ok(pairs) => listing = Some(pairs),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the list of trading pairs to resolve the symbols to resume; every symbol gets the full backfill")
                }
            }
        }
        let symbols: Vec<String> = match &listing {
            Some(pairs) => selection.resolve(pairs).into_iter().collect(),
            None if selection.needs_listing() => Vec::new(),
            None => selection.resolve(&[]).into_iter().collect(),
        };
        resume::newest_trades(&settings, &symbols, &cancel).await
    } else {
        resume::Newest::new()
    };
    let mut exchange = tokio::spawn(bitfinex::run(
        settings.bitfinex.clone(),
        rest,
        listing,
        resumed,
        tx,
        data,
        cancel.clone(),
    ));
    tracing::info!(
        topic = %settings.kafka.topic,
        trades_topic = %settings.kafka.trades_topic,
        symbols = ?settings.bitfinex.symbols,
        mode = ?settings.bitfinex.mode,
        trades = settings.bitfinex.trades,
        "producer running"
    );

    let mut clock = MonotonicClock::default();
    let mut abandoned = 0usize;
    let mut announced = false;
    // Made once: a new one per record locks and registers a waiter each time.
    let expired = shutdown.expired.cancelled();
    let stopping = cancel.cancelled();
    tokio::pin!(expired, stopping);
    loop {
        let mut record = tokio::select! {
            biased;
            _ = &mut expired => {
                abandoned += rx.len();
                break;
            }
            next = rx.recv() => match next { Some(t) => t, None => break },
            _ = &mut stopping, if !announced => {
                tracing::info!("shutting down: no new exchange reads; delivering what was read");
                announced = true;
                continue;
            }
        };
        if let Record::Tick(tick) = &mut record
            && clock.stamp(tick) > 0
        {
            metrics::counter!(metric::TIME_ADJUSTED).increment(1);
        }
        let payload = match encode(&encoder, &record, &settings, &shutdown.expired).await {
            Some(p) => p,
            None => {
                abandoned += 1;
                continue;
            }
        };
        let out = Outgoing {
            topic: settings.kafka.topic_of(record.kind()),
            key: record.symbol(),
            payload,
        };
        if !tracker.send(&out).await {
            abandoned += 1 + rx.len();
            break;
        }
    }
    drop(rx);
    // The exchange stops on `cancel`; a REST request in flight is not waited for past the
    // deadline.
    tokio::select! {
        _ = &mut exchange => {}
        _ = shutdown.expired.cancelled() => exchange.abort(),
    }

    let remaining = shutdown.remaining(settings.producer.shutdown_timeout);
    let flushed = tracker.close(remaining).await;
    match (flushed, abandoned) {
        (Ok(()), 0) => {
            tracing::info!("producer stopped; every record read was acknowledged by Kafka")
        }
        (flushed, _) => tracing::error!(
            abandoned,
            unacknowledged = ?flushed.err(),
            "producer stopped before Kafka acknowledged everything"
        ),
    }
    Ok(())
}

/// Waits between registry attempts start here; `producer.retry_backoff_max` caps them.
const REGISTRY_BACKOFF_MIN: Duration = Duration::from_millis(200);

/// Registers the schema of `kind`, retrying while the registry is unreachable. `None` when
/// cancelled.
async fn register_schema(
    encoder: &Encoder,
    kind: RecordKind,
    settings: &Settings,
    cancel: &CancellationToken,
) -> Result<Option<u32>, CodecError> {
    let registered = retry(
        Backoff::new(REGISTRY_BACKOFF_MIN, settings.producer.retry_backoff_max),
        cancel,
        || encoder.register(kind),
        |e, wait| {
            if !e.is_retryable() {
                return Verdict::Fail;
            }
            tracing::error!(error = %e, url = %settings.schema_registry.url, ?wait, "cannot register the schema; retrying");
            Verdict::Retry
        },
    )
    .await;
    match registered {
        Ok(id) => Ok(Some(id)),
        Err(GaveUp::Stopped) => Ok(None),
        Err(GaveUp::Failed(e)) => Err(e),
    }
}

/// Encodes one record, retrying while the registry is unreachable; `None` means the record is
/// given up (it cannot be encoded, or shutdown's deadline passed).
async fn encode(
    encoder: &Encoder,
    record: &Record,
    settings: &Settings,
    expired: &CancellationToken,
) -> Option<Vec<u8>> {
    // The retry machinery only once the registry is needed and away: it costs more than the
    // encoding.
    let encoded = match encoder.encode(record).await {
        Err(e) if e.is_retryable() => {
            retry(
                Backoff::new(REGISTRY_BACKOFF_MIN, settings.producer.retry_backoff_max),
                expired,
                || encoder.encode(record),
                |e, wait| {
                    if !e.is_retryable() {
                        return Verdict::Fail;
                    }
                    tracing::warn!(error = %e, ?wait, "encode needs the registry; retrying");
                    Verdict::Retry
                },
            )
            .await
        }
        done => done.map_err(GaveUp::Failed),
    };
    match encoded {
        Ok(p) => Some(p),
        Err(GaveUp::Stopped) => {
            tracing::error!(
                kind = record.kind().label(),
                symbol = record.symbol(),
                "shutdown deadline passed before the registry answered; record not sent"
            );
            None
        }
        Err(GaveUp::Failed(e)) => {
            metrics::counter!(metric::ENCODE_ERRORS).increment(1);
            tracing::error!(error = %e, kind = record.kind().label(), symbol = record.symbol(), "record cannot be encoded; dropped");
            None
        }
    }
}
