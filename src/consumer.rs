//! `candlestream consumer`: Kafka consumer group → Avro decode → InfluxDB, at-least-once.
//!
//! Each worker is one group member: a poller task reads records into a bounded channel, a writer
//! task batches them into InfluxDB and stores their offsets only once the write is acknowledged.
//! While InfluxDB is down the writer retries, the channel fills and the poller stops reading.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::candles::RecordKind;
use crate::codec::{CodecError, Decoder};
use crate::config::Settings;
use crate::kafka::{consumer_config, producer_config, FlushRequest, GroupContext};
use crate::retry::backoff;
use crate::sink::influx::{write_line, InfluxSink, SinkError};
use crate::telemetry::{metric, serve_http, Health, Liveness};

#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("Kafka client: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("cannot serve /healthz and /metrics: {0}")]
    Http(#[from] std::io::Error),
}

impl ConsumerError {
    pub fn is_retryable(&self) -> bool {
        match self {
            ConsumerError::Codec(e) => e.is_retryable(),
            ConsumerError::Sink(e) => e.is_retryable(),
            ConsumerError::Kafka(_) | ConsumerError::Http(_) => false,
        }
    }
}

/// Headers a dead letter carries, next to the untouched key and payload.
pub mod dlq_header {
    pub const REASON: &str = "candlestream.error.reason";
    pub const DETAIL: &str = "candlestream.error.detail";
    pub const TOPIC: &str = "candlestream.source.topic";
    pub const PARTITION: &str = "candlestream.source.partition";
    pub const OFFSET: &str = "candlestream.source.offset";
}

/// What the workers of one process share.
struct Shared {
    settings: Settings,
    decoder: Decoder,
    sink: InfluxSink,
    dlq: FutureProducer,
    writes: Arc<Liveness>,
    cancel: CancellationToken,
}

/// Runs `workers` group members until `cancel`; each then writes what it read and commits.
pub async fn run(settings: Settings, workers: usize, cancel: CancellationToken) -> Result<(), ConsumerError> {
    let health = Health::default();
    let writes = health.progress("influx_writes", settings.health.max_ack_silence);
    let http_stop = CancellationToken::new();
    let _http_guard = http_stop.clone().drop_guard();
    serve_http(settings.http.listen, health, http_stop).await?;

    let shared = Arc::new(Shared {
        decoder: Decoder::new(&settings.schema_registry)?,
        sink: InfluxSink::new(&settings.influx)?,
        dlq: producer_config(&settings.kafka).create()?,
        writes,
        cancel,
        settings,
    });
    let mut members = JoinSet::new();
    for id in 0..workers {
        let consumer = subscribe(&shared, id)?;
        members.spawn(member(shared.clone(), id, consumer));
    }
    let topics = topics(&shared.settings);
    tracing::info!(workers, ?topics, group = %shared.settings.kafka.group_id, "consumer running");
    while let Some(r) = members.join_next().await {
        if let Err(e) = r {
            tracing::error!(error = %e, "consumer worker panicked");
        }
    }
    tracing::info!("consumer stopped");
    Ok(())
}

/// One group reads every record type; each goes to its own measurement.
fn topics(settings: &Settings) -> Vec<&str> {
    RecordKind::ALL.iter().map(|k| settings.kafka.topic_of(*k)).collect()
}

type Member = (Arc<StreamConsumer<GroupContext>>, mpsc::Receiver<FlushRequest>);

fn subscribe(shared: &Shared, id: usize) -> Result<Member, ConsumerError> {
    let (flush, flush_rx) = mpsc::channel(1);
    let context = GroupContext { worker: id, flush, flush_timeout: shared.settings.consumer.shutdown_timeout };
    let consumer: StreamConsumer<GroupContext> =
        consumer_config(&shared.settings.kafka).create_with_context(context)?;
    consumer.subscribe(&topics(&shared.settings))?;
    Ok((Arc::new(consumer), flush_rx))
}

async fn member(shared: Arc<Shared>, id: usize, (consumer, flush_rx): Member) {
    let (tx, rx) = mpsc::channel(shared.settings.influx.batch_size * 2);
    let poller = tokio::spawn(poll(consumer.clone(), tx, shared.cancel.clone()));
    let timeout = shared.settings.consumer.shutdown_timeout;
    Writer::new(shared, id, consumer.clone()).run(rx, flush_rx).await;
    let _ = poller.await;
    // Closing commits the stored offsets (auto-commit) and leaves the group. librdkafka blocks
    // while it does and can wait on the group for long, so it runs on a thread of its own that
    // neither the async workers nor the runtime's shutdown wait for beyond the limit.
    let (closed_tx, closed) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        drop(consumer);
        let _ = closed_tx.send(());
    });
    match tokio::time::timeout(timeout, closed).await {
        Ok(_) => tracing::info!(worker = id, "offsets committed, left the group"),
        Err(_) => tracing::error!(worker = id, ?timeout, "Kafka did not confirm the final commit in time"),
    }
}

async fn poll(consumer: Arc<StreamConsumer<GroupContext>>, tx: mpsc::Sender<OwnedMessage>, cancel: CancellationToken) {
    loop {
        let next = tokio::select! {
            _ = cancel.cancelled() => return,
            m = consumer.recv() => m,
        };
        match next {
            Ok(m) => {
                metrics::counter!(metric::CONSUMED).increment(1);
                let owned = m.detach();
                tokio::select! {
                    sent = tx.send(owned) => if sent.is_err() { return },
                    _ = cancel.cancelled() => return,
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "Kafka consume error");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// A partition of one of the topics read.
type Partition = (String, i32);

fn partition_of(record: &OwnedMessage) -> Partition {
    (record.topic().to_string(), record.partition())
}

#[derive(Default)]
struct Batch {
    lines: String,
    records: Vec<OwnedMessage>,
    /// Highest offset per partition that is safe to store once the batch is written.
    offsets: BTreeMap<Partition, i64>,
    /// Partitions where a record could be neither written nor dead-lettered (shutdown); no
    /// offset of theirs may be stored past it.
    blocked: BTreeSet<Partition>,
    oldest: Option<Instant>,
}

impl Batch {
    fn mark_done(&mut self, partition: Partition, offset: i64) {
        if !self.blocked.contains(&partition) {
            self.offsets.insert(partition, offset);
        }
        self.oldest.get_or_insert_with(Instant::now);
    }

    fn is_empty(&self) -> bool {
        self.records.is_empty() && self.offsets.is_empty()
    }
}

struct Writer {
    shared: Arc<Shared>,
    id: usize,
    consumer: Arc<StreamConsumer<GroupContext>>,
    batch: Batch,
    /// Set at shutdown: retries stop here and what is left is re-read by the next owner.
    deadline: Option<Instant>,
}

impl Writer {
    fn new(shared: Arc<Shared>, id: usize, consumer: Arc<StreamConsumer<GroupContext>>) -> Self {
        Self { shared, id, consumer, batch: Batch::default(), deadline: None }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<OwnedMessage>, mut flush_rx: mpsc::Receiver<FlushRequest>) {
        let influx = &self.shared.settings.influx;
        let (batch_size, flush_interval) = (influx.batch_size, influx.flush_interval);
        let mut ticker = tokio::time::interval(flush_interval.min(Duration::from_millis(250)));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let cancel = self.shared.cancel.clone();
        loop {
            tokio::select! {
                biased;
                Some(ack) = flush_rx.recv() => {
                    self.flush().await;
                    let _ = ack.send(());
                }
                next = rx.recv() => match next {
                    Some(record) => {
                        self.add(record).await;
                        if self.batch.records.len() >= batch_size {
                            self.flush().await;
                        }
                    }
                    None => break,
                },
                _ = ticker.tick() => {
                    if self.batch.oldest.is_some_and(|t| t.elapsed() >= flush_interval) {
                        self.flush().await;
                    }
                }
                _ = cancel.cancelled(), if self.deadline.is_none() => {
                    self.deadline = Some(Instant::now() + self.shared.settings.consumer.shutdown_timeout);
                }
            }
        }
        self.flush().await;
    }

    fn past_deadline(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    async fn add(&mut self, record: OwnedMessage) {
        let (partition, offset) = (partition_of(&record), record.offset());
        let mut delays = backoff(Duration::from_millis(200), self.shared.settings.consumer.retry_backoff_max);
        loop {
            match self.shared.decoder.decode(record.payload().unwrap_or_default()).await {
                Ok(decoded) => {
                    let measurement = self.shared.settings.influx.measurement_of(decoded.kind());
                    write_line(&mut self.batch.lines, measurement, &decoded);
                    self.shared.writes.add_pending(1);
                    self.batch.records.push(record);
                    self.batch.mark_done(partition, offset);
                    return;
                }
                Err(e) if e.is_retryable() && !self.past_deadline() => {
                    metrics::counter!(metric::DECODE_RETRIES).increment(1);
                    let wait = delays.next().unwrap_or(self.shared.settings.consumer.retry_backoff_max);
                    tracing::warn!(worker = self.id, error = %e, ?wait, "cannot decode yet; retrying");
                    tokio::time::sleep(wait).await;
                }
                Err(e) if e.is_retryable() => {
                    self.batch.blocked.insert(partition);
                    return;
                }
                Err(e) => {
                    if self.dead_letter(&record, e.reason(), &e.to_string()).await {
                        self.batch.mark_done(partition, offset);
                    } else {
                        self.batch.blocked.insert(partition);
                    }
                    return;
                }
            }
        }
    }

    /// Copies a record, untouched, to the dead-letter topic; true once Kafka acknowledged it.
    async fn dead_letter(&self, record: &OwnedMessage, reason: &str, detail: &str) -> bool {
        let kafka = &self.shared.settings.kafka;
        let (partition, offset) = (record.partition().to_string(), record.offset().to_string());
        let headers = OwnedHeaders::new()
            .insert(Header { key: dlq_header::REASON, value: Some(reason) })
            .insert(Header { key: dlq_header::DETAIL, value: Some(detail) })
            .insert(Header { key: dlq_header::TOPIC, value: Some(record.topic()) })
            .insert(Header { key: dlq_header::PARTITION, value: Some(&partition) })
            .insert(Header { key: dlq_header::OFFSET, value: Some(&offset) });
        let mut delays = backoff(Duration::from_millis(200), self.shared.settings.consumer.retry_backoff_max);
        loop {
            let mut out = FutureRecord::to(&kafka.dlq_topic).headers(headers.clone());
            if let Some(k) = record.key() {
                out = out.key(k);
            }
            if let Some(p) = record.payload() {
                out = out.payload(p);
            }
            match self.shared.dlq.send(out, Duration::from_secs(5)).await {
                Ok(_) => {
                    metrics::counter!(metric::DEAD_LETTERS, "reason" => reason.to_string()).increment(1);
                    tracing::warn!(worker = self.id, reason, detail, partition, offset, dlq = %kafka.dlq_topic, "record sent to the dead-letter topic");
                    return true;
                }
                Err((e, _)) if !self.past_deadline() => {
                    let wait = delays.next().unwrap_or(self.shared.settings.consumer.retry_backoff_max);
                    tracing::error!(worker = self.id, error = %e, ?wait, "cannot write to the dead-letter topic; retrying");
                    tokio::time::sleep(wait).await;
                }
                Err(_) => return false,
            }
        }
    }

    /// Writes the batch (retrying while InfluxDB is unavailable), then stores its offsets.
    async fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let points = self.batch.records.len();
        if points > 0 && !self.write_batch().await {
            let left = self.batch.records.len();
            tracing::error!(worker = self.id, points = left, "shutdown deadline passed before InfluxDB took the batch; its offsets stay uncommitted and the records will be read again");
            self.shared.writes.add_pending(-(left as i64));
            self.batch = Batch::default();
            return;
        }
        let batch = std::mem::take(&mut self.batch);
        self.shared.writes.add_pending(-(points as i64));
        for ((topic, partition), offset) in batch.offsets {
            if let Err(e) = self.consumer.store_offset(&topic, partition, offset) {
                // The partition moved to another member; it re-reads from the last commit.
                tracing::debug!(worker = self.id, %topic, partition, error = %e, "offset not stored");
            }
        }
    }

    /// False only when shutdown's deadline cut the retries short.
    async fn write_batch(&mut self) -> bool {
        let max = self.shared.settings.consumer.retry_backoff_max;
        let mut delays = backoff(Duration::from_millis(200), max);
        loop {
            let started = Instant::now();
            match self.shared.sink.write(&self.batch.lines).await {
                Ok(()) => {
                    metrics::histogram!(metric::WRITE_SECONDS).record(started.elapsed().as_secs_f64());
                    metrics::counter!(metric::POINTS_WRITTEN).increment(self.batch.records.len() as u64);
                    self.shared.writes.beat();
                    return true;
                }
                Err(e) if e.is_retryable() => {
                    metrics::counter!(metric::WRITE_ERRORS, "kind" => "retried").increment(1);
                    if self.past_deadline() {
                        return false;
                    }
                    let wait = delays.next().unwrap_or(max);
                    tracing::warn!(worker = self.id, error = %e, ?wait, points = self.batch.records.len(), "InfluxDB write failed; holding the batch and retrying");
                    tokio::time::sleep(wait).await;
                }
                Err(e) => {
                    metrics::counter!(metric::WRITE_ERRORS, "kind" => "rejected").increment(1);
                    let sample: String = self.batch.lines.lines().next().unwrap_or_default().chars().take(300).collect();
                    tracing::error!(worker = self.id, error = %e, points = self.batch.records.len(), first_line = %sample, "InfluxDB rejected the batch; its records go to the dead-letter topic");
                    let records = std::mem::take(&mut self.batch.records);
                    for record in &records {
                        if !self.dead_letter(record, "influx-rejected", &e.to_string()).await {
                            let partition = partition_of(record);
                            self.batch.offsets.remove(&partition);
                            self.batch.blocked.insert(partition);
                        }
                    }
                    return true;
                }
            }
        }
    }
}
