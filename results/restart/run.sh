#!/usr/bin/env bash
# A server restarted under load: loadgen chat --reconnect (USERS users, RATE msg/s of private
# chat for DURATION s) while, AT seconds in, the server is restarted:
#   embedded  the embedded default (SQLite) gets SIGTERM (clients closed with 1012), and once it
#             has exited a new one starts on the same ports and data: downtime is its stop
#             plus its start.
#   takeover  the embedded default replaced with `sai-im --take-over`: the new process binds
#             the same ports beside the running one, stops it, and serves once it has let go
#             of the data directory: no connection is refused meanwhile.
#   gateway   a cluster (one services process on MySQL and Redis, one gateway, gRPC flows): a
#             replacement gateway starts beside the running one on the same port
#             (SO_REUSEPORT), then the old one gets SIGTERM: zero downtime, clients reconnect at
#             once to the new one.
# loadgen's clients reconnect, sync and resend what was not acked; the run fails unless every
# message is acked and delivered exactly once (missing, duplicated, unacked all 0). Output per
# mode: <mode>/ (summary.json, series.csv, charts), <mode>.txt (loadgen's table),
# <mode>.events (when the restart steps happened, loadgen-relative).
#   results/restart/run.sh [embedded] [takeover] [gateway]
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=target/release/sai-im
LG=target/release/loadgen
OUT=${OUT:-results/restart}
USERS=${USERS:-2000}
RATE=${RATE:-2000}
DURATION=${DURATION:-20}
AT=${AT:-8}
# Clients from 8 loopback addresses: from one, the gateway's limit of 1,024 unfinished
# handshakes per address refuses part of a 2,000-client reconnect burst (as it should), and the
# run measures that limit instead of the restart.
SRC_ADDRS=${SRC_ADDRS:-8}
MYSQL=${MYSQL:-mysql://root@127.0.0.1:3306}
REDIS=${REDIS:-redis://127.0.0.1:6379}
mkdir -p "$OUT"
[ -x "$BIN" ] && [ -x "$LG" ] || cargo build --release --locked -p sai-im -p loadgen

# Waits for the ready line in $1 from pid $2.
ready() {
    for _ in $(seq 600); do
        grep -q " ready " "$1" 2>/dev/null && return 0
        kill -0 "$2" 2>/dev/null || { echo "process $2 exited before it was ready" >&2; return 1; }
        sleep 0.05
    done
    echo "not ready after 30 s: $1" >&2
    return 1
}

now() { date +%s.%N; }
# Seconds since the load started, for the events file.
since() { echo "$(now) - $T0" | bc; }

# Runs loadgen in the background against ws $1 with data dir $2 (its jwt.secret).
load() {
    "$LG" chat --ws "$1" --data-dir "$2" --users "$USERS" --rate "$RATE" --duration "$DURATION" \
        --connect-rate 2000 --drain 30 --src-addrs "$SRC_ADDRS" --reconnect --quiet --out "$OUT/$MODE" > "$OUT/$MODE.txt" 2>&1 &
    LOAD=$!
    T0=$(now)
}

# Waits for the load to end, stops the processes named, says how it went.
finish() {
    local rc=0
    wait $LOAD || rc=$?
    kill -TERM "$@"; wait "$@" || true
    echo "$MODE: loadgen exit $rc"; cat "$OUT/$MODE.events"
    return $rc
}

# Starts the embedded default on data dir $d (seeded) as $OLD, and the load against it.
embedded_under_load() {
    rm -rf "$d"; mkdir -p "$d"
    args=(--data-dir "$d" --require-friendship false --ws-listen 127.0.0.1:18080
        --http-listen 127.0.0.1:18081 --grpc-listen 127.0.0.1:18082)
    "$BIN" --data-dir "$d" admin seed-users --count "$USERS" --prefix load > /dev/null
    "$BIN" "${args[@]}" > "$d/out-1" 2> "$d/err-1" &
    OLD=$!
    ready "$d/out-1" $OLD
    load 127.0.0.1:18080 "$d"
    sleep "$AT"
}

embedded() {
    MODE=embedded
    local d=/tmp/bench-restart-embedded args
    embedded_under_load
    local pid=$OLD
    {
        echo "$(since) SIGTERM to the server"
        kill -TERM $pid; wait $pid || true
        echo "$(since) the server exited"
        "$BIN" "${args[@]}" > "$d/out-2" 2> "$d/err-2" &
        pid=$!
        ready "$d/out-2" $pid
        echo "$(since) the new server is ready"
    } > "$OUT/$MODE.events"
    finish $pid
}

takeover() {
    MODE=takeover
    local d=/tmp/bench-restart-takeover args
    embedded_under_load
    {
        echo "$(since) the new server starts with --take-over"
        "$BIN" "${args[@]}" --take-over > "$d/out-2" 2> "$d/err-2" &
        new=$!
        ready "$d/out-2" $new
        echo "$(since) the new server is ready"
        wait $OLD || true
        echo "$(since) the old server has exited"
    } > "$OUT/$MODE.events"
    finish $new
}

gateway() {
    MODE=gateway
    local d=/tmp/bench-restart-gateway tag
    tag=$(date +%s)
    rm -rf "$d"; mkdir -p "$d"
    ./scripts/backends.sh mysql redis > /dev/null
    local db="$MYSQL/sai_restart_$tag?pool=16" prefix="sai-restart:$tag:"
    export SAI_CLUSTER_KEY=restart-cluster-key-0123456789
    export SAI_JWT_SECRET=restart-jwt-secret-0123456789
    echo "$SAI_JWT_SECRET" > "$d/jwt.secret"
    "$BIN" --data-dir "$d" --database-url "$db" admin seed-users --count "$USERS" --prefix load > /dev/null
    "$BIN" services --data-dir "$d/services" --database-url "$db" --redis-url "$REDIS" \
        --redis-prefix "$prefix" --http-listen 127.0.0.1:18081 --grpc-listen 127.0.0.1:18082 \
        --internal-listen 127.0.0.1:18083 --require-friendship false > "$d/services.out" 2> "$d/services.err" &
    local services=$!
    ready "$d/services.out" $services
    local gw=(gateway --services 127.0.0.1:18083 --redis-url "$REDIS" --redis-prefix "$prefix"
        --ws-listen 127.0.0.1:18080)
    "$BIN" "${gw[@]}" --node 1 --data-dir "$d/g1" > "$d/g1.out" 2> "$d/g1.err" &
    local old=$!
    ready "$d/g1.out" $old
    load 127.0.0.1:18080 "$d"
    sleep "$AT"
    {
        echo "$(since) a replacement gateway starts beside the running one"
        "$BIN" "${gw[@]}" --node 2 --data-dir "$d/g2" > "$d/g2.out" 2> "$d/g2.err" &
        new=$!
        ready "$d/g2.out" $new
        echo "$(since) the replacement is ready; SIGTERM to the old gateway"
        kill -TERM $old; wait $old || true
        echo "$(since) the old gateway exited"
    } > "$OUT/$MODE.events"
    local rc=0
    finish $new $services || rc=$?
    mysql -h 127.0.0.1 -u root -e "DROP DATABASE IF EXISTS sai_restart_$tag" 2>/dev/null || true
    return $rc
}

status=0
for mode in "${@:-embedded takeover gateway}"; do
    for m in $mode; do
        "$m" || status=1
    done
done
exit $status
