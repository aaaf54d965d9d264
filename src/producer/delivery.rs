//! Delivery tracking: every record handed to Kafka is either acknowledged, sent again after a
//! passing failure, or reported as given up.

use std::sync::Arc;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::kafka::is_retriable;
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

/// Produces records and tracks every delivery: acks are counted, retriable failures are sent
/// again, permanent failures are logged with their key. Memory stays bounded because librdkafka's
/// queue is bounded and [`DeliveryTracker::send`] waits while it is full.
#[derive(Clone)]
pub struct DeliveryTracker {
    producer: FutureProducer,
    acks: Arc<Liveness>,
    pending_tx: mpsc::Sender<(DeliveryFuture, Arc<str>)>,
    /// Shutdown's deadline: waits for room in librdkafka's queue end here.
    expired: CancellationToken,
}

impl DeliveryTracker {
    /// Returns the tracker and the task that awaits deliveries; the task ends once every clone
    /// of the tracker is dropped and all deliveries are settled.
    pub fn new(
        producer: FutureProducer,
        acks: Arc<Liveness>,
        expired: CancellationToken,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (pending_tx, pending_rx) = mpsc::channel(4096);
        let tracker = Self {
            producer,
            acks,
            pending_tx,
            expired,
        };
        let task = tokio::spawn(tracker.clone().settle(pending_rx));
        (tracker, task)
    }

    /// Enqueues one record, waiting while librdkafka's queue is full. Gives up only when
    /// shutdown's deadline passes, returning false.
    pub async fn send(&self, msg: &Outgoing<'_>) -> bool {
        let enqueued = enqueue(
            &self.producer,
            msg.topic,
            msg.key.as_bytes(),
            &msg.payload,
            &self.expired,
        )
        .await;
        match enqueued {
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
            expired,
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
                            match enqueue(&producer, msg.topic(), k, p, &expired).await {
                                Ok(Some(delivery)) => inflight.push(settled(delivery, key)),
                                // Shutdown's deadline passed: the flush reports what is left.
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

/// How often a full librdkafka queue is offered the record again: about one delivery's time.
const QUEUE_FULL_WAIT: Duration = Duration::from_millis(50);

/// Enqueues one record, waiting while librdkafka refuses it for a passing reason (queue full).
/// `Ok(None)` when `expired` came first; `Err` when Kafka will never take it.
async fn enqueue(
    producer: &FutureProducer,
    topic: &str,
    key: &[u8],
    payload: &[u8],
    expired: &CancellationToken,
) -> Result<Option<DeliveryFuture>, KafkaError> {
    let mut warned = false;
    let sent = retry(
        Backoff::new(QUEUE_FULL_WAIT, QUEUE_FULL_WAIT),
        expired,
        || async {
            producer
                .send_result(FutureRecord::to(topic).key(key).payload(payload))
                .map_err(|(e, _)| e)
        },
        |e, _| {
            if !is_retriable(e) {
                return Verdict::Fail;
            }
            if !warned {
                tracing::warn!(error = %e, "Kafka producer queue is full; holding data (backpressure)");
                warned = true;
            }
            Verdict::Retry
        },
    )
    .await;
    match sent {
        Ok(delivery) => Ok(Some(delivery)),
        Err(GaveUp::Stopped) => Ok(None),
        Err(GaveUp::Failed(e)) => Err(e),
    }
}

/// A record Kafka will never take: reported, counted, and no longer waited for.
fn given_up(acks: &Liveness, error: &KafkaError, key: &str) {
    acks.add_pending(-1);
    metrics::gauge!(metric::IN_FLIGHT).decrement(1.0);
    metrics::counter!(metric::DELIVERY_ERRORS, "kind" => "permanent").increment(1);
    tracing::error!(%error, key, "delivery failed permanently; record not stored");
}
