//! The consumer's group membership: rebalance callbacks that flush the writer before partitions
//! move, and the librdkafka calls rust-rdkafka does not offer on a `StreamConsumer`.

use std::time::Duration;

use rdkafka::error::KafkaError;
use tokio::sync::mpsc;

use super::writer::FlushRequest;
use crate::retry::Shutdown;
use crate::telemetry::metric;

/// Group callbacks of one consumer worker: before partitions are revoked, what was already read
/// is written and committed, so the next owner does not start behind us.
pub struct GroupContext {
    pub worker: usize,
    pub flush: mpsc::Sender<FlushRequest>,
    /// How long a revoke waits for the writer's flush outside shutdown.
    pub flush_timeout: Duration,
    pub shutdown: Shutdown,
    /// Known from the configuration, so that no callback has to ask librdkafka for it.
    pub cooperative: bool,
    /// Set once the member has joined the group (its first assignment, even an empty one).
    pub joined: tokio::sync::watch::Sender<bool>,
    /// Forgets what the worker did with a partition once it is revoked.
    pub progress: std::sync::Arc<super::stall::Progress>,
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
                for e in tpl.elements() {
                    self.progress.revoked(e.topic(), e.partition());
                }
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
        // While shutting down, half of what is left at most: a writer held by an InfluxDB outage
        // must not take the time the commit and the LeaveGroup after this need. What it has not
        // written by then is not committed, and the next owner reads it again.
        let wait = match self.shutdown.deadline() {
            Some(_) => self.shutdown.remaining(self.flush_timeout) / 2,
            None => self.flush_timeout,
        };
        // This runs inside the poll of the consumer's own task; the writer is another task, so
        // waiting here is only safe where tokio can move that task to another thread.
        let flushed = multi_thread
            && self.flush.try_send(ack).is_ok()
            && tokio::task::block_in_place(|| done.recv_timeout(wait)).is_ok();
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
