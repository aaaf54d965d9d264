//! Kafka clients: built-in defaults overlaid with the `[kafka.producer]` / `[kafka.consumer]`
//! pass-through tables, and what every client knows about Kafka's errors.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use tokio_util::sync::CancellationToken;

use crate::config::KafkaConfig;
use crate::telemetry::metric;

/// Producer defaults: acks from every in-sync replica, no duplicates from retries, and the
/// Java-compatible key hash so a coin lands on the same partition whichever client wrote it.
const PRODUCER_DEFAULTS: &[(&str, &str)] = &[
    ("acks", "all"),
    ("enable.idempotence", "true"),
    ("partitioner", "murmur2_random"),
    ("compression.type", "lz4"),
    ("linger.ms", "20"),
    ("client.id", "candlestream-producer"),
    // What idempotence allows at most, said outright so that a producer without it (Kafka 0.9,
    // or enable.idempotence=false) keeps the same bound. While acks stall (a broker died and
    // its followers are not yet out of the in-sync replicas), an unbounded producer sends a
    // request per linger.ms; the broker answers one request per connection at a time, each
    // after replication, so once acks resume the backlog drained a few records per request and
    // every partition led by that broker waited behind it (issue 19: 12-15 s round trips, records
    // 30 s late). With 5 in flight, the records wait in the client and go out in full batches.
    ("max.in.flight.requests.per.connection", "5"),
    FAILOVER_RECONNECT,
];

/// How long a client waits at most before connecting again to a broker it lost. librdkafka
/// doubles the wait after each refused attempt, up to 10 s by default: a broker back after a
/// restart was then reached up to 10 s late, and once Kafka hands leadership back to it (the
/// preferred-leader election that follows a restart) its partitions waited that long (issue 19:
/// a producer reconnected 4 s after it learned that the restarted broker led again). Trying a
/// dead broker once a second costs nothing.
const FAILOVER_RECONNECT: (&str, &str) = ("reconnect.backoff.max.ms", "1000");

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
        FAILOVER_RECONNECT,
    ];
    client_config(&cfg.brokers, &defaults, &cfg.consumer)
}

/// Errors caused by the record itself, which no retry and no repair outside it can cure: too
/// large for Kafka (librdkafka's own size check, or the broker's), or refused by the broker's
/// validation of its contents (KIP-467; the other records of that batch fail with
/// `InvalidDifferentRecord` and are not meant here).
///
/// Why a list of the record's faults and not of the passing ones: every other error is a fault of
/// configuration or infrastructure (an ACL missing, a topic not created, brokers down, a clock
/// off) or one librdkafka adds in a later version, and giving up on those lost records while
/// /healthz stayed green. They are held and sent again, so the records wait unacknowledged and
/// the `kafka_acks` check turns red until someone fixes the cause.
///
/// Not listed, though it names the record: `InvalidMessage` (a CRC mismatch). librdkafka takes it
/// for corruption on the way and sends the batch again itself, as the Java client does.
pub fn is_permanent_for_record(e: &KafkaError) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        e.rdkafka_error_code(),
        Some(MessageSizeTooLarge | InvalidMessageSize | InvalidRecord)
    )
}

/// How often [`report_group_lag`] reads the group's offsets.
const LAG_INTERVAL: Duration = Duration::from_secs(5);

/// Sets `candlestream_consumer_lag_records` per topic and partition until `cancel`: the
/// partition's high watermark minus the offset `cfg.group_id` committed there (partitions
/// without a commit are left out). Read from the brokers, not from the consumers' own statistics:
/// it has to keep rising while every consumer is stopped, and a consumer that paused its
/// partitions fetches nothing, so its own view of the high watermark stands still.
pub async fn report_group_lag(cfg: KafkaConfig, topics: Vec<String>, cancel: CancellationToken) {
    let client = match group_offsets_reader(&cfg, "candlestream-lag") {
        Ok(c) => Arc::new(c),
        Err(e) => {
            tracing::error!(error = %e, "cannot create the client that reads consumer lag; no lag metric");
            return;
        }
    };
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
                for p in lags {
                    metrics::gauge!(metric::CONSUMER_LAG, "topic" => p.topic, "partition" => p.partition.to_string())
                        .set((p.high - p.committed).max(0) as f64);
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot read consumer lag; trying again"),
            Err(e) => tracing::error!(error = %e, "consumer lag reader panicked"),
        }
    }
}

/// A client of `cfg.group_id` that never subscribes, so it never joins the group: it reads the
/// group's committed offsets, the high watermarks and single records at chosen offsets.
pub fn group_offsets_reader(
    cfg: &KafkaConfig,
    client_id: &str,
) -> Result<rdkafka::consumer::BaseConsumer, KafkaError> {
    let defaults = [
        ("group.id", cfg.group_id.as_str()),
        ("client.id", client_id),
        // It reads one record per partition at a time: a small fetch, not a backlog's megabytes.
        ("max.partition.fetch.bytes", "65536"),
    ];
    let mut config = client_config(&cfg.brokers, &defaults, &cfg.consumer);
    // Set after the pass-through table, whatever it says: a commit from this client would mark
    // records stored that InfluxDB never saw.
    config
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    config.create()
}

/// Where the group stands in one partition: everything before `committed` is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionLag {
    pub topic: String,
    pub partition: i32,
    /// The group's committed offset: the next record it will store.
    pub committed: i64,
    pub high: i64,
}

/// The committed offset and high watermark of every partition of `topics` the group committed.
pub fn group_lag(
    client: &rdkafka::consumer::BaseConsumer,
    topics: &[String],
    timeout: Duration,
) -> Result<Vec<PartitionLag>, KafkaError> {
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
            lags.push(PartitionLag {
                topic: e.topic().to_string(),
                partition: e.partition(),
                committed: offset,
                high,
            });
        }
    }
    Ok(lags)
}

/// Reads the record at `offset` of each partition in `at` (topic, partition, offset), waiting at
/// most `timeout` for all of them; the ones that did not come in time are left out.
pub fn read_at(
    client: &rdkafka::consumer::BaseConsumer,
    at: &[(String, i32, i64)],
    timeout: Duration,
) -> Result<Vec<rdkafka::message::OwnedMessage>, KafkaError> {
    use rdkafka::consumer::Consumer;
    use rdkafka::message::Message;
    let mut tpl = rdkafka::TopicPartitionList::new();
    for (topic, partition, offset) in at {
        tpl.add_partition_offset(topic, *partition, rdkafka::Offset::Offset(*offset))?;
    }
    client.assign(&tpl)?;
    let deadline = std::time::Instant::now() + timeout;
    let mut wanted: Vec<&(String, i32, i64)> = at.iter().collect();
    let mut out = Vec::new();
    while !wanted.is_empty() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            break;
        }
        // An error (a partition whose leader is away) leaves the others to come.
        if let Some(Ok(m)) = client.poll(left) {
            let at = (m.topic(), m.partition(), m.offset());
            if let Some(i) = wanted
                .iter()
                .position(|(t, p, o)| (t.as_str(), *p, *o) == at)
            {
                wanted.swap_remove(i);
                out.push(m.detach());
            }
        }
    }
    // Nothing more is fetched until the next read.
    client.unassign()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_records_own_faults_are_permanent() {
        use RDKafkaErrorCode::*;
        for code in [MessageSizeTooLarge, InvalidMessageSize, InvalidRecord] {
            let e = KafkaError::MessageProduction(code);
            assert!(
                is_permanent_for_record(&e),
                "{code:?} is the record's fault"
            );
        }
        // Faults of configuration or infrastructure, passing ones, a record failed for another
        // record's fault, and what librdkafka reports for a code it does not know.
        for code in [
            TopicAuthorizationFailed,
            ClusterAuthorizationFailed,
            SaslAuthenticationFailed,
            Authentication,
            UnknownTopic,
            UnknownPartition,
            UnknownTopicOrPartition,
            QueueFull,
            MessageTimedOut,
            NotEnoughReplicas,
            AllBrokersDown,
            InvalidDifferentRecord,
            InvalidMessage,
            InvalidTimestamp,
            MessageBatchTooLarge,
            PolicyViolation,
            UnsupportedForMessageFormat,
            Fatal,
            Unknown,
        ] {
            let e = KafkaError::MessageProduction(code);
            assert!(!is_permanent_for_record(&e), "{code:?} is held");
        }
        assert!(!is_permanent_for_record(&KafkaError::Canceled));
    }
}
