//! launch.sh itself, run under dash against a stub `docker` (tests/stubs/docker) that records its
//! calls and answers like Docker with Compose v2, and the fake Schema Registry behind the stub's
//! `compose exec schema-registry curl`. Each test runs in a copy of the scripts, with a PATH that
//! holds the stub and a few basic tools only: no real Docker, curl, jq or python on the host side.
//! The stub also plays `influx` and `grafana` inside their containers, so what those processes
//! get on their command lines is recorded and checked for secrets too.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use serde_json::Value;

use support::fake_registry::FakeRegistry;

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|file| file.is_file())
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ok: {}\n--- stdout\n{}--- stderr\n{}",
            self.ok, self.stdout, self.stderr
        )
    }
}

/// A copy of launch.sh, avro_schema.sh and schemas/ with its own stub state and PATH.
struct Sandbox {
    root: tempfile::TempDir,
    registry_url: Option<String>,
}

impl Sandbox {
    fn new(registry: Option<&FakeRegistry>) -> Self {
        let root = tempfile::tempdir().unwrap();
        let project = root.path().join("project");
        std::fs::create_dir_all(project.join("schemas")).unwrap();
        for file in [
            "launch.sh",
            "avro_schema.sh",
            "schemas/ticker.avsc",
            "schemas/trade.avsc",
        ] {
            std::fs::copy(repo(file), project.join(file)).unwrap();
        }
        let bin = root.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(root.path().join("state")).unwrap();
        let dash = which("dash").expect("dash runs the shell tests (Debian: apt-get install dash)");
        std::os::unix::fs::symlink(dash, bin.join("sh")).unwrap();
        for tool in [
            "cat", "sed", "tr", "grep", "head", "sleep", "dirname", "date",
        ] {
            let found = which(tool).unwrap_or_else(|| panic!("{tool} not found"));
            std::os::unix::fs::symlink(found, bin.join(tool)).unwrap();
        }
        let sandbox = Self {
            root,
            registry_url: registry.map(FakeRegistry::url),
        };
        sandbox.install_stub("bin", "docker");
        sandbox.install_stub("container-bin", "influx");
        sandbox
    }

    fn install_stub(&self, dir: &str, name: &str) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(self.root.path().join(dir)).unwrap();
        let target = self.root.path().join(dir).join(name);
        std::fs::copy(repo("tests/stubs/docker"), &target).unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn remove_docker(&self) {
        std::fs::remove_file(self.root.path().join("bin/docker")).unwrap();
    }

    fn write_env(&self, text: &str) {
        std::fs::write(self.root.path().join("project/.env"), text).unwrap();
    }

    fn run(&self, env: &[(&str, &str)]) -> Run {
        let mut cmd = Command::new(which("dash").unwrap());
        cmd.arg(self.root.path().join("project/launch.sh"))
            .env_clear()
            .env("PATH", self.root.path().join("bin"))
            .env("STUB_DIR", self.root.path().join("state"))
            .env("STUB_CONTAINER_BIN", self.root.path().join("container-bin"))
            .env("WAIT_SECONDS", "5");
        if let Some(url) = &self.registry_url {
            cmd.env("STUB_REGISTRY_URL", url)
                .env("STUB_CURL", which("curl").expect("curl"));
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        Run {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    fn lines(&self, file: &str) -> Vec<String> {
        std::fs::read_to_string(self.root.path().join("state").join(file))
            .map(|s| s.lines().map(String::from).collect())
            .unwrap_or_default()
    }

    /// Every call to the stub, one line each: "docker compose up -d", …
    fn calls(&self) -> Vec<String> {
        self.lines("calls")
    }

    /// The calls of `influx` and `grafana` inside their containers, with the arguments their
    /// process list would show: "influx v1 auth list --host … --username grafana --json", …
    fn container_calls(&self) -> Vec<String> {
        self.lines("container-calls")
    }

    /// What the calls changed in the pretend deployment: containers started, topics created, scale.
    fn changes(&self) -> Vec<String> {
        self.lines("changes")
    }

    /// Asserts that no secret shows in any argument of any call, on the host or in a container.
    fn assert_on_no_command_line(&self, secrets: &[&str]) {
        let calls = [self.calls(), self.container_calls()].concat();
        for secret in secrets {
            assert!(
                !calls.iter().any(|c| c.contains(secret)),
                "{secret} on a command line: {calls:#?}"
            );
        }
    }

    /// The admin password the pretend Grafana accepts.
    fn grafana_admin_password(&self) -> String {
        std::fs::read_to_string(self.root.path().join("state/grafana-admin-password"))
            .unwrap()
            .trim_end()
            .to_string()
    }
}

async fn run_async(sandbox: &Arc<Sandbox>, env: &[(&str, &str)]) -> Run {
    let sandbox = sandbox.clone();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        sandbox.run(&env)
    })
    .await
    .unwrap()
}

fn topic_call<'a>(calls: &'a [String], topic: &str) -> Vec<&'a String> {
    calls
        .iter()
        .filter(|c| c.contains("kafka-topics") && c.contains(&format!("--topic {topic} ")))
        .collect()
}

fn schema(path: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(repo(path)).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_run_sets_everything_up_and_a_second_run_changes_nothing() {
    let registry = FakeRegistry::start().await;
    let sandbox = Arc::new(Sandbox::new(Some(&registry)));

    let first = run_async(&sandbox, &[]).await;
    assert!(first.ok, "{first:?}");
    assert!(
        first.stderr.contains("no .env"),
        "says the development defaults are in use: {first:?}"
    );
    assert_eq!(
        sandbox.changes(),
        [
            "built the app image",
            "started the platform",
            "created InfluxDB v1 user grafana, read-only on bucket crypto",
            "created topic crypto-ticker",
            "created topic crypto-trades",
            "created topic crypto-ticker-dlq",
            "started producer consumer verifier",
            "scaled consumer=2",
        ]
    );
    let calls = sandbox.calls();
    for topic in ["crypto-ticker", "crypto-trades"] {
        let create = topic_call(&calls, topic);
        assert_eq!(create.len(), 1, "{calls:#?}");
        assert!(
            create[0].contains(&format!(
                "--create --if-not-exists --topic {topic} --partitions 6 --replication-factor 3 --config min.insync.replicas=2"
            )),
            "{}",
            create[0]
        );
    }
    // Both schemas, through the registry's container, with the compatibility set.
    assert_eq!(
        registry.subjects(),
        ["crypto-ticker-value", "crypto-trades-value"]
    );
    for (subject, file) in [
        ("crypto-ticker-value", "schemas/ticker.avsc"),
        ("crypto-trades-value", "schemas/trade.avsc"),
    ] {
        let (_, registered) = registry.latest(subject).unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&registered).unwrap(),
            schema(file),
            "{subject}"
        );
        assert_eq!(
            registry.compatibility(Some(subject)).as_deref(),
            Some("BACKWARD")
        );
    }
    assert!(
        calls
            .iter()
            .any(|c| c.starts_with("docker compose exec -T schema-registry curl")),
        "{calls:#?}"
    );
    // The InfluxDB token and the passwords travel on stdin, never on a command line, neither
    // docker's on the host nor influx's or grafana's in their containers.
    assert!(
        calls
            .iter()
            .any(|c| c.starts_with("docker compose exec -T influxdb")),
        "{calls:#?}"
    );
    let in_containers = sandbox.container_calls();
    for tool in ["influx bucket list", "influx v1 auth create", "grafana cli"] {
        assert!(
            in_containers.iter().any(|c| c.starts_with(tool)),
            "{tool}: {in_containers:#?}"
        );
    }
    sandbox.assert_on_no_command_line(&["candlestream-dev-token", "candlestream-grafana-dev"]);
    assert!(
        !in_containers.iter().any(|c| c.contains("--password ")),
        "{in_containers:#?}"
    );
    // What a new user needs to find their way: the dashboard's real title and the logins.
    for shown in [
        "http://localhost:3000",
        "dashboard \"candlestream: candles\"; log in as admin (viewers log in)",
        "log in as INFLUXDB_USERNAME",
        "Grafana admin/admin, InfluxDB admin/candlestream-dev",
    ] {
        assert!(first.stdout.contains(shown), "{shown}: {first:?}");
    }

    let ids: Vec<u32> = registry
        .subjects()
        .iter()
        .map(|s| registry.latest(s).unwrap().0)
        .collect();
    let second = run_async(&sandbox, &[]).await;
    assert!(second.ok, "{second:?}");
    assert_eq!(
        sandbox.changes().len(),
        8,
        "the second run changed something: {:#?}",
        sandbox.changes()
    );
    assert_eq!(
        registry
            .subjects()
            .iter()
            .map(|s| registry.latest(s).unwrap().0)
            .collect::<Vec<_>>(),
        ids
    );
    // And it went through the same motions, so it can be repeated any number of times.
    let all = sandbox.calls();
    assert_eq!(all[calls.len()..], all[..calls.len()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callers_variables_win_over_dotenv() {
    let registry = FakeRegistry::start().await;
    let sandbox = Arc::new(Sandbox::new(Some(&registry)));
    sandbox.write_env(concat!(
        "# Compose's .env syntax, as people write it\n",
        "CONSUMER_REPLICAS=2\n",
        "export TOPIC=\"from-dotenv\" # a comment\n",
        "TRADES_TOPIC='dotenv-trades'\n",
        "  TOPIC_PARTITIONS = 3   # spaces and a comment\n",
        "INFLUXDB_TOKEN=dotenv-token\r\n",
        "INFLUXDB_ORG=first\n",
        "INFLUXDB_ORG=second-wins\n",
        "INFLUXDB_BUCKET=crypto#not-a-comment",
    ));
    let run = run_async(
        &sandbox,
        &[
            ("CONSUMER_REPLICAS", "4"),
            ("TOPIC", "from-shell"),
            ("STUB_INFLUX_TOKEN", "dotenv-token"),
            ("STUB_INFLUX_ORG", "second-wins"),
            ("STUB_INFLUX_BUCKET", "crypto#not-a-comment"),
        ],
    )
    .await;
    assert!(run.ok, "{run:?}");
    assert!(
        sandbox.changes().contains(&"scaled consumer=4".to_string()),
        "{:#?}",
        sandbox.changes()
    );
    let calls = sandbox.calls();
    assert!(
        calls
            .iter()
            .any(|c| c.contains("--scale consumer=4 producer consumer verifier")),
        "{calls:#?}"
    );
    assert!(
        !calls.iter().any(|c| c.contains("from-dotenv")),
        "{calls:#?}"
    );
    for topic in ["from-shell", "dotenv-trades"] {
        let create = topic_call(&calls, topic);
        assert_eq!(create.len(), 1, "{topic}: {calls:#?}");
        assert!(create[0].contains("--partitions 3 "), "{}", create[0]);
    }
    assert_eq!(
        registry.subjects(),
        ["dotenv-trades-value", "from-shell-value"]
    );
    assert!(
        run.stdout
            .contains("org second-wins, bucket crypto#not-a-comment\n"),
        "{run:?}"
    );
    assert!(!run.stderr.contains("no .env"), "{run:?}");
}

const RESET: &str = "docker compose --profile app down -v";

#[test]
fn a_wrong_influxdb_token_org_or_bucket_stops_it_before_the_app_with_what_to_do() {
    let cases = [
        (
            ("STUB_INFLUX_TOKEN", "the-first-token"),
            ("INFLUXDB_TOKEN", "edited-token"),
            "rejects the token in INFLUXDB_TOKEN",
        ),
        (
            ("STUB_INFLUX_ORG", "first-org"),
            ("INFLUXDB_ORG", "edited-org"),
            "no organization 'edited-org'",
        ),
        (
            ("STUB_INFLUX_BUCKET", "first-bucket"),
            ("INFLUXDB_BUCKET", "edited"),
            "no bucket 'edited' in organization",
        ),
    ];
    for (set_up_with, now, message) in cases {
        let sandbox = Sandbox::new(None);
        sandbox.write_env(&format!("{}={}\n", now.0, now.1));
        let run = sandbox.run(&[set_up_with]);
        assert!(!run.ok, "{run:?}");
        assert!(run.stderr.contains(message), "{message}: {run:?}");
        assert!(
            run.stderr.contains(RESET) && run.stderr.contains("put back"),
            "says what to do: {run:?}"
        );
        assert_eq!(
            sandbox.changes(),
            ["built the app image", "started the platform"],
            "nothing after the check"
        );
        assert!(
            !sandbox.calls().iter().any(|c| c.contains("edited-token")),
            "token on a command line"
        );
    }
}

#[test]
fn missing_docker_is_reported_as_such() {
    let sandbox = Sandbox::new(None);
    sandbox.remove_docker();
    let run = sandbox.run(&[]);
    assert!(!run.ok);
    assert!(run.stderr.contains("Docker is not installed"), "{run:?}");
}

#[test]
fn a_stopped_daemon_and_a_denied_socket_are_told_apart() {
    let sandbox = Sandbox::new(None);
    let run = sandbox.run(&[("STUB_INFO", "down")]);
    assert!(!run.ok);
    assert!(
        run.stderr.contains("the Docker daemon is not reachable"),
        "{run:?}"
    );

    let run = sandbox.run(&[("STUB_INFO", "denied")]);
    assert!(!run.ok);
    assert!(
        run.stderr
            .contains("permission denied on the Docker socket"),
        "{run:?}"
    );
    assert!(run.stderr.contains("docker group"), "{run:?}");
    assert!(!run.stderr.contains("not reachable"), "{run:?}");
    assert_eq!(sandbox.calls(), ["docker info", "docker info"]);
}

#[test]
fn compose_v2_is_required() {
    let sandbox = Sandbox::new(None);
    let run = sandbox.run(&[("STUB_COMPOSE", "none")]);
    assert!(!run.ok);
    assert!(
        run.stderr.contains("Docker Compose v2 is missing"),
        "{run:?}"
    );

    // Only the old Python docker-compose: refused, with the reason.
    sandbox.install_stub("bin", "docker-compose");
    let run = sandbox.run(&[("STUB_COMPOSE", "none")]);
    assert!(!run.ok);
    assert!(
        run.stderr
            .contains("found docker-compose 1.29.2, but candlestream needs Docker Compose v2"),
        "{run:?}"
    );
    assert!(
        run.stderr.contains("KeyError: 'ContainerConfig'"),
        "{run:?}"
    );
    assert!(sandbox.changes().is_empty());

    // A standalone docker-compose that is v2 is fine: it gets as far as the health checks.
    let run = sandbox.run(&[
        ("STUB_COMPOSE", "none"),
        ("STUB_COMPOSE_VERSION", "2.29.7"),
        ("STUB_UNHEALTHY", "zookeeper"),
        ("HEALTH_TIMEOUT", "1"),
    ]);
    assert!(!run.ok);
    assert!(
        run.stderr
            .contains("zookeeper is 'starting' after 1s; see: docker-compose logs zookeeper"),
        "{run:?}"
    );
    assert!(
        sandbox
            .calls()
            .contains(&"docker-compose up -d".to_string())
    );
}

#[test]
fn a_service_that_never_turns_healthy_is_named_with_where_to_look() {
    let sandbox = Sandbox::new(None);
    let started = std::time::Instant::now();
    let run = sandbox.run(&[("STUB_UNHEALTHY", "broker_2"), ("HEALTH_TIMEOUT", "1")]);
    assert!(!run.ok);
    assert!(
        run.stderr
            .contains("broker_2 is 'starting' after 1s; see: docker compose logs broker_2"),
        "{run:?}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    assert_eq!(
        sandbox.changes(),
        ["built the app image", "started the platform"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_creation_is_retried_while_the_brokers_register() {
    let registry = FakeRegistry::start().await;
    let sandbox = Arc::new(Sandbox::new(Some(&registry)));
    let run = run_async(&sandbox, &[("STUB_TOPIC_FAILURES", "1")]).await;
    assert!(run.ok, "{run:?}");
    assert_eq!(topic_call(&sandbox.calls(), "crypto-ticker").len(), 2);
    assert!(
        sandbox
            .changes()
            .contains(&"created topic crypto-ticker".to_string())
    );
}

#[test]
fn bad_numbers_are_refused_before_anything_starts() {
    let sandbox = Sandbox::new(None);
    let run = sandbox.run(&[("CONSUMER_REPLICAS", "four")]);
    assert!(!run.ok);
    assert!(
        run.stderr
            .contains("CONSUMER_REPLICAS must be a positive whole number, not 'four'"),
        "{run:?}"
    );
    assert!(sandbox.changes().is_empty());
}

#[test]
fn a_topic_error_that_cannot_pass_stops_at_once() {
    let sandbox = Sandbox::new(None);
    let run = sandbox.run(&[(
        "STUB_TOPIC_ERROR",
        "Invalid value 0 for configuration min.insync.replicas",
    )]);
    assert!(!run.ok, "{run:?}");
    assert!(
        run.stderr
            .contains("creating topic crypto-ticker failed: Error while executing topic command : Invalid value"),
        "{run:?}"
    );
    assert_eq!(
        topic_call(&sandbox.calls(), "crypto-ticker").len(),
        1,
        "retried an error that cannot pass"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_and_grafanas_password_follow_the_settings_on_the_next_run() {
    let registry = FakeRegistry::start().await;
    let sandbox = Arc::new(Sandbox::new(Some(&registry)));
    let first = run_async(&sandbox, &[]).await;
    assert!(first.ok, "{first:?}");
    let before = sandbox.changes().len();
    let second = run_async(
        &sandbox,
        &[
            ("TOPIC_RETENTION_MS", "3600000"),
            ("GRAFANA_INFLUXDB_PASSWORD", "a-new-reader-pw"),
        ],
    )
    .await;
    assert!(second.ok, "{second:?}");
    assert_eq!(
        sandbox.changes()[before..],
        [
            "set the password of InfluxDB v1 user grafana",
            "set retention.ms=3600000 on topic crypto-ticker",
            "set retention.ms=3600000 on topic crypto-trades",
            "set retention.ms=3600000 on topic crypto-ticker-dlq",
        ]
    );
    sandbox.assert_on_no_command_line(&["a-new-reader-pw"]);
}

/// Every secret set to a value of its own, as a public deployment must.
const OWN_SECRETS: &str = "GRAFANA_ADMIN_PASSWORD=an-admin-secret\n\
    INFLUXDB_TOKEN=a-long-operator-token\n\
    INFLUXDB_PASSWORD=an-influx-secret\n\
    GRAFANA_INFLUXDB_PASSWORD=a-reader-secret\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_exposure_is_refused_while_a_secret_is_a_default() {
    let example = std::fs::read_to_string(repo(".env.example")).unwrap();
    for (env, exposure, opt_in) in [
        ("", "GRAFANA_ANONYMOUS=true", ""),
        ("", "GRAFANA_BIND_ADDRESS=0.0.0.0", ""),
        (example.as_str(), "GRAFANA_ANONYMOUS=true", ""),
        (
            example.as_str(),
            "BIND_ADDRESS=0.0.0.0",
            "EXPOSE_UNAUTHENTICATED_SERVICES=true",
        ),
    ] {
        let sandbox = Sandbox::new(None);
        sandbox.write_env(&format!("{env}\n{exposure}\n{opt_in}\n"));
        let run = sandbox.run(&[]);
        assert!(!run.ok, "{exposure} with defaults: {run:?}");
        assert!(
            run.stderr.contains(&format!(
                "{exposure} opens the stack to others, but these are still development defaults: \
                 GRAFANA_ADMIN_PASSWORD INFLUXDB_TOKEN INFLUXDB_PASSWORD GRAFANA_INFLUXDB_PASSWORD."
            )),
            "{run:?}"
        );
        assert!(sandbox.changes().is_empty(), "{:#?}", sandbox.changes());
    }

    // One default left is one too many.
    let sandbox = Sandbox::new(None);
    sandbox.write_env(&format!(
        "{}GRAFANA_ADMIN_PASSWORD=admin\nGRAFANA_ANONYMOUS=true\n",
        OWN_SECRETS
    ));
    let run = sandbox.run(&[("STUB_INFLUX_TOKEN", "a-long-operator-token")]);
    assert!(!run.ok, "{run:?}");
    assert!(
        run.stderr
            .contains("still development defaults: GRAFANA_ADMIN_PASSWORD."),
        "{run:?}"
    );

    // With secrets of its own, the public dashboard starts, on its own address and port.
    let registry = FakeRegistry::start().await;
    let sandbox = Arc::new(Sandbox::new(Some(&registry)));
    sandbox.write_env(&format!(
        "{OWN_SECRETS}GRAFANA_ANONYMOUS=true\nGRAFANA_BIND_ADDRESS=0.0.0.0\nGRAFANA_PORT=8443\n"
    ));
    let run = run_async(&sandbox, &[("STUB_INFLUX_TOKEN", "a-long-operator-token")]).await;
    assert!(run.ok, "{run:?}");
    assert!(
        run.stdout.contains(
            "http://localhost:8443   dashboard \"candlestream: candles\"; log in as admin (anyone may view without logging in)"
        ),
        "{run:?}"
    );
}

#[test]
fn a_password_influxdb_would_refuse_is_refused_first() {
    for name in ["INFLUXDB_PASSWORD", "GRAFANA_INFLUXDB_PASSWORD"] {
        let sandbox = Sandbox::new(None);
        sandbox.write_env(&format!("{name}=short\n"));
        let run = sandbox.run(&[]);
        assert!(!run.ok, "{run:?}");
        assert!(
            run.stderr
                .contains(&format!("{name} must have at least 8 characters")),
            "{run:?}"
        );
        assert!(sandbox.changes().is_empty());
    }
}

#[test]
fn too_little_memory_for_the_stack_is_said_before_anything_starts() {
    let sandbox = Sandbox::new(None);
    // 3 GiB, then the first service never turns healthy: the warning came first.
    let run = sandbox.run(&[
        ("STUB_MEMORY", "3221225472"),
        ("STUB_UNHEALTHY", "zookeeper"),
        ("HEALTH_TIMEOUT", "1"),
    ]);
    assert!(!run.ok);
    assert!(
        run.stderr
            .contains("Docker has 3072 MiB of memory; the stack needs 4 GiB"),
        "{run:?}"
    );
    // 8 GiB (the stub's default): not a word.
    let sandbox = Sandbox::new(None);
    let run = sandbox.run(&[("STUB_UNHEALTHY", "zookeeper"), ("HEALTH_TIMEOUT", "1")]);
    assert!(!run.stderr.contains("MiB of memory"), "{run:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_bind_address_needs_its_own_opt_in_and_a_read_only_kafka_ui() {
    // Secrets of its own are not enough: what BIND_ADDRESS publishes has no password at all.
    let sandbox = Sandbox::new(None);
    sandbox.write_env(&format!("{OWN_SECRETS}BIND_ADDRESS=0.0.0.0\n"));
    let run = sandbox.run(&[("STUB_INFLUX_TOKEN", "a-long-operator-token")]);
    assert!(!run.ok, "{run:?}");
    assert!(
        run.stderr
            .contains("BIND_ADDRESS=0.0.0.0 would publish services that no password protects"),
        "{run:?}"
    );
    assert!(
        run.stderr.contains("set GRAFANA_BIND_ADDRESS instead")
            && run.stderr.contains("EXPOSE_UNAUTHENTICATED_SERVICES=true"),
        "says what to do: {run:?}"
    );
    assert!(sandbox.changes().is_empty(), "{:#?}", sandbox.changes());

    // A Kafka-UI that may delete topics is never published, opt-in or not.
    for readonly in ["false", "no"] {
        let sandbox = Sandbox::new(None);
        sandbox.write_env(&format!(
            "{OWN_SECRETS}BIND_ADDRESS=192.168.1.20\nEXPOSE_UNAUTHENTICATED_SERVICES=true\nKAFKA_UI_READONLY={readonly}\n"
        ));
        let run = sandbox.run(&[("STUB_INFLUX_TOKEN", "a-long-operator-token")]);
        assert!(!run.ok, "{run:?}");
        assert!(
            run.stderr.contains(&format!(
                "BIND_ADDRESS=192.168.1.20 with KAFKA_UI_READONLY={readonly}: anyone who reaches"
            )),
            "{run:?}"
        );
        assert!(sandbox.changes().is_empty(), "{:#?}", sandbox.changes());
    }
    // On loopback, an editable Kafka-UI is the user's own business.
    let sandbox = Sandbox::new(None);
    let run = sandbox.run(&[
        ("KAFKA_UI_READONLY", "false"),
        ("STUB_UNHEALTHY", "zookeeper"),
        ("HEALTH_TIMEOUT", "1"),
    ]);
    assert!(
        run.stderr.contains("zookeeper is 'starting'"),
        "got as far as the platform: {run:?}"
    );

    // Opted in, with secrets of its own: it runs.
    let registry = FakeRegistry::start().await;
    let sandbox = Arc::new(Sandbox::new(Some(&registry)));
    sandbox.write_env(&format!(
        "{OWN_SECRETS}BIND_ADDRESS=0.0.0.0\nEXPOSE_UNAUTHENTICATED_SERVICES=true\n"
    ));
    let run = run_async(&sandbox, &[("STUB_INFLUX_TOKEN", "a-long-operator-token")]).await;
    assert!(run.ok, "{run:?}");
    assert!(run.stdout.contains("candlestream is running"), "{run:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grafanas_admin_password_follows_the_settings_on_every_run_before_the_rest_is_waited_for() {
    let registry = FakeRegistry::start().await;
    let sandbox = Arc::new(Sandbox::new(Some(&registry)));
    // First start without .env: Grafana takes the default, and the reset leaves it as it is.
    let first = run_async(&sandbox, &[]).await;
    assert!(first.ok, "{first:?}");
    assert_eq!(sandbox.grafana_admin_password(), "admin");
    assert!(
        !sandbox
            .changes()
            .iter()
            .any(|c| c.contains("Grafana admin")),
        "{:#?}",
        sandbox.changes()
    );
    let before = sandbox.changes().len();
    let calls_before = sandbox.calls().len();

    // Secrets of its own, then the dashboard published: GF_SECURITY_ADMIN_PASSWORD no longer
    // applies, so without the reset Grafana would still take "admin" from anyone.
    sandbox.write_env(&format!("{OWN_SECRETS}GRAFANA_BIND_ADDRESS=0.0.0.0\n"));
    let second = run_async(&sandbox, &[("STUB_INFLUX_TOKEN", "a-long-operator-token")]).await;
    assert!(second.ok, "{second:?}");
    assert_eq!(sandbox.grafana_admin_password(), "an-admin-secret");
    assert_eq!(
        sandbox.changes()[before..],
        [
            "set the Grafana admin password",
            "set the password of InfluxDB v1 user grafana",
        ]
    );
    sandbox.assert_on_no_command_line(&[
        "an-admin-secret",
        "a-long-operator-token",
        "a-reader-secret",
    ]);
    // Set as soon as Grafana is healthy: before the brokers and the rest are waited for.
    let calls = &sandbox.calls()[calls_before..];
    let position = |prefix: &str| {
        calls
            .iter()
            .position(|c| c.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix}: {calls:#?}"))
    };
    assert!(
        position("docker compose ps -q grafana") < position("docker compose exec -T grafana")
            && position("docker compose exec -T grafana")
                < position("docker compose ps -q zookeeper"),
        "{calls:#?}"
    );

    // Too short for Grafana: refused before anything starts.
    let sandbox = Sandbox::new(None);
    let run = sandbox.run(&[("GRAFANA_ADMIN_PASSWORD", "abcd")]);
    assert!(!run.ok, "{run:?}");
    assert!(
        run.stderr
            .contains("GRAFANA_ADMIN_PASSWORD must have at least 5 characters"),
        "{run:?}"
    );
    assert!(sandbox.changes().is_empty());
}

#[test]
fn grafana_kafka_ui_and_prometheus_are_waited_for_too() {
    std::thread::scope(|scope| {
        for service in ["grafana", "kafka-ui", "prometheus"] {
            scope.spawn(move || {
                let sandbox = Sandbox::new(None);
                let run = sandbox.run(&[("STUB_UNHEALTHY", service), ("HEALTH_TIMEOUT", "1")]);
                assert!(!run.ok, "{run:?}");
                assert!(
                    run.stderr.contains(&format!(
                        "{service} is 'starting' after 1s; see: docker compose logs {service}"
                    )),
                    "{run:?}"
                );
                assert!(!run.stdout.contains("candlestream is running"), "{run:?}");
                assert_eq!(
                    sandbox.changes(),
                    ["built the app image", "started the platform"]
                );
            });
        }
    });
}

/// The app roles are waited for before "running" is said, every consumer replica of them: one
/// that never turns healthy stops it with what its /healthz says, and a run where all are healthy
/// asked each of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_roles_are_waited_for_and_one_not_healthy_says_why() {
    let registry = FakeRegistry::start().await;
    let sandbox = Arc::new(Sandbox::new(Some(&registry)));
    let run = run_async(
        &sandbox,
        &[
            ("STUB_UNHEALTHY", "consumer-3"),
            ("CONSUMER_REPLICAS", "3"),
            ("HEALTH_TIMEOUT", "1"),
        ],
    )
    .await;
    assert!(!run.ok, "{run:?}");
    assert!(
        run.stderr.contains(
            "consumer is 'starting' after 1s; see: docker compose logs consumer\n  its /healthz: Error: http://127.0.0.1:9100/healthz: 503 Service Unavailable: exchange_data:"
        ),
        "{run:?}"
    );
    assert!(!run.stdout.contains("candlestream is running"), "{run:?}");
    let calls = sandbox.calls();
    for container in ["stub-consumer-1", "stub-consumer-2", "stub-consumer-3"] {
        assert!(
            calls.contains(&format!(
                "docker inspect -f {{{{.State.Health.Status}}}} {container}"
            )),
            "{container}: {calls:#?}"
        );
    }
    assert_eq!(
        calls
            .iter()
            .filter(|c| c.starts_with("docker exec "))
            .collect::<Vec<_>>(),
        ["docker exec stub-consumer-3 candlestream healthcheck"]
    );
    assert_eq!(
        sandbox.changes().last().map(String::as_str),
        Some("scaled consumer=3")
    );

    // Healthy: each role was asked, after it was started, before "running".
    let run = run_async(&sandbox, &[("CONSUMER_REPLICAS", "3")]).await;
    assert!(run.ok, "{run:?}");
    assert!(run.stdout.contains("candlestream is running"), "{run:?}");
    let calls = sandbox.calls();
    let last_start = calls
        .iter()
        .rposition(|c| c.starts_with("docker compose --profile app up -d"))
        .expect("the app started");
    for role in ["producer", "consumer", "verifier"] {
        assert!(
            calls[last_start..].contains(&format!("docker compose ps -q {role}")),
            "{role}: {calls:#?}"
        );
    }
}

#[test]
fn kafka_tool_retries_end_at_a_deadline_and_say_so_meanwhile() {
    let sandbox = Sandbox::new(None);
    let started = std::time::Instant::now();
    let run = sandbox.run(&[("STUB_TOPIC_FAILURES", "1000"), ("HEALTH_TIMEOUT", "3")]);
    let took = started.elapsed();
    assert!(!run.ok, "{run:?}");
    assert!(
        run.stderr
            .contains("creating topic crypto-ticker still failing after 3s (HEALTH_TIMEOUT): "),
        "{run:?}"
    );
    // Every retry says why, and how long is left.
    assert!(
        run.stderr.contains(
            "launch.sh: creating topic crypto-ticker: Error while executing topic command : \
             Replication factor: 3 larger than available brokers: 2.; trying again ("
        ),
        "{run:?}"
    );
    let tries = topic_call(&sandbox.calls(), "crypto-ticker").len();
    assert!((2..=3).contains(&tries), "{tries} tries: {run:?}");
    // A try every 2 s until 3 s have passed (the old count of 30 tries took a minute).
    assert!(took < std::time::Duration::from_secs(10), "{took:?}");
}
