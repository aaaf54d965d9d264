#!/usr/bin/env bash
# A whole market through the real binaries: 300 pairs from the pattern t*USD on the fake exchange
# (Bitfinex's 25 channels per connection and 20 opens per minute enforced), 300 trades/s with a
# 5 s burst to 3 000/s every minute, skewed, plus 30 tickers/s, for 10 minutes, through the
# candlestream producer and consumer, a 3-broker Kafka 0.9.0.1 cluster and InfluxDB 1.6.7.
# Prints one Markdown table: end-to-end latency, RSS and CPU of producer and consumer, the most
# connection opens in a minute, REST requests per minute, and the exact count check.
# Takes about 12 minutes after the release build; --quick measures 2 minutes instead of 10
# (for trying it, not for figures).
# Usage: benches/market.sh [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in java influxd; do
  command -v "$tool" >/dev/null || { echo "$tool missing: run tests/install-deps.sh" >&2; exit 1; }
done
if [ -z "${CANDLESTREAM_KAFKA_HOME:-}" ] && [ ! -x .test-deps/kafka/bin/kafka-server-start.sh ]; then
  echo "Kafka 0.9.0.1 missing: run tests/install-deps.sh" >&2
  exit 1
fi
# Builds the candlestream binary (release profile) along with the bench, which runs it as
# child processes.
exec cargo bench --locked --bench market -- "$@"
