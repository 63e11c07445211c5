#!/usr/bin/env bash
# Issue 10, item 4: chat latency while 16 clients flood login with wrong passwords.
# Three runs on the release binary, bcrypt cost 12 (the default), each on a fresh copy of one
# seeded database: chat alone; chat + flood with the default attempt limits; chat + flood with
# the attempt limits off (as if every flooding client had addresses and accounts to spare), so
# only the bounded, niced bcrypt pool stands between the flood and chat.
#
#   ./scripts/login-flood.sh            # writes results/reliability/login-flood/
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/reliability/login-flood}
RATE=${RATE:-500}
DURATION=${DURATION:-20}
DATA=$(mktemp -d /tmp/sai-flood.XXXXXX)
mkdir -p "$OUT"

cargo build --release --locked -p sai-im -p loadgen
BIN=target/release/sai-im
LG=target/release/loadgen
SEED="$DATA/seed"
"$BIN" --data-dir "$SEED" admin seed-users --count 2000 --prefix load
RUN="$DATA/run"
cat > "$DATA/nolimits.toml" <<'TOML'
[auth]
login_attempts_per_account = 0
login_attempts_per_address = 0
TOML

SERVER_PID=
FLOOD_PID=
start_server() { # extra args...
    rm -rf "$RUN"
    cp -r "$SEED" "$RUN"
    "$BIN" --data-dir "$RUN" --require-friendship false "$@" \
        --ws-listen 127.0.0.1:18080 --http-listen 127.0.0.1:18081 --grpc-listen 127.0.0.1:18082 \
        > "$DATA/server.log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 100); do grep -q "sai-im ready" "$DATA/server.log" && return 0; sleep 0.1; done
    echo "server did not start"; cat "$DATA/server.log"; exit 1
}
stop() {
    [ -n "$FLOOD_PID" ] && kill "$FLOOD_PID" 2>/dev/null || true
    kill -TERM "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true
}
trap 'stop; rm -rf "$DATA"' EXIT

run() { # name, flood (yes|no), server args...
    local name=$1 flood=$2; shift 2
    echo "=== $name"
    start_server "$@"
    FLOOD_PID=
    if [ "$flood" = yes ]; then
        # The flood starts 2 s before chat and outlasts it.
        ./scripts/login_flood.py --http 127.0.0.1:18081 --clients 16 --duration $((DURATION + 6)) \
            > "$OUT/$name-flood.json" &
        FLOOD_PID=$!
    fi
    # Every run starts chat 2 s after the server is ready (the flood runs need the time for the
    # flood to get going; the run without one waits the same, so that all three start alike).
    sleep 2
    "$LG" chat --users 2000 --rate "$RATE" --duration "$DURATION" \
        --ws 127.0.0.1:18080 --http http://127.0.0.1:18081 --data-dir "$RUN" \
        --server-pid "$SERVER_PID" --note "login flood: $name" --quiet --out "$OUT/$name" \
        | tee "$OUT/$name.txt"
    [ -n "$FLOOD_PID" ] && wait "$FLOOD_PID"
    FLOOD_PID=
    stop
}

run no-flood no
run flood-limits yes
run flood-no-limits yes --config "$DATA/nolimits.toml"

python3 - "$OUT" "$RATE" "$DURATION" <<'PY'
import json, sys, os
out, rate, duration = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rows = []
for name in ["no-flood", "flood-limits", "flood-no-limits"]:
    s = json.load(open(f"{out}/{name}/summary.json"))
    e = s["latency"]["e2e"]
    c = s["counters"]
    f = {}
    if os.path.exists(f"{out}/{name}-flood.json"):
        f = json.load(open(f"{out}/{name}-flood.json"))
    rows.append((name, e["p50_ms"], e["p99_ms"], c.get("acked", 0), c.get("missing", 0),
                 f.get("per_s", "-"), json.dumps(f.get("by_status", {})), s.get("cpu", {})))
base = rows[0][2]
with open(f"{out}/README.md", "w") as w:
    w.write("# Chat under a login flood (issue 10, item 4)\n\n")
    w.write(f"`RATE={rate} DURATION={duration} ./scripts/login-flood.sh`: chat at {rate:,} msg/s among 2,000 users for\n"
            f"{duration} s (ack only) while 16 HTTP clients post wrong passwords (one account each, closed loop, at\n"
            "most 20 requests/s each); bcrypt cost 12, release binary, flood and loadgen on the same 2 cores\n"
            "as the server. Chat starts 2 s after the server (and the flood) in every run.\n\n")
    w.write("| run | e2e p50 ms | e2e p99 ms | p99 / no flood | acked | missing | flood req/s | flood answers |\n")
    w.write("|---|---:|---:|---:|---:|---:|---:|---|\n")
    for r in rows:
        w.write(f"| {r[0]} | {r[1]:.1f} | {r[2]:.1f} | {r[2]/base:.2f} | {r[3]} | {r[4]} | {r[5]} | `{r[6]}` |\n")
print(open(f"{out}/README.md").read())
PY
