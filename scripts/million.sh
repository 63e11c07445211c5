#!/usr/bin/env bash
# The million-connection run (issue 11): one sai-im process on the direct engine holds USERS
# authenticated WebSocket connections (default 1,000,000) from one loadgen process on io_uring
# direct descriptors, for HOLD seconds with heartbeats, and checks every one is alive at the end.
# With CHAT_USERS > 0, that many of the users instead run private chat at CHAT_RATE msg/s from a
# second loadgen while the others are held (the "chat at 1M connected" figure).
#
#   ./scripts/million.sh                                  # 1M held for 300 s -> results/million/
#   USERS=200000 HOLD=30 OUT=/tmp/m ./scripts/million.sh  # smaller
#   CHAT_USERS=10000 CHAT_RATE=5000 ./scripts/million.sh  # with chat among 10,000 of them
#
# BIN_DIR=<dir> runs the sai-im and loadgen binaries found there instead of building them (a
# machine without a Rust toolchain); SHARDS sets the gateway's shard threads (default: one per
# core), THREADS the holding loadgen's threads, CHAT_PROCS the chat loadgen's processes.
#
# EHASH=2097152 runs everything in a network namespace of its own whose TCP established-connection
# hash has that many buckets (default 0: the host's namespace). This VM's boot-time table has
# 262,144: with two million loopback sockets the kernel's lookup of each incoming segment took
# 26 % of the gateway's CPU during chat at a million connections, 10 % with 2,097,152 buckets
# (results/million/profile-*.txt), though the runs' latencies did not improve with it on this
# noisy VM. Production hosts size it with the `thash_entries` boot parameter; a namespace gets its
# own through net.ipv4.tcp_child_ehash_entries (Linux 6.1). Needs root and iproute2.
#
# Needs about 5 KB of kernel memory per socket, two sockets per connection (about 10 GB for a
# million), ~1.1 KB per connection in the server and ~0.5 KB in loadgen. Loopback only: the
# clients bind source addresses 127.0.x.y (2,000 connections each, under the gateway's
# per-address cap), so ephemeral ports never run short.
set -euo pipefail
cd "$(dirname "$0")/.."
USERS=${USERS:-1000000}
HOLD=${HOLD:-300}
RATE=${RATE:-20000}
THREADS=${THREADS:-1}
CHAT_USERS=${CHAT_USERS:-0}
CHAT_RATE=${CHAT_RATE:-5000}
CHAT_PROCS=${CHAT_PROCS:-1}
SHARDS=${SHARDS:-0}
BIN_DIR=${BIN_DIR:-}
OUT=${OUT:-results/million}
NOTE=${NOTE:-"2-core / 24 GiB dev VM, loadgen on the same machine"}
DATA=${DATA:-/tmp/sai-million}
EHASH=${EHASH:-0}
NS=sai-million
mkdir -p "$OUT"

if [ -z "$BIN_DIR" ]; then
    cargo build --release --locked -p sai-im -p loadgen
    BIN_DIR=target/release
fi
BIN=$BIN_DIR/sai-im
LG=$BIN_DIR/loadgen

# Seeding a million users takes ~12 s; the seeded database is kept for the next run.
if [ ! -f "$DATA/seeded-$USERS" ]; then
    rm -rf "$DATA"
    "$BIN" --data-dir "$DATA" admin seed-users --count "$USERS" --prefix m
    touch "$DATA/seeded-$USERS"
fi

IN=()
if [ "$EHASH" != 0 ]; then
    ip netns del "$NS" 2>/dev/null || true
    OLD_EHASH=$(cat /proc/sys/net/ipv4/tcp_child_ehash_entries)
    sysctl -qw net.ipv4.tcp_child_ehash_entries="$EHASH"
    ip netns add "$NS"
    sysctl -qw net.ipv4.tcp_child_ehash_entries="$OLD_EHASH"
    ip netns exec "$NS" ip link set lo up
    IN=(ip netns exec "$NS")
fi
# `ip netns exec` execs the command: $! is the server's pid.
"${IN[@]}" "$BIN" --data-dir "$DATA" --engine direct --shards "$SHARDS" --require-friendship false \
    --ws-listen 127.0.0.1:19080 --http-listen 127.0.0.1:19081 --grpc-listen 127.0.0.1:19082 \
    > "$OUT/server.log" 2>&1 &
SERVER_PID=$!
cleanup() {
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    if [ "$EHASH" != 0 ]; then ip netns del "$NS" 2>/dev/null || true; fi
}
trap cleanup EXIT
for _ in $(seq 100); do grep -q "sai-im ready" "$OUT/server.log" && break; sleep 0.1; done
grep -q "engine=direct" "$OUT/server.log" || { echo "the server is not on the direct engine"; cat "$OUT/server.log"; exit 1; }

{
    echo "kernel $(uname -r), $(nproc) cores, $(awk '/MemTotal/ {print $2}' /proc/meminfo) KiB"
    echo "descriptor limit $(ulimit -n)"
    echo "TCP established hash buckets $("${IN[@]}" cat /proc/sys/net/ipv4/tcp_ehash_entries)"
    grep -E "^(Slab|SUnreclaim|MemFree):" /proc/meminfo
} > "$OUT/machine-before.txt"

HELD=$((USERS - CHAT_USERS))
CHAT_PID=
if [ "$CHAT_USERS" -gt 0 ]; then
    # The chat starts 5 s after every held connection is up (or, should the ramp stall, after
    # twice its planned time plus a minute).
    (
        for _ in $(seq $((2 * HELD / RATE + 60))); do
            grep -qE "open +$HELD started" "$OUT/hold-progress.txt" 2>/dev/null && break
            sleep 1
        done
        sleep 5
        "${IN[@]}" "$LG" chat --users "$CHAT_USERS" --first-user "$HELD" --rate "$CHAT_RATE" --duration 30 \
            --procs "$CHAT_PROCS" \
            --connect-rate 5000 --ws 127.0.0.1:19080 --http http://127.0.0.1:19081 --data-dir "$DATA" \
            --prefix m --ack-mode only --server-pid "$SERVER_PID" --note "$NOTE, during a hold of $HELD" \
            --quiet --out "$OUT/chat" \
            > "$OUT/chat.txt" 2>&1
    ) &
    CHAT_PID=$!
fi
"${IN[@]}" "$LG" hold --users "$HELD" --connect-rate "$RATE" --hold "$HOLD" --heartbeat 20 --threads "$THREADS" \
    --connect-timeout 30 --ws 127.0.0.1:19080 --data-dir "$DATA" --prefix m --server-pid "$SERVER_PID" \
    --note "$NOTE" --out "$OUT/hold" 2> "$OUT/hold-progress.txt" | tee "$OUT/hold.txt"
if [ -n "$CHAT_PID" ]; then wait "$CHAT_PID" || true; cat "$OUT/chat.txt"; fi
grep -E "^(Slab|SUnreclaim|MemFree):" /proc/meminfo > "$OUT/machine-after.txt"
