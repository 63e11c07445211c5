#!/usr/bin/env bash
# Load-generator smoke test: a few thousand connections and a few seconds of chat in each ack
# mode, plus group and storm, against a fresh server. It asserts correctness only (loadgen exits
# non-zero on any missing, duplicated or out-of-order message, or when connections fail) - never
# a speed bound.
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${PROFILE:-release}
FLAG=$([ "$PROFILE" = release ] && echo --release || true)
cargo build $FLAG --locked -p sai-im -p loadgen
BIN=target/$PROFILE/sai-im
LG=target/$PROFILE/loadgen
DATA=$(mktemp -d /tmp/sai-smoke.XXXXXX)
. scripts/lib/sai-server.sh
trap 'sai_stop; rm -rf "$DATA"' EXIT

"$BIN" --data-dir "$DATA" --bcrypt-cost 4 admin seed-users --count 4000 --prefix smoke

lg() { # ack mode, loadgen args...
    local mode=$1; shift
    "$LG" "$@" --ws "$WS" --http "$HTTP" --data-dir "$DATA" --prefix smoke --ack-mode "$mode" \
        --server-pid "$SERVER_PID" --quiet --drain 15 > "$DATA/lg.out" 2>&1 || { cat "$DATA/lg.out"; exit 1; }
    grep -E "^(== |verdict|count  (sent|delivered|missing|duplicated|alive_at_end) )" "$DATA/lg.out"
    # Every connection must have opened.
    if grep -qE "^fail" "$DATA/lg.out"; then cat "$DATA/lg.out"; echo "smoke: failures above"; exit 1; fi
}

for mode in none only rigor; do
    sai_start "$BIN" "$DATA" --ack-mode "$mode"
    echo "--- ack mode $mode"
    lg "$mode" chat --users 3000 --connect-rate 3000 --rate 500 --duration 3
    if [ "$mode" = only ]; then
        lg "$mode" connect --users 3000 --connect-rate 3000 --hold 2 --procs 2
        # One process on io_uring direct descriptors, heartbeats every second, every connection
        # checked alive at the end.
        lg "$mode" hold --users 3000 --connect-rate 3000 --hold 3 --heartbeat 1 --threads 2
        lg "$mode" group --groups 4 --size 50 --rate-per-group 5 --duration 3 --first-user 3000
        # Busy groups: members sending at once from different shards must still be pushed in
        # seq order (loadgen counts any out-of-order delivery as a correctness failure).
        lg "$mode" group --groups 2 --size 50 --rate-per-group 100 --duration 3 --first-user 3200
        lg "$mode" storm --users 1000 --rate 300 --duration 3 --drop 0.3
        # A capacity search over two worker processes stepping together (correctness only: the
        # steps must have been judged on both workers' latencies, whatever the verdict).
        lg "$mode" capacity --users 2000 --procs 2 --start-rate 400 --step-rate 400 --max-rate 800 --step-secs 1
        grep -q "over 2 workers" "$DATA/lg.out" || { cat "$DATA/lg.out"; echo "smoke: no stepped capacity search"; exit 1; }
    fi
    sai_stop
done
echo "smoke: ok"
