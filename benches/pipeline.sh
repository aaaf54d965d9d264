#!/usr/bin/env bash
# The whole pipeline on real parts, next to plain tools: producer throughput against kcat,
# end-to-end latency from the fake exchange to a queryable InfluxDB point at a live-like rate and
# at 5 000 records/s, and RSS and CPU of the producer and consumer processes. Runs on a 3-broker
# Kafka 0.9.0.1 cluster and InfluxDB 1.6.7 from tests/install-deps.sh; prints one Markdown table.
# Takes about 2.5 minutes after the release build; --quick shortens every phase 4 times (for trying it, not for figures);
# --throughput runs only the producer-next-to-kcat phase.
# Usage: benches/pipeline.sh [--quick] [--throughput]
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in java influxd kcat; do
  command -v "$tool" >/dev/null || { echo "$tool missing: run tests/install-deps.sh" >&2; exit 1; }
done
if [ -z "${CANDLESTREAM_KAFKA_HOME:-}" ] && [ ! -x .test-deps/kafka/bin/kafka-server-start.sh ]; then
  echo "Kafka 0.9.0.1 missing: run tests/install-deps.sh" >&2
  exit 1
fi
# Builds the candlestream binary (release profile) along with the bench, which runs it as
# child processes.
exec cargo bench --locked --bench pipeline -- "$@"
