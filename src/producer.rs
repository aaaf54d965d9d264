//! `candlestream producer`: Bitfinex → Avro (Schema Registry) → Kafka.

pub(crate) mod delivery;

use std::time::Duration;

use rdkafka::producer::FutureProducer;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::codec::{CodecError, Encoder};
use crate::config::Settings;
use crate::exchange::bitfinex;
use crate::kafka::producer_config;
use crate::model::{MonotonicClock, Record, RecordKind};
use crate::retry::backoff;
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

impl ProducerError {
    pub fn is_retryable(&self) -> bool {
        match self {
            ProducerError::Codec(e) => e.is_retryable(),
            ProducerError::Kafka(e) => e.is_retryable(),
            ProducerError::Exchange(e) => e.is_retryable(),
            ProducerError::Http(_) => false,
        }
    }
}

/// Runs until `cancel`, then drains what was read and flushes it to Kafka within
/// `producer.shutdown_timeout`.
pub async fn run(settings: Settings, cancel: CancellationToken) -> Result<(), ProducerError> {
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

    let producer: FutureProducer = producer_config(&settings.kafka)
        .create()
        .map_err(KafkaStageError::Client)?;
    let (tracker, settle) = DeliveryTracker::new(producer, acks);
    // Consumer lag is read here, where it survives every consumer being stopped.
    let topics = RecordKind::ALL.map(|k| settings.kafka.topic_of(k).to_string());
    tokio::spawn(crate::kafka::report_group_lag(
        settings.kafka.clone(),
        topics.to_vec(),
        http_stop.clone(),
    ));
    let (tx, mut rx) = mpsc::channel(settings.producer.buffer);
    let rest = bitfinex::RestClient::new(&settings.bitfinex, cancel.clone())?;
    let exchange = tokio::spawn(bitfinex::run(
        settings.bitfinex.clone(),
        rest,
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
    let mut deadline: Option<Instant> = None;
    let mut abandoned = 0usize;
    loop {
        let mut record = tokio::select! {
            next = rx.recv() => match next { Some(t) => t, None => break },
            _ = cancel.cancelled(), if deadline.is_none() => {
                tracing::info!("shutting down: no new exchange reads; delivering what was read");
                deadline = Some(Instant::now() + settings.producer.shutdown_timeout);
                continue;
            }
        };
        if let Record::Tick(tick) = &mut record
            && clock.stamp(tick) > 0
        {
            metrics::counter!(metric::TIME_ADJUSTED).increment(1);
        }
        let payload = match encode(&encoder, &record, &settings, deadline).await {
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
        if !tracker.send(&out, deadline).await {
            abandoned += 1 + rx.len();
            break;
        }
    }
    drop(rx);
    let _ = exchange.await;

    let remaining = deadline.map_or(settings.producer.shutdown_timeout, |d| {
        d.saturating_duration_since(Instant::now())
    });
    let flushed = tracker.flush(remaining).await;
    drop(tracker);
    if tokio::time::timeout(remaining.max(Duration::from_millis(100)), settle)
        .await
        .is_err()
    {
        tracing::error!("delivery reports still outstanding at shutdown");
    }
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

/// Registers the schema of `kind`, retrying while the registry is unreachable. `None` when
/// cancelled.
async fn register_schema(
    encoder: &Encoder,
    kind: RecordKind,
    settings: &Settings,
    cancel: &CancellationToken,
) -> Result<Option<u32>, CodecError> {
    let mut delays = backoff(
        Duration::from_millis(500),
        settings.producer.retry_backoff_max,
    );
    loop {
        match encoder.register(kind).await {
            Ok(id) => return Ok(Some(id)),
            Err(e) if e.is_retryable() => {
                let wait = delays.next().unwrap_or(settings.producer.retry_backoff_max);
                tracing::error!(error = %e, url = %settings.schema_registry.url, ?wait, "cannot register the schema; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = cancel.cancelled() => return Ok(None),
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// Encodes one record, retrying while the registry is unreachable; `None` means the record is
/// given up (it cannot be encoded, or shutdown's deadline passed).
async fn encode(
    encoder: &Encoder,
    record: &Record,
    settings: &Settings,
    deadline: Option<Instant>,
) -> Option<Vec<u8>> {
    let mut delays = backoff(
        Duration::from_millis(200),
        settings.producer.retry_backoff_max,
    );
    loop {
        match encoder.encode(record).await {
            Ok(p) => return Some(p),
            Err(e) if e.is_retryable() && deadline.is_none_or(|d| Instant::now() < d) => {
                let wait = delays.next().unwrap_or(settings.producer.retry_backoff_max);
                tracing::warn!(error = %e, ?wait, "encode needs the registry; retrying");
                tokio::time::sleep(wait).await;
            }
            Err(e) => {
                metrics::counter!(metric::ENCODE_ERRORS).increment(1);
                tracing::error!(error = %e, kind = record.kind().label(), symbol = record.symbol(), "record cannot be encoded; dropped");
                return None;
            }
        }
    }
}
