#!/bin/sh
# Brings candlestream up on top of `docker compose up -d`: refuses public exposure with default
# secrets (and of the unauthenticated services unless asked for), builds the app image, waits for
# every service of the platform, sets Grafana's admin password from the settings, checks InfluxDB's
# token, org and bucket, gives Grafana its read-only InfluxDB credential, creates the topics (and
# applies their retention), registers the schemas, starts (or scales) the producer and the
# consumers and the verifier, and prints where to look. Safe to run again at any time: a second run with the same
# settings changes nothing.
#
# POSIX sh (no arrays, no [[ ]], no $SECONDS), so it runs the same under macOS's /bin/bash 3.2,
# dash and busybox; tests/run.sh checks it with `shellcheck -s sh` and tests/launch.rs runs it
# under dash against a stub `docker`. Host tools: docker, sed, tr, grep, head, sleep, date.
#
# Settings are resolved like Compose resolves ${NAME:-default}: the caller's environment first,
# then .env, then the default, so `CONSUMER_REPLICAS=4 ./launch.sh` runs 4 consumers whatever
# .env says. .env is read, never sourced (see dotenv below).
set -eu
cd "$(dirname "$0")"

die() {
  printf 'launch.sh: %s\n' "$*" >&2
  exit 1
}

# --- Docker and Compose v2 -------------------------------------------------------------------
command -v docker >/dev/null 2>&1 || die "Docker is not installed (https://docs.docker.com/get-docker/)."
if ! info=$(docker info 2>&1); then
  case $info in
    *"permission denied"*)
      die "permission denied on the Docker socket: this user may not talk to the Docker daemon.
  Add it to the docker group (sudo usermod -aG docker \"\$USER\", then log out and in again),
  or run Docker rootless. The daemon said: $(printf '%s\n' "$info" | grep -i 'permission denied' | head -n 1)" ;;
    *)
      die "the Docker daemon is not reachable; start Docker (Docker Desktop, or sudo systemctl start docker) and try again." ;;
  esac
fi

if version=$(docker compose version --short 2>/dev/null); then
  compose_name="docker compose"
elif command -v docker-compose >/dev/null 2>&1 && version=$(docker-compose version --short 2>/dev/null); then
  compose_name=docker-compose
else
  die "Docker Compose v2 is missing: 'docker compose version' fails. Install the Compose plugin
  (https://docs.docker.com/compose/install/); Docker Desktop includes it."
fi
major=${version#v}
major=${major%%.*}
case $major in
  '' | *[!0-9]*) die "cannot read the Compose version from '$version'." ;;
esac
if [ "$major" -lt 2 ]; then
  die "found $compose_name $version, but candlestream needs Docker Compose v2 ('docker compose').
  Compose v1 fails to recreate containers on Docker Engine 25 and later (KeyError: 'ContainerConfig').
  Install the Compose plugin: https://docs.docker.com/compose/install/"
fi

compose() {
  if [ "$compose_name" = docker-compose ]; then
    docker-compose "$@"
  else
    docker compose "$@"
  fi
}

# --- Settings --------------------------------------------------------------------------------
cr=$(printf '\r')

# dotenv NAME: prints NAME's value in .env; fails when .env does not set it. The subset of
# Compose's .env syntax that .env.example uses and people write: KEY=VALUE lines, an optional
# `export `, blank and # comment lines, spaces around the value, 'single' or "double" quotes
# (taken literally), and ` # comment` after an unquoted value. The last assignment wins, as in
# Compose. Not supported: ${VAR} interpolation inside .env and values spanning several lines.
dotenv() {
  [ -f .env ] || return 1
  found=
  found_any=
  while IFS= read -r line || [ -n "$line" ]; do
    line=${line%"$cr"}
    line=${line#"${line%%[![:space:]]*}"}
    case $line in
      export[[:space:]]*) line=${line#export}; line=${line#"${line%%[![:space:]]*}"} ;;
    esac
    case $line in
      "$1"=* | "$1"[[:space:]]*=*) ;;
      *) continue ;;
    esac
    value=${line#*=}
    value=${value#"${value%%[![:space:]]*}"}
    case $value in
      \"*) value=${value#\"}; value=${value%%\"*} ;;
      \'*) value=${value#\'}; value=${value%%\'*} ;;
      *)
        value=${value%%[[:space:]]#*}
        value=${value%"${value##*[![:space:]]}"} ;;
    esac
    found=$value
    found_any=1
  done <.env
  [ "$found_any" = 1 ] || return 1
  printf '%s\n' "$found"
}

# setting NAME DEFAULT: what Compose substitutes for ${NAME:-DEFAULT}. A variable set in the
# caller's environment wins over .env, even when empty; an empty value means DEFAULT.
setting() {
  if eval "[ -n \"\${$1+set}\" ]"; then
    eval "value=\${$1}"
  elif ! value=$(dotenv "$1"); then
    value=
  fi
  printf '%s\n' "${value:-$2}"
}

positive() {
  case $2 in
    '' | *[!0-9]* | 0) die "$1 must be a positive whole number, not '$2'." ;;
  esac
}

if [ ! -f .env ]; then
  echo "launch.sh: no .env, so the local development passwords and token are in use;" >&2
  echo "           create .env from .env.example before the first 'docker compose up -d' to change them." >&2
fi
topic=$(setting TOPIC crypto-ticker)
trades_topic=$(setting TRADES_TOPIC crypto-trades)
dlq_topic=$(setting DLQ_TOPIC crypto-ticker-dlq)
partitions=$(setting TOPIC_PARTITIONS 6)
retention_ms=$(setting TOPIC_RETENTION_MS 604800000)
replicas=$(setting CONSUMER_REPLICAS 2)
bind_address=$(setting BIND_ADDRESS 127.0.0.1)
influx_org=$(setting INFLUXDB_ORG candlestream)
influx_bucket=$(setting INFLUXDB_BUCKET crypto)
influx_token=$(setting INFLUXDB_TOKEN candlestream-dev-token)
influx_password=$(setting INFLUXDB_PASSWORD candlestream-dev)
grafana_bind_address=$(setting GRAFANA_BIND_ADDRESS 127.0.0.1)
grafana_anonymous=$(setting GRAFANA_ANONYMOUS false)
grafana_admin_user=$(setting GRAFANA_ADMIN_USER admin)
grafana_admin_password=$(setting GRAFANA_ADMIN_PASSWORD admin)
kafka_ui_readonly=$(setting KAFKA_UI_READONLY true)
expose_unauthenticated=$(setting EXPOSE_UNAUTHENTICATED_SERVICES false)
grafana_influx_user=$(setting GRAFANA_INFLUXDB_USER grafana)
grafana_influx_password=$(setting GRAFANA_INFLUXDB_PASSWORD candlestream-grafana-dev)
grafana_port=$(setting GRAFANA_PORT 3000)
kafka_ui_port=$(setting KAFKA_UI_PORT 8080)
registry_port=$(setting SCHEMA_REGISTRY_PORT 8081)
influx_port=$(setting INFLUXDB_PORT 8086)
producer_port=$(setting PRODUCER_METRICS_PORT 9101)
verifier_port=$(setting VERIFIER_METRICS_PORT 9102)
prometheus_port=$(setting PROMETHEUS_PORT 9090)
health_timeout=$(setting HEALTH_TIMEOUT 180)
positive TOPIC_PARTITIONS "$partitions"
positive TOPIC_RETENTION_MS "$retention_ms"
positive CONSUMER_REPLICAS "$replicas"
positive HEALTH_TIMEOUT "$health_timeout"
positive GRAFANA_PORT "$grafana_port"
positive KAFKA_UI_PORT "$kafka_ui_port"
positive SCHEMA_REGISTRY_PORT "$registry_port"
positive INFLUXDB_PORT "$influx_port"
positive PRODUCER_METRICS_PORT "$producer_port"
positive VERIFIER_METRICS_PORT "$verifier_port"
positive PROMETHEUS_PORT "$prometheus_port"
[ "$topic" != "$trades_topic" ] || die "TOPIC and TRADES_TOPIC must differ (both are '$topic')."
# InfluxDB refuses a shorter password: its setup would fail and the container never turn healthy.
[ "${#influx_password}" -ge 8 ] || die "INFLUXDB_PASSWORD must have at least 8 characters (InfluxDB refuses shorter ones)."
[ "${#grafana_influx_password}" -ge 8 ] || die "GRAFANA_INFLUXDB_PASSWORD must have at least 8 characters (InfluxDB refuses shorter ones)."
# Grafana's password reset (below) refuses 4 characters or fewer.
[ "${#grafana_admin_password}" -ge 5 ] || die "GRAFANA_ADMIN_PASSWORD must have at least 5 characters (Grafana refuses shorter ones)."

# --- Exposure --------------------------------------------------------------------------------
# Published beyond this machine, or open to viewers without a login, the stack must not run with a
# password or token that anyone can read in this repository: the compose defaults and the
# .env.example placeholders.
loopback() {
  case $1 in
    127.* | localhost | ::1 | '[::1]') return 0 ;;
    *) return 1 ;;
  esac
}
# BIND_ADDRESS publishes services that no password protects: the Schema Registry (writable),
# Kafka's plaintext LOCAL listener, Kafka-UI, Prometheus and the metrics ports. Passwords of our
# own do not make that safe, so it takes a setting that says so; and a Kafka-UI that may delete
# topics is never published. Grafana's own address (GRAFANA_BIND_ADDRESS) needs neither: Grafana
# has logins and reads InfluxDB read-only.
if ! loopback "$bind_address"; then
  [ "$kafka_ui_readonly" = true ] || die "BIND_ADDRESS=$bind_address with KAFKA_UI_READONLY=$kafka_ui_readonly: anyone who reaches
  Kafka-UI (no login) could delete topics and change their settings. Set KAFKA_UI_READONLY=true, or keep
  BIND_ADDRESS on 127.0.0.1."
  [ "$expose_unauthenticated" = true ] || die "BIND_ADDRESS=$bind_address would publish services that no password protects: the Schema
  Registry (writable), Kafka's plaintext listener (ports 19091-19093), Kafka-UI, Prometheus and the
  metrics ports. For a public dashboard set GRAFANA_BIND_ADDRESS instead and keep BIND_ADDRESS on
  127.0.0.1. To publish them all anyway (a network you trust, or a firewall in front of Docker),
  set EXPOSE_UNAUTHENTICATED_SERVICES=true (README, Public dashboard)."
fi
exposure=
loopback "$grafana_bind_address" || exposure="GRAFANA_BIND_ADDRESS=$grafana_bind_address"
loopback "$bind_address" || exposure="BIND_ADDRESS=$bind_address"
[ "$grafana_anonymous" != true ] || exposure="GRAFANA_ANONYMOUS=true"
if [ -n "$exposure" ]; then
  defaults=
  case $grafana_admin_password in admin | change-me-please) defaults="$defaults GRAFANA_ADMIN_PASSWORD" ;; esac
  case $influx_token in candlestream-dev-token | change-me-to-a-long-random-token) defaults="$defaults INFLUXDB_TOKEN" ;; esac
  case $influx_password in candlestream-dev | change-me-please) defaults="$defaults INFLUXDB_PASSWORD" ;; esac
  case $grafana_influx_password in candlestream-grafana-dev | change-me-please) defaults="$defaults GRAFANA_INFLUXDB_PASSWORD" ;; esac
  [ -z "$defaults" ] || die "$exposure opens the stack to others, but these are still development defaults:$defaults.
  Set each in .env to a value of your own (InfluxDB's take effect only on its first start: see README, Public dashboard)."
fi

# --- Platform --------------------------------------------------------------------------------
# wait_healthy SERVICE: until every container of SERVICE reports healthy (each consumer replica);
# after HEALTH_TIMEOUT seconds it stops, naming the service, and for a candlestream role also what
# the first container not healthy says on /healthz: the check that fails, or that nothing answers
# (a role that exits at start).
wait_healthy() {
  waited=0
  printf 'waiting for %s ' "$1"
  while :; do
    status=missing id=
    ids=$(compose ps -q "$1" 2>/dev/null) || ids=
    for id in $ids; do
      status=$(docker inspect -f '{{.State.Health.Status}}' "$id" 2>/dev/null) || status=missing
      [ "$status" = healthy ] || break
    done
    if [ "$status" = healthy ]; then
      echo "healthy"
      return 0
    fi
    if [ "$waited" -ge "$health_timeout" ]; then
      echo
      says=
      case $1 in
        producer | consumer | verifier)
          if [ -n "$id" ]; then
            says=$(docker exec "$id" candlestream healthcheck 2>&1) || :
            [ -z "$says" ] || says="
  its /healthz: $says"
          fi ;;
      esac
      die "$1 is '$status' after ${health_timeout}s; see: $compose_name logs $1$says"
    fi
    printf .
    sleep 2
    waited=$((waited + 2))
  done
}

# Memory: the JVMs of the stack need about 3.7 GiB (README, Memory). Said once, before anything
# starts: too little makes the brokers fail their healthchecks much later, with no word of why.
memory=$(docker info --format '{{.MemTotal}}' 2>/dev/null) || memory=
case $memory in
  '' | *[!0-9]*) ;;
  *)
    if [ "$((memory / 1048576))" -lt 3900 ]; then
      printf 'launch.sh: Docker has %s MiB of memory; the stack needs 4 GiB (README, Memory).
' "$((memory / 1048576))" >&2
      printf '           Give Docker more (Docker Desktop: Settings, Resources, Memory), or the brokers may not turn healthy.
' >&2
    fi ;;
esac

# The app image first: the release build (about 0.7 GiB at its peak, README, Memory) is done
# before the JVMs start, so that the two never need memory at the same time on a first start.
compose --profile app build producer
compose up -d

# --- Grafana's admin password ----------------------------------------------------------------
# GF_SECURITY_ADMIN_PASSWORD applies only on Grafana's first start; after that Grafana keeps the
# password in its database (grafana_data), whatever .env says. So it is set from the settings on
# every run, right after Grafana turns healthy: a password changed in .env (say, before
# publishing the dashboard) replaces the old one at once, and the exposure check above is about
# the password Grafana really takes. On stdin, so it shows on no command line (`ps`). The reset
# applies to the admin account Grafana created on its first start (user id 1), under the login
# it was given then.
wait_healthy influxdb
wait_healthy grafana
if ! out=$(printf '%s\n' "$grafana_admin_password" | compose exec -T grafana grafana cli \
  --homepath /usr/share/grafana --config /etc/grafana/grafana.ini \
  admin reset-admin-password --password-from-stdin 2>&1); then
  die "could not set Grafana's admin password: $out"
fi
echo "Grafana: admin password set from GRAFANA_ADMIN_PASSWORD"

for service in zookeeper broker_1 broker_2 broker_3 schema-registry kafka-ui prometheus; do
  wait_healthy "$service"
done

# --- InfluxDB: does it know the token, org and bucket the consumers and Grafana will use? ------
# The token goes in on stdin, so it shows on no command line.
influx_setup_hint="InfluxDB applies INFLUXDB_TOKEN, INFLUXDB_ORG and INFLUXDB_BUCKET only on its first start and keeps
  that setup in the influxdb_data volume; they were changed after that (in .env or the environment).
  Either put back the values InfluxDB was set up with, or delete all data (Kafka, InfluxDB and
  Grafana volumes) and set up again with the current ones:
    $compose_name --profile app down -v && $compose_name up -d && ./launch.sh"
# shellcheck disable=SC2016 # $1 and $2 expand in the container's shell
if out=$(printf '%s\n' "$influx_token" | compose exec -T influxdb sh -c \
  'read -r INFLUX_TOKEN && export INFLUX_TOKEN && exec influx bucket list --host http://localhost:8086 --org "$1" --name "$2" --json' \
  check "$influx_org" "$influx_bucket" 2>&1); then
  influx_ok=1
else
  influx_ok=0
fi
case $out in
  *"\"name\": \"$influx_bucket\""*) [ "$influx_ok" = 1 ] || die "could not check InfluxDB: $out" ;;
  *[Uu]nauthorized*) die "InfluxDB rejects the token in INFLUXDB_TOKEN (401 unauthorized).
  $influx_setup_hint" ;;
  *organization*) die "InfluxDB has no organization '$influx_org' (INFLUXDB_ORG).
  $influx_setup_hint" ;;
  *"not found"* | "[]" | "") die "InfluxDB has no bucket '$influx_bucket' in organization '$influx_org' (INFLUXDB_BUCKET).
  $influx_setup_hint" ;;
  *) die "could not check InfluxDB's token, org and bucket: $out" ;;
esac
echo "InfluxDB: token, org '$influx_org' and bucket '$influx_bucket' are valid"

# --- Grafana's read-only InfluxDB credential -------------------------------------------------
# A v1 authorization that may only read the bucket: InfluxQL through Grafana then cannot write,
# drop or delete. Created once; its password is set from .env on every run, so changing
# GRAFANA_INFLUXDB_PASSWORD takes effect with ./launch.sh (and Grafana's next start). Token and
# password travel on stdin, and influx reads the password from its own stdin when that is not a
# terminal (influx-cli 2.1 and later), so neither shows on a command line in the container.
bucket_id=$(printf '%s\n' "$out" | sed -n 's/.*"id": "\([0-9a-f]*\)".*/\1/p' | head -n 1)
[ -n "$bucket_id" ] || die "could not read the id of bucket '$influx_bucket' from: $out"
# shellcheck disable=SC2016 # $1..$4 expand in the container's shell
if ! out=$(printf '%s\n%s\n' "$influx_token" "$grafana_influx_password" | compose exec -T influxdb sh -c '
  read -r INFLUX_TOKEN && read -r password && export INFLUX_TOKEN
  host=http://localhost:8086
  if influx v1 auth list --host $host --username "$1" --json | grep -q "\"token\": \"$1\""; then
    printf "%s\n" "$password" | influx v1 auth set-password --host $host --username "$1" && echo "password set"
  else
    printf "%s\n" "$password" | influx v1 auth create --host $host --org "$2" --read-bucket "$3" --username "$1" \
      --description "Grafana: read-only on bucket $4" >/dev/null && echo created
  fi' grafana-reader "$grafana_influx_user" "$influx_org" "$bucket_id" "$influx_bucket" 2>&1); then
  die "could not give Grafana its read-only InfluxDB credential '$grafana_influx_user': $out"
fi
echo "InfluxDB: Grafana reads as '$grafana_influx_user', read-only on bucket '$influx_bucket' ($out)"

# --- Topics and schemas ----------------------------------------------------------------------
# transient OUTPUT: whether a failed Kafka tool call may pass by itself. A broker's port opens a
# moment before it has registered, and a replication factor of 3 needs all three registered; a
# leader election or a timeout passes too. Anything else (a bad config value, a name Kafka refuses)
# fails the same way every time, so it stops at once.
transient() {
  case $1 in
    *"larger than available brokers"* | *[Tt]imeout* | *"LEADER_NOT_AVAILABLE"* | *"NOT_CONTROLLER"* | \
      *"not available"* | *"Connection to node"* | *"disconnected"*) return 0 ;;
    *) return 1 ;;
  esac
}

# kafka_tool WHAT COMMAND...: runs a Kafka tool in broker_1, retrying transient failures until
# HEALTH_TIMEOUT seconds have passed since the first try. A deadline, not a number of tries: one
# try can take a minute by itself (the admin client's timeout), so counting tries could wait half
# an hour. Each retry says why, so the wait is never silent for longer than one try.
kafka_tool() {
  what=$1
  shift
  deadline=$(($(date +%s) + health_timeout))
  until out=$(compose exec -T -e KAFKA_HEAP_OPTS=-Xmx256m broker_1 "$@" 2>&1); do
    transient "$out" || die "$what failed: $out"
    left=$((deadline - $(date +%s)))
    [ "$left" -gt 0 ] || die "$what still failing after ${health_timeout}s (HEALTH_TIMEOUT): $out"
    printf 'launch.sh: %s: %s; trying again (%ss left)\n' "$what" \
      "$(printf '%s\n' "$out" | grep -v '^[[:space:]]*$' | head -n 1)" "$left" >&2
    sleep 2
  done
}

create_topic() {
  kafka_tool "creating topic $1" kafka-topics --bootstrap-server broker-1:29092 \
    --create --if-not-exists --topic "$1" --partitions "$2" --replication-factor 3 \
    --config min.insync.replicas=2 --config retention.ms="$retention_ms"
  [ -z "$out" ] || printf '%s\n' "$out"
}
# --create --if-not-exists leaves an existing topic's settings alone: TOPIC_RETENTION_MS is
# applied to existing topics here, so a changed value takes effect with the next ./launch.sh.
set_retention() {
  kafka_tool "setting the retention of topic $1" kafka-configs --bootstrap-server broker-1:29092 \
    --alter --entity-type topics --entity-name "$1" --add-config retention.ms="$retention_ms"
}
create_topic "$topic" "$partitions"
create_topic "$trades_topic" "$partitions"
create_topic "$dlq_topic" 1
set_retention "$topic"
set_retention "$trades_topic"
set_retention "$dlq_topic"

# Through the registry's own container: no published port and no host curl needed.
SCHEMA_REGISTRY_URL=http://localhost:8081 SCHEMA_REGISTRY_CURL="$compose_name exec -T schema-registry curl" \
  TOPIC="$topic" TRADES_TOPIC="$trades_topic" sh ./avro_schema.sh || die "registering the schemas failed (see above)."

# --- The app ---------------------------------------------------------------------------------
compose --profile app up -d --scale consumer="$replicas" producer consumer verifier
# Why wait: what launch.sh prints next is what the user acts on, opening Grafana; a role that
# exits at start on a setting it refuses (and restarts, over and over) would otherwise show only
# as an empty chart.
for service in producer consumer verifier; do
  wait_healthy "$service"
done

url_host() {
  case $1 in
    127.0.0.1 | 0.0.0.0 | '') echo localhost ;;
    *) echo "$1" ;;
  esac
}
host=$(url_host "$bind_address")
grafana_host=$(url_host "$grafana_bind_address")
if [ "$grafana_anonymous" = true ]; then
  viewers="anyone may view without logging in"
else
  viewers="viewers log in"
fi
cat <<INFO

candlestream is running ($replicas consumer(s)).
  Grafana          http://$grafana_host:$grafana_port   dashboard "candlestream: candles"; log in as $grafana_admin_user ($viewers)
  Kafka-UI         http://$host:$kafka_ui_port   topics $topic, $trades_topic, $dlq_topic
  Schema Registry  http://$host:$registry_port/subjects
  InfluxDB         http://$host:$influx_port   log in as INFLUXDB_USERNAME (.env; default admin); org $influx_org, bucket $influx_bucket
  Producer health  http://$host:$producer_port/healthz
  Verifier health  http://$host:$verifier_port/healthz   (every closed candle checked against Bitfinex's)
  Prometheus       http://$host:$prometheus_port   (dashboard "candlestream: pipeline health" and alert rules in Grafana)
Passwords are in .env (without .env: Grafana admin/admin, InfluxDB admin/candlestream-dev).
Scale the consumers: CONSUMER_REPLICAS=4 ./launch.sh
INFO
