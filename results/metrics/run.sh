#!/usr/bin/env bash
# What the metrics cost: loadgen capacity of the embedded default (SQLite, ack mode only, 2,000
# users, private chat, steps of 1,000 msg/s for 5 s, limit p99 end-to-end 50 ms) with nobody
# reading /metrics (`quiet`) and with a scrape every second (`scraped`), alternated ROUNDS times
# (default 2) so that the VM's drift hits both. Each scrape's duration and size go to
# scrapes-<run>.txt; the last scrape of each run is kept as metrics-<run>.txt.
#   results/metrics/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=target/release/sai-im
LG=target/release/loadgen
OUT=${OUT:-results/metrics}
ROUNDS=${ROUNDS:-2}
RATES=(--users 2000 --start-rate 2000 --step-rate 1000 --max-rate 16000 --step-secs 5)
mkdir -p "$OUT"
[ -x "$BIN" ] && [ -x "$LG" ] || cargo build --release --locked -p sai-im -p loadgen

run() { # name, scrape (0/1)
    local name=$1 scrape=$2 d=/tmp/bench-metrics
    rm -rf "$d"; mkdir -p "$d"
    "$BIN" --data-dir "$d" admin seed-users --count 2000 --prefix load >/dev/null
    "$BIN" --data-dir "$d" --require-friendship false --ws-listen 127.0.0.1:18080 \
        --http-listen 127.0.0.1:18081 --grpc-listen 127.0.0.1:18082 > "$d/out" 2> "$d/err" &
    local pid=$! scraper=
    for _ in $(seq 300); do grep -q " ready " "$d/out" && break; sleep 0.1; done
    if [ "$scrape" = 1 ]; then
        (while :; do
            curl -s -o "$d/metrics.txt" -w '%{time_total} %{size_download}\n' http://127.0.0.1:18081/metrics \
                >> "$OUT/scrapes-$name.txt" || true
            sleep 1
        done) &
        scraper=$!
    fi
    "$LG" capacity --ws 127.0.0.1:18080 --http http://127.0.0.1:18081 --data-dir "$d" "${RATES[@]}" \
        --server-pid "$pid" --p99-limit-ms 50 --quiet --out "$OUT/capacity-$name" > "$OUT/capacity-$name.txt"
    if [ -n "$scraper" ]; then
        kill "$scraper"; wait "$scraper" 2>/dev/null || true
        cp "$d/metrics.txt" "$OUT/metrics-$name.txt"
    fi
    kill -TERM "$pid"; wait "$pid" || true
    echo "$name: $(grep -m1 -i "capacity" "$OUT/capacity-$name.txt" || tail -1 "$OUT/capacity-$name.txt")"
}

for round in $(seq 1 "$ROUNDS"); do
    run "quiet-$round" 0
    run "scraped-$round" 1
done
