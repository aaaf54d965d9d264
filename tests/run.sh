#!/usr/bin/env bash
# The test command: installs the test dependencies if missing, checks the deployment files that
# need no Docker engine, then runs every Rust test.
set -euo pipefail
cd "$(dirname "$0")/.."
tests/install-deps.sh
shellcheck launch.sh avro_schema.sh tests/*.sh benches/*.sh .ci/run
docker-compose --env-file .env.example config -q
echo "deployment files: shellcheck and docker-compose config passed"
cargo test --locked "$@"
