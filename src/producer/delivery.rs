//! Delivery tracking: every record handed to Kafka is either acknowledged, sent again after a
//! passing failure, or reported as given up.

use std::sync::Arc;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::kafka::is_retriable;
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
