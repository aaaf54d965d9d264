#!/usr/bin/env bash
# The test command: installs the test dependencies if missing, checks the deployment files that
# need no Docker engine, formatting and lints, then runs every Rust test.
set -euo pipefail
cd "$(dirname "$0")/.."
tests/install-deps.sh
# Scripts that run on the user's host are POSIX sh (macOS has bash 3.2 only): checked as sh, and
# parsed and run (tests/deploy.rs, tests/launch.rs) by dash, which knows no bash extensions.
command -v dash >/dev/null || { echo "tests/run.sh: dash is missing (apt-get install dash)" >&2; exit 1; }
host_scripts=(launch.sh avro_schema.sh tests/stubs/docker)
shellcheck -s sh "${host_scripts[@]}"
for script in "${host_scripts[@]}"; do dash -n "$script"; done
shellcheck tests/*.sh benches/*.sh .ci/run
docker-compose --env-file .env.example config -q
docker-compose --env-file .env.example -f docker-compose.yml -f docker-compose.kafka-external.yml config -q
echo "deployment files: shellcheck, dash -n and docker-compose config passed"
# The habits of the field, kept by CI: rustfmt's default style and no clippy warning on any target.
# clippy checks into target/check, which tests/dockerfile.rs's replay of the image build shares:
# the dependencies are checked once for both.
cargo fmt --check
CARGO_TARGET_DIR=target/check cargo clippy --all-targets --locked -- -D warnings
echo "cargo fmt --check and cargo clippy -D warnings passed"
# Every test target is built first; then the Dockerfile replay (CPU-bound: it compiles
# cargo-chef and checks the crate) runs beside the other tests, which mostly wait on Kafka,
# InfluxDB and Prometheus (6 of 18 minutes busy on 2 cores, measured). It runs at the lowest
# priority, so the timing of the end-to-end tests sees no more load than before.
cargo test --locked --no-run
# A failing test's message names its file and line. A backtrace adds some 40 lines of tokio's
# frames after it, and a CI log that keeps only its end lost a failure's message so. Off unless
# asked for with RUST_BACKTRACE_TESTS=1 (CI machines often set RUST_BACKTRACE=1 for everything).
export RUST_BACKTRACE="${RUST_BACKTRACE_TESTS:-0}"
lane_log=$(mktemp)
trap 'rm -f "$lane_log"' EXIT
nice -n 19 cargo test --locked --test dockerfile "$@" >"$lane_log" 2>&1 &
dockerfile_lane=$!
others=()
for file in tests/*.rs; do
  name=$(basename "$file" .rs)
  [ "$name" = dockerfile ] || others+=(--test "$name")
done
status=0
cargo test --locked --lib --bins --examples "${others[@]}" "$@" || status=$?
wait "$dockerfile_lane" || status=$?
echo "--- tests/dockerfile.rs (run beside the others) ---"
cat "$lane_log"
exit "$status"
