#!/usr/bin/env bash
# End-to-end write benchmark on this machine: points per second into a real InfluxDB 1.x through
# candlestream's sink, next to curl posting the same gzipped line protocol in the same batches.
# The sink's figure includes building and gzipping each batch; curl's does not.
# Usage: benches/influx_vs_curl.sh [POINTS] [BATCH]
set -euo pipefail
cd "$(dirname "$0")/.."
points=${1:-200000}
batch=${2:-500}
command -v influxd >/dev/null || { echo "influxd missing: run tests/install-deps.sh" >&2; exit 1; }

work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
rpc=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$work/influxdb.conf" <<CONF
reporting-disabled = true
bind-address = "127.0.0.1:$rpc"
[meta]
  dir = "$work/meta"
[data]
  dir = "$work/data"
  wal-dir = "$work/wal"
  query-log-enabled = false
[http]
  bind-address = "127.0.0.1:$port"
  log-enabled = false
[monitor]
  store-enabled = false
[logging]
  level = "warn"
CONF
influxd -config "$work/influxdb.conf" >"$work/influxd.log" 2>&1 &
influx_pid=$!
trap 'kill $influx_pid 2>/dev/null; rm -rf "$work"' EXIT
url="http://127.0.0.1:$port"
for _ in $(seq 100); do curl -sf "$url/ping" >/dev/null && break; sleep 0.1; done
for db in via_candlestream via_curl; do
  curl -sf -XPOST "$url/query" --data-urlencode "q=CREATE DATABASE $db" >/dev/null
done

cargo build -q --release --example influx_write
ours=$(target/release/examples/influx_write --url "$url" --db via_candlestream --points "$points" --batch "$batch" --out "$work/batches")

# One curl process for all batches (sequential, one kept-alive connection), so process start-up
# does not count against curl.
for f in "$work"/batches/batch-*.lp.gz; do
  printf 'url = "%s/write?db=via_curl&precision=ns"\nheader = "Content-Encoding: gzip"\ndata-binary = "@%s"\nfail\nsilent\nnext\n' "$url" "$f"
done >"$work/curl.cfg"
sed -i '$ d' "$work/curl.cfg" # no empty transfer after the last batch
start=$(date +%s.%N)
curl -K "$work/curl.cfg" >/dev/null
end=$(date +%s.%N)
theirs=$(python3 -c "print(round($points / ($end - $start)))")

count() {
  curl -sf -G "$url/query" --data-urlencode "db=$1" --data-urlencode "q=SELECT count(last_price) FROM ticker" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["results"][0]["series"][0]["values"][0][1])'
}
stored_ours=$(count via_candlestream)
stored_theirs=$(count via_curl)

printf 'points %s, batch %s\n' "$points" "$batch"
printf 'candlestream sink: %8s points/s (%s stored)\n' "$ours" "$stored_ours"
printf 'curl:              %8s points/s (%s stored)\n' "$theirs" "$stored_theirs"
python3 -c "print('ratio candlestream/curl: %.2f' % ($ours / $theirs))"
