//! The writer of one group member: group commit into InfluxDB, offsets stored after the ack.
//!
//! It writes as soon as it has taken what is waiting (up to `influx.batch_size`); records that
//! arrive while a write is in flight wait in the channel and make up the next write. One record at
//! a time when traffic is light, full batches under load, with no timer in between.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TryRecvError;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::group::GroupContext;
use super::{Shared, dlq_header};
use crate::model::{Record, RecordKind};
use crate::retry::{Backoff, GaveUp, Verdict, retry};
use crate::sink::influx::{SinkError, write_line};
use crate::telemetry::{metric, truncate};

/// Waits between retries start here; `consumer.retry_backoff_max` caps them.
const RETRY_BACKOFF_MIN: Duration = Duration::from_millis(200);

/// Where the records go that can never be written: the dead-letter topic in production, a
/// fake in the writer's unit tests.
pub(super) trait DeadLetters: Send + Sync {
    /// Copies `record`, untouched, with headers saying why; `Err` when it was not taken.
    fn send(
        &self,
        record: &OwnedMessage,
        reason: &str,
        detail: &str,
    ) -> impl std::future::Future<Output = Result<(), KafkaError>> + Send;
}

/// The dead-letter topic.
pub(super) struct DeadLetterTopic {
    pub producer: FutureProducer,
    pub topic: String,
}

impl DeadLetters for DeadLetterTopic {
    async fn send(
        &self,
        record: &OwnedMessage,
        reason: &str,
        detail: &str,
    ) -> Result<(), KafkaError> {
        let (partition, offset) = (record.partition().to_string(), record.offset().to_string());
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: dlq_header::REASON,
                value: Some(reason),
            })
            .insert(Header {
                key: dlq_header::DETAIL,
                value: Some(detail),
            })
            .insert(Header {
                key: dlq_header::TOPIC,
                value: Some(record.topic()),
            })
            .insert(Header {
                key: dlq_header::PARTITION,
                value: Some(&partition),
            })
            .insert(Header {
                key: dlq_header::OFFSET,
                value: Some(&offset),
            });
        let mut out = FutureRecord::to(&self.topic).headers(headers);
        if let Some(k) = record.key() {
            out = out.key(k);
        }
        if let Some(p) = record.payload() {
            out = out.payload(p);
        }
        self.producer
            .send(out, Duration::from_secs(5))
            .await
            .map(|_| ())
            .map_err(|(e, _)| e)
    }
}

/// Copies a record to the dead letters, retrying until they take it or `expired`; true once
/// taken.
async fn dead_letter(
    dlq: &impl DeadLetters,
    policy: Backoff,
    expired: &CancellationToken,
    worker: usize,
    record: &OwnedMessage,
    reason: &str,
    detail: &str,
) -> bool {
    let sent = retry(
        policy,
        expired,
        || dlq.send(record, reason, detail),
        |e, wait| {
            tracing::error!(worker, error = %e, ?wait, "cannot write to the dead-letter topic; retrying");
            Verdict::Retry
        },
    )
    .await;
    let (partition, offset) = (record.partition(), record.offset());
    match sent {
        Ok(()) => {
            metrics::counter!(metric::DEAD_LETTERS, "reason" => reason.to_string()).increment(1);
            tracing::warn!(
                worker,
                reason,
                detail,
                topic = record.topic(),
                partition,
                offset,
                "record sent to the dead-letter topic"
            );
            true
        }
        Err(_) => false,
    }
}

/// Dead-letters the records InfluxDB rejected. A record the dead letters did not take before
/// the deadline blocks its partition: no offset of that partition is stored past it.
async fn settle_rejected(
    batch: &mut Batch,
    rejected: Vec<(usize, String)>,
    dlq: &impl DeadLetters,
    policy: Backoff,
    expired: &CancellationToken,
    worker: usize,
) {
    for (i, reason) in rejected {
        let record = &batch.records[i];
        if !dead_letter(
            dlq,
            policy,
            expired,
            worker,
            record,
            "influx-rejected",
            &reason,
        )
        .await
        {
            let partition = partition_of(record);
            batch.block(partition);
        }
    }
}

/// Asks the worker's writer to flush; the sender gets an answer once the batch is written and
/// its offsets stored.
pub type FlushRequest = std::sync::mpsc::Sender<()>;

/// A partition of one of the topics read.
type Partition = (String, i32);

fn partition_of(record: &OwnedMessage) -> Partition {
    (record.topic().to_string(), record.partition())
}

/// What the latency metrics need of a point once InfluxDB acknowledged it.
struct Point {
    /// End of its line in `Batch::lines`.
    end: usize,
    kind: RecordKind,
    received_at: i64,
    exchange_time: i64,
    symbol: String,
}

#[derive(Default)]
struct Batch {
    lines: String,
    /// One per decoded record, in the order of `records`.
    points: Vec<Point>,
    records: Vec<OwnedMessage>,
    /// Highest offset per partition that is safe to store once the batch is written.
    offsets: BTreeMap<Partition, i64>,
    /// Partitions where a record could be neither written nor dead-lettered (shutdown); no
    /// offset of theirs may be stored past it.
    blocked: BTreeSet<Partition>,
}

impl Batch {
    fn push(&mut self, measurement: &str, decoded: &Record, record: OwnedMessage) {
        write_line(&mut self.lines, measurement, decoded);
        self.points.push(Point {
            end: self.lines.len(),
            kind: decoded.kind(),
            received_at: decoded.received_at(),
            exchange_time: decoded.exchange_time(),
            symbol: decoded.symbol().to_string(),
        });
        self.records.push(record);
    }

    fn mark_done(&mut self, partition: Partition, offset: i64) {
        if !self.blocked.contains(&partition) {
            self.offsets.insert(partition, offset);
        }
    }

    fn block(&mut self, partition: Partition) {
        self.offsets.remove(&partition);
        self.blocked.insert(partition);
    }

    fn is_empty(&self) -> bool {
        self.records.is_empty() && self.offsets.is_empty()
    }

    /// The line protocol of the points in `range`.
    fn lines_of(&self, range: &Range<usize>) -> &str {
        let start = range.start.checked_sub(1).map_or(0, |i| self.points[i].end);
        &self.lines[start..self.points[range.end - 1].end]
    }
}

pub(super) struct Writer {
    shared: Arc<Shared>,
    id: usize,
    consumer: Arc<StreamConsumer<GroupContext>>,
    batch: Batch,
}

impl Writer {
    pub(super) fn new(
        shared: Arc<Shared>,
        id: usize,
        consumer: Arc<StreamConsumer<GroupContext>>,
    ) -> Self {
        Self {
            shared,
            id,
            consumer,
            batch: Batch::default(),
        }
    }

    pub(super) async fn run(
        mut self,
        mut rx: mpsc::Receiver<OwnedMessage>,
        mut flush_rx: mpsc::Receiver<FlushRequest>,
    ) {
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
                        self.gather(&mut rx).await;
                        self.flush().await;
                    }
                    None => break,
                },
            }
        }
        self.flush().await;
    }

    /// Takes what is already waiting, up to a batch. With `influx.flush_interval` above zero, a
    /// batch that is not full waits up to that long for more.
    async fn gather(&mut self, rx: &mut mpsc::Receiver<OwnedMessage>) {
        let influx = &self.shared.settings.influx;
        let (batch_size, linger) = (influx.batch_size, influx.flush_interval);
        let until = Instant::now() + linger;
        for _ in 1..batch_size {
            let next = match rx.try_recv() {
                Ok(record) => Some(record),
                Err(TryRecvError::Empty) if !linger.is_zero() => tokio::select! {
                    r = rx.recv() => r,
                    _ = tokio::time::sleep_until(until) => None,
                },
                Err(_) => None,
            };
            let Some(record) = next else { return };
            self.add(record).await;
        }
    }

    /// The writer's retries: InfluxDB, the registry and the dead-letter topic.
    fn policy(&self) -> Backoff {
        Backoff::new(
            RETRY_BACKOFF_MIN,
            self.shared.settings.consumer.retry_backoff_max,
        )
    }

    /// Shutdown's deadline: retries stop there and what is left is re-read by the next owner.
    fn expired(&self) -> &CancellationToken {
        &self.shared.shutdown.expired
    }

    /// Decodes the record into the batch, or dead-letters it when it can never be decoded. It
    /// counts as waiting from here until InfluxDB took it, so a Schema Registry outage that holds
    /// decoding turns /healthz red just as an InfluxDB outage that holds the write does.
    async fn add(&mut self, record: OwnedMessage) {
        let (partition, offset) = (partition_of(&record), record.offset());
        let id = self.id;
        self.shared.writes.add_pending(1);
        let decoded = retry(
            self.policy(),
            self.expired(),
            || {
                self.shared
                    .decoder
                    .decode(record.payload().unwrap_or_default())
            },
            |e, wait| {
                if !e.is_retryable() {
                    return Verdict::Fail;
                }
                metrics::counter!(metric::DECODE_RETRIES).increment(1);
                tracing::warn!(worker = id, error = %e, ?wait, "cannot decode yet; retrying");
                Verdict::Retry
            },
        )
        .await;
        match decoded {
            Ok(decoded) => {
                let measurement = self.shared.settings.influx.measurement_of(decoded.kind());
                self.batch.push(measurement, &decoded, record);
                self.batch.mark_done(partition, offset);
            }
            Err(GaveUp::Stopped) => {
                self.shared.writes.add_pending(-1);
                self.batch.block(partition);
            }
            Err(GaveUp::Failed(e)) => {
                self.shared.writes.add_pending(-1);
                let taken = dead_letter(
                    &self.shared.dlq,
                    self.policy(),
                    self.expired(),
                    id,
                    &record,
                    e.reason(),
                    &e.to_string(),
                )
                .await;
                if taken {
                    self.batch.mark_done(partition, offset);
                } else {
                    self.batch.block(partition);
                }
            }
        }
    }

    /// Writes the batch, dead-letters the records InfluxDB rejected, then stores the offsets.
    async fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let mut batch = std::mem::take(&mut self.batch);
        let written = self.write(&batch).await;
        // Only now: while the write is held, its records wait and /healthz must say so.
        self.shared
            .writes
            .add_pending(-(batch.records.len() as i64));
        let Some(rejected) = written else {
            tracing::error!(
                worker = self.id,
                points = batch.records.len(),
                "shutdown deadline passed before InfluxDB took the batch; its offsets stay uncommitted and the records will be read again"
            );
            return;
        };
        settle_rejected(
            &mut batch,
            rejected,
            &self.shared.dlq,
            self.policy(),
            self.expired(),
            self.id,
        )
        .await;
        for ((topic, partition), offset) in batch.offsets {
            match self.consumer.store_offset(&topic, partition, offset) {
                Ok(()) => self.shared.progress.stored(&topic, partition, offset),
                // Revoked meanwhile: the new owner re-reads from the last commit.
                Err(e) => {
                    tracing::debug!(worker = self.id, %topic, partition, error = %e, "offset not stored")
                }
            }
        }
    }

    /// Writes every point of the batch, holding it while InfluxDB is unavailable or refuses the
    /// setup. Points rejected for their content are isolated by halving: InfluxDB 1.x stores the
    /// valid points of a partial write, and writing them again only overwrites them with
    /// themselves. Returns the rejected points with InfluxDB's reason; None when shutdown's
    /// deadline cut the retries short.
    async fn write(&self, batch: &Batch) -> Option<Vec<(usize, String)>> {
        let mut rejected = Vec::new();
        let mut todo: Vec<Range<usize>> = Vec::with_capacity(8);
        todo.push(0..batch.points.len());
        while let Some(range) = todo.pop() {
            if range.is_empty() {
                continue;
            }
            match self.write_range(batch, &range).await? {
                Ok(()) => self.acked(&batch.points[range]),
                Err(e) if range.len() == 1 => rejected.push((range.start, e.to_string())),
                Err(e) => {
                    if range.len() == batch.points.len() {
                        let first_line = truncate(batch.lines.lines().next().unwrap_or_default());
                        tracing::error!(worker = self.id, error = %e, points = range.len(), %first_line, "InfluxDB rejected points; splitting the batch to find them");
                    }
                    let mid = range.start + range.len() / 2;
                    todo.push(mid..range.end);
                    todo.push(range.start..mid);
                }
            }
        }
        Some(rejected)
    }

    /// One write, retried while the error can pass. None when shutdown's deadline passed.
    async fn write_range(
        &self,
        batch: &Batch,
        range: &Range<usize>,
    ) -> Option<Result<(), SinkError>> {
        let id = self.id;
        let setup = &self.shared.setup;
        let written = retry(
            self.policy(),
            self.expired(),
            || async {
                let started = Instant::now();
                let written = self.shared.sink.write(batch.lines_of(range)).await;
                if written.is_ok() {
                    metrics::histogram!(metric::WRITE_SECONDS)
                        .record(started.elapsed().as_secs_f64());
                }
                written
            },
            |error, wait| {
                if !error.is_retryable() {
                    metrics::counter!(metric::WRITE_ERRORS, "kind" => "rejected").increment(1);
                    return Verdict::Fail;
                }
                if matches!(error, SinkError::Misconfigured { .. }) {
                    metrics::counter!(metric::WRITE_ERRORS, "kind" => "misconfigured").increment(1);
                    if setup.set(error.to_string()) {
                        tracing::error!(worker = id, error = %error, "InfluxDB refuses every write until this is fixed; records are held and nothing is committed");
                    }
                } else {
                    metrics::counter!(metric::WRITE_ERRORS, "kind" => "retried").increment(1);
                    // Unreachable now: whatever was wrong with the setup is not what fails.
                    setup.clear();
                }
                tracing::warn!(worker = id, error = %error, ?wait, points = range.len(), "InfluxDB write failed; holding the batch and retrying");
                Verdict::Retry
            },
        )
        .await;
        match written {
            Ok(()) => {
                if setup.clear() {
                    tracing::info!(worker = id, "InfluxDB accepts writes again");
                }
                Some(Ok(()))
            }
            Err(GaveUp::Failed(e)) => Some(Err(e)),
            Err(GaveUp::Stopped) => None,
        }
    }

    /// InfluxDB acknowledged these points: their latency is known now.
    fn acked(&self, points: &[Point]) {
        let now = crate::model::now_ms();
        let mut newest_trade = BTreeMap::new();
        for p in points {
            if p.kind == RecordKind::Trade {
                let t = newest_trade
                    .entry(p.symbol.as_str())
                    .or_insert(p.exchange_time);
                *t = p.exchange_time.max(*t);
            }
            let kind = p.kind.label();
            metrics::histogram!(metric::PIPELINE_LATENCY, "kind" => kind)
                .record((now - p.received_at) as f64 / 1000.0);
            metrics::histogram!(metric::EXCHANGE_TO_STORE, "kind" => kind)
                .record((now - p.exchange_time) as f64 / 1000.0);
        }
        for (symbol, t) in newest_trade {
            metrics::gauge!(metric::LAST_TRADE_STORED, "symbol" => symbol.to_string())
                .set(t as f64 / 1000.0);
        }
        metrics::counter!(metric::POINTS_WRITTEN).increment(points.len() as u64);
        self.shared.writes.beat();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use rdkafka::Timestamp;
    use rdkafka::types::RDKafkaErrorCode;

    use super::*;

    /// Dead letters that refuse the first `failures` copies, then keep what they are sent.
    #[derive(Default)]
    struct FakeDeadLetters {
        failures: AtomicUsize,
        attempts: AtomicUsize,
        kept: Mutex<Vec<(String, i32, i64, String)>>,
    }

    impl FakeDeadLetters {
        fn failing(failures: usize) -> Self {
            Self {
                failures: AtomicUsize::new(failures),
                ..Default::default()
            }
        }
    }

    impl DeadLetters for FakeDeadLetters {
        async fn send(
            &self,
            record: &OwnedMessage,
            reason: &str,
            _detail: &str,
        ) -> Result<(), KafkaError> {
            self.attempts.fetch_add(1, Ordering::SeqCst);
            let failing = self
                .failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if failing {
                return Err(KafkaError::MessageProduction(
                    RDKafkaErrorCode::BrokerTransportFailure,
                ));
            }
            self.kept.lock().unwrap().push((
                record.topic().to_string(),
                record.partition(),
                record.offset(),
                reason.to_string(),
            ));
            Ok(())
        }
    }

    fn record(partition: i32, offset: i64) -> OwnedMessage {
        OwnedMessage::new(
            Some(b"payload".to_vec()),
            Some(b"tBTCUSD".to_vec()),
            "ticks".into(),
            Timestamp::NotAvailable,
            partition,
            offset,
            None,
        )
    }

    /// Records 0..n, alternating between partitions 0 and 1, each read and marked done.
    fn batch(n: i64) -> Batch {
        let mut batch = Batch::default();
        for offset in 0..n {
            let r = record((offset % 2) as i32, offset);
            batch.mark_done(partition_of(&r), offset);
            batch.records.push(r);
        }
        batch
    }

    const POLICY: Backoff = Backoff {
        min: Duration::from_millis(100),
        max: Duration::from_secs(1),
    };

    fn offsets(batch: &Batch) -> Vec<(i32, i64)> {
        batch.offsets.iter().map(|((_, p), o)| (*p, *o)).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn rejected_points_are_dead_lettered_and_their_partitions_advance() {
        let mut batch = batch(4);
        let dlq = FakeDeadLetters::failing(2);
        let expired = CancellationToken::new();
        let rejected = vec![(1, "field type conflict".to_string())];
        settle_rejected(&mut batch, rejected, &dlq, POLICY, &expired, 0).await;
        assert_eq!(
            *dlq.kept.lock().unwrap(),
            [("ticks".to_string(), 1, 1, "influx-rejected".to_string())],
            "the rejected record, once, after two refusals"
        );
        assert_eq!(dlq.attempts.load(Ordering::SeqCst), 3);
        assert_eq!(offsets(&batch), [(0, 2), (1, 3)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_letter_not_taken_by_the_deadline_blocks_only_its_partition() {
        let mut batch = batch(4);
        let dlq = FakeDeadLetters::failing(usize::MAX);
        let expired = CancellationToken::new();
        let deadline = expired.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(10)).await;
            deadline.cancel();
        });
        let started = Instant::now();
        let rejected = vec![(2, "outside the retention policy".to_string())];
        settle_rejected(&mut batch, rejected, &dlq, POLICY, &expired, 0).await;
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(10),
            "retried until the deadline"
        );
        assert!(dlq.attempts.load(Ordering::SeqCst) > 5);
        assert_eq!(
            offsets(&batch),
            [(1, 3)],
            "partition 0 keeps its last commit: the record is read again"
        );
        batch.mark_done(("ticks".into(), 0), 4);
        assert_eq!(offsets(&batch), [(1, 3)], "nothing passes a blocked record");
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_letter_after_the_deadline_is_not_attempted() {
        let dlq = FakeDeadLetters::default();
        let expired = CancellationToken::new();
        expired.cancel();
        let taken = dead_letter(&dlq, POLICY, &expired, 0, &record(0, 7), "bad", "x").await;
        assert!(!taken);
        assert_eq!(dlq.attempts.load(Ordering::SeqCst), 0);
    }
}
