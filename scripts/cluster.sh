#!/usr/bin/env bash
# A SAI-IM cluster on this machine: one `sai-im services` process, N `sai-im gateway`
# processes and a `sai-im task` process on MySQL (MariaDB), MongoDB (SecantusDB, the chat log),
# Redis and Kafka (tansu), started when missing by scripts/backends.sh.
#   ./scripts/cluster.sh up [--gateways N] [--services M] [--tasks K] [--no-kafka] [--no-mongo]
#                            start (default 3 gateways, 1 services process, 1 task process);
#                            prints each ready line; chat commands and deliveries go through
#                            Kafka topics and group read bitmaps through msg_to_mongo to the
#                            task processes, or with --no-kafka through the services' internal
#                            ports (no task process: the services write the bitmaps); messages
#                            live in MongoDB, or with --no-mongo in MySQL's tables
#   ./scripts/cluster.sh down                stop every process `up` started
# Settings: SAI_CLUSTER_DIR (state, logs; default /tmp/sai-cluster), SAI_CLUSTER_DATABASE_URL
# (default mysql://root@127.0.0.1:3306/sai_cluster), SAI_CLUSTER_REDIS_URL (default
# redis://127.0.0.1:6379), SAI_CLUSTER_KAFKA (default 127.0.0.1:9092), SAI_CLUSTER_KAFKA_PREFIX
# (default sai-cluster.), SAI_CLUSTER_CHAT_LOG (default mongodb://127.0.0.1:27017/sai_cluster; a
# MySQL database keeps the chat log it started with), SAI_CLUSTER_BIN (default: target/release/sai-im, built if missing),
# SAI_CLUSTER_SERVICES_ARGS / SAI_CLUSTER_GATEWAY_ARGS (more flags for those processes, e.g.
# "--require-friendship false" for a benchmark).
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=${SAI_CLUSTER_DIR:-/tmp/sai-cluster}
DB=${SAI_CLUSTER_DATABASE_URL:-mysql://root@127.0.0.1:3306/sai_cluster}
REDIS=${SAI_CLUSTER_REDIS_URL:-redis://127.0.0.1:6379}
BIN=${SAI_CLUSTER_BIN:-target/release/sai-im}
KAFKA=${SAI_CLUSTER_KAFKA:-127.0.0.1:9092}
CHAT_LOG=${SAI_CLUSTER_CHAT_LOG:-mongodb://127.0.0.1:27017/sai_cluster}

# Waits for the ready line of the process logging to $1 (pid $2); prints it.
await_ready() {
    for _ in $(seq 1 300); do
        if line=$(grep -m1 " ready " "$1" 2>/dev/null); then
            echo "$line"
            return 0
        fi
        if ! kill -0 "$2" 2>/dev/null; then
            echo "process $2 exited before it was ready:" >&2
            tail -20 "${1%.out}.err" >&2 || true
            return 1
        fi
        sleep 0.1
    done
    echo "process $2 not ready after 30 s" >&2
    return 1
}

up() {
    local gateways=3 services=1 tasks=1 kafka=1 mongo=1
    while [ $# -gt 0 ]; do
        case "$1" in
            --gateways) gateways=$2; shift 2 ;;
            --services) services=$2; shift 2 ;;
            --tasks) tasks=$2; shift 2 ;;
            --no-kafka) kafka=0; shift ;;
            --no-mongo) mongo=0; shift ;;
            *) echo "unknown option $1" >&2; exit 2 ;;
        esac
    done
    if [ -s "$DIR/pids" ]; then
        echo "a cluster is up ($DIR/pids): ./scripts/cluster.sh down first" >&2
        exit 1
    fi
    [ -n "${SAI_CLUSTER_DATABASE_URL:-}" ] || ./scripts/backends.sh mysql
    [ -n "${SAI_CLUSTER_REDIS_URL:-}" ] || ./scripts/backends.sh redis
    local flows=() bitmaps=()
    if [ "$kafka" = 1 ]; then
        [ -n "${SAI_CLUSTER_KAFKA:-}" ] || ./scripts/backends.sh kafka
        flows=(--kafka "$KAFKA" --kafka-prefix "${SAI_CLUSTER_KAFKA_PREFIX:-sai-cluster.}")
        if [ "$tasks" -gt 0 ]; then bitmaps=(--read-bitmaps task); fi
    else
        tasks=0
    fi
    local log=()
    if [ "$mongo" = 1 ]; then
        [ -n "${SAI_CLUSTER_CHAT_LOG:-}" ] || ./scripts/backends.sh mongo
        log=(--chat-log "$CHAT_LOG")
    fi
    [ -x "$BIN" ] || cargo build --release --locked --bin sai-im
    mkdir -p "$DIR"
    : > "$DIR/pids"
    # The secret of the internal port, shared by this cluster's processes only, and the token
    # secret every services process signs with (also in $DIR/jwt.secret, where loadgen's
    # --data-dir finds it), unless SAI_JWT_SECRET gives one.
    local key
    key=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
    export SAI_CLUSTER_KEY=$key
    export SAI_JWT_SECRET=${SAI_JWT_SECRET:-$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')}
    (umask 077 && echo "$SAI_JWT_SECRET" > "$DIR/jwt.secret")
    local ready internals=()
    for i in $(seq 1 "$services"); do
        local share=()
        [ "$kafka" = 1 ] && share=(--kafka-share "$((i - 1))/$services")
        "$BIN" services --data-dir "$DIR/services-$i" --database-url "$DB" --redis-url "$REDIS" \
            --redis-prefix sai-cluster: --http-listen 127.0.0.1:0 \
            --grpc-listen 127.0.0.1:0 --internal-listen 127.0.0.1:0 "${flows[@]}" "${share[@]}" "${log[@]}" \
            "${bitmaps[@]}" \
            ${SAI_CLUSTER_SERVICES_ARGS:-} \
            > "$DIR/services-$i.out" 2> "$DIR/services-$i.err" &
        echo $! >> "$DIR/pids"
        ready=$(await_ready "$DIR/services-$i.out" $!)
        echo "$ready"
        internals+=("$(echo "$ready" | tr ' ' '\n' | sed -n 's/^internal=//p')")
    done
    for i in $(seq 1 "$tasks"); do
        "$BIN" task --data-dir "$DIR/task-$i" --database-url "$DB" "${flows[@]}" \
            --kafka-share "$((i - 1))/$tasks" "${log[@]}" \
            > "$DIR/task-$i.out" 2> "$DIR/task-$i.err" &
        echo $! >> "$DIR/pids"
        await_ready "$DIR/task-$i.out" $!
    done
    local internal
    internal=$(IFS=,; echo "${internals[*]}")
    for node in $(seq 1 "$gateways"); do
        "$BIN" gateway --node "$node" --services "$internal" --redis-url "$REDIS" \
            --redis-prefix sai-cluster: --ws-listen 127.0.0.1:0 --data-dir "$DIR/gateway-$node" \
            "${flows[@]}" ${SAI_CLUSTER_GATEWAY_ARGS:-} \
            > "$DIR/gateway-$node.out" 2> "$DIR/gateway-$node.err" &
        echo $! >> "$DIR/pids"
        await_ready "$DIR/gateway-$node.out" $!
    done
}

down() {
    [ -f "$DIR/pids" ] || { echo "no cluster is up ($DIR/pids)"; return 0; }
    # Gateways first (reverse order of start), gracefully; then whatever is left.
    for pid in $(tac "$DIR/pids"); do
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    rm -f "$DIR/pids"
    echo "cluster down"
}

case "${1:-}" in
    up) shift; up "$@" ;;
    down) down ;;
    *) echo "usage: $0 up [--gateways N] [--services M] [--tasks K] [--no-kafka] [--no-mongo] | down" >&2; exit 2 ;;
esac
