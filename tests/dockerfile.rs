//! The Dockerfile's build stages, replayed without a Docker engine: each stage gets a directory
//! of its own standing for its filesystem, COPY copies from the build context (the checkout less
//! what .dockerignore leaves out) or from an earlier stage, WORKDIR and ENV apply, and RUN runs
//! its command with `sh` there, and ARG sets its variable in the environment of the stage's RUNs
//! (a declaration before the first FROM gives the default that a stage's bare `ARG NAME` takes).
//! So a target that the manifests declare but the image cannot
//! build (a bench whose file the context lacks, say) fails here, in CI, and not on a user's first
//! `./launch.sh`.
//!
//! What the replay changes, and why:
//! - apt-get commands are left out: the packages are the image's, the machine has its own.
//! - `--release` builds become `cargo check` (`cargo chef cook --check`): the same manifests,
//!   targets, lock file and feature resolution in a fraction of a release build's time.
//! - The checks share one target directory, `target/check`, with tests/run.sh's clippy run, so
//!   the dependencies are checked once.
//!
//! The runtime stage is not run; its `COPY --from` must name the binary that the build stage's
//! last command builds, at the path cargo puts it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// One instruction: its keyword and its arguments, continuation lines joined.
fn instructions(dockerfile: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in dockerfile.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                let (keyword, args) = current.split_once(' ').unwrap_or((&current, ""));
                out.push((keyword.to_uppercase(), args.trim().to_string()));
                current.clear();
            }
        }
    }
    assert!(
        current.is_empty(),
        "the Dockerfile ends inside a continuation"
    );
    out
}

/// The build context: every file of the checkout that .dockerignore does not leave out. The
/// replay knows plain names at the top of the context, which is all .dockerignore uses.
fn copy_context(to: &Path) {
    let ignored: Vec<String> = std::fs::read_to_string(repo().join(".dockerignore"))
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect();
    for pattern in &ignored {
        assert!(
            !pattern.contains(['*', '?', '[', '!', '/']),
            ".dockerignore pattern {pattern:?}: the replay knows plain top-level names only"
        );
    }
    for entry in std::fs::read_dir(repo()).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if !ignored.contains(&name) {
            copy_tree(&entry.path(), &to.join(&name));
        }
    }
}

fn copy_tree(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            copy_tree(&entry.path(), &to.join(entry.file_name()));
        }
    } else {
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::copy(from, to).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
    }
}

/// A stage's filesystem: a directory standing for `/`, its working directory and environment.
#[derive(Clone)]
struct Stage {
    root: PathBuf,
    workdir: String,
    env: BTreeMap<String, String>,
}

impl Stage {
    /// A path of the stage's filesystem: absolute, or relative to its working directory.
    fn path(&self, path: &str) -> PathBuf {
        let absolute = if path.starts_with('/') {
            path.to_string()
        } else if path == "." {
            self.workdir.clone()
        } else {
            format!("{}/{path}", self.workdir)
        };
        self.root.join(absolute.trim_start_matches('/'))
    }
}

/// The command RUN runs in the replay: apt-get left out, release builds checked instead.
fn replayed(command: &str) -> String {
    command
        .split("&&")
        .map(str::trim)
        .filter(|part| !part.starts_with("apt-get") && !part.starts_with("rm -rf /var/lib/apt"))
        .map(|part| {
            part.replace("cargo chef cook --release", "cargo chef cook --check")
                .replace("cargo build --release", "cargo check")
        })
        .collect::<Vec<_>>()
        .join(" && ")
}

#[test]
fn the_dockerfile_build_stages_build_the_binary_the_runtime_stage_copies() {
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let scratch = tempfile::Builder::new()
        .prefix("dockerfile-replay-")
        .tempdir()
        .unwrap();
    let context = scratch.path().join("context");
    copy_context(&context);
    let target = repo().join("target/check");

    let mut stages: BTreeMap<String, Stage> = BTreeMap::new();
    let mut current: Option<(String, Stage)> = None;
    let mut last_build: Option<(String, String)> = None; // (stage, command)
    let mut runtime_copy: Option<(String, String)> = None; // (stage, path)
    // Build arguments declared before the first FROM, with their defaults.
    let mut global_args: BTreeMap<String, String> = BTreeMap::new();
    // The environment of every cargo build of the build stages.
    let mut cargo_envs: Vec<BTreeMap<String, String>> = Vec::new();
    for (keyword, args) in instructions(&dockerfile) {
        if keyword == "ARG" && current.is_none() {
            let (k, v) = args
                .split_once('=')
                .expect("a global ARG has a default: ARG NAME=value");
            global_args.insert(k.into(), v.into());
            continue;
        }
        if keyword == "FROM" {
            if let Some((name, stage)) = current.take() {
                stages.insert(name, stage);
            }
            let words: Vec<&str> = args.split_whitespace().collect();
            let (base, name) = match words.as_slice() {
                [base, as_, name] if as_.eq_ignore_ascii_case("as") => (*base, *name),
                _ => panic!("FROM {args}: every stage is named"),
            };
            let root = scratch.path().join("stages").join(name);
            let stage = match stages.get(base) {
                Some(parent) => {
                    copy_tree(&parent.root, &root);
                    Stage {
                        root,
                        ..parent.clone()
                    }
                }
                None => {
                    assert!(
                        base.contains(':') && base.contains("@sha256:"),
                        "base image {base} is pinned by tag and digest"
                    );
                    std::fs::create_dir_all(&root).unwrap();
                    Stage {
                        root,
                        workdir: "/".into(),
                        env: BTreeMap::new(),
                    }
                }
            };
            current = Some((name.to_string(), stage));
            continue;
        }
        let (name, stage) = current.as_mut().expect("an instruction before FROM");
        match keyword.as_str() {
            "WORKDIR" => {
                stage.workdir = args.clone();
                std::fs::create_dir_all(stage.path(".")).unwrap();
            }
            "ENV" => {
                let (k, v) = args.split_once('=').expect("ENV KEY=value");
                stage.env.insert(k.into(), v.into());
            }
            "ARG" => {
                let (k, v) = match args.split_once('=') {
                    Some((k, v)) => (k.to_string(), v.to_string()),
                    None => {
                        let v = global_args.get(&args).unwrap_or_else(|| {
                            panic!("ARG {args} in stage {name}: no default before the first FROM")
                        });
                        (args.clone(), v.clone())
                    }
                };
                stage.env.insert(k, v);
            }
            "COPY" => {
                let mut words: Vec<&str> = args.split_whitespace().collect();
                let from = words
                    .first()
                    .and_then(|w| w.strip_prefix("--from="))
                    .map(String::from);
                if from.is_some() {
                    words.remove(0);
                }
                let (dest, sources) = words.split_last().expect("COPY SOURCE... DEST");
                assert!(!sources.is_empty(), "COPY {args}: no source");
                assert!(
                    sources.len() == 1 || dest.ends_with('/'),
                    "COPY {args}: several sources go to a directory"
                );
                for src in sources {
                    // Several sources land in the destination directory under their own names.
                    let dest = if sources.len() > 1 {
                        format!("{dest}{}", src.rsplit('/').next().unwrap())
                    } else {
                        dest.to_string()
                    };
                    match &from {
                        Some(other) if !stages.contains_key(other) => {
                            panic!("COPY --from={other}: no such stage before {name}")
                        }
                        Some(other) if name == "runtime" => {
                            runtime_copy = Some((other.clone(), src.to_string()));
                        }
                        Some(other) => {
                            let source = stages[other].path(src);
                            assert!(
                                source.exists(),
                                "COPY --from={other} {src}: stage {other} has no such file"
                            );
                            copy_tree(&source, &stage.path(&dest));
                        }
                        None => {
                            let source = context.join(src.trim_start_matches("./"));
                            assert!(source.exists(), "COPY {src}: not in the build context");
                            if name != "runtime" {
                                copy_tree(&source, &stage.path(&dest));
                            }
                        }
                    }
                }
            }
            "RUN" if name == "runtime" => {}
            "RUN" => {
                let command = replayed(&args);
                if args.contains("cargo build") {
                    last_build = Some((name.clone(), args.clone()));
                }
                if args.contains("cargo build") || args.contains("cargo chef cook") {
                    cargo_envs.push(stage.env.clone());
                }
                if command.is_empty() {
                    continue;
                }
                let out = Command::new("sh")
                    .arg("-c")
                    .arg(&command)
                    .current_dir(stage.path("."))
                    .envs(&stage.env)
                    .env("CARGO_TARGET_DIR", &target)
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "stage {name}: RUN {command} failed:\n{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            "USER" | "EXPOSE" | "HEALTHCHECK" | "ENTRYPOINT" | "CMD" if name == "runtime" => {}
            other => panic!("{other} in stage {name}: the replay does not know it"),
        }
    }
    let (runtime, _) = current.expect("a runtime stage");
    assert_eq!(runtime, "runtime", "the last stage is the runtime image");

    // The runtime copies what the last build made: <workdir>/target/release/<bin>.
    let (build_stage, build) = last_build.expect("a cargo build in the build stages");
    let bin = build
        .split("--bin ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("cargo build --bin NAME");
    let (from, path) = runtime_copy.expect("the runtime stage copies the binary");
    assert_eq!(from, build_stage);
    assert_eq!(
        path,
        format!("{}/target/release/{bin}", stages[&from].workdir),
        "the runtime stage copies the binary from where cargo builds it"
    );
    assert_eq!(bin, "candlestream");

    // Every compiling step runs with its jobs capped (README, Memory): cargo's default of one job
    // per CPU can outgrow a 4 GiB Docker on a many-core machine.
    assert_eq!(cargo_envs.len(), 2, "cargo chef cook and cargo build");
    for env in &cargo_envs {
        let jobs: u32 = env
            .get("CARGO_BUILD_JOBS")
            .expect("the build stage's cargo runs with CARGO_BUILD_JOBS")
            .parse()
            .expect("CARGO_BUILD_JOBS is a number");
        assert_eq!(jobs, 2, "the default the README's figures are for");
    }
}

/// Packages every Debian image has: the C library and what Debian's Essential packages depend on
/// (dpkg needs zlib1g, and libgcc-s1 comes with the C runtime), so debian:bookworm-slim ships them.
const IN_EVERY_DEBIAN_IMAGE: [&str; 3] = ["libc6", "libgcc-s1", "zlib1g"];

/// The Debian package that holds a library file, looked up in this machine's dpkg database
/// (with and without the /usr prefix of a merged /usr).
fn package_of(path: &str) -> String {
    let candidates = [path.to_string(), format!("/usr{path}")];
    for candidate in &candidates {
        let out = Command::new("dpkg")
            .arg("-S")
            .arg(candidate)
            .output()
            .unwrap();
        if out.status.success() {
            let line = String::from_utf8_lossy(&out.stdout).into_owned();
            let package = line.split(':').next().unwrap().trim().to_string();
            return package;
        }
    }
    panic!("no Debian package holds {path}");
}

#[test]
fn the_runtime_stage_installs_every_library_the_binary_links() {
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    // The packages the runtime stage installs.
    let mut stage = String::new();
    let mut installed: Vec<String> = Vec::new();
    for (keyword, args) in instructions(&dockerfile) {
        if keyword == "FROM" {
            stage = args.split_whitespace().last().unwrap().to_string();
        } else if keyword == "RUN" && stage == "runtime" {
            for part in args.split("&&") {
                if let Some(rest) = part.trim().strip_prefix("apt-get install") {
                    installed.extend(
                        rest.split_whitespace()
                            .filter(|w| !w.starts_with('-'))
                            .map(String::from),
                    );
                }
            }
        }
    }
    assert!(!installed.is_empty(), "the runtime stage installs nothing");

    // The shared libraries the binary needs, built with the same dependencies and features as the
    // image's (a debug build links the same C libraries as a release build).
    let out = Command::new("ldd")
        .arg(env!("CARGO_BIN_EXE_candlestream"))
        .output()
        .expect("ldd");
    assert!(out.status.success());
    let ldd = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut needed = Vec::new();
    for line in ldd.lines() {
        let Some((_, resolved)) = line.split_once("=> ") else {
            continue; // the vDSO and the dynamic loader, which come with libc6
        };
        let path = resolved.split_whitespace().next().unwrap();
        assert!(path.starts_with('/'), "unresolved library: {line}");
        needed.push((path.to_string(), package_of(path)));
    }
    for (path, package) in &needed {
        assert!(
            installed.contains(package) || IN_EVERY_DEBIAN_IMAGE.contains(&package.as_str()),
            "the binary links {path} from {package}, which the runtime stage does not install \
             (it installs {installed:?})"
        );
    }
    // rdkafka is built with TLS: the check above must have seen OpenSSL.
    assert!(
        needed.iter().any(|(_, p)| p == "libssl3"),
        "no libssl3 among {needed:?}"
    );
}
