#!/bin/sh
# Registers the Avro value schemas (TopicNameStrategy) and sets each subject's compatibility:
#   schemas/ticker.avsc  under "<TOPIC>-value"
#   schemas/trade.avsc   under "<TRADES_TOPIC>-value"
# Works against any Confluent-compatible Schema Registry. Registering an unchanged schema again
# changes nothing (the registry answers with the id it already has).
#
# POSIX sh, so it runs the same under macOS's bash 3.2, dash and busybox; tests/run.sh checks it
# with `shellcheck -s sh` and the tests run it under dash. Host tools: sh, tr, sed, sleep, plus
# curl unless SCHEMA_REGISTRY_CURL says otherwise; no jq, no python.
#
# Environment:
#   SCHEMA_REGISTRY_URL   registry base URL, as seen by the curl that runs (default http://localhost:8081)
#   SCHEMA_REGISTRY_CURL  the command that runs curl (default: curl). launch.sh sets
#                         "docker compose exec -T schema-registry curl": the requests then run inside
#                         the registry's container and need no published port and no curl on the host.
#   TOPIC                 ticker topic (default crypto-ticker)
#   TRADES_TOPIC          trades topic (default crypto-trades)
#   COMPATIBILITY         subject compatibility level    (default BACKWARD)
#   SCHEMA_REGISTRY_USER / SCHEMA_REGISTRY_PASSWORD      optional basic auth
#   WAIT_SECONDS          how long to wait for the registry (default 60)
set -eu
cd "$(dirname "$0")"

url=${SCHEMA_REGISTRY_URL:-http://localhost:8081}
url=${url%/}
curl_cmd=${SCHEMA_REGISTRY_CURL:-curl}
topic=${TOPIC:-crypto-ticker}
trades_topic=${TRADES_TOPIC:-crypto-trades}
compatibility=${COMPATIBILITY:-BACKWARD}
wait_seconds=${WAIT_SECONDS:-60}
content_type="Content-Type: application/vnd.schemaregistry.v1+json"

# registry METHOD PATH [curl options...]: one request; prints the body, then a space and the HTTP
# status. ${1+"$@"} is the old portable spelling of "$@": some bash releases before 4 call an empty
# "$@" unbound under set -u.
registry() {
  method=$1
  path=$2
  shift 2
  set -- -X "$method" ${1+"$@"}
  if [ -n "${SCHEMA_REGISTRY_USER:-}" ]; then
    set -- --user "${SCHEMA_REGISTRY_USER}:${SCHEMA_REGISTRY_PASSWORD:-}" "$@"
  fi
  # shellcheck disable=SC2086 # $curl_cmd is a command with arguments; splitting it is the point
  $curl_cmd -sS -w ' %{http_code}' "$@" "$url$path"
}

# The text of a JSON file as a JSON string. Raw tabs, newlines and carriage returns cannot occur
# inside a JSON string, so outside strings they are whitespace and become spaces; then backslashes
# and double quotes are escaped.
json_string() {
  printf '"%s"' "$(tr '\t\r\n' '   ' <"$1" | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g')"
}

echo "waiting for the schema registry at $url (up to ${wait_seconds}s)"
waited=0
until answer=$(registry GET /subjects 2>/dev/null) && [ "${answer##* }" = 200 ]; do
  if [ "$waited" -ge "$wait_seconds" ]; then
    echo "schema registry at $url did not answer within ${wait_seconds}s" >&2
    exit 1
  fi
  sleep 1
  waited=$((waited + 1))
done

# register FILE SUBJECT
register() {
  [ -f "$1" ] || { echo "avro_schema.sh: $1 is missing" >&2; exit 1; }
  body="{\"schemaType\":\"AVRO\",\"schema\":$(json_string "$1")}"
  answer=$(printf '%s' "$body" | registry POST "/subjects/$2/versions" -H "$content_type" --data-binary @-) || {
    echo "registering $1 under $2: no answer from the registry" >&2
    exit 1
  }
  if [ "${answer##* }" != 200 ]; then
    echo "registering $1 under $2 failed with HTTP ${answer##* }: ${answer% *}" >&2
    echo "(409: incompatible with the versions registered before under compatibility $compatibility)" >&2
    exit 1
  fi
  echo "registered $1 under $2: ${answer% *}"

  answer=$(printf '{"compatibility":"%s"}' "$compatibility" |
    registry PUT "/config/$2" -H "$content_type" --data-binary @-) || answer="none 000"
  if [ "${answer##* }" != 200 ]; then
    echo "setting the compatibility of $2 failed with HTTP ${answer##* }: ${answer% *}" >&2
    exit 1
  fi
  echo "compatibility of $2: $compatibility"
}

register schemas/ticker.avsc "$topic-value"
register schemas/trade.avsc "$trades_topic-value"
