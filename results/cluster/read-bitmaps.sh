#!/usr/bin/env bash
# Group read receipts' bitmaps written by the services with each receipt (`inline`) or by a task
# process in batches from msg_to_mongo (`task`), on the production wiring (Kafka on tansu, the
# chat log in MongoDB on SecantusDB, MySQL, Redis): a group of MEMBERS (default 200) gets
# MESSAGES (default 20) messages, then every member posts one receipt for all of them at once
# (read-bitmaps.py). Reported per mode: the receipts' latency and wall time, the time until
# "read by" shows every member on every message, and the CPU seconds the services, task,
# mariadbd and secantusd processes spent from the first receipt to the end.
#   results/cluster/read-bitmaps.sh [inline] [task]
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=target/release/sai-im
OUT=${OUT:-results/cluster/read-bitmaps}
MEMBERS=${MEMBERS:-200}
MESSAGES=${MESSAGES:-20}
MYSQL=mysql://root@127.0.0.1:3306
mkdir -p "$OUT"
[ -x "$BIN" ] || cargo build --release --locked --bin sai-im
./scripts/backends.sh mysql redis kafka mongo >/dev/null

source results/cluster/cpu.sh

run() { # mode, cluster.sh flags
    local mode=$1; shift
    local dir=/tmp/bench-read-bitmaps-$mode
    SAI_CLUSTER_DIR=$dir ./scripts/cluster.sh down >/dev/null 2>&1 || true
    rm -rf "$dir"
    mysql -h127.0.0.1 -uroot -e "DROP DATABASE IF EXISTS sai_bench_receipts"
    SAI_CLUSTER_CHAT_LOG=mongodb://127.0.0.1:27017/sai_bench_receipts_$(date +%s) \
        SAI_CLUSTER_DIR=$dir SAI_CLUSTER_BIN=$BIN SAI_CLUSTER_DATABASE_URL=$MYSQL/sai_bench_receipts \
        SAI_CLUSTER_KAFKA_PREFIX=sai-bench-$mode-$(date +%s). \
        SAI_CLUSTER_SERVICES_ARGS="--max-group-members 2000" ./scripts/cluster.sh up --gateways 1 "$@" > "$dir.ready"
    "$BIN" --data-dir "$dir/services-1" --database-url "$MYSQL/sai_bench_receipts" \
        admin seed-users --count $((MEMBERS + 1)) --prefix rb >/dev/null
    local ws http
    ws=$(grep -m1 "^gateway ready" "$dir.ready" | tr ' ' '\n' | sed -n 's/^ws=//p')
    http=$(grep -m1 "^services ready" "$dir.ready" | tr ' ' '\n' | sed -n 's/^http=//p')
    local pids
    pids="$(tr '\n' ' ' < "$dir/pids") $(pgrep -x mariadbd || true) $(pgrep -f "secantusd-py --host 127.0.0.1 --port 27017" | head -1 || true)"
    local c0 c1 result
    c0=$(cpu $pids)
    result=$(python3 results/cluster/read-bitmaps.py --http "http://$http" --ws "$ws" \
        --secret "$(cat "$dir/jwt.secret")" --members "$MEMBERS" --messages "$MESSAGES")
    c1=$(cpu $pids)
    echo "$mode $result cpu_seconds=$(echo "$c1 - $c0" | bc)" | tee -a "$OUT/read-bitmaps.txt"
    SAI_CLUSTER_DIR=$dir ./scripts/cluster.sh down >/dev/null
}

for mode in "${@:-inline task}"; do
    for m in $mode; do
        case "$m" in
            inline) run inline --tasks 0 ;;
            task) run task --tasks 1 ;;
            *) echo "unknown mode $m (inline, task)" >&2; exit 2 ;;
        esac
    done
done
