#!/usr/bin/env bash
# Registers every Avro schema in schemas/ under "<topic>-value" (TopicNameStrategy) and sets that
# subject's compatibility. Works against any Confluent-compatible Schema Registry.
#
# Environment:
#   SCHEMA_REGISTRY_URL   registry base URL              (default http://localhost:8081)
#   TOPIC                 topic whose value schema it is (default crypto-ticker)
#   COMPATIBILITY         subject compatibility level    (default BACKWARD)
#   SCHEMA_REGISTRY_USER / SCHEMA_REGISTRY_PASSWORD      optional basic auth
#   WAIT_SECONDS          how long to wait for the registry (default 60)
set -euo pipefail
cd "$(dirname "$0")"

url=${SCHEMA_REGISTRY_URL:-http://localhost:8081}
url=${url%/}
topic=${TOPIC:-crypto-ticker}
compatibility=${COMPATIBILITY:-BACKWARD}
wait_seconds=${WAIT_SECONDS:-60}
subject="${topic}-value"
content_type="Content-Type: application/vnd.schemaregistry.v1+json"

auth=()
if [[ -n "${SCHEMA_REGISTRY_USER:-}" ]]; then
  auth=(--user "${SCHEMA_REGISTRY_USER}:${SCHEMA_REGISTRY_PASSWORD:-}")
fi

# JSON-encode a file's text as a string.
json_string() {
  if command -v jq >/dev/null; then
    jq -Rs . <"$1"
  elif command -v python3 >/dev/null; then
    python3 -c 'import json,sys; print(json.dumps(sys.stdin.read()))' <"$1"
  else
    echo "avro_schema.sh needs jq or python3 to encode schemas" >&2
    exit 1
  fi
}

echo "waiting for the schema registry at $url (up to ${wait_seconds}s)"
deadline=$((SECONDS + wait_seconds))
until curl -fsS "${auth[@]}" "$url/subjects" >/dev/null 2>&1; do
  if ((SECONDS >= deadline)); then
    echo "schema registry at $url did not answer within ${wait_seconds}s" >&2
    exit 1
  fi
  sleep 2
done

shopt -s nullglob
schemas=(schemas/*.avsc)
if ((${#schemas[@]} == 0)); then
  echo "no .avsc files in schemas/" >&2
  exit 1
fi

for file in "${schemas[@]}"; do
  body="{\"schemaType\":\"AVRO\",\"schema\":$(json_string "$file")}"
  if ! answer=$(curl -fsS "${auth[@]}" -X POST -H "$content_type" --data "$body" "$url/subjects/$subject/versions"); then
    echo "registering $file under $subject failed (incompatible with the registered versions?)" >&2
    exit 1
  fi
  echo "registered $file under $subject: $answer"
done

curl -fsS "${auth[@]}" -X PUT -H "$content_type" --data "{\"compatibility\":\"$compatibility\"}" \
  "$url/config/$subject" >/dev/null
echo "compatibility of $subject: $compatibility"
