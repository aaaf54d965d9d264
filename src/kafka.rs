//! Kafka clients: built-in defaults overlaid with the `[kafka.producer]` / `[kafka.consumer]`
//! pass-through tables, and what every client knows about Kafka's errors.

use std::collections::BTreeMap;

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::config::KafkaConfig;

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
        ("statistics.interval.ms", "5000"),
        ("client.id", "candlestream-consumer"),
    ];
    client_config(&cfg.brokers, &defaults, &cfg.consumer)
}

/// Errors after which sending the same record again can succeed.
pub fn is_retriable(e: &KafkaError) -> bool {
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
