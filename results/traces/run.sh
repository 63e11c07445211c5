#!/usr/bin/env bash
# What traces cost when they are on: loadgen capacity of the embedded default (SQLite, ack mode
# only, 2,000 users, private chat, steps of 1,000 msg/s for 5 s, limit p99 end-to-end 50 ms)
# without traces (`off`) and with every message traced and exported over OTLP/gRPC to a sink on
# this machine (`on`: --trace-sampling 1.0, the sink is `server/examples/otlp_sink.rs`, which
# counts what it receives), alternated ROUNDS times (default 2) so that the VM's drift hits both.
#   results/traces/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=target/release/sai-im
LG=target/release/loadgen
SINK=target/release/examples/otlp_sink
OUT=${OUT:-results/traces}
ROUNDS=${ROUNDS:-2}
RATES=(--users 2000 --start-rate 2000 --step-rate 1000 --max-rate 16000 --step-secs 5)
mkdir -p "$OUT"
cargo build --release --locked -p sai-im -p loadgen --bins --example otlp_sink

run() { # name, traced (0/1)
    local name=$1 traced=$2 d=/tmp/bench-traces sink= extra=()
    rm -rf "$d"; mkdir -p "$d"
    "$BIN" --data-dir "$d" admin seed-users --count 2000 --prefix load >/dev/null
    if [ "$traced" = 1 ]; then
        "$SINK" 127.0.0.1:14317 > "$d/sink" &
        sink=$!
        extra=(--otlp-endpoint http://127.0.0.1:14317 --trace-sampling 1.0)
    fi
    "$BIN" --data-dir "$d" --require-friendship false --ws-listen 127.0.0.1:18080 \
        --http-listen 127.0.0.1:18081 --grpc-listen 127.0.0.1:18082 "${extra[@]}" > "$d/out" 2> "$d/err" &
    local pid=$!
    for _ in $(seq 300); do grep -q " ready " "$d/out" && break; sleep 0.1; done
    "$LG" capacity --ws 127.0.0.1:18080 --http http://127.0.0.1:18081 --data-dir "$d" "${RATES[@]}" \
        --server-pid "$pid" --p99-limit-ms 50 --quiet --out "$OUT/capacity-$name" > "$OUT/capacity-$name.txt"
    kill -TERM "$pid"; wait "$pid" || true
    if [ -n "$sink" ]; then
        sleep 2
        kill "$sink"; wait "$sink" 2>/dev/null || true
        echo "spans received: $(tail -1 "$d/sink")" >> "$OUT/capacity-$name.txt"
    fi
    echo "$name: $(grep -m1 -i "capacity" "$OUT/capacity-$name.txt" || tail -1 "$OUT/capacity-$name.txt")"
}

for round in $(seq 1 "$ROUNDS"); do
    run "off-$round" 0
    run "on-$round" 1
done
