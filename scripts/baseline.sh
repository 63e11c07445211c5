#!/usr/bin/env bash
# Refreshes results/baseline/: builds release binaries, starts a fresh sai-im (embedded default,
# benchmark settings), seeds users and runs every baseline scenario with loadgen.
#
#   ./scripts/baseline.sh                 # all scenarios into results/baseline
#   OUT=/tmp/new ./scripts/baseline.sh    # somewhere else (then: loadgen compare)
#   ONLY="chat-only-1000" ./scripts/baseline.sh
#   BIN=/tmp/sai-im-old OUT=/tmp/old ./scripts/baseline.sh   # another server build, same loadgen
#
# Benchmark settings: --require-friendship false (random pairs need no friend requests), ack mode
# per scenario. Loadgen mints tokens from the data dir's jwt.secret.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/baseline}
NOTE=${NOTE:-"2-core / 24 GiB dev VM, loadgen on the same machine"}
ONLY=${ONLY:-}
DATA=$(mktemp -d /tmp/sai-baseline.XXXXXX)
mkdir -p "$OUT"

cargo build --release --locked -p sai-im -p loadgen
BIN=${BIN:-target/release/sai-im}
LG=target/release/loadgen

# Every run starts from the same freshly seeded database (a copy of this one), so no run
# measures the messages an earlier run left behind: capacity falls as the database grows
# (results/pipeline/README.md).
SEED="$DATA/seed"
"$BIN" --data-dir "$SEED" admin seed-users --count 25000 --prefix load
RUN="$DATA/run"

SERVER_PID=
start_server() { # $1 = ack mode
    rm -rf "$RUN"
    cp -r "$SEED" "$RUN"
    "$BIN" --data-dir "$RUN" --ack-mode "$1" --require-friendship false \
        --ws-listen 127.0.0.1:18080 --http-listen 127.0.0.1:18081 --grpc-listen 127.0.0.1:18082 \
        > "$DATA/server.log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 100); do grep -q "sai-im ready" "$DATA/server.log" && return 0; sleep 0.1; done
    echo "server did not start"; cat "$DATA/server.log"; exit 1
}
stop_server() { kill -TERM "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; }
trap 'stop_server; rm -rf "$DATA"' EXIT

run() { # name, ack mode, loadgen args...
    local name=$1 mode=$2; shift 2
    if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi
    echo "=== $name"
    start_server "$mode"
    "$LG" "$@" --ws 127.0.0.1:18080 --http http://127.0.0.1:18081 --data-dir "$RUN" \
        --ack-mode "$mode" --server-pid "$SERVER_PID" --note "$NOTE" --quiet --out "$OUT/$name" \
        | tee "$OUT/$name.txt"
    stop_server
}

# The most connections one gateway process can hold under the 20,000-fd cap (~40 fds are the
# process's own), from two loadgen processes spread over 8 source addresses.
run connect only connect --users 19800 --procs 2 --src-addrs 8 --connect-rate 4000 --hold 20
for mode in none only rigor; do
    for rate in 1000 2500 10000; do
        run "chat-$mode-$rate" "$mode" chat --users 2000 --rate "$rate" --duration 10
    done
done
run group-200 only group --groups 10 --size 200 --rate-per-group 5 --duration 10 --first-user 20000
run storm only storm --users 2000 --rate 1000 --duration 12 --drop 0.3
run capacity only capacity --users 2000 --start-rate 1000 --step-rate 1000 --max-rate 30000 --step-secs 5 --p99-limit-ms 50
# Group fan-out searched the same way: 10 groups of 200, rates in messages/s (x199 deliveries).
run group-capacity only capacity --users 2000 --group-size 200 --first-user 20000 \
    --start-rate 100 --step-rate 100 --max-rate 2000 --step-secs 5 --p99-limit-ms 50
