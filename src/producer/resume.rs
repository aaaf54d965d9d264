//! At start: the newest trade of each symbol the trades topic already holds, so that its backfill
//! starts there and a restart does not send again what Kafka has.
//!
//! Records are keyed by symbol, so each symbol lives in one partition, and a partition is in the
//! order the producer received its records. The newest trades are therefore at the end of each
//! partition: it is read backwards, [`CHUNK`] records at a time, until every symbol was found or
//! the records reach back past the backfill horizon. Reading a chunk goes forwards (assign at
//! its first offset, read up to the chunk after it). Where the brokers know record timestamps
//! (message format v1, Kafka 0.10+), `offsets_for_times` marks the horizon's offset; Kafka 0.9
//! has none, so the records' own receive time tells when the horizon is passed.
//!
//! A repair or backfill sends trades older than those the websocket sent before it, so the
//! highest trade found in the chunks read may fall short of the newest Kafka holds: the backfill
//! then sends a few trades again, which is harmless. What this read cannot see is a repair the
//! stopped producer had not finished: the trades of that gap newer than where it got are not
//! fetched again (see the README).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::codec::{CodecError, Decoder};
use crate::config::Settings;
use crate::kafka::client_config;
use crate::model::{Record, Source, now_ms};
use crate::telemetry::metric;

/// Records read from a partition at a time. Small enough that a partition whose symbols all
/// traded recently is done in one round, large enough that a quiet symbol far back takes few
/// fetches.
const CHUNK: i64 = 5_000;

/// Per symbol, the newest trade found: (exchange time, id).
pub type Newest = HashMap<String, (i64, i64)>;

#[derive(Debug, thiserror::Error)]
enum ResumeError {
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("a Kafka metadata call panicked or was cancelled: {0}")]
    Blocking(#[from] tokio::task::JoinError),
}

/// True when the producer resumes from Kafka at all: trades are streamed, with a backfill to
/// shorten, and `bitfinex.resume_timeout` is not "0s".
pub fn enabled(settings: &Settings) -> bool {
    let cfg = &settings.bitfinex;
    cfg.trades && !cfg.backfill.is_zero() && !cfg.resume_timeout.is_zero()
}

/// The newest trade of each of `symbols` in `kafka.trades_topic`, within
/// `bitfinex.resume_timeout`. Whatever cannot be read by then (or at all) is left out, with a
/// warning: those symbols get the full backfill.
pub async fn newest_trades(
    settings: &Settings,
    symbols: &[String],
    cancel: &CancellationToken,
) -> Newest {
    let cfg = &settings.bitfinex;
    let mut found = Newest::new();
    if !enabled(settings) {
        return found;
    }
    let horizon_ms = now_ms() - cfg.backfill.as_millis() as i64;
    let started = Instant::now();
    let deadline = started + cfg.resume_timeout;
    let scanned = {
        let scan = tokio::time::timeout(
            cfg.resume_timeout,
            scan(settings, symbols, horizon_ms, deadline, &mut found),
        );
        tokio::select! {
            biased;
            _ = cancel.cancelled() => None,
            scanned = scan => Some(scanned),
        }
    };
    let symbols = symbols.len();
    metrics::gauge!(metric::BACKFILL_RESUMED).set(found.len() as f64);
    match scanned {
        Some(Ok(Ok(records))) => tracing::info!(
            found = found.len(),
            symbols,
            records,
            elapsed = ?started.elapsed(),
            topic = %settings.kafka.trades_topic,
            "backfill resumes from the newest trades Kafka holds; symbols not found there backfill in full"
        ),
        Some(Ok(Err(e))) => tracing::warn!(
            error = %e,
            found = found.len(),
            symbols,
            topic = %settings.kafka.trades_topic,
            "cannot read the newest trades Kafka holds; the symbols not found backfill in full"
        ),
        Some(Err(_)) => tracing::warn!(
            timeout = ?cfg.resume_timeout,
            found = found.len(),
            symbols,
            topic = %settings.kafka.trades_topic,
            "reading the newest trades Kafka holds took longer than bitfinex.resume_timeout; the symbols not found backfill in full"
        ),
        None => {}
    }
    found
}

/// What is left to read of one partition: offsets `[floor, end)`, read backwards.
struct Partition {
    id: i32,
    floor: i64,
    end: i64,
}

/// Reads the partitions' tails into `found`, round by round, one chunk of each partition per
/// round; returns how many records it read.
async fn scan(
    settings: &Settings,
    symbols: &[String],
    horizon_ms: i64,
    deadline: Instant,
    found: &mut Newest,
) -> Result<i64, ResumeError> {
    let kafka = &settings.kafka;
    let topic = kafka.trades_topic.clone();
    let group = format!("{}-resume", kafka.group_id);
    let defaults = [
        // Assigned, never subscribed: the group is neither joined nor committed to.
        ("group.id", group.as_str()),
        ("enable.auto.commit", "false"),
        ("enable.auto.offset.store", "false"),
        ("auto.offset.reset", "earliest"),
        ("enable.partition.eof", "true"),
        ("client.id", "candlestream-resume"),
    ];
    let consumer: Arc<StreamConsumer> =
        Arc::new(client_config(&kafka.brokers, &defaults, &kafka.consumer).create()?);
    let decoder = Decoder::new(&settings.schema_registry)?;
    let wanted: HashSet<&str> = symbols.iter().map(String::as_str).collect();
    let mut partitions = {
        let (consumer, topic) = (consumer.clone(), topic.clone());
        let wait = deadline.saturating_duration_since(Instant::now());
        tokio::task::spawn_blocking(move || bounds(&consumer, &topic, horizon_ms, wait)).await??
    };
    let mut records = 0;
    let mut live = HashSet::new();
    loop {
        partitions.retain(|p| p.end > p.floor);
        if partitions.is_empty() || wanted.iter().all(|s| found.contains_key(*s)) {
            return Ok(records);
        }
        for p in &mut partitions {
            let start = (p.end - CHUNK).max(p.floor);
            let chunk = Chunk {
                topic: &topic,
                partition: p.id,
                start,
                end: p.end,
            };
            let newest_received = chunk
                .read(&consumer, &decoder, &wanted, found, &mut live)
                .await?;
            records += p.end - start;
            p.end = start;
            // The partition is in receive order: once a whole chunk was received before the
            // horizon, so was everything before it.
            if newest_received.is_none_or(|ms| ms < horizon_ms) {
                p.end = p.floor;
            }
        }
    }
}

/// The partitions of `topic` and the offsets to read back to: the low watermark, or where the
/// horizon falls if the brokers can tell (not Kafka 0.9).
fn bounds(
    consumer: &StreamConsumer,
    topic: &str,
    horizon_ms: i64,
    wait: Duration,
) -> Result<Vec<Partition>, KafkaError> {
    let metadata = consumer.fetch_metadata(Some(topic), wait)?;
    // A topic the brokers do not know (or are only now creating) holds no trade: nothing to
    // resume, and no reason to wait out the deadline on partitions without a leader.
    if let Some(error) = metadata.topics().iter().find_map(|t| t.error()) {
        tracing::debug!(%topic, ?error, "the trades topic holds nothing yet");
        return Ok(Vec::new());
    }
    let ids: Vec<i32> = metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions())
        .map(|p| p.id())
        .collect();
    let mut at_horizon = TopicPartitionList::new();
    for &id in &ids {
        at_horizon.add_partition_offset(topic, id, Offset::Offset(horizon_ms))?;
    }
    let horizon_offsets = match consumer.offsets_for_times(at_horizon, wait) {
        Ok(offsets) => offsets,
        Err(e) => {
            tracing::debug!(error = %e, "the brokers cannot look offsets up by time; reading back by the records' times");
            TopicPartitionList::new()
        }
    };
    let mut partitions = Vec::with_capacity(ids.len());
    for id in ids {
        let (low, high) = consumer.fetch_watermarks(topic, id, wait)?;
        let floor = match horizon_offsets
            .find_partition(topic, id)
            .map(|e| e.offset())
        {
            Some(Offset::Offset(at)) => at.clamp(low, high),
            // Kafka 0.9 answers `End` whatever the time: the records' own times tell instead.
            _ => low,
        };
        partitions.push(Partition {
            id,
            floor,
            end: high,
        });
    }
    Ok(partitions)
}

/// Offsets `[start, end)` of one partition.
struct Chunk<'a> {
    topic: &'a str,
    partition: i32,
    start: i64,
    end: i64,
}

impl Chunk<'_> {
    /// Reads the chunk, keeping the newest trade of each wanted symbol in `found`; returns the
    /// latest receive time among its trades. Decoding is most of the cost, so a record is decoded
    /// only when it is the chunk's last (for its receive time) or of a wanted symbol not yet
    /// `live` (no websocket trade of it found in a later chunk). Further back than a websocket
    /// trade, a symbol's trades are older; not so behind a repair's, which are older than the
    /// websocket trades sent before them.
    async fn read(
        &self,
        consumer: &StreamConsumer,
        decoder: &Decoder,
        wanted: &HashSet<&str>,
        found: &mut Newest,
        live: &mut HashSet<String>,
    ) -> Result<Option<i64>, ResumeError> {
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset(self.topic, self.partition, Offset::Offset(self.start))?;
        consumer.assign(&assignment)?;
        let settled = live.clone();
        let mut newest_received: Option<i64> = None;
        loop {
            let message = match consumer.recv().await {
                Ok(m) => m,
                Err(KafkaError::PartitionEOF(p)) if p == self.partition => break,
                Err(KafkaError::PartitionEOF(_)) => continue,
                Err(e) => return Err(e.into()),
            };
            let offset = message.offset();
            // Fetched before this chunk was assigned, or past it.
            if message.partition() != self.partition || offset < self.start {
                continue;
            }
            if offset >= self.end {
                break;
            }
            let last = offset + 1 >= self.end;
            let key = message.key().and_then(|k| std::str::from_utf8(k).ok());
            let skip = !last && key.is_some_and(|k| !wanted.contains(k) || settled.contains(k));
            if let Some(payload) = message.payload().filter(|_| !skip) {
                match decoder.decode(payload).await {
                    Ok(Record::Trade(t)) => {
                        newest_received = newest_received.max(Some(t.received_at));
                        if wanted.contains(t.symbol.as_str()) {
                            if t.source == Source::Websocket {
                                live.insert(t.symbol.clone());
                            }
                            let at = (t.exchange_time, t.id);
                            let newest = found.entry(t.symbol).or_insert(at);
                            *newest = at.max(*newest);
                        }
                    }
                    Ok(Record::Tick(_)) => {}
                    // The registry is away: give up rather than miss a symbol's newest trade.
                    Err(e) if e.is_retryable() => return Err(e.into()),
                    // A record no consumer can read either (it goes to the dead-letter topic).
                    Err(e) => tracing::debug!(offset, error = %e, "undecodable record skipped"),
                }
            }
            if last {
                break;
            }
        }
        Ok(newest_received)
    }
}
