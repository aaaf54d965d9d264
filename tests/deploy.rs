//! What can be checked of the deployment without a Docker engine: avro_schema.sh against the
//! fake registry, and the compose files against the configuration keys, the broker listeners, the
//! published ports and the memory the README states. launch.sh itself is tested in launch.rs.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candlestream::config::Settings;
use serde_json::Value;
use yaml_rust2::{Yaml, YamlLoader};

use support::fake_registry::FakeRegistry;

fn repo(path: &str) -> String {
    std::fs::read_to_string(repo_path(path)).unwrap()
}

fn repo_path(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|file| file.is_file())
}

/// Runs avro_schema.sh under dash, with a PATH holding only the tools it may need on a Mac: no jq,
/// no python.
fn avro_schema_sh(url: &str, topic: &str, trades_topic: &str, wait: &str) -> (bool, String) {
    avro_schema_sh_in(
        Path::new(env!("CARGO_MANIFEST_DIR")),
        url,
        topic,
        trades_topic,
        wait,
    )
}

/// The same, with the copy of avro_schema.sh and schemas/ in `dir`.
fn avro_schema_sh_in(
    dir: &Path,
    url: &str,
    topic: &str,
    trades_topic: &str,
    wait: &str,
) -> (bool, String) {
    let bin = tempfile::tempdir().unwrap();
    for tool in ["curl", "tr", "sed", "sleep", "dirname"] {
        std::os::unix::fs::symlink(
            which(tool).unwrap_or_else(|| panic!("{tool} not found")),
            bin.path().join(tool),
        )
        .unwrap();
    }
    let out = Command::new(
        which("dash").expect("dash runs the shell tests (Debian: apt-get install dash)"),
    )
    .arg(dir.join("avro_schema.sh"))
    .env_clear()
    .env("PATH", bin.path())
    .env("SCHEMA_REGISTRY_URL", url)
    .env("TOPIC", topic)
    .env("TRADES_TOPIC", trades_topic)
    .env("WAIT_SECONDS", wait)
    .output()
    .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn avro_schema_sh_registers_both_schemas_and_sets_compatibility() {
    let registry = FakeRegistry::start().await;
    let url = registry.url();
    let (ok, out) =
        tokio::task::spawn_blocking(move || avro_schema_sh(&url, "prices", "deals", "10"))
            .await
            .unwrap();
    assert!(ok, "{out}");
    let mut ids = Vec::new();
    for (subject, file) in [
        ("prices-value", "schemas/ticker.avsc"),
        ("deals-value", "schemas/trade.avsc"),
    ] {
        let (id, schema) = registry
            .latest(subject)
            .unwrap_or_else(|| panic!("subject {subject}"));
        let shipped: Value = serde_json::from_str(&repo(file)).unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&schema).unwrap(),
            shipped,
            "{subject}"
        );
        assert_eq!(
            registry.compatibility(Some(subject)).as_deref(),
            Some("BACKWARD"),
            "{subject}"
        );
        assert!(
            out.contains(&format!("under {subject}: {{\"id\":{id}}}")),
            "prints the id: {out}"
        );
        ids.push(id);
    }
    assert_ne!(ids[0], ids[1]);

    // Running it again changes nothing.
    let url = registry.url();
    let (ok, out) =
        tokio::task::spawn_blocking(move || avro_schema_sh(&url, "prices", "deals", "10"))
            .await
            .unwrap();
    assert!(ok, "{out}");
    assert_eq!(registry.latest("prices-value").unwrap().0, ids[0]);
    assert_eq!(registry.latest("deals-value").unwrap().0, ids[1]);
    assert_eq!(registry.subjects(), ["deals-value", "prices-value"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn avro_schema_sh_reports_the_registrys_refusal() {
    let registry = FakeRegistry::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("schemas")).unwrap();
    std::fs::write(dir.path().join("avro_schema.sh"), repo("avro_schema.sh")).unwrap();
    std::fs::write(
        dir.path().join("schemas/ticker.avsc"),
        repo("schemas/ticker.avsc"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("schemas/trade.avsc"),
        "{\"type\": \"record\", broken",
    )
    .unwrap();
    let url = registry.url();
    let path = dir.path().to_path_buf();
    let (ok, out) =
        tokio::task::spawn_blocking(move || avro_schema_sh_in(&path, &url, "prices", "deals", "2"))
            .await
            .unwrap();
    assert!(!ok, "{out}");
    assert!(
        out.contains("registering schemas/trade.avsc under deals-value failed with HTTP 422"),
        "{out}"
    );
    assert!(out.contains("42201"), "shows the registry's answer: {out}");
    assert_eq!(registry.subjects(), ["prices-value"]);
}

#[test]
fn avro_schema_sh_gives_up_clearly_when_the_registry_never_answers() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (ok, out) = avro_schema_sh(&format!("http://127.0.0.1:{port}"), "prices", "deals", "2");
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
        // `<<: *a` or `<<: [*a, *b]`.
        match h.get(&Yaml::String("<<".into())) {
            Some(Yaml::Array(bases)) => bases.iter().for_each(|b| out.extend(merged(b))),
            Some(base) => out.extend(merged(base)),
            None => {}
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
        "zookeeper",
        "broker_1",
        "broker_2",
        "broker_3",
        "schema-registry",
        "kafka-ui",
        "influxdb",
        "grafana",
        "prometheus",
        "producer",
        "consumer",
        "verifier",
        "audit",
    ];
    assert_eq!(
        services
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .len(),
        expected.len()
    );

    let mut internal = Vec::new();
    for (name, service) in &services {
        assert!(
            expected.contains(&name.as_str()),
            "unexpected service {name}"
        );
        let s = merged(service);
        if name == "audit" {
            // A one-shot command, not a service to keep up.
            assert_eq!(scalar(&s["restart"]), "no");
            assert_eq!(
                merged(&s["healthcheck"])
                    .get("disable")
                    .map(scalar)
                    .as_deref(),
                Some("true")
            );
        } else {
            assert!(s.contains_key("healthcheck"), "{name} has no healthcheck");
            assert!(s.contains_key("restart"), "{name} has no restart policy");
        }
        let image = s.get("image").map(scalar).unwrap_or_default();
        assert!(
            image.contains(':') && !image.ends_with(":latest"),
            "{name}: image {image:?} not pinned"
        );
        if name.starts_with("broker_") {
            let env = merged(&s["environment"]);
            let advertised = scalar(&env["KAFKA_ADVERTISED_LISTENERS"]);
            let listeners: Vec<&str> = advertised.split(',').collect();
            assert_eq!(
                listeners.len(),
                3,
                "{name}: internal, local and external listeners"
            );
            internal.push(
                listeners
                    .iter()
                    .find(|l| l.starts_with("INTERNAL://"))
                    .unwrap()
                    .trim_start_matches("INTERNAL://")
                    .to_string(),
            );
            for (k, v) in [
                ("KAFKA_DEFAULT_REPLICATION_FACTOR", "3"),
                ("KAFKA_MIN_INSYNC_REPLICAS", "2"),
                ("KAFKA_UNCLEAN_LEADER_ELECTION_ENABLE", "false"),
                ("KAFKA_AUTO_CREATE_TOPICS_ENABLE", "false"),
                ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "3"),
            ] {
                assert_eq!(scalar(&env[k]), v, "{name}: {k}");
            }
            assert!(image.starts_with("confluentinc/cp-kafka:7.9."), "{image}");
        }
    }
    internal.sort();

    for app in ["producer", "consumer", "verifier"] {
        let s = merged(&services[app]);
        let env: Vec<(String, String)> = merged(&s["environment"])
            .iter()
            .map(|(k, v)| (k.clone(), interpolate(&scalar(v))))
            .collect();
        assert!(
            env.iter().all(|(k, _)| k.starts_with("CANDLESTREAM__")),
            "{app}: {env:?}"
        );
        let settings = Settings::load_with_env(None, env.clone())
            .unwrap_or_else(|e| panic!("{app}'s environment names no real config key: {e:?}"));
        let mut brokers: Vec<String> = settings
            .kafka
            .brokers
            .split(',')
            .map(String::from)
            .collect();
        brokers.sort();
        assert_eq!(
            brokers, internal,
            "{app} must use the brokers' internal listeners"
        );
        assert_eq!(settings.schema_registry.url, "http://schema-registry:8081");
        // The trades topic comes from TRADES_TOPIC, like the ticker topic from TOPIC.
        assert_eq!(settings.kafka.trades_topic, "crypto-trades", "{app}");
        let raw = merged(&s["environment"]);
        assert_eq!(
            scalar(&raw["CANDLESTREAM__KAFKA__TRADES_TOPIC"]),
            "${TRADES_TOPIC:-crypto-trades}",
            "{app}"
        );
        assert_eq!(
            scalar(&raw["CANDLESTREAM__KAFKA__TOPIC"]),
            "${TOPIC:-crypto-ticker}",
            "{app}"
        );
        // Docker's SIGKILL must not cut the graceful shutdown short.
        let grace =
            humantime::parse_duration(&scalar(&s["stop_grace_period"])).expect("stop_grace_period");
        let shutdown = settings
            .producer
            .shutdown_timeout
            .max(settings.consumer.shutdown_timeout);
        assert!(
            grace > shutdown,
            "{app}: stop_grace_period {grace:?} within shutdown_timeout {shutdown:?}"
        );
    }
    let consumer = merged(&services["consumer"]);
    assert!(
        consumer.contains_key("deploy"),
        "the consumer can be scaled with replicas"
    );
    let verifier = merged(&services["verifier"]);
    assert!(
        !verifier.contains_key("deploy"),
        "one verifier: replicas would heal the same minutes twice"
    );
    assert_eq!(
        merged(&verifier["environment"])
            .get("CANDLESTREAM__INFLUX__URL")
            .map(scalar)
            .as_deref(),
        Some("http://influxdb:8086"),
        "the verifier reads and writes the consumers' InfluxDB"
    );
}

#[test]
fn env_example_lists_every_variable_the_compose_file_reads() {
    let compose = repo("docker-compose.yml") + &repo("docker-compose.kafka-external.yml");
    let example = repo(".env.example");
    let defined: Vec<&str> = example
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .filter(|k| !k.starts_with('#'))
        .collect();
    let mut rest = compose.as_str();
    while let Some(start) = rest.find("${") {
        let end = rest[start..].find('}').unwrap() + start;
        let name = rest[start + 2..end].split([':', '?', '-']).next().unwrap();
        assert!(defined.contains(&name), ".env.example lacks {name}");
        rest = &rest[end..];
    }
}

fn ports(service: &Yaml) -> Vec<String> {
    merged(service)
        .get("ports")
        .map(|p| p.as_vec().unwrap().iter().map(scalar).collect())
        .unwrap_or_default()
}

#[test]
fn every_port_is_published_on_bind_address_and_kafka_external_is_opt_in() {
    let compose = yaml("docker-compose.yml");
    let services = merged(&compose["services"]);
    for (name, service) in &services {
        for port in ports(service) {
            // Grafana alone has an address of its own: a public dashboard publishes nothing else.
            let address = if name == "grafana" {
                "${GRAFANA_BIND_ADDRESS:-127.0.0.1}:"
            } else {
                "${BIND_ADDRESS:-127.0.0.1}:"
            };
            assert!(
                port.starts_with(address),
                "{name} publishes {port}, not on {address}"
            );
            // Host ports of the UIs and APIs can be moved off ports already taken.
            let host_port = port[address.len()..].rsplit_once(':').unwrap().0;
            assert!(
                host_port.starts_with("${") || name.starts_with("broker_"),
                "{name}: host port {host_port} is fixed"
            );
            assert!(
                !port.contains(":3909"),
                "{name}: the EXTERNAL listener must be opt-in: {port}"
            );
        }
    }
    let external = merged(&yaml("docker-compose.kafka-external.yml")["services"]);
    assert_eq!(
        external.keys().collect::<Vec<_>>(),
        ["broker_1", "broker_2", "broker_3"]
    );
    for n in 1..=3 {
        let broker = &services[&format!("broker_{n}")];
        assert_eq!(
            ports(broker),
            [format!("${{BIND_ADDRESS:-127.0.0.1}}:1909{n}:1909{n}")]
        );
        let env = merged(&merged(broker)["environment"]);
        assert!(scalar(&env["KAFKA_LISTENERS"]).contains(&format!("EXTERNAL://0.0.0.0:3909{n}")));
        assert!(
            scalar(&env["KAFKA_ADVERTISED_LISTENERS"])
                .contains(&format!("LOCAL://localhost:1909{n}"))
        );
        assert_eq!(
            ports(&external[&format!("broker_{n}")]),
            [format!("3909{n}:3909{n}")]
        );
    }
}

fn healthcheck(service: &Yaml) -> String {
    let test = &merged(&merged(service)["healthcheck"])["test"];
    test.as_vec()
        .map(|v| v.iter().map(scalar).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| scalar(test))
}

#[test]
fn healthchecks_send_what_zookeeper_reads_and_start_no_jvm() {
    let services = merged(&yaml("docker-compose.yml")["services"]);
    let zookeeper = healthcheck(&services["zookeeper"]);
    assert!(
        zookeeper.contains("printf ruok >&3") && !zookeeper.contains("echo"),
        "{zookeeper}"
    );
    for n in 1..=3 {
        let broker = healthcheck(&services[&format!("broker_{n}")]);
        assert!(
            broker.starts_with("CMD bash -c") && broker.contains("/dev/tcp/localhost/29092"),
            "{broker}"
        );
        assert!(
            !broker.contains("kafka-"),
            "a Kafka tool starts a JVM per check: {broker}"
        );
    }
    assert!(
        !repo("docker-compose.yml").contains("SUPPORT_METRICS"),
        "stray Confluent support-metrics setting"
    );
    // The influxdb image's entrypoint first runs a setup server on another port; a bare
    // `influx ping` could pass against it.
    assert_eq!(
        healthcheck(&services["influxdb"]),
        "CMD influx ping --host http://localhost:8086"
    );
}

#[test]
fn grafana_reads_with_its_own_credential_and_mounts_only_its_provisioning_folders() {
    let services = merged(&yaml("docker-compose.yml")["services"]);
    let grafana = merged(&services["grafana"]);
    let env = merged(&grafana["environment"]);
    for (key, value) in &env {
        let value = scalar(value);
        assert!(
            !value.contains("INFLUXDB_TOKEN") && !key.contains("TOKEN"),
            "Grafana gets the operator token through {key}"
        );
    }
    // Only what the provisioning files read.
    let mut passed: Vec<&str> = env
        .keys()
        .map(String::as_str)
        .filter(|k| !k.starts_with("GF_"))
        .collect();
    passed.sort();
    assert_eq!(
        passed,
        [
            "GRAFANA_INFLUXDB_PASSWORD",
            "GRAFANA_INFLUXDB_USER",
            "INFLUXDB_BUCKET"
        ]
    );
    assert_eq!(scalar(&env["GF_AUTH_ANONYMOUS_HIDE_VERSION"]), "true");
    // Each provisioning folder is mounted on its own, so the image's others stay visible.
    let mounts: Vec<String> = grafana["volumes"]
        .as_vec()
        .unwrap()
        .iter()
        .map(scalar)
        .collect();
    assert!(
        !mounts
            .iter()
            .any(|m| m.contains(":/etc/grafana/provisioning:")),
        "{mounts:?}"
    );
    for mount in mounts
        .iter()
        .filter(|m| m.contains("/etc/grafana/provisioning/"))
    {
        let (host, rest) = mount.split_once(':').unwrap();
        let folder = host.trim_start_matches("./grafana/provisioning/");
        assert_eq!(
            rest,
            format!("/etc/grafana/provisioning/{folder}:ro,z"),
            "{mount}"
        );
        assert!(repo_path(host).is_dir(), "{mount}: no such folder");
    }
}

/// -Xmx of a JVM option string, in MiB.
fn heap_mib(opts: &str) -> u64 {
    let xmx = opts
        .split_whitespace()
        .find_map(|o| o.strip_prefix("-Xmx"))
        .unwrap_or_else(|| panic!("no -Xmx in {opts:?}"));
    let (number, unit) = xmx.split_at(xmx.len() - 1);
    let number: u64 = number.parse().unwrap();
    match unit {
        "m" | "M" => number,
        "g" | "G" => number * 1024,
        _ => panic!("unit of {xmx}"),
    }
}

#[test]
fn java_heaps_are_capped_to_fit_the_memory_the_readme_states() {
    let services = merged(&yaml("docker-compose.yml")["services"]);
    let jvms = [
        ("zookeeper", "KAFKA_HEAP_OPTS"),
        ("broker_1", "KAFKA_HEAP_OPTS"),
        ("broker_2", "KAFKA_HEAP_OPTS"),
        ("broker_3", "KAFKA_HEAP_OPTS"),
        ("schema-registry", "SCHEMA_REGISTRY_HEAP_OPTS"),
        ("kafka-ui", "JAVA_OPTS"),
    ];
    let heaps: u64 = jvms
        .iter()
        .map(|(service, var)| {
            let env = merged(&merged(&services[*service])["environment"]);
            heap_mib(&scalar(env.get(*var).unwrap_or_else(|| {
                panic!("{service} sets no {var}: default heap")
            })))
        })
        .sum();
    // The README's budget: each JVM needs about 200 MiB beside its heap (metaspace, code cache,
    // thread stacks, GC and network buffers); InfluxDB, Grafana and the three candlestream processes
    // about 600 MiB together.
    let readme = repo("README.md");
    assert!(
        readme.contains(&format!("{heaps} MiB")),
        "README must state the heap total, {heaps} MiB"
    );
    assert!(
        readme.contains("4 GiB"),
        "README states the memory Docker needs"
    );
    assert!(
        heaps + 200 * jvms.len() as u64 + 600 <= 4 * 1024,
        "{heaps} MiB of heaps no longer fit in 4 GiB"
    );
}

#[test]
fn bind_mounts_are_relabelled_for_selinux() {
    let services = merged(&yaml("docker-compose.yml")["services"]);
    let mut mounts = 0;
    for (name, service) in &services {
        for volume in merged(service)
            .get("volumes")
            .and_then(Yaml::as_vec)
            .into_iter()
            .flatten()
        {
            let volume = scalar(volume);
            if volume.starts_with("./") {
                mounts += 1;
                let options = volume.rsplit(':').next().unwrap();
                assert!(
                    options.split(',').any(|o| o == "z"),
                    "{name}: {volume} lacks :z"
                );
            }
        }
    }
    assert!(mounts > 0);
}

#[test]
fn scripts_and_env_files_are_checked_out_with_lf() {
    let files = [
        "launch.sh",
        "avro_schema.sh",
        ".env.example",
        ".env",
        "tests/stubs/docker",
        "tests/run.sh",
        ".ci/run",
    ];
    let out = Command::new("git")
        .args(["check-attr", "eol", "--"])
        .args(files)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("git");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer = String::from_utf8_lossy(&out.stdout);
    for file in files {
        assert!(
            answer.contains(&format!("{file}: eol: lf")),
            "{file} not forced to LF: {answer}"
        );
    }
}

#[test]
fn readme_quick_start_is_one_command_and_every_reset_includes_the_app_profile() {
    let readme = repo("README.md");
    let quick_start = readme.split("## Quick start").nth(1).unwrap();
    let block = quick_start
        .split("```sh\n")
        .nth(1)
        .unwrap()
        .split("```")
        .next()
        .unwrap();
    // launch.sh builds the image, then starts the platform itself: one command.
    assert_eq!(block, "./launch.sh\n");
    assert!(
        readme.contains("before the first `./launch.sh`"),
        "README must say when to create .env"
    );
    for (i, _) in readme.match_indices("down -v") {
        assert!(
            readme[..i].ends_with("docker compose --profile app "),
            "a reset without --profile app: {}",
            &readme[i.saturating_sub(40)..i + 7]
        );
    }
}

#[test]
fn the_image_build_caps_its_compiler_jobs_with_one_default() {
    // The Dockerfile's default, which .env can raise through the compose file's build argument.
    let dockerfile = repo("Dockerfile");
    let default = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("ARG CARGO_BUILD_JOBS="))
        .expect("the Dockerfile declares ARG CARGO_BUILD_JOBS=N");
    let compose = yaml("docker-compose.yml");
    let app = merged(&compose["services"]["producer"]);
    let build = merged(&app["build"]);
    assert_eq!(scalar(&build["context"]), ".");
    assert_eq!(
        scalar(&merged(&build["args"])["CARGO_BUILD_JOBS"]),
        format!("${{CARGO_BUILD_JOBS:-{default}}}")
    );
    assert!(
        repo(".env.example").contains(&format!("\nCARGO_BUILD_JOBS={default}\n")),
        ".env.example states the same default"
    );
}
