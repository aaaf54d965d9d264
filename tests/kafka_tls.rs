//! Kafka over TLS, the way a managed cluster (Confluent Cloud, MSK, Redpanda) is reached. The
//! brokers of the real 0.9.0.1 cluster also listen for SSL, with a certificate for 127.0.0.1 that
//! a CA made with Java's keytool signed; the producer and consumer binaries are given only those
//! SSL listeners, with `security.protocol` and `ssl.ca.location` in `[kafka.producer]` and
//! `[kafka.consumer]` (the consumer's dead-letter producer reads `[kafka.producer]`).
//!
//! SASL cannot be tested against 0.9: its only SASL mechanism is GSSAPI (Kerberos, on the
//! PLAINTEXT-or-SSL listener as SASL_PLAINTEXT/SASL_SSL); PLAIN came with Kafka 0.10.0 and SCRAM
//! with 0.10.2. What is checked without a broker is that this build of librdkafka accepts
//! `SASL_SSL` with PLAIN and SCRAM, which a build without OpenSSL refuses at client creation.

// The cluster lock is held across awaits on purpose: it keeps whole tests, each on its own
// runtime, from running two clusters at once.
#![allow(clippy::await_holding_lock)]

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use candlestream::config::{KafkaConfig, Settings};
use candlestream::kafka::{consumer_config, producer_config};
use rdkafka::consumer::BaseConsumer;
use rdkafka::producer::BaseProducer;

use support::fake_registry::FakeRegistry;
use support::fake_trades::Trader;
use support::kafka09::{KafkaCluster, TestCa};
use support::pipeline::WAIT;
use support::rig::{CLUSTER, Rig};
use support::{Process, SYMBOLS, eventually_async, settings_toml, topic_size};

/// Live trades the exchange executes over TLS before the count is taken.
const TRADES: usize = 1_500;

/// What a managed cluster asks of every client: SASL over TLS, with PLAIN or SCRAM. librdkafka
/// checks `security.protocol` and `sasl.mechanisms` against what it was built with when the
/// client is created; nothing here reaches a broker.
#[test]
fn sasl_ssl_with_plain_and_scram_is_built_in() {
    for mechanism in ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] {
        let managed: BTreeMap<String, String> = [
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanisms", mechanism),
            ("sasl.username", "candlestream"),
            ("sasl.password", "not-a-real-password"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let kafka = KafkaConfig {
            // Nothing listens there; creation does not wait for a connection.
            brokers: "127.0.0.1:9".into(),
            producer: managed.clone(),
            consumer: managed,
            ..Default::default()
        };
        if let Err(e) = producer_config(&kafka).create::<BaseProducer>() {
            panic!("producer with SASL_SSL + {mechanism}: {e}");
        }
        if let Err(e) = consumer_config(&kafka).create::<BaseConsumer>() {
            panic!("consumer with SASL_SSL + {mechanism}: {e}");
        }
    }
}

/// The producer and the consumer, as processes, reach the cluster only through its SSL
/// listeners: InfluxDB then holds exactly the trades the exchange executed, and both exit
/// cleanly. The consumer is given the CA in `ssl.ca.location`; the producer is not, and finds it
/// in OpenSSL's default store, here pointed at the CA by `SSL_CERT_FILE` (a managed cluster's
/// public CA is found there through ca-certificates). Then a producer and a consumer that trust
/// another CA: they must say in their logs that the broker's certificate failed verification,
/// keep running (an infrastructure fault is held and retried), and the producer's /healthz turns
/// red while its trades wait for Kafka.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_trade_once_over_tls_and_a_wrong_ca_is_named() {
    let _one = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let (ca, wrong_ca, cluster) = tokio::task::spawn_blocking(|| {
        let ca = TestCa::new("candlestream test CA");
        let wrong_ca = TestCa::new("some other CA");
        let cluster = KafkaCluster::start_with_tls(3, ca.broker_keystore());
        (ca, wrong_ca, cluster)
    })
    .await
    .unwrap();
    let mut rig = Rig::on_cluster(cluster, FakeRegistry::start().await).await;
    rig.settings.kafka.brokers = rig.cluster.ssl_bootstrap();
    use_tls(&mut rig.settings, None);

    let logs = tempfile::tempdir().unwrap();
    let mut consumer_settings = rig.settings.clone();
    use_tls(&mut consumer_settings, Some(&ca.cert_pem()));
    let consumer_config = config_file(&consumer_settings, "");
    let producer_config = config_file(&rig.producer_settings(), "");
    let mut consumer = spawn("consumer", consumer_config.path(), logs.path(), None);
    let mut producer = spawn(
        "producer",
        producer_config.path(),
        logs.path(),
        Some(&ca.cert_pem()),
    );
    let ex = &rig.exchange;
    ex.wait_trades_subscribed(&SYMBOLS, WAIT).await;
    let trader = Trader::start(ex, &SYMBOLS, 3, Duration::from_millis(10));
    while ex.ledger().len() < TRADES {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let live = trader.stop().await;
    let stored = rig
        .assert_trades_exact(
            &format!("trades over TLS (0.9 SSL listener, private CA): {live} live"),
            None,
        )
        .await;
    assert!(stored >= TRADES, "{stored} trades stored");
    assert!(producer.terminate().success(), "producer exit over TLS");
    assert!(consumer.terminate().success(), "consumer exit over TLS");

    // The same clients, trusting a CA that did not sign the brokers' certificate.
    let in_kafka = topic_size(
        &rig.cluster.bootstrap(),
        &rig.trades_topic(),
        &support::kafka09::client_overrides(),
    );
    let mut untrusting = rig.settings.clone();
    use_tls(&mut untrusting, Some(&wrong_ca.cert_pem()));
    let consumer_config = config_file(&untrusting, "");
    let mut producer_settings = rig.producer_settings();
    use_tls(&mut producer_settings, Some(&wrong_ca.cert_pem()));
    // Before it subscribes, the producer tries to read where Kafka's copy of the trades ends, for
    // up to bitfinex.resume_timeout (30 s by default); Kafka unreachable, it gives up then and
    // streams with the full backfill. Shortened so that the wait below need not cover it.
    producer_settings.bitfinex.resume_timeout = Duration::from_secs(2);
    // Red soon after trades wait for an ack, rather than after the default minute.
    let producer_config = config_file(&producer_settings, "[health]\nmax_ack_silence = \"3s\"\n");
    let logs = tempfile::tempdir().unwrap();
    let consumer = spawn("consumer", consumer_config.path(), logs.path(), None);
    let mut producer = spawn("producer", producer_config.path(), logs.path(), None);
    ex.wait_trades_subscribed(&SYMBOLS, WAIT).await;
    let trader = Trader::start(ex, &SYMBOLS, 1, Duration::from_millis(50));
    let failure = |role: &str| {
        std::fs::read_to_string(logs.path().join(role))
            .unwrap_or_default()
            .lines()
            .find_map(|l| {
                l.contains("certificate verify failed")
                    .then(|| l[l.find("SSL handshake failed").unwrap_or(0)..].to_string())
            })
    };
    eventually_async(
        "both logs name the failed certificate verification",
        WAIT,
        || async { failure("producer").is_some() && failure("consumer").is_some() },
    )
    .await;
    crate::report!(
        "TLS | wrong CA, producer log | {}",
        failure("producer").unwrap()
    );
    eventually_async("the producer's /healthz is red", WAIT, || async {
        let (status, body) = rig.health().await;
        status == 503 && body.contains("kafka_acks")
    })
    .await;
    trader.stop().await;
    assert!(
        producer.0.try_wait().unwrap().is_none(),
        "the producer holds its records and retries instead of exiting"
    );
    assert_eq!(
        topic_size(
            &rig.cluster.bootstrap(),
            &rig.trades_topic(),
            &support::kafka09::client_overrides(),
        ),
        in_kafka,
        "nothing was written through an unverified connection"
    );
    producer.kill();
    drop(consumer);
}

/// Both clients of a process talk TLS to the brokers, trusting `ca` (PEM) if given, else
/// OpenSSL's default store.
fn use_tls(settings: &mut Settings, ca: Option<&Path>) {
    for client in [&mut settings.kafka.producer, &mut settings.kafka.consumer] {
        client.insert("security.protocol".into(), "ssl".into());
        if let Some(ca) = ca {
            client.insert("ssl.ca.location".into(), ca.display().to_string());
        }
    }
}

fn config_file(settings: &Settings, extra: &str) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), settings_toml(settings) + extra).unwrap();
    file
}

/// The binary with its stdout and stderr in `dir/<subcommand>`; `ssl_cert_file` replaces
/// OpenSSL's default CA store for it.
fn spawn(subcommand: &str, config: &Path, dir: &Path, ssl_cert_file: Option<&Path>) -> Process {
    let log = std::fs::File::create(dir.join(subcommand)).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_candlestream"));
    if let Some(file) = ssl_cert_file {
        cmd.env("SSL_CERT_FILE", file);
    }
    let child = cmd
        .arg(subcommand)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    Process(child)
}
