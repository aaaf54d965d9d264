//! Kafka clients: built-in defaults overlaid with the `[kafka.producer]` / `[kafka.consumer]`
//! pass-through tables, and the delivery-tracking producer stage.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::KafkaConfig;
use crate::telemetry::{Liveness, metric};

#[derive(Debug, thiserror::Error)]
pub enum KafkaStageError {
    #[error("cannot create Kafka client: {0}")]
    Client(#[source] KafkaError),
    #[error("shutdown deadline passed with {0} message(s) not acknowledged by Kafka")]
    Undelivered(usize),
}

impl KafkaStageError {
    pub fn is_retryable(&self) -> bool {
        false
    }
}

/// Producer defaults: acks from every in-sync replica, no duplicates from retries, and the
/// Java-compatible key hash so a coin lands on the same partition whichever client wrote it.
const PRODUCER_DEFAULTS: &[(&str, &str)] = &[
    ("acks", "all"),
    ("enable.idempotence", "true"),
    ("partitioner", "murmur2_random"),
    ("compression.type", "lz4"),
    ("linger.ms", "20"),
    ("client.id", "candlestream-producer"),
];

pub fn client_config(
    brokers: &str,
    defaults: &[(&str, &str)],
    overrides: &BTreeMap<String, String>,
) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", brokers);
    for (k, v) in defaults {
        cfg.set(*k, *v);
    }
    for (k, v) in overrides {
        cfg.set(k, v);
    }
    cfg
}

pub fn producer_config(cfg: &KafkaConfig) -> ClientConfig {
    client_config(&cfg.brokers, PRODUCER_DEFAULTS, &cfg.producer)
}

/// Errors after which sending the same record again can succeed.
fn is_retriable(e: &KafkaError) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        e.rdkafka_error_code(),
        Some(
            MessageTimedOut
                | QueueFull
                | NotEnoughReplicas
                | NotEnoughReplicasAfterAppend
                | LeaderNotAvailable
                | NotLeaderForPartition
                | RequestTimedOut
                | NetworkException
                | BrokerTransportFailure
                | AllBrokersDown
                | UnknownTopicOrPartition
                | UnknownPartition
                | BrokerNotAvailable
                | OutOfOrderSequenceNumber
        )
    )
}

/// One record to produce.
pub struct Outgoing<'a> {
    pub topic: &'a str,
    pub key: &'a str,
    pub payload: Vec<u8>,
}

/// Produces records and tracks every delivery: acks are counted, retriable failures are sent
/// again, permanent failures are logged with their key. Memory stays bounded because librdkafka's
/// queue is bounded and [`DeliveryTracker::send`] waits while it is full.
#[derive(Clone)]
pub struct DeliveryTracker {
    producer: FutureProducer,
    acks: Arc<Liveness>,
    pending_tx: mpsc::Sender<(DeliveryFuture, Arc<str>)>,
}

impl DeliveryTracker {
    /// Returns the tracker and the task that awaits deliveries; the task ends once every clone
    /// of the tracker is dropped and all deliveries are settled.
    pub fn new(
        producer: FutureProducer,
        acks: Arc<Liveness>,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (pending_tx, pending_rx) = mpsc::channel(4096);
        let tracker = Self {
            producer,
            acks,
            pending_tx,
        };
        let task = tokio::spawn(tracker.clone().settle(pending_rx));
        (tracker, task)
    }

    /// Enqueues one record, waiting while librdkafka's queue is full. Gives up only when
    /// `deadline` passes (shutdown), returning false.
    pub async fn send(&self, msg: &Outgoing<'_>, deadline: Option<Instant>) -> bool {
        match enqueue(
            &self.producer,
            msg.topic,
            msg.key.as_bytes(),
            &msg.payload,
            deadline,
        )
        .await
        {
            Ok(Some(delivery)) => {
                self.acks.add_pending(1);
                metrics::gauge!(metric::IN_FLIGHT).increment(1.0);
                // The settle task holds at most this many futures; beyond that we wait.
                let _ = self.pending_tx.send((delivery, msg.key.into())).await;
                true
            }
            Ok(None) => false,
            Err(e) => {
                metrics::counter!(metric::DELIVERY_ERRORS, "kind" => "permanent").increment(1);
                tracing::error!(error = %e, topic = msg.topic, key = msg.key, "Kafka refused a record; it is not retried");
                true
            }
        }
    }

    async fn settle(self, mut incoming: mpsc::Receiver<(DeliveryFuture, Arc<str>)>) {
        let Self {
            producer,
            acks,
            pending_tx,
        } = self;
        // Our own sender must go, or the channel could never close.
        drop(pending_tx);
        let mut inflight = FuturesUnordered::new();
        let mut open = true;
        loop {
            tokio::select! {
                next = incoming.recv(), if open => match next {
                    Some((delivery, key)) => inflight.push(settled(delivery, key)),
                    None => open = false,
                },
                Some((result, key)) = inflight.next() => {
                    match result {
                        Ok(Ok(_)) => {
                            acks.beat();
                            acks.add_pending(-1);
                            metrics::gauge!(metric::IN_FLIGHT).decrement(1.0);
                            metrics::counter!(metric::PRODUCED).increment(1);
                        }
                        Ok(Err((e, msg))) if is_retriable(&e) => {
                            metrics::counter!(metric::DELIVERY_ERRORS, "kind" => "retried").increment(1);
                            tracing::warn!(error = %e, %key, "delivery failed; sending again");
                            let (k, p) = (msg.key().unwrap_or_default(), msg.payload().unwrap_or_default());
                            match enqueue(&producer, msg.topic(), k, p, None).await {
                                Ok(Some(delivery)) => inflight.push(settled(delivery, key)),
                                // Without a deadline, enqueue ends only with a delivery or an error.
                                Ok(None) => {}
                                Err(e) => given_up(&acks, &e, &key),
                            }
                        }
                        Ok(Err((e, _))) => given_up(&acks, &e, &key),
                        Err(_) => tracing::error!(%key, "producer dropped before delivery was reported"),
                    }
                }
                else => break,
            }
        }
    }

    /// Waits up to `timeout` for everything queued to be acknowledged.
    pub async fn flush(&self, timeout: Duration) -> Result<(), KafkaStageError> {
        let producer = self.producer.clone();
        let result = tokio::task::spawn_blocking(move || producer.flush(timeout)).await;
        match result {
            Ok(Ok(())) => Ok(()),
            _ => Err(KafkaStageError::Undelivered(
                self.producer.in_flight_count().max(0) as usize,
            )),
        }
    }
}

async fn settled(
    delivery: DeliveryFuture,
    key: Arc<str>,
) -> (
    Result<
        rdkafka::producer::future_producer::OwnedDeliveryResult,
        futures::channel::oneshot::Canceled,
    >,
    Arc<str>,
) {
    (delivery.await, key)
}

/// Enqueues one record, waiting while librdkafka refuses it for a passing reason (queue full).
/// `Ok(None)` when `deadline` passed first; `Err` when Kafka will never take it.
async fn enqueue(
    producer: &FutureProducer,
    topic: &str,
    key: &[u8],
    payload: &[u8],
    deadline: Option<Instant>,
) -> Result<Option<DeliveryFuture>, KafkaError> {
    let mut warned = false;
    loop {
        match producer.send_result(FutureRecord::to(topic).key(key).payload(payload)) {
            Ok(delivery) => return Ok(Some(delivery)),
            Err((e, _)) if is_retriable(&e) => {
                if !warned {
                    tracing::warn!(error = %e, "Kafka producer queue is full; holding data (backpressure)");
                    warned = true;
                }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Ok(None);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// A record Kafka will never take: reported, counted, and no longer waited for.
fn given_up(acks: &Liveness, error: &KafkaError, key: &str) {
    acks.add_pending(-1);
    metrics::gauge!(metric::IN_FLIGHT).decrement(1.0);
    metrics::counter!(metric::DELIVERY_ERRORS, "kind" => "permanent").increment(1);
    tracing::error!(%error, key, "delivery failed permanently; record not stored");
}

/// Consumer defaults: offsets are stored by the application only after InfluxDB acknowledged the
/// write (at-least-once), and librdkafka commits what was stored in the background.
pub fn consumer_config(cfg: &KafkaConfig) -> ClientConfig {
    let defaults = [
        ("group.id", cfg.group_id.as_str()),
        ("enable.auto.commit", "true"),
        ("auto.commit.interval.ms", "1000"),
        ("enable.auto.offset.store", "false"),
        ("auto.offset.reset", cfg.auto_offset_reset.librdkafka_name()),
        (
            "partition.assignment.strategy",
            cfg.assignment_strategy.librdkafka_name(),
        ),
        ("enable.partition.eof", "false"),
        ("client.id", "candlestream-consumer"),
    ];
    client_config(&cfg.brokers, &defaults, &cfg.consumer)
}

/// How often [`report_group_lag`] reads the group's offsets.
const LAG_INTERVAL: Duration = Duration::from_secs(5);

/// Sets `candlestream_consumer_lag_records` per topic and partition until `cancel`: the
/// partition's high watermark minus the offset `cfg.group_id` committed there (partitions
/// without a commit are left out). Read from the brokers, not from the consumers' own statistics:
/// it has to keep rising while every consumer is stopped, and a consumer that paused its
/// partitions fetches nothing, so its own view of the high watermark stands still.
pub async fn report_group_lag(cfg: KafkaConfig, topics: Vec<String>, cancel: CancellationToken) {
    use rdkafka::consumer::BaseConsumer;
    // Never subscribes, so it only reads the group's offsets and never joins it.
    let defaults = [
        ("group.id", cfg.group_id.as_str()),
        ("enable.auto.commit", "false"),
        ("client.id", "candlestream-lag"),
    ];
    let client: BaseConsumer = match client_config(&cfg.brokers, &defaults, &cfg.consumer).create()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot create the client that reads consumer lag; no lag metric");
            return;
        }
    };
    let client = Arc::new(client);
    let mut ticker = tokio::time::interval(LAG_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let (c, t) = (client.clone(), topics.clone());
        match tokio::task::spawn_blocking(move || group_lag(&c, &t, LAG_INTERVAL)).await {
            Ok(Ok(lags)) => {
                for (topic, partition, lag) in lags {
                    metrics::gauge!(metric::CONSUMER_LAG, "topic" => topic, "partition" => partition.to_string())
                        .set(lag as f64);
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot read consumer lag; trying again"),
            Err(e) => tracing::error!(error = %e, "consumer lag reader panicked"),
        }
    }
}

/// (topic, partition, high watermark - committed offset) of every committed partition.
fn group_lag(
    client: &rdkafka::consumer::BaseConsumer,
    topics: &[String],
    timeout: Duration,
) -> Result<Vec<(String, i32, i64)>, KafkaError> {
    use rdkafka::consumer::Consumer;
    let mut partitions = rdkafka::TopicPartitionList::new();
    for topic in topics {
        let metadata = client.fetch_metadata(Some(topic), timeout)?;
        for p in metadata.topics().iter().flat_map(|t| t.partitions()) {
            partitions.add_partition(topic, p.id());
        }
    }
    let committed = client.committed_offsets(partitions, timeout)?;
    let mut lags = Vec::new();
    for e in committed.elements() {
        if let rdkafka::Offset::Offset(offset) = e.offset() {
            let (_, high) = client.fetch_watermarks(e.topic(), e.partition(), timeout)?;
            lags.push((e.topic().to_string(), e.partition(), (high - offset).max(0)));
        }
    }
    Ok(lags)
}

/// Asks the worker's writer to flush; the sender gets an answer once the batch is written and
/// its offsets stored.
pub type FlushRequest = std::sync::mpsc::Sender<()>;

/// Group callbacks of one consumer worker: before partitions are revoked, what was already read
/// is written and committed, so the next owner does not start behind us.
pub struct GroupContext {
    pub worker: usize,
    pub flush: mpsc::Sender<FlushRequest>,
    pub flush_timeout: Duration,
    /// Known from the configuration, so that no callback has to ask librdkafka for it.
    pub cooperative: bool,
    /// Set once the member has joined the group (its first assignment, even an empty one).
    pub joined: tokio::sync::watch::Sender<bool>,
}

impl rdkafka::client::ClientContext for GroupContext {}

impl rdkafka::consumer::ConsumerContext for GroupContext {
    /// rust-rdkafka's default asks `rd_kafka_rebalance_protocol()` on every callback: a request
    /// to the group thread that waits without a timeout and can wait forever when the callback
    /// runs while the consumer closes (librdkafka #4041, rust-rdkafka #509). The protocol follows
    /// from `partition.assignment.strategy`, and the answer of every (un)assign is checked.
    fn rebalance(
        &self,
        consumer: &rdkafka::consumer::BaseConsumer<Self>,
        err: rdkafka::types::RDKafkaRespErr,
        tpl: &mut rdkafka::TopicPartitionList,
    ) {
        use rdkafka::consumer::Consumer;
        use rdkafka::types::RDKafkaRespErr::*;
        let (event, result) = match err {
            RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.post_assign(tpl);
                self.joined.send_replace(true);
                let r = if self.cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                ("assign", r)
            }
            RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.pre_revoke(consumer, tpl);
                let r = if self.cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                ("revoke", r)
            }
            other => {
                tracing::error!(worker = self.worker, error = ?other, "rebalance failed; librdkafka rejoins the group");
                // An error leaves the assignment to librdkafka; dropping it is what it expects.
                let r = if self.cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                ("error", r)
            }
        };
        metrics::counter!(metric::REBALANCES, "event" => event).increment(1);
        if let Err(e) = result {
            tracing::error!(worker = self.worker, event, error = %e, "librdkafka refused the new assignment");
        }
    }
}

impl GroupContext {
    fn pre_revoke(
        &self,
        consumer: &rdkafka::consumer::BaseConsumer<Self>,
        partitions: &rdkafka::TopicPartitionList,
    ) {
        use rdkafka::consumer::{CommitMode, Consumer};
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let (ack, done) = std::sync::mpsc::channel();
        // This runs inside the poll of the consumer's own task; the writer is another task, so
        // waiting here is only safe where tokio can move that task to another thread.
        let flushed = multi_thread
            && self.flush.try_send(ack).is_ok()
            && tokio::task::block_in_place(|| done.recv_timeout(self.flush_timeout)).is_ok();
        // librdkafka also commits on revoke with auto-commit on; asking now puts the offsets
        // just stored first in line. A synchronous commit could wait out the rebalance itself.
        let committed = consumer.commit_consumer_state(CommitMode::Async);
        tracing::info!(
            worker = self.worker,
            revoked = partitions.count(),
            flushed,
            commit = ?committed.err().map(|e| e.to_string()),
            "partitions revoked"
        );
    }

    fn post_assign(&self, tpl: &rdkafka::TopicPartitionList) {
        // One group reads both topics: name the topic of each partition.
        let partitions: Vec<String> = tpl
            .elements()
            .iter()
            .map(|e| format!("{}/{}", e.topic(), e.partition()))
            .collect();
        tracing::info!(worker = self.worker, ?partitions, "partitions assigned");
    }
}

/// Starts leaving the group without blocking: librdkafka revokes the assignment through the
/// rebalance callback (served by whoever polls the consumer), commits and sends LeaveGroup.
/// rust-rdkafka offers this only on `BaseConsumer`, which a `StreamConsumer` keeps private.
pub fn start_close<C: rdkafka::consumer::Consumer<GroupContext>>(
    consumer: &C,
) -> Result<(), KafkaError> {
    use rdkafka::bindings as rd;
    let rk = consumer.client().native_ptr();
    // SAFETY: `rk` is a live consumer handle; the queue handle is released before returning and
    // librdkafka keeps its own reference to the queue for the close.
    unsafe {
        let queue = rd::rd_kafka_queue_get_consumer(rk);
        let error = rd::rd_kafka_consumer_close_queue(rk, queue);
        rd::rd_kafka_queue_destroy(queue);
        if error.is_null() {
            return Ok(());
        }
        let code = rd::rd_kafka_error_code(error);
        rd::rd_kafka_error_destroy(error);
        Err(KafkaError::ConsumerQueueClose(code.into()))
    }
}

/// True once the close started by [`start_close`] has finished.
pub fn is_closed<C: rdkafka::consumer::Consumer<GroupContext>>(consumer: &C) -> bool {
    // SAFETY: reads an atomic of a live consumer handle.
    unsafe { rdkafka::bindings::rd_kafka_consumer_closed(consumer.client().native_ptr()) == 1 }
}

/// The member id the group coordinator gave the consumer: empty before it joined and once it
/// started leaving.
pub fn member_id<C: rdkafka::consumer::Consumer<GroupContext>>(consumer: &C) -> String {
    use rdkafka::bindings as rd;
    let rk = consumer.client().native_ptr();
    // SAFETY: `rk` is a live consumer handle; librdkafka returns its own copy of the id (or
    // null), which is read and then freed with librdkafka's allocator.
    unsafe {
        let id = rd::rd_kafka_memberid(rk);
        if id.is_null() {
            return String::new();
        }
        let owned = std::ffi::CStr::from_ptr(id).to_string_lossy().into_owned();
        rd::rd_kafka_mem_free(rk, id.cast());
        owned
    }
}
