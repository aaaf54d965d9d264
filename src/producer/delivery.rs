//! Delivery tracking: every record handed to Kafka is either acknowledged, held and sent again
//! after a failure that is not its own, or reported as given up when Kafka can never take it
//! (see [`is_permanent_for_record`]).
//!
//! librdkafka reports each delivery to [`Deliveries`] on the client's polling thread, with the
//! record's sequence number as its opaque. Why a callback and not a future per record: the
//! oneshot channel, boxed opaque and task wake-up of a future per record, awaited by a task of
//! their own, cost more CPU than the rest of the producer's path after the websocket (see the
//! README's benchmark notes).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use metrics::{Counter, Gauge};
use rdkafka::ClientContext;
use rdkafka::config::{ClientConfig, FromClientConfigAndContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Message};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::kafka::is_permanent_for_record;
use crate::retry::{Backoff, GaveUp, Verdict, retry};
use crate::telemetry::{Liveness, metric};

#[derive(Debug, thiserror::Error)]
pub enum KafkaStageError {
    #[error("cannot create Kafka client: {0}")]
    Client(#[source] KafkaError),
    #[error("shutdown deadline passed with {0} message(s) not acknowledged by Kafka")]
    Undelivered(usize),
}

/// One record to produce.
pub struct Outgoing<'a> {
    pub topic: &'a str,
    pub key: &'a str,
    pub payload: Vec<u8>,
}

/// How often `candlestream_producer_oldest_unacked_seconds` is brought up to date.
const OLDEST_REFRESH: Duration = Duration::from_secs(1);

/// How often a full librdkafka queue is offered the record again: about one delivery's time.
const QUEUE_FULL_WAIT: Duration = Duration::from_millis(50);

/// How long a record whose delivery failed waits before it is sent again. librdkafka hands some
/// failures over at once without retrying them itself (a topic the producer may not write to):
/// without a pause, a held record would go round the broker as fast as it answers, a request
/// and a log line each time, for as long as the fault lasts.
const RESEND_PAUSE: Duration = Duration::from_secs(1);

/// Produces records and tracks every delivery: acks are counted, records that failed for a fault
/// outside them are held and sent again, records Kafka can never take are logged with their key
/// and dropped. Memory stays bounded: librdkafka's queue
/// is bounded and [`DeliveryTracker::send`] waits while it is full, and while failed records wait
/// to be sent again (they left that queue, so new records must not take their room).
pub struct DeliveryTracker {
    producer: ThreadedProducer<Deliveries>,
    /// Shutdown's deadline: waits for room in librdkafka's queue end here.
    expired: CancellationToken,
    /// Sends failed records again and keeps the oldest-unacked gauge current.
    resender: JoinHandle<()>,
    stop_resender: CancellationToken,
}

impl DeliveryTracker {
    /// Creates the Kafka producer from `config` and the task that sends failed records again.
    pub fn new(
        config: &ClientConfig,
        acks: Arc<Liveness>,
        expired: CancellationToken,
    ) -> Result<Self, KafkaStageError> {
        let (failed_tx, failed_rx) = mpsc::unbounded_channel();
        let context = Deliveries {
            acks,
            outstanding: Mutex::default(),
            settled: Notify::new(),
            failed: failed_tx,
            failed_waiting: AtomicUsize::new(0),
            resent: Notify::new(),
            metrics: DeliveryMetrics::register(),
        };
        let producer = ThreadedProducer::from_config_and_context(config, context)
            .map_err(KafkaStageError::Client)?;
        let stop_resender = CancellationToken::new();
        let resender = tokio::spawn(resend_failed(
            producer.clone(),
            failed_rx,
            expired.clone(),
            stop_resender.clone(),
        ));
        Ok(Self {
            producer,
            expired,
            resender,
            stop_resender,
        })
    }

    /// Enqueues one record, waiting while librdkafka's queue is full, while it refuses the record
    /// for a fault outside it, or while failed records wait to be sent again. Returns false only
    /// when shutdown's deadline passes; a record Kafka can never take is dropped and reported.
    pub async fn send(&self, msg: &Outgoing<'_>) -> bool {
        let deliveries = self.producer.context();
        if !deliveries.resends_done(&self.expired).await {
            return false;
        }
        let seq = deliveries.hand_over();
        let enqueued = enqueue(
            &self.producer,
            msg.topic,
            msg.key.as_bytes(),
            &msg.payload,
            seq,
            &self.expired,
        )
        .await;
        match enqueued {
            Ok(true) => true,
            Ok(false) => {
                deliveries.settle(seq);
                false
            }
            Err(e) => {
                deliveries.settle(seq);
                deliveries.metrics.permanent.increment(1);
                tracing::error!(error = %e, topic = msg.topic, key = msg.key, "Kafka can never take this record; it is dropped");
                true
            }
        }
    }

    /// Waits up to `timeout` for every record sent to be acknowledged (or given up), then closes
    /// the Kafka client; what is still unacknowledged by then is dropped and reported.
    pub async fn close(self, timeout: Duration) -> Result<(), KafkaStageError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let deliveries = self.producer.context().clone();
        let settled = tokio::time::timeout_at(deadline, deliveries.all_settled())
            .await
            // Counted before closing: closing purges them.
            .map_err(|_| KafkaStageError::Undelivered(deliveries.lock().since.len()));
        let Self {
            producer,
            resender,
            stop_resender,
            ..
        } = self;
        // The resender holds the last handle of the client and closes it.
        drop(producer);
        stop_resender.cancel();
        if tokio::time::timeout_at(deadline, resender).await.is_err() {
            tracing::warn!("the Kafka client was still closing at the shutdown deadline");
        }
        settled
    }
}

/// Enqueues one record, waiting while librdkafka refuses it for a reason outside the record (its
/// queue is full, the topic or partition is unknown, the client failed). `Ok(false)` when
/// `expired` came first; `Err` when Kafka can never take it.
async fn enqueue(
    producer: &ThreadedProducer<Deliveries>,
    topic: &str,
    key: &[u8],
    payload: &[u8],
    seq: usize,
    expired: &CancellationToken,
) -> Result<bool, KafkaError> {
    let record = || {
        BaseRecord::with_opaque_to(topic, seq)
            .key(key)
            .payload(payload)
    };
    // Almost always there is room: no retry machinery on that path.
    match producer.send(record()) {
        Ok(()) => return Ok(true),
        Err((e, _)) if is_permanent_for_record(&e) => return Err(e),
        Err((e, _)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) => {
            tracing::warn!(error = %e, "Kafka producer queue is full; holding data (backpressure)")
        }
        Err((e, _)) => {
            tracing::warn!(error = %e, topic, "Kafka client refused a record; holding data and trying again")
        }
    }
    let sent = retry(
        Backoff::new(QUEUE_FULL_WAIT, QUEUE_FULL_WAIT),
        expired,
        || async { producer.send(record()).map_err(|(e, _)| e) },
        |e, _| {
            if is_permanent_for_record(e) {
                Verdict::Fail
            } else {
                Verdict::Retry
            }
        },
    )
    .await;
    match sent {
        Ok(()) => Ok(true),
        Err(GaveUp::Stopped) => Ok(false),
        Err(GaveUp::Failed(e)) => Err(e),
    }
}

/// A record whose delivery failed for a fault outside it, to be sent again.
struct Failed {
    seq: usize,
    failed_at: Instant,
    topic: String,
    key: Vec<u8>,
    payload: Vec<u8>,
}

/// Sends failed records again until `stop`, and refreshes the oldest-unacked gauge; then closes
/// the Kafka client.
async fn resend_failed(
    producer: ThreadedProducer<Deliveries>,
    mut failed: mpsc::UnboundedReceiver<Failed>,
    expired: CancellationToken,
    stop: CancellationToken,
) {
    let deliveries = producer.context().clone();
    let mut refresh = tokio::time::interval(OLDEST_REFRESH);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = refresh.tick() => deliveries.publish_oldest(),
            Some(f) = failed.recv() => {
                let paused = tokio::select! {
                    _ = tokio::time::sleep_until((f.failed_at + RESEND_PAUSE).into()) => true,
                    _ = expired.cancelled() => false,
                    _ = stop.cancelled() => false,
                };
                let sent = if paused {
                    enqueue(&producer, &f.topic, &f.key, &f.payload, f.seq, &expired).await
                } else {
                    Ok(false)
                };
                match sent {
                    Ok(true) => {}
                    // Shutdown's deadline passed: the record stays unacknowledged and is counted
                    // as such when the tracker closes.
                    Ok(false) => {}
                    Err(e) => deliveries.give_up(f.seq, &e, &f.key),
                }
                if deliveries.failed_waiting.fetch_sub(1, Ordering::AcqRel) == 1 {
                    deliveries.resent.notify_waiters();
                }
            }
        }
    }
    // Failed records from now on are not sent again: the callback sees the channel closed.
    drop(failed);
    deliveries.publish_oldest();
    // Closing purges what is left and may wait for brokers: not on a runtime thread.
    let _ = tokio::task::spawn_blocking(move || drop(producer)).await;
}

/// Records handed to Kafka and not yet settled, by sequence number, with when each was first
/// handed over: the first entry is the oldest. Bounded like librdkafka's queue (see
/// [`DeliveryTracker`]).
#[derive(Default)]
struct Outstanding {
    next: usize,
    since: BTreeMap<usize, Instant>,
    /// Those whose delivery failed before: a record held through a long fault is logged at its
    /// first failure only, not at every round.
    held: BTreeSet<usize>,
}

/// Metric handles, registered once: a lookup per record costs more than the update.
struct DeliveryMetrics {
    produced: Counter,
    in_flight: Gauge,
    retried: Counter,
    permanent: Counter,
    oldest_unacked: Gauge,
}

impl DeliveryMetrics {
    fn register() -> Self {
        Self {
            produced: metrics::counter!(metric::PRODUCED),
            in_flight: metrics::gauge!(metric::IN_FLIGHT),
            retried: metrics::counter!(metric::DELIVERY_ERRORS, "kind" => "retried"),
            permanent: metrics::counter!(metric::DELIVERY_ERRORS, "kind" => "permanent"),
            oldest_unacked: metrics::gauge!(metric::OLDEST_UNACKED),
        }
    }
}

/// The producer's context: settles each delivery librdkafka reports.
struct Deliveries {
    acks: Arc<Liveness>,
    outstanding: Mutex<Outstanding>,
    /// Signalled when nothing is outstanding any more.
    settled: Notify,
    failed: mpsc::UnboundedSender<Failed>,
    /// Failed records not yet enqueued again; new records wait while there are any.
    failed_waiting: AtomicUsize,
    /// Signalled when `failed_waiting` drops to 0.
    resent: Notify,
    metrics: DeliveryMetrics,
}

impl Deliveries {
    fn lock(&self) -> MutexGuard<'_, Outstanding> {
        // Nothing panics while holding it; a poisoned lock still holds consistent entries.
        self.outstanding
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Counts a record as handed to Kafka; returns its sequence number.
    fn hand_over(&self) -> usize {
        let now = Instant::now();
        let seq = {
            let mut o = self.lock();
            let seq = o.next;
            o.next += 1;
            o.since.insert(seq, now);
            seq
        };
        self.acks.add_pending(1);
        self.metrics.in_flight.increment(1.0);
        seq
    }

    /// The record is no longer waited for: acknowledged, given up, or never enqueued.
    fn settle(&self, seq: usize) {
        let none_left = {
            let mut o = self.lock();
            o.since.remove(&seq);
            o.held.remove(&seq);
            o.since.is_empty()
        };
        self.acks.add_pending(-1);
        self.metrics.in_flight.decrement(1.0);
        if none_left {
            self.settled.notify_waiters();
        }
    }

    /// A record Kafka will never take: reported, counted, and no longer waited for.
    fn give_up(&self, seq: usize, error: &KafkaError, key: &[u8]) {
        self.settle(seq);
        self.metrics.permanent.increment(1);
        let key = String::from_utf8_lossy(key);
        tracing::error!(%error, %key, "delivery failed permanently; record not stored");
    }

    /// How long the oldest record not yet settled has waited; zero when none waits.
    fn oldest_unacked(&self) -> Duration {
        let oldest = self.lock().since.first_key_value().map(|(_, t)| *t);
        oldest.map_or(Duration::ZERO, |t| t.elapsed())
    }

    fn publish_oldest(&self) {
        let age = self.oldest_unacked().as_secs_f64();
        self.metrics.oldest_unacked.set(age);
    }

    /// Returns once no failed record waits to be sent again; false when `expired` came first.
    async fn resends_done(&self, expired: &CancellationToken) -> bool {
        while self.failed_waiting.load(Ordering::Acquire) > 0 {
            let resent = self.resent.notified();
            tokio::pin!(resent);
            resent.as_mut().enable();
            if self.failed_waiting.load(Ordering::Acquire) == 0 {
                break;
            }
            tokio::select! {
                _ = resent => {}
                _ = expired.cancelled() => return false,
            }
        }
        true
    }

    async fn all_settled(&self) {
        loop {
            let settled = self.settled.notified();
            tokio::pin!(settled);
            settled.as_mut().enable();
            if self.lock().since.is_empty() {
                return;
            }
            settled.await;
        }
    }
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, seq: usize) {
        let (error, msg) = match result {
            Ok(_) => {
                self.acks.beat();
                self.settle(seq);
                self.metrics.produced.increment(1);
                return;
            }
            Err((error, msg)) => (error, msg),
        };
        let key = msg.key().unwrap_or_default();
        if is_purged(error) {
            // The client closed after shutdown's deadline; the tracker reported these already.
            self.settle(seq);
        } else if is_permanent_for_record(error) {
            self.give_up(seq, error, key);
        } else {
            self.metrics.retried.increment(1);
            let shown = String::from_utf8_lossy(key);
            if self.lock().held.insert(seq) {
                tracing::warn!(%error, key = %shown, "delivery failed; holding the record and sending it again");
            } else {
                tracing::debug!(%error, key = %shown, "delivery failed again; holding the record and sending it again");
            }
            self.failed_waiting.fetch_add(1, Ordering::AcqRel);
            let again = Failed {
                seq,
                failed_at: Instant::now(),
                topic: msg.topic().to_string(),
                key: key.to_vec(),
                payload: msg.payload().unwrap_or_default().to_vec(),
            };
            if self.failed.send(again).is_err() {
                // The tracker closed after shutdown's deadline, which reported the record.
                self.failed_waiting.fetch_sub(1, Ordering::AcqRel);
                self.settle(seq);
            }
        }
    }
}

/// Records librdkafka dropped because the client closed.
fn is_purged(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::Health;

    fn deliveries() -> Deliveries {
        Deliveries {
            acks: Health::default().progress("kafka_acks", Duration::from_secs(1)),
            outstanding: Mutex::default(),
            settled: Notify::new(),
            failed: mpsc::unbounded_channel().0,
            failed_waiting: AtomicUsize::new(0),
            resent: Notify::new(),
            metrics: DeliveryMetrics::register(),
        }
    }

    #[tokio::test]
    async fn the_oldest_unacked_record_is_the_oldest_not_yet_settled() {
        let d = deliveries();
        assert_eq!(d.oldest_unacked(), Duration::ZERO, "nothing handed over");
        let first = d.hand_over();
        std::thread::sleep(Duration::from_millis(50));
        let second = d.hand_over();
        assert!(d.oldest_unacked() >= Duration::from_millis(50));
        assert_eq!(d.acks.pending(), 2);

        // Acks arrive out of order across partitions: the newer one settles first.
        d.settle(second);
        assert!(d.oldest_unacked() >= Duration::from_millis(50));
        let third = d.hand_over();
        d.settle(first);
        assert!(
            d.oldest_unacked() < Duration::from_millis(50),
            "only the record just handed over waits"
        );
        d.settle(third);
        assert_eq!(d.oldest_unacked(), Duration::ZERO);
        assert_eq!(d.acks.pending(), 0);
        tokio::time::timeout(Duration::from_secs(1), d.all_settled())
            .await
            .expect("nothing outstanding: settled at once");
    }

    /// An authorization Kafka refuses is a fault of configuration: the record is held (not
    /// settled, /healthz red once acks are silent) and delivered once when it is granted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_record_refused_for_authorization_is_held_and_delivered_once_when_granted() {
        use rdkafka::mocking::MockCluster;
        use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("held", 1, 1).unwrap();
        // Every produce request is refused until the errors are cleared.
        cluster.request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 1000],
        );
        let health = Health::default();
        let acks = health.progress("kafka_acks", Duration::from_millis(100));
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("enable.idempotence", "true")
            .set("acks", "all");
        let tracker =
            DeliveryTracker::new(&config, acks.clone(), CancellationToken::new()).unwrap();
        let msg = Outgoing {
            topic: "held",
            key: "tBTCUSD",
            payload: b"tick".to_vec(),
        };
        assert!(tracker.send(&msg).await);

        // Refused at least twice: held through a resend, not given up.
        let deliveries = tracker.producer.context().clone();
        let deadline = Instant::now() + Duration::from_secs(10);
        while deliveries.failed_waiting.load(Ordering::Acquire) == 0 || health.status().is_ok() {
            assert!(
                Instant::now() < deadline,
                "the refusal never turned /healthz red"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(RESEND_PAUSE * 2).await;
        assert_eq!(acks.pending(), 1, "the refused record is still waited for");
        let problems = health.status().unwrap_err();
        assert!(problems[0].starts_with("kafka_acks"), "{problems:?}");

        cluster.clear_request_errors(RDKafkaApiKey::Produce);
        tokio::time::timeout(Duration::from_secs(10), deliveries.all_settled())
            .await
            .expect("delivered once the topic may be written");
        assert_eq!(acks.pending(), 0);
        tracker.close(Duration::from_secs(5)).await.unwrap();

        assert_eq!(
            watermarks(&cluster, "held"),
            (0, 1),
            "the record is in Kafka exactly once"
        );
    }

    /// The low and high watermarks of partition 0 of `topic`.
    fn watermarks(
        cluster: &rdkafka::mocking::MockCluster<'_, rdkafka::producer::DefaultProducerContext>,
        topic: &str,
    ) -> (i64, i64) {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let reader: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("group.id", "watermarks")
            .create()
            .unwrap();
        reader
            .fetch_watermarks(topic, 0, Duration::from_secs(5))
            .unwrap()
    }

    /// A record too large for Kafka can never be written: it is dropped at once and not waited
    /// for, and the records after it go on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_record_too_large_for_kafka_is_dropped_and_the_next_delivered() {
        use rdkafka::mocking::MockCluster;

        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("large", 1, 1).unwrap();
        let health = Health::default();
        let acks = health.progress("kafka_acks", Duration::from_millis(100));
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("message.max.bytes", "10000");
        let tracker =
            DeliveryTracker::new(&config, acks.clone(), CancellationToken::new()).unwrap();
        let record = |payload: Vec<u8>| Outgoing {
            topic: "large",
            key: "tBTCUSD",
            payload,
        };
        assert!(tracker.send(&record(vec![0; 20_000])).await);
        assert_eq!(acks.pending(), 0, "dropped, not waited for");
        assert!(tracker.send(&record(b"tick".to_vec())).await);
        let deliveries = tracker.producer.context().clone();
        tokio::time::timeout(Duration::from_secs(10), deliveries.all_settled())
            .await
            .expect("the next record delivered");
        assert!(health.status().is_ok());
        tracker.close(Duration::from_secs(5)).await.unwrap();
        assert_eq!(watermarks(&cluster, "large"), (0, 1), "only the small one");
    }
}
