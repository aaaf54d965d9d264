#!/usr/bin/env bash
# The test command: installs the test dependencies if missing, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
tests/install-deps.sh
cargo test --locked "$@"
