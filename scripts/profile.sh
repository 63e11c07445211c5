#!/usr/bin/env bash
# Profiles the server under a steady chat load: CPU seconds per thread (and microseconds per
# message) over 8 s, then a 6 s `perf record -g` of the server and its flat profile.
#
#   ./scripts/profile.sh                      # 6,000 msg/s, ack only, into /tmp/sai-profile
#   RATE=2000 MODE=rigor OUT=/tmp/p ./scripts/profile.sh
#   BIN=/tmp/sai-im-old ./scripts/profile.sh   # another server binary (e.g. a build of main)
#
# Needs `perf` (installed here). Release binaries are built first. Everything runs on loopback
# and stops by itself (12 s of sending).
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${RATE:-6000}
MODE=${MODE:-only}
OUT=${OUT:-/tmp/sai-profile}
DATA=$(mktemp -d /tmp/sai-profile.XXXXXX)
mkdir -p "$OUT"

cargo build --release --locked -p sai-im -p loadgen
BIN=${BIN:-target/release/sai-im}
LG=target/release/loadgen

"$BIN" --data-dir "$DATA" admin seed-users --count 2000 --prefix load >/dev/null
"$BIN" --data-dir "$DATA" --ack-mode "$MODE" --require-friendship false \
    --ws-listen 127.0.0.1:18090 --http-listen 127.0.0.1:18091 --grpc-listen 127.0.0.1:18092 \
    > "$DATA/server.log" 2>&1 &
PID=$!
trap 'kill -TERM $PID 2>/dev/null || true; wait $PID 2>/dev/null || true; rm -rf "$DATA"' EXIT
for _ in $(seq 100); do grep -q "sai-im ready" "$DATA/server.log" && break; sleep 0.1; done

"$LG" chat --users 2000 --rate "$RATE" --duration 12 --ws 127.0.0.1:18090 --data-dir "$DATA" \
    --ack-mode "$MODE" --server-pid "$PID" --quiet > "$OUT/loadgen.txt" &
LOAD=$!

# CPU seconds of each server thread (utime + stime, in 1/100 s), summed by thread name.
threads() {
    for t in /proc/"$PID"/task/*; do
        echo "$(cat "$t/comm") $(cut -d' ' -f14,15 "$t/stat")"
    done | awk '{a[$1] += $2 + $3} END {for (k in a) print k, a[k]}' | sort
}
# Bytes the server process had the kernel write to storage (WAL, checkpoints, message log).
written() { awk '/^write_bytes/ {print $2}' /proc/"$PID"/io; }
sleep 3
threads > "$DATA/t1"
W1=$(written)
perf record -F 499 -g -p "$PID" -o "$OUT/perf.data" -- sleep 6 >/dev/null 2>&1 || true
sleep 2
threads > "$DATA/t2"
W2=$(written)
join "$DATA/t1" "$DATA/t2" | awk -v r="$RATE" '{d = ($3 - $2) / 100;
    printf "%-24s %6.2f s  %6.1f us/msg\n", $1, d, d * 1e6 / (r * 8)}' > "$OUT/threads.txt"
awk -v w=$((W2 - W1)) -v r="$RATE" 'BEGIN {printf "%-24s %6.1f MB   %6.0f bytes/msg\n", "written to storage", w / 1e6, w / (r * 8)}' >> "$OUT/threads.txt"
wait "$LOAD" || true
# (`head` closes the pipe early: not a failure.)
perf report -i "$OUT/perf.data" --no-children --sort dso,symbol --stdio -g none 2>/dev/null \
    | grep -v '^#' | grep -v '^$' | sed -E 's/[[:space:]]+-[[:space:]]+-[[:space:]]*$//' \
    | head -60 > "$OUT/flat.txt" || true
echo "== server threads over 8 s at $RATE msg/s ($MODE)"; cat "$OUT/threads.txt"
echo "== top of the flat profile"; head -25 "$OUT/flat.txt"
grep -E "^e2e|cpu " "$OUT/loadgen.txt"
