#!/usr/bin/env bash
# Brings candlestream up on top of `docker compose up -d`: waits for the brokers and the registry,
# creates the topics, registers the schema, starts (or scales) the producer and the consumers, and
# prints where to look. Safe to run again at any time.
set -euo pipefail
cd "$(dirname "$0")"

die() {
  echo "launch.sh: $*" >&2
  exit 1
}

command -v docker >/dev/null || die "Docker is not installed (https://docs.docker.com/get-docker/)."
docker info >/dev/null 2>&1 || die "the Docker daemon is not reachable; start Docker and try again."
if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
elif command -v docker-compose >/dev/null; then
  compose=(docker-compose)
else
  die "Docker Compose is missing (the 'docker compose' plugin or docker-compose)."
fi
if [[ -f .env ]]; then
  set -a
  # shellcheck source=/dev/null
  source .env
  set +a
else
  echo "launch.sh: no .env, so the local development passwords and token are in use;" >&2
  echo "           copy .env.example to .env and change them before exposing anything." >&2
fi
topic=${TOPIC:-crypto-ticker}
dlq_topic=${DLQ_TOPIC:-crypto-ticker-dlq}
partitions=${TOPIC_PARTITIONS:-6}
retention_ms=${TOPIC_RETENTION_MS:-604800000}
replicas=${CONSUMER_REPLICAS:-2}

wait_healthy() {
  local service=$1 timeout=${2:-180} id status
  local deadline=$((SECONDS + timeout))
  echo -n "waiting for $service "
  while :; do
    id=$("${compose[@]}" ps -q "$service" 2>/dev/null || true)
    status=$([[ -n "$id" ]] && docker inspect -f '{{.State.Health.Status}}' "$id" 2>/dev/null || echo missing)
    [[ "$status" == healthy ]] && { echo " healthy"; return; }
    if ((SECONDS >= deadline)); then
      echo
      die "$service is '$status' after ${timeout}s; see: ${compose[*]} logs $service"
    fi
    echo -n "."
    sleep 3
  done
}

"${compose[@]}" up -d
for service in zookeeper broker_1 broker_2 broker_3 schema-registry influxdb; do
  wait_healthy "$service"
done

create_topic() {
  "${compose[@]}" exec -T broker_1 kafka-topics --bootstrap-server broker-1:29092 \
    --create --if-not-exists --topic "$1" --partitions "$2" --replication-factor 3 \
    --config min.insync.replicas=2 --config retention.ms="$retention_ms"
}
create_topic "$topic" "$partitions"
create_topic "$dlq_topic" 1

SCHEMA_REGISTRY_URL=http://localhost:8081 TOPIC="$topic" ./avro_schema.sh

"${compose[@]}" --profile app up -d --build --scale consumer="$replicas" producer consumer

cat <<INFO

candlestream is running ($replicas consumer(s)).
  Grafana          http://localhost:3000   (dashboard "candlestream: 2-minute candles")
  Kafka-UI         http://localhost:8080   (topics $topic, $dlq_topic)
  Schema Registry  http://localhost:8081/subjects
  InfluxDB         http://localhost:8086   (org ${INFLUXDB_ORG:-candlestream}, bucket ${INFLUXDB_BUCKET:-crypto})
  Producer health  http://localhost:9101/healthz
Scale the consumers: CONSUMER_REPLICAS=4 ./launch.sh
INFO
