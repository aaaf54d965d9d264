//! What can be checked of the deployment without a Docker engine: avro_schema.sh against the
//! fake registry, and the compose file against the configuration keys and broker listeners.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use candlestream::config::Settings;
use serde_json::Value;
use yaml_rust2::{Yaml, YamlLoader};

use support::fake_registry::FakeRegistry;

fn repo(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

fn avro_schema_sh(url: &str, topic: &str, wait: &str) -> (bool, String) {
    let out = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("avro_schema.sh"))
        .env("SCHEMA_REGISTRY_URL", url)
        .env("TOPIC", topic)
        .env("WAIT_SECONDS", wait)
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn avro_schema_sh_registers_the_schema_and_sets_compatibility() {
    let registry = FakeRegistry::start().await;
    let url = registry.url();
    let (ok, out) = tokio::task::spawn_blocking(move || avro_schema_sh(&url, "prices", "10")).await.unwrap();
    assert!(ok, "{out}");
    let (id, schema) = registry.latest("prices-value").expect("subject prices-value");
    let shipped: Value = serde_json::from_str(&repo("schemas/ticker.avsc")).unwrap();
    assert_eq!(serde_json::from_str::<Value>(&schema).unwrap(), shipped);
    assert_eq!(registry.compatibility(Some("prices-value")).as_deref(), Some("BACKWARD"));
    assert!(out.contains(&format!("\"id\":{id}")), "prints the id: {out}");

    // Running it again changes nothing.
    let url = registry.url();
    let (ok, out) = tokio::task::spawn_blocking(move || avro_schema_sh(&url, "prices", "10")).await.unwrap();
    assert!(ok, "{out}");
    assert_eq!(registry.latest("prices-value").unwrap().0, id);
    assert_eq!(registry.subjects(), ["prices-value"]);
}

#[test]
fn avro_schema_sh_gives_up_clearly_when_the_registry_never_answers() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (ok, out) = avro_schema_sh(&format!("http://127.0.0.1:{port}"), "prices", "2");
    assert!(!ok);
    assert!(out.contains("did not answer within 2s"), "{out}");
}

fn yaml(path: &str) -> Yaml {
    YamlLoader::load_from_str(&repo(path)).unwrap().remove(0)
}

/// Applies YAML merge keys (`<<: *anchor`), which yaml-rust2 leaves as plain entries.
fn merged(y: &Yaml) -> BTreeMap<String, Yaml> {
    let mut out = BTreeMap::new();
    if let Some(h) = y.as_hash() {
        if let Some(base) = h.get(&Yaml::String("<<".into())) {
            out.extend(merged(base));
        }
        for (k, v) in h {
            if let Some(k) = k.as_str().filter(|k| *k != "<<") {
                out.insert(k.to_string(), v.clone());
            }
        }
    }
    out
}

fn scalar(y: &Yaml) -> String {
    match y {
        Yaml::String(s) | Yaml::Real(s) => s.clone(),
        Yaml::Integer(i) => i.to_string(),
        Yaml::Boolean(b) => b.to_string(),
        other => panic!("not a scalar: {other:?}"),
    }
}

/// `${VAR:-default}` → default; `${VAR}` → a stand-in value.
fn interpolate(value: &str) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').unwrap() + start;
        let expr = &rest[start + 2..end];
        out.push_str(expr.split_once(":-").map_or("stand-in", |(_, d)| d));
        rest = &rest[end + 1..];
    }
    out + rest
}

#[test]
fn compose_services_are_pinned_healthchecked_and_configured_with_real_keys() {
    let compose = yaml("docker-compose.yml");
    let services = merged(&compose["services"]);
    let expected = [
        "zookeeper", "broker_1", "broker_2", "broker_3", "schema-registry", "kafka-ui", "influxdb", "grafana", "producer",
        "consumer",
    ];
    assert_eq!(services.keys().map(String::as_str).collect::<Vec<_>>().len(), expected.len());

    let mut internal = Vec::new();
    for (name, service) in &services {
        assert!(expected.contains(&name.as_str()), "unexpected service {name}");
        let s = merged(service);
        assert!(s.contains_key("healthcheck"), "{name} has no healthcheck");
        assert!(s.contains_key("restart"), "{name} has no restart policy");
        let image = s.get("image").map(scalar).unwrap_or_default();
        assert!(image.contains(':') && !image.ends_with(":latest"), "{name}: image {image:?} not pinned");
        if name.starts_with("broker_") {
            let env = merged(&s["environment"]);
            let advertised = scalar(&env["KAFKA_ADVERTISED_LISTENERS"]);
            let listeners: Vec<&str> = advertised.split(',').collect();
            assert_eq!(listeners.len(), 3, "{name}: internal, local and external listeners");
            internal.push(listeners.iter().find(|l| l.starts_with("INTERNAL://")).unwrap().trim_start_matches("INTERNAL://").to_string());
            for (k, v) in [("KAFKA_DEFAULT_REPLICATION_FACTOR", "3"), ("KAFKA_MIN_INSYNC_REPLICAS", "2"), ("KAFKA_UNCLEAN_LEADER_ELECTION_ENABLE", "false"), ("KAFKA_AUTO_CREATE_TOPICS_ENABLE", "false"), ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "3")] {
                assert_eq!(scalar(&env[k]), v, "{name}: {k}");
            }
            assert!(image.starts_with("confluentinc/cp-kafka:7.9."), "{image}");
        }
    }
    internal.sort();

    for app in ["producer", "consumer"] {
        let s = merged(&services[app]);
        let env: Vec<(String, String)> =
            merged(&s["environment"]).iter().map(|(k, v)| (k.clone(), interpolate(&scalar(v)))).collect();
        assert!(env.iter().all(|(k, _)| k.starts_with("CANDLESTREAM__")), "{app}: {env:?}");
        let settings = Settings::load_with_env(None, env.clone())
            .unwrap_or_else(|e| panic!("{app}'s environment names no real config key: {e:?}"));
        let mut brokers: Vec<String> = settings.kafka.brokers.split(',').map(String::from).collect();
        brokers.sort();
        assert_eq!(brokers, internal, "{app} must use the brokers' internal listeners");
        assert_eq!(settings.schema_registry.url, "http://schema-registry:8081");
    }
    let consumer = merged(&services["consumer"]);
    assert!(consumer.contains_key("deploy"), "the consumer can be scaled with replicas");
}

#[test]
fn env_example_lists_every_variable_the_compose_file_reads() {
    let compose = repo("docker-compose.yml");
    let example = repo(".env.example");
    let defined: Vec<&str> = example.lines().filter_map(|l| l.split_once('=').map(|(k, _)| k)).filter(|k| !k.starts_with('#')).collect();
    let mut rest = compose.as_str();
    while let Some(start) = rest.find("${") {
        let end = rest[start..].find('}').unwrap() + start;
        let name = rest[start + 2..end].split([':', '?', '-']).next().unwrap();
        assert!(defined.contains(&name), ".env.example lacks {name}");
        rest = &rest[end..];
    }
}
