//! `candlestream consumer`: Kafka consumer group → Avro decode → InfluxDB, at-least-once.
//!
//! Each worker is one group member: a poller task reads records into a bounded channel, a writer
//! task ([`writer`]) writes them to InfluxDB and stores their offsets only once the write is
//! acknowledged. When the writer falls behind (InfluxDB down, the registry failing), the channel
//! fills and the poller pauses the member's partitions but goes on polling, so the member keeps
//! its partitions however long that lasts.

mod group;
mod stall;
mod writer;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Message, OwnedMessage};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::codec::{CodecError, Decoder};
use crate::config::{AssignmentStrategy, Settings};
use crate::kafka::{consumer_config, producer_config};
use crate::model::RecordKind;
use crate::retry::Shutdown;
use crate::sink::influx::{InfluxSink, SinkError};
use crate::telemetry::{Fault, Health, Liveness, metric, serve_http};
use group::{GroupContext, is_closed, member_id, start_close};
use writer::FlushRequest;

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
    #[error(
        "{0} group member(s) did not finish leaving the group within consumer.shutdown_timeout"
    )]
    Close(usize),
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
    dlq: writer::DeadLetterTopic,
    /// Records from decoding until InfluxDB took them; beats on every acknowledged write.
    writes: Arc<Liveness>,
    /// Set while InfluxDB refuses writes for a reason only an operator can fix.
    setup: Arc<Fault>,
    shutdown: Shutdown,
    /// Held by the member that is leaving the group; see [`member`].
    leaving: tokio::sync::Mutex<()>,
    /// What the workers fetched and stored, for telling where a stalled record waits.
    progress: Arc<stall::Progress>,
}

/// Runs `workers` group members until `cancel`; each then writes what it read, commits and
/// leaves the group.
pub async fn run(
    settings: Settings,
    workers: usize,
    cancel: CancellationToken,
) -> Result<(), ConsumerError> {
    let health = Health::default();
    let writes = health.progress("records_stored", settings.health.max_ack_silence);
    let setup = health.fault("influx_writes");
    // Every kind exported from the start at 0: a rate over a counter that appears only with its
    // first failure cannot show that failure.
    for kind in ["retried", "misconfigured", "rejected"] {
        metrics::counter!(metric::WRITE_ERRORS, "kind" => kind).increment(0);
    }
    let http_stop = CancellationToken::new();
    let _http_guard = http_stop.clone().drop_guard();
    serve_http(settings.http.listen, health, http_stop.clone()).await?;

    let shared = Arc::new(Shared {
        decoder: Decoder::new(&settings.schema_registry)?,
        sink: InfluxSink::new(&settings.influx)?,
        dlq: writer::DeadLetterTopic {
            producer: producer_config(&settings.kafka).create()?,
            topic: settings.kafka.dlq_topic.clone(),
        },
        writes,
        setup,
        shutdown: Shutdown::new(cancel, settings.consumer.shutdown_timeout),
        leaving: tokio::sync::Mutex::new(()),
        progress: Arc::default(),
        settings,
    });
    let mut members = JoinSet::new();
    for id in 0..workers {
        let consumer = subscribe(&shared, id)?;
        members.spawn(member(shared.clone(), id, consumer));
    }
    let topics = topics(&shared.settings);
    tokio::spawn(stall::watch(
        shared.clone(),
        topics.iter().map(|t| t.to_string()).collect(),
        http_stop.clone(),
    ));
    tracing::info!(workers, ?topics, group = %shared.settings.kafka.group_id, "consumer running");
    let mut unclosed = 0;
    while let Some(r) = members.join_next().await {
        match r {
            Ok(true) => {}
            Ok(false) => unclosed += 1,
            Err(e) => tracing::error!(error = %e, "consumer worker panicked"),
        }
    }
    tracing::info!("consumer stopped");
    if unclosed > 0 {
        return Err(ConsumerError::Close(unclosed));
    }
    Ok(())
}

/// One group reads every record type; each goes to its own measurement.
fn topics(settings: &Settings) -> Vec<&str> {
    RecordKind::ALL
        .iter()
        .map(|k| settings.kafka.topic_of(*k))
        .collect()
}

struct Member {
    consumer: Arc<StreamConsumer<GroupContext>>,
    flush_rx: mpsc::Receiver<FlushRequest>,
    joined: watch::Receiver<bool>,
}

fn subscribe(shared: &Shared, id: usize) -> Result<Member, ConsumerError> {
    let (flush, flush_rx) = mpsc::channel(1);
    let (joined, joined_rx) = watch::channel(false);
    let context = GroupContext {
        worker: id,
        flush,
        flush_timeout: shared.settings.consumer.shutdown_timeout,
        shutdown: shared.shutdown.clone(),
        cooperative: shared.settings.kafka.assignment_strategy
            == AssignmentStrategy::CooperativeSticky,
        joined,
        progress: shared.progress.clone(),
    };
    let consumer: StreamConsumer<GroupContext> =
        consumer_config(&shared.settings.kafka).create_with_context(context)?;
    consumer.subscribe(&topics(&shared.settings))?;
    Ok(Member {
        consumer: Arc::new(consumer),
        flush_rx,
        joined: joined_rx,
    })
}

/// Runs one member until shutdown; true when it left the group cleanly within
/// `consumer.shutdown_timeout` of the shutdown signal.
///
/// A close sends the final offset commit and LeaveGroup to the coordinator, and librdkafka
/// queues both behind a JoinGroup in flight on that connection; the coordinator answers a
/// JoinGroup only once every member of the group has rejoined. Two rules keep that wait short:
/// - A member whose first JoinGroup is still unanswered does not close yet. It has no member id,
///   so it would leave without a LeaveGroup while the coordinator, which counted it in,
///   waits for it in the next rebalance until its session times out, holding every other
///   member's JoinGroup, commit and LeaveGroup that long.
/// - The members of a process leave one at a time while the others go on polling, so that each
///   of them rejoins at once when another's leaving starts a rebalance.
async fn member(
    shared: Arc<Shared>,
    id: usize,
    Member {
        consumer,
        flush_rx,
        mut joined,
    }: Member,
) -> bool {
    let (tx, rx) = mpsc::channel(shared.settings.influx.batch_size * 2);
    let timeout = shared.settings.consumer.shutdown_timeout;
    let mut writer =
        tokio::spawn(writer::Writer::new(shared.clone(), id, consumer.clone()).run(rx, flush_rx));
    let turn = async {
        shared.shutdown.stop.cancelled().await;
        // A quarter of the time at most, so that a coordinator that holds the join longer
        // still leaves time to close.
        let joined = tokio::time::timeout(timeout / 4, joined.wait_for(|j| *j))
            .await
            .is_ok();
        if !joined {
            tracing::warn!(worker = id, "closing before the group answered our join");
        }
        tokio::select! {
            turn = shared.leaving.lock() => (Some(turn), joined),
            _ = shared.shutdown.expired.cancelled() => (None, joined),
        }
    };
    let (turn, joined) = poll(&consumer, tx, turn, id, &shared.progress).await;
    let deadline = shared
        .shutdown
        .deadline()
        .expect("the turn comes after the shutdown started");
    // The writer finishes what it was handed meanwhile; the revoke that closing brings asks it
    // to flush, and the commit that follows carries those offsets.
    let closed = turn.is_some() && close(&consumer, deadline, joined, id).await;
    drop(turn);
    // The writer's retries end at the deadline; this bound only guards that promise.
    if tokio::time::timeout_at(deadline, &mut writer)
        .await
        .is_err()
    {
        tracing::error!(
            worker = id,
            "writer still busy at the shutdown deadline; stopped"
        );
        writer.abort();
    }
    if closed {
        tracing::info!(worker = id, "offsets committed, left the group");
    } else {
        tracing::error!(
            worker = id,
            ?timeout,
            "Kafka did not confirm leaving the group in time"
        );
        // Dropping an unclosed consumer blocks until it closes; nothing may wait for that.
        std::thread::spawn(move || drop(consumer));
    }
    closed
}

/// How long the writer may keep the queue full before the partitions are paused.
const PAUSE_AFTER: Duration = Duration::from_secs(1);

/// Reads records into `tx` until `stop` is ready, and returns its output. When `tx` stays full
/// for [`PAUSE_AFTER`] the member's partitions are paused and polling goes on (group membership depends on it); what
/// arrived meanwhile is held, at most a record per partition, and handed over before the
/// partitions resume.
async fn poll<T>(
    consumer: &StreamConsumer<GroupContext>,
    tx: mpsc::Sender<OwnedMessage>,
    stop: impl std::future::Future<Output = T>,
    id: usize,
    progress: &stall::Progress,
) -> T {
    let mut held: VecDeque<OwnedMessage> = VecDeque::new();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            out = &mut stop => return out,
            permit = tx.reserve(), if !held.is_empty() => {
                let Ok(permit) = permit else { return stop.await };
                permit.send(held.pop_front().expect("held is not empty"));
                if held.is_empty() {
                    flow(consumer, id, false);
                }
            }
            next = consumer.recv() => match next {
                Ok(m) => {
                    metrics::counter!(metric::CONSUMED).increment(1);
                    progress.fetched(m.topic(), m.partition(), m.offset());
                    let record = m.detach();
                    if !held.is_empty() {
                        // Fetched before the pause took hold, or from a partition assigned since.
                        flow(consumer, id, true);
                        held.push_back(record);
                        continue;
                    }
                    match tx.try_send(record) {
                        Ok(()) => {}
                        // A queue full for a moment is ordinary backpressure (a backlog being
                        // written): wait for room. Pausing then would throw away what librdkafka
                        // prefetched and slow the catch-up to a crawl. Only a writer stuck for
                        // longer (InfluxDB down) gets the partitions paused, well within
                        // max.poll.interval.ms, so that polling goes on.
                        Err(TrySendError::Full(record)) => tokio::select! {
                            out = &mut stop => return out,
                            permit = tokio::time::timeout(PAUSE_AFTER, tx.reserve()) => match permit {
                                Ok(Ok(permit)) => permit.send(record),
                                Ok(Err(_)) => return stop.await,
                                Err(_) => {
                                    flow(consumer, id, true);
                                    held.push_back(record);
                                }
                            },
                        },
                        Err(TrySendError::Closed(_)) => return stop.await,
                    }
                }
                Err(e) => {
                    tracing::warn!(worker = id, error = %e, "Kafka consume error");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            },
        }
    }
}

/// Pauses (or resumes) every partition assigned to the member. A paused partition fetches
/// nothing more and, on resume, starts again after the last record handed to us.
fn flow(consumer: &StreamConsumer<GroupContext>, id: usize, pause: bool) {
    let result = consumer.assignment().and_then(|a| {
        if pause {
            consumer.pause(&a)
        } else {
            consumer.resume(&a)
        }
    });
    match result {
        Ok(()) if pause => {
            metrics::counter!(metric::PAUSES).increment(1);
            tracing::info!(
                worker = id,
                "writer behind; partitions paused, polling goes on"
            );
        }
        Ok(()) => tracing::info!(worker = id, "writer caught up; partitions resumed"),
        Err(e) => {
            tracing::warn!(worker = id, pause, error = %e, "cannot pause or resume partitions")
        }
    }
}

/// Leaves the group on this task: the rebalance callbacks that leaving raises are served here,
/// where the writer can still flush, rather than inside a drop on some other thread. True once
/// librdkafka reports the consumer closed (final commit sent, group left) before `deadline`.
///
/// A member that has joined unsubscribes before it closes. A close alone sends no LeaveGroup for
/// a cooperative-sticky member that holds no partitions (librdkafka 2.12:
/// `rd_kafka_cgrp_revoke_all_rejoin` returns early when terminating with an empty assignment),
/// and the coordinator would wait for that member in the next rebalance until its session times
/// out. An unsubscribe leaves in every case; during a rebalance librdkafka applies it once the
/// rebalance is done. Leaving clears the member id, normally within milliseconds; the wait for it
/// takes a quarter of the time left at most, so that the close keeps time for a LeaveGroup queued
/// behind a held JoinGroup (librdkafka gives a LeaveGroup 5 s). The close then waits for the
/// answer.
async fn close(
    consumer: &StreamConsumer<GroupContext>,
    deadline: Instant,
    joined: bool,
    id: usize,
) -> bool {
    if joined {
        consumer.unsubscribe();
        let quarter = deadline.saturating_duration_since(Instant::now()) / 4;
        if !serve_until(consumer, Instant::now() + quarter, || {
            member_id(consumer).is_empty()
        })
        .await
        {
            tracing::warn!(
                worker = id,
                "the group has not let us leave yet; closing anyway"
            );
        }
    }
    if let Err(e) = start_close(consumer) {
        tracing::warn!(worker = id, error = %e, "cannot start leaving the group");
        return is_closed(consumer);
    }
    serve_until(consumer, deadline, || is_closed(consumer)).await
}

/// Serves the consumer's callbacks until `done` holds; false if `deadline` came first.
async fn serve_until(
    consumer: &StreamConsumer<GroupContext>,
    deadline: Instant,
    done: impl Fn() -> bool,
) -> bool {
    while !done() {
        tokio::select! {
            // Records still arriving are not stored; the next owner reads them.
            _ = consumer.recv() => {}
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            _ = tokio::time::sleep_until(deadline) => return done(),
        }
    }
    true
}
