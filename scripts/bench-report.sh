#!/usr/bin/env bash
# The benchmark regression report CI publishes: a short benchmark (about two minutes) compared
# with the reference committed in results/baseline/ci/ (scripts/bench_report.py says how).
#
#   ./scripts/bench-report.sh               # report in $BENCH_REPORT_DIR (target/bench-report):
#                                           # report.md, ratios.svg, capacity.svg, the runs;
#                                           # exit 1 on a correctness failure or a regression
#   MODE=record ./scripts/bench-report.sh   # measure the reference again into results/baseline/ci
#
# The benchmark: a fresh embedded sai-im (release build, ack mode only) and loadgen `chat` with
# 2,000 users at 3,000 msg/s for 5 s, REPS times (default 3: the noise band comes from their
# spread), then one `capacity` search in 2 s steps; the calibration workload runs before and
# after them, on the same machine in the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${MODE:-check}
REPS=${REPS:-3}
REF=results/baseline/ci
OUT=${BENCH_REPORT_DIR:-target/bench-report}
[ "$MODE" = record ] && RUNS=$REF || RUNS=$OUT/runs
cargo build --release --locked -p sai-im -p loadgen
BIN=target/release/sai-im
LG=target/release/loadgen
DATA=$(mktemp -d /tmp/sai-bench.XXXXXX)
. scripts/lib/sai-server.sh
trap 'sai_stop; rm -rf "$DATA"' EXIT
rm -rf "$RUNS"
mkdir -p "$RUNS"

"$BIN" --data-dir "$DATA/seed" admin seed-users --count 2000 --prefix bench > /dev/null
lg() { # name, loadgen args...
    local name=$1; shift
    rm -rf "$DATA/run"
    cp -r "$DATA/seed" "$DATA/run"
    sai_start "$BIN" "$DATA/run"
    # loadgen exits 3 on a correctness failure: the report still gets written, and fails.
    "$LG" "$@" --ws "$WS" --http "$HTTP" --data-dir "$DATA/run" --prefix bench --ack-mode only \
        --server-pid "$SERVER_PID" --quiet --out "$RUNS/$name" > "$RUNS/$name.txt" 2>&1 || true
    sai_stop
    grep -E "^(verdict|e2e |rate   capacity_msgs_per_s)" "$RUNS/$name.txt" || true
}

python3 scripts/bench_report.py calibrate > "$RUNS/calibration-before.json"
for i in $(seq "$REPS"); do
    echo "--- chat run $i of $REPS"
    lg "chat-$i" chat --users 2000 --rate 3000 --duration 5
done
echo "--- capacity"
lg capacity capacity --users 2000 --start-rate 2000 --step-rate 2000 --max-rate 30000 --step-secs 2
python3 scripts/bench_report.py calibrate > "$RUNS/calibration-after.json"
# The calibration of the run: the better of before and after; how far they differ is its noise.
python3 - "$RUNS" <<'PY'
import json, sys
d = sys.argv[1]
a, b = (json.load(open(f"{d}/calibration-{w}.json")) for w in ("before", "after"))
best = max(a["score"], b["score"])
json.dump({"sha256_64k_per_s": best, "score": best,
           "uncertainty": abs(a["score"] - b["score"]) / best}, open(f"{d}/calibration.json", "w"))
PY

if [ "$MODE" = record ]; then
    echo "reference recorded in $REF"
    exit 0
fi
python3 scripts/bench_report.py report "$REF" "$RUNS" "$OUT"
