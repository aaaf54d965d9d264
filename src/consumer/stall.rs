//! Stalls: records that have waited longer than `pipeline.stall_warning` since the producer
//! received them and are not yet stored in InfluxDB.
//!
//! The age is read from the brokers, not only from what this process holds: every
//! [`CHECK_INTERVAL`] the oldest record of each partition that is not known to be stored is
//! fetched and its `received_at` read. That is the record at the group's committed offset, or,
//! where a worker of this process owns the partition, the first one InfluxDB has not acknowledged
//! (the commit follows the acknowledgement by up to a second, and by more while the group's
//! coordinator moves). So a freeze shows while no member fetches anything: during a rebalance,
//! while the coordinator moves to another broker, or with every partition paused. Where that
//! record waits is what this process knows of it: fetched by one of its workers or not.
//! Separately, an acknowledged record whose offset stays uncommitted is a stall of the commit.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::message::Message;
use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::kafka::{PartitionLag, group_lag, group_offsets_reader, read_at};
use crate::telemetry::metric;

/// How often the oldest unstored record of every partition is read.
const CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// A partition of one of the topics read.
type Partition = (String, i32);

/// What this process's workers did with each partition's records: next offsets, so that an
/// offset below them is done.
#[derive(Debug, Default)]
pub struct Progress {
    partitions: Mutex<HashMap<Partition, Local>>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Local {
    /// The offset after the last record a worker fetched.
    fetched: i64,
    /// The offset after the last record InfluxDB acknowledged (and whose offset was stored).
    stored: i64,
}

/// Where the oldest unstored record of a partition waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// In Kafka: no worker of this process has fetched it (the partition is not assigned here,
    /// the group is rebalancing, or its fetcher waits for a broker).
    Fetch,
    /// Fetched, and InfluxDB has not acknowledged it.
    Write,
    /// In InfluxDB; its offset is stored but not yet committed.
    Commit,
}

impl Stage {
    pub fn label(self) -> &'static str {
        match self {
            Stage::Fetch => "fetch",
            Stage::Write => "write",
            Stage::Commit => "commit",
        }
    }
}

impl Progress {
    fn with(&self, topic: &str, partition: i32, f: impl FnOnce(&mut Local)) {
        let mut parts = self.partitions.lock().expect("progress lock");
        f(parts.entry((topic.to_string(), partition)).or_default());
    }

    /// A worker took the record at `offset` from Kafka.
    pub fn fetched(&self, topic: &str, partition: i32, offset: i64) {
        self.with(topic, partition, |l| l.fetched = offset + 1);
    }

    /// InfluxDB acknowledged every record of the partition up to `offset`, whose offset is
    /// stored for the next commit.
    pub fn stored(&self, topic: &str, partition: i32, offset: i64) {
        self.with(topic, partition, |l| l.stored = offset + 1);
    }

    /// The partition left this process's workers: what they did with it says nothing any more.
    pub fn revoked(&self, topic: &str, partition: i32) {
        let mut parts = self.partitions.lock().expect("progress lock");
        parts.remove(&(topic.to_string(), partition));
    }

    /// The offset after the last record InfluxDB acknowledged, where a worker of this process
    /// owns the partition.
    pub fn stored_next(&self, topic: &str, partition: i32) -> Option<i64> {
        let parts = self.partitions.lock().expect("progress lock");
        parts.get(&(topic.to_string(), partition)).map(|l| l.stored)
    }

    /// Where the record at `offset` waits, as far as this process knows; and whether one of its
    /// workers holds the partition.
    pub fn stage(&self, topic: &str, partition: i32, offset: i64) -> (Stage, bool) {
        let parts = self.partitions.lock().expect("progress lock");
        match parts.get(&(topic.to_string(), partition)) {
            Some(l) if l.stored > offset => (Stage::Commit, true),
            Some(l) if l.fetched > offset => (Stage::Write, true),
            Some(_) => (Stage::Fetch, true),
            None => (Stage::Fetch, false),
        }
    }
}

/// A partition as last read: the group's committed offset and its oldest unstored record (None
/// when everything is stored).
#[derive(Debug, Clone, Copy)]
struct Read {
    committed: i64,
    oldest: Option<Oldest>,
}

#[derive(Debug, Clone, Copy)]
struct Oldest {
    offset: i64,
    /// When the producer received it (Unix ms).
    received_at: i64,
}

/// What the checks remember between rounds.
#[derive(Debug, Default)]
struct Watch {
    read: BTreeMap<Partition, Read>,
    /// Partitions whose stall was logged, with the offset of the record it was logged for.
    warned: BTreeMap<Partition, i64>,
    /// Partitions with acknowledged records whose commit waits: the committed offset then, when
    /// that wait was first seen (Unix ms), and whether it was logged.
    commit_wait: BTreeMap<Partition, (i64, i64, bool)>,
}

/// Exports `candlestream_oldest_unstored_seconds` and logs stalls until `cancel`.
pub async fn watch(shared: Arc<Shared>, topics: Vec<String>, cancel: CancellationToken) {
    let client = match group_offsets_reader(&shared.settings.kafka, "candlestream-stall-watch") {
        Ok(c) => Arc::new(c),
        Err(e) => {
            tracing::error!(error = %e, "cannot create the client that watches for stalls; no candlestream_oldest_unstored_seconds");
            return;
        }
    };
    let mut state = Watch::default();
    let mut ticker = tokio::time::interval(CHECK_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        match read_oldest(&shared, &client, &topics).await {
            Ok(read) => state.read = read,
            // The committed offsets come from the group's coordinator. While it cannot be asked
            // (it is moving to another broker, say), nothing can be committed either, so the
            // oldest record read last is still waiting, or was stored without this process
            // knowing: its age keeps counting, erring on the side of a warning.
            Err(e) => tracing::debug!(error = %e, "cannot read the group's offsets; ages count on"),
        }
        state.report(&shared, crate::model::now_ms());
    }
}

/// Per partition the group committed in: the committed offset and the oldest unstored record.
async fn read_oldest(
    shared: &Shared,
    client: &Arc<rdkafka::consumer::BaseConsumer>,
    topics: &[String],
) -> Result<BTreeMap<Partition, Read>, rdkafka::error::KafkaError> {
    let (c, t, progress) = (client.clone(), topics.to_vec(), shared.progress.clone());
    let (lags, records) = tokio::task::spawn_blocking(move || {
        let lags: Vec<PartitionLag> = group_lag(&c, &t, CHECK_INTERVAL)?;
        // The first record not known to be stored, where there is one.
        let from = |p: &PartitionLag| {
            let stored = progress.stored_next(&p.topic, p.partition);
            p.committed.max(stored.unwrap_or(p.committed))
        };
        let behind: Vec<(String, i32, i64)> = lags
            .iter()
            .filter(|p| p.high > from(p))
            .map(|p| (p.topic.clone(), p.partition, from(p)))
            .collect();
        let records = if behind.is_empty() {
            Vec::new()
        } else {
            read_at(&c, &behind, CHECK_INTERVAL)?
        };
        Ok::<_, rdkafka::error::KafkaError>((lags, records))
    })
    .await
    .expect("the stall reader does not panic")?;
    let mut read: BTreeMap<Partition, Read> = lags
        .into_iter()
        .map(|p| {
            let r = Read {
                committed: p.committed,
                oldest: None,
            };
            ((p.topic, p.partition), r)
        })
        .collect();
    for r in records {
        // A record that does not decode is the dead letters' business; its age is unknown.
        let Ok(decoded) = shared.decoder.decode(r.payload().unwrap_or_default()).await else {
            continue;
        };
        if let Some(p) = read.get_mut(&(r.topic().to_string(), r.partition())) {
            p.oldest = Some(Oldest {
                offset: r.offset(),
                received_at: decoded.received_at(),
            });
        }
    }
    Ok(read)
}

impl Watch {
    /// Sets the gauges and logs what became a stall (or stopped being one) since the last check.
    fn report(&mut self, shared: &Shared, now_ms: i64) {
        let limit = shared.settings.pipeline.stall_warning;
        for ((topic, partition), read) in &self.read {
            let key = (topic.clone(), *partition);
            let age_ms = read.oldest.map_or(0, |o| (now_ms - o.received_at).max(0));
            let age = Duration::from_millis(age_ms as u64);
            metrics::gauge!(metric::OLDEST_UNSTORED, "topic" => topic.clone(), "partition" => partition.to_string())
                .set(age.as_secs_f64());
            match read.oldest {
                Some(o) if age > limit => {
                    // Once per stall: a new warning only for a later record stalling anew.
                    if self.warned.get(&key) != Some(&o.offset) {
                        self.warned.insert(key.clone(), o.offset);
                        let (stage, assigned_here) =
                            shared.progress.stage(topic, *partition, o.offset);
                        stalled(
                            topic,
                            *partition,
                            o.offset,
                            age,
                            stage,
                            assigned_here,
                            limit,
                        );
                    }
                }
                _ => {
                    if self.warned.remove(&key).is_some() {
                        tracing::info!(%topic, partition, "stall over: the partition's records are stored within pipeline.stall_warning");
                    }
                }
            }
            // Acknowledged by InfluxDB, and the commit does not follow.
            match shared.progress.stored_next(topic, *partition) {
                Some(stored) if stored > read.committed => {
                    let wait =
                        self.commit_wait
                            .entry(key)
                            .or_insert((read.committed, now_ms, false));
                    if wait.0 != read.committed {
                        *wait = (read.committed, now_ms, false);
                    }
                    let waited = Duration::from_millis((now_ms - wait.1).max(0) as u64);
                    if waited > limit && !wait.2 {
                        wait.2 = true;
                        stalled(
                            topic,
                            *partition,
                            read.committed,
                            waited,
                            Stage::Commit,
                            true,
                            limit,
                        );
                    }
                }
                _ => {
                    self.commit_wait.remove(&key);
                }
            }
        }
    }
}

/// One stall: logged and counted as one event.
fn stalled(
    topic: &str,
    partition: i32,
    offset: i64,
    age: Duration,
    stage: Stage,
    assigned_here: bool,
    limit: Duration,
) {
    metrics::counter!(metric::STALLS, "stage" => stage.label()).increment(1);
    let what = match stage {
        Stage::Fetch | Stage::Write => "record not stored in InfluxDB",
        Stage::Commit => "stored records not committed",
    };
    tracing::warn!(
        %topic,
        partition,
        offset,
        age = ?age,
        stage = stage.label(),
        assigned_here,
        "{what} after pipeline.stall_warning ({limit:?})"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_follows_what_the_workers_did() {
        let p = Progress::default();
        assert_eq!(p.stage("t", 0, 5), (Stage::Fetch, false));
        p.fetched("t", 0, 4);
        assert_eq!(p.stage("t", 0, 5), (Stage::Fetch, true));
        p.fetched("t", 0, 7);
        assert_eq!(p.stage("t", 0, 5), (Stage::Write, true));
        p.stored("t", 0, 5);
        assert_eq!(p.stage("t", 0, 5), (Stage::Commit, true));
        assert_eq!(p.stage("t", 0, 6), (Stage::Write, true));
        p.revoked("t", 0);
        assert_eq!(p.stage("t", 0, 6), (Stage::Fetch, false));
    }
}
