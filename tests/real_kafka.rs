//! The producer against a real replicated Kafka cluster: ZooKeeper + 3 brokers of Kafka 0.9.0.1,
//! topic with replication 3 and min.insync.replicas=2, acks=all.

// The cluster lock is held across awaits on purpose: it keeps whole tests, each on its own
// runtime, from running two clusters at once.
#![allow(clippy::await_holding_lock)]

mod support;

use std::sync::Mutex;
use std::time::Duration;

use support::fake_bitfinex::FakeBitfinex;
use support::fake_registry::FakeRegistry;
use support::influx1::Influx1;
use support::kafka09::{KafkaCluster, client_overrides, producer_overrides};
use support::pipeline::*;
use support::{SYMBOLS, eventually, settings, unique};

/// One cluster at a time: each is four JVMs on a two-core machine.
static CLUSTER: Mutex<()> = Mutex::new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_writes_every_update_through_a_replicated_cluster() {
    let _one_at_a_time = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let cluster = tokio::task::spawn_blocking(|| KafkaCluster::start(3))
        .await
        .unwrap();
    let topic = unique("ticks");
    cluster.create_topic(&topic, 3, 3, 2);
    assert!(cluster.describe(&topic).contains("min.insync.replicas=2"));

    let exchange = FakeBitfinex::start().await;
    let registry = FakeRegistry::start().await;
    let mut s = settings(&exchange, &registry, &cluster.bootstrap(), &topic);
    s.kafka.producer = producer_overrides();
    s.kafka.producer.insert("acks".into(), "all".into());
    // The producer also reads (the trades topic's tail at start, the group's lag): those
    // clients need the 0.9 compatibility settings too.
    s.kafka.consumer = client_overrides();
    let running = start(s);
    exchange.wait_subscribed(&SYMBOLS, WAIT).await;
    assert_eq!(emit_rounds(&exchange, 50).await, 150);
    let records = stop_when_delivered(
        running,
        &exchange,
        &cluster.bootstrap(),
        &topic,
        &client_overrides(),
    )
    .await;
    let ticks = decode_all(&registry, &records).await;
    assert_exactly_sent(&exchange.sent(), &ticks);
    assert_one_partition_per_symbol(&records, 3);
}

/// The close that must always finish. Two members of one process leave their group on a real
/// coordinator at every stage of joining: the first member alone, the second one's join under way
/// (for cooperative-sticky, both rounds), both assigned and writing. Every member must report its
/// close finished (final commit, LeaveGroup) within `consumer.shutdown_timeout`, or `run` fails.
/// Each group writes to its own database, so that what it committed can be held against what it
/// wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_members_of_one_process_always_finish_closing() {
    use candlestream::config::{AssignmentStrategy, Settings};
    let _one_at_a_time = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let rig = GroupRig::start().await;
    let (cluster, influx, ticks) = (&rig.cluster, &rig.influx, &rig.ticks);
    // Records to write, so that a revoke has a batch to flush and offsets to commit.
    let records = make_ticks(&SYMBOLS, 40, 1_763_787_600_000, 1000);
    produce_ticks(
        &cluster.bootstrap(),
        ticks,
        &rig.registry,
        &producer_overrides(),
        &records,
    )
    .await;
    let end = end_offsets(&cluster.bootstrap(), ticks, 4);
    assert_eq!(end.iter().sum::<i64>(), records.len() as i64);

    let limit = Settings::default().consumer.shutdown_timeout;
    let mut report = Vec::new();
    for strategy in [
        AssignmentStrategy::CooperativeSticky,
        AssignmentStrategy::Range,
    ] {
        let (mut took, mut complete) = (Vec::new(), 0);
        // Rounds of concurrent groups keep the test short; each group is one process's two members.
        for _round in 0..3 {
            let mut groups = Vec::new();
            for i in 0..10u64 {
                let mut s = rig.group_settings(&unique("close-g")).await;
                s.kafka.assignment_strategy = strategy;
                let db = s.influx.database.clone();
                // 0.5 s to 5.9 s: before, during and after the rebalance the second member's
                // join starts (members learn of it by heartbeat, every 3 s).
                groups.push((
                    Duration::from_millis(500 + 600 * i),
                    s.kafka.group_id.clone(),
                    db,
                    start_consumer(s, 2),
                ));
            }
            let stops = groups
                .into_iter()
                .map(|(stop_after, group, db, running)| async move {
                    tokio::time::sleep(stop_after).await;
                    let started = std::time::Instant::now();
                    running.stop().await;
                    (started.elapsed(), group, db)
                });
            for (elapsed, group, db) in futures::future::join_all(stops).await {
                took.push(elapsed);
                // Each member left with a LeaveGroup: none is left for the coordinator to wait
                // for in the next rebalance until its session times out.
                assert_eq!(
                    group_members(&cluster.bootstrap(), &group),
                    Vec::<String>::new(),
                    "{group} after {elapsed:?}"
                );
                // Nothing is committed that InfluxDB did not acknowledge.
                let committed = support::committed_offsets(
                    &cluster.bootstrap(),
                    &group,
                    ticks,
                    4,
                    &client_overrides(),
                );
                let written = written_per_partition(influx, &db, 4).await;
                for ((c, w), e) in committed.iter().zip(&written).zip(&end) {
                    assert!(
                        *c <= *w && *w <= *e,
                        "{group}: committed {committed:?}, written {written:?}, end {end:?}"
                    );
                }
                complete += usize::from(committed.iter().zip(&end).all(|(c, e)| (*c).max(0) == *e));
            }
        }
        took.sort();
        report.push(format!(
            "{strategy:?}: {} closes, median {:?}, slowest {:?}, {complete} groups committed every record",
            took.len(),
            took[took.len() / 2],
            took[took.len() - 1]
        ));
        assert!(took.iter().all(|t| *t < limit), "{strategy:?}: {took:?}");
        // Most closes came after the members had read and written everything: the loop closed
        // working members, not idle ones.
        assert!(
            complete * 2 >= took.len(),
            "{strategy:?}: only {complete} of {} groups committed everything",
            took.len()
        );
    }
    crate::report!(
        "CLOSES | two members of one process, real 0.9 coordinator | {} | limit {limit:?}",
        report.join(" | ")
    );
}

/// A member stopped while the coordinator still holds its first JoinGroup (waiting for the
/// group's other member, which learns of the rebalance only by its next heartbeat) must not
/// stay behind in the group: the coordinator counted it in and would wait for it, and hold the
/// other members' joins, until its session times out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_stopped_during_its_first_join_leaves_no_member_behind() {
    let _one_at_a_time = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let rig = GroupRig::start().await;
    let group = unique("join-g");
    let stable = start_consumer(rig.group_settings(&group).await, 1);
    let bootstrap = rig.cluster.bootstrap();
    eventually("the first member joined", WAIT, || {
        group_members(&bootstrap, &group).len() == 1
    })
    .await;
    // Past a heartbeat: the group is stable.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let newcomer = start_consumer(rig.group_settings(&group).await, 1);
    // Its JoinGroup is out and held: the stable member rejoins at its next heartbeat (3 s).
    tokio::time::sleep(Duration::from_millis(500)).await;
    newcomer.stop().await;
    let members = group_members(&bootstrap, &group);
    assert_eq!(
        members.len(),
        1,
        "only the stable member is left: {members:?}"
    );
    stable.stop().await;
    assert_eq!(group_members(&bootstrap, &group), Vec::<String>::new());
}

/// A 3-broker 0.9 cluster with a ticks topic (4 partitions) and a trades topic (2), InfluxDB and
/// the registry, for tests of consumer groups.
struct GroupRig {
    cluster: KafkaCluster,
    influx: Influx1,
    registry: FakeRegistry,
    ticks: String,
    trades: String,
}

impl GroupRig {
    async fn start() -> Self {
        let cluster = tokio::task::spawn_blocking(|| KafkaCluster::start(3))
            .await
            .unwrap();
        let influx = tokio::task::spawn_blocking(Influx1::start).await.unwrap();
        let registry = FakeRegistry::start().await;
        let (ticks, trades) = (unique("group"), unique("group-trades"));
        cluster.create_topic(&ticks, 4, 3, 2);
        cluster.create_topic(&trades, 2, 3, 2);
        Self {
            cluster,
            influx,
            registry,
            ticks,
            trades,
        }
    }

    /// Consumer settings for `group`, writing to a database of its own.
    async fn group_settings(&self, group: &str) -> candlestream::config::Settings {
        let mut s = candlestream::config::Settings::default();
        s.kafka.brokers = self.cluster.bootstrap();
        (s.kafka.consumer, s.kafka.producer) = (client_overrides(), producer_overrides());
        // The longest session 0.9 allows (librdkafka's default of 45 s is over its limit): a
        // member the coordinator waits for would hold a close past the limit.
        s.kafka
            .consumer
            .insert("session.timeout.ms".into(), "30000".into());
        (s.kafka.topic, s.kafka.trades_topic, s.kafka.group_id) =
            (self.ticks.clone(), self.trades.clone(), group.into());
        s.schema_registry.url = self.registry.url();
        let db = group.replace('-', "_");
        self.influx.create_database(&db).await;
        self.influx.configure(&mut s, &db);
        s.http.listen = ([127, 0, 0, 1], 0).into();
        s
    }
}

/// Points the group wrote per partition of the ticks topic: the count of its symbols' points.
async fn written_per_partition(influx: &Influx1, db: &str, partitions: i32) -> Vec<i64> {
    let mut written = vec![0; partitions as usize];
    for symbol in SYMBOLS {
        let rows = influx
            .rows(
                db,
                &format!("SELECT count(last_price) FROM ticker WHERE symbol = '{symbol}'"),
            )
            .await;
        let n = rows.first().and_then(|r| r["count"].as_i64()).unwrap_or(0);
        written[support::java_partition(symbol.as_bytes(), partitions) as usize] += n;
    }
    written
}

/// The members the coordinator holds in `group`, by client host and id. A coordinator still
/// loading its group metadata (CoordinatorLoadInProgress, seen right after a cluster starts)
/// is asked again.
fn group_members(brokers: &str, group: &str) -> Vec<String> {
    use rdkafka::consumer::Consumer;
    let reader = support::reader(brokers, &client_overrides());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let list = loop {
        match reader.fetch_group_list(Some(group), Duration::from_secs(10)) {
            Ok(list) => break list,
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("group list of {group}: {e}; asking again");
                std::thread::sleep(Duration::from_millis(250));
            }
            Err(e) => panic!("group list of {group}: {e}"),
        }
    };
    list.groups()
        .iter()
        .flat_map(|g| g.members())
        .map(|m| format!("{} {}", m.client_host(), m.id()))
        .collect()
}

fn end_offsets(brokers: &str, topic: &str, partitions: i32) -> Vec<i64> {
    use rdkafka::consumer::Consumer;
    let consumer = support::reader(brokers, &client_overrides());
    (0..partitions)
        .map(|p| {
            consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .unwrap()
                .1
        })
        .collect()
}
