#!/usr/bin/env bash
# Same-day capacity of one build in several wirings: the embedded default (SQLite), the embedded
# default on MySQL (--database-url), and clusters of two gateway processes on MySQL + Redis:
# `cluster` (one services process, chat over its internal gRPC port), `cluster-kafka` (one
# services process, chat through Kafka topics on tansu), `cluster-kafka-2` (two services
# processes, each reading half the partitions) and `cluster-kafka-memory` (tansu keeping its
# topics in memory), `cluster-mongo` (as `cluster`, with the chat log in MongoDB: SecantusDB
# here) and `cluster-kafka-mongo` (Kafka and the MongoDB chat log: the whole production
# wiring); the others keep messages in MySQL's tables. loadgen capacity: 2,000 users, private chat, ack
# mode only, steps of 1,000 msg/s for 5 s, limit p99 e2e 50 ms (LIMIT_MS). CPU seconds of every process
# involved (sai-im processes, mariadbd, redis-server, tansu) are read from /proc before and
# after each run: cpu.txt.
#   results/cluster/run.sh [embedded-sqlite|embedded-mysql|cluster|cluster-kafka|cluster-kafka-2|cluster-kafka-memory|cluster-mongo|cluster-kafka-mongo ...]
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=target/release/sai-im
LG=target/release/loadgen
OUT=${OUT:-results/cluster}
mkdir -p "$OUT"
MYSQL=mysql://root@127.0.0.1:3306
# The capacity search's p99 end-to-end limit (LIMIT_MS, default 50 ms).
LIMIT_MS=${LIMIT_MS:-50}
RATES=(--users 2000 --start-rate 2000 --step-rate 1000 --max-rate 16000 --step-secs 5)
# The Kafka clusters start lower: tansu on SQLite holds about 2,000 msg/s here.
KAFKA_RATES=(--users 2000 --start-rate 500 --step-rate 250 --max-rate 16000 --step-secs 5)
# The MongoDB chat log starts lower still: SecantusDB (Python) journals about 1,100 documents/s.
MONGO_RATES=(--users 2000 --start-rate 100 --step-rate 100 --max-rate 16000 --step-secs 5)

# tansu_bin: the broker binary scripts/backends.sh installs.
source scripts/backends.sh

source results/cluster/cpu.sh
drop_db() { mysql -h127.0.0.1 -uroot -e "DROP DATABASE IF EXISTS $1"; }
backend_pids() { echo "$(pgrep -x mariadbd || true) $(pgrep -x redis-server | head -1 || true) $(pgrep -f "tansu broker --listener-url tcp://${SAI_CLUSTER_KAFKA:-127.0.0.1:9092}" | head -1 || true) $(pgrep -f "secantusd-py --host 127.0.0.1 --port 27017" | head -1 || true)"; }
wait_ready() { for _ in $(seq 300); do grep -q " ready " "$1" && return 0; sleep 0.1; done; return 1; }

run_embedded() { # name, extra server flags
    local name=$1; shift
    local d=/tmp/bench-$name
    rm -rf "$d"; mkdir -p "$d"
    "$BIN" --data-dir "$d" "$@" admin seed-users --count 2000 --prefix load >/dev/null
    "$BIN" --data-dir "$d" --require-friendship false "$@" --ws-listen 127.0.0.1:18080 \
        --http-listen 127.0.0.1:18081 --grpc-listen 127.0.0.1:18082 > "$d/out" 2> "$d/err" &
    local pid=$!
    wait_ready "$d/out"
    local pids="$pid $(backend_pids)"
    local c0; c0=$(cpu $pids)
    "$LG" capacity --ws 127.0.0.1:18080 --http http://127.0.0.1:18081 --data-dir "$d" "${RATES[@]}" \
        --server-pid "$pid" --p99-limit-ms "$LIMIT_MS" --quiet --out "$OUT/capacity-$name" > "$OUT/capacity-$name.txt"
    local c1; c1=$(cpu $pids)
    echo "$name cpu_seconds=$(echo "$c1 - $c0" | bc) processes=sai-im,mariadbd,redis-server" >> "$OUT/cpu.txt"
    kill -TERM "$pid"; wait "$pid" || true
}

run_cluster() { # name, rates (array name), cluster.sh up flags
    local name=$1; local -n rates=$2; shift 2
    local dir=/tmp/bench-$name
    SAI_CLUSTER_DIR=$dir ./scripts/cluster.sh down >/dev/null 2>&1 || true
    rm -rf "$dir"
    drop_db sai_bench_cluster
    # A chat log database of the run's own (nothing here drops MongoDB databases).
    SAI_CLUSTER_CHAT_LOG=mongodb://127.0.0.1:27017/sai_bench_$(date +%s) \
        SAI_CLUSTER_DIR=$dir SAI_CLUSTER_BIN=$BIN SAI_CLUSTER_DATABASE_URL=$MYSQL/sai_bench_cluster \
        SAI_CLUSTER_SERVICES_ARGS="--require-friendship false ${SERVICES_ARGS:-}" SAI_CLUSTER_GATEWAY_ARGS="${GATEWAY_ARGS:-}" ./scripts/cluster.sh up --gateways 2 "$@" | tee "$dir.ready"
    "$BIN" --data-dir "$dir/services-1" --database-url "$MYSQL/sai_bench_cluster" admin seed-users --count 2000 --prefix load >/dev/null
    local ws http
    ws=$(grep "^gateway ready" "$dir.ready" | tr ' ' '\n' | sed -n 's/^ws=//p' | paste -sd,)
    http=$(grep -m1 "^services ready" "$dir.ready" | tr ' ' '\n' | sed -n 's/^http=//p')
    local pids; pids="$(cat "$dir/pids" | tr '\n' ' ') $(backend_pids)"
    local c0; c0=$(cpu $pids)
    "$LG" capacity --ws "$ws" --http "http://$http" --data-dir "$dir" "${rates[@]}" \
        --server-pid "$(head -1 "$dir/pids")" --p99-limit-ms "$LIMIT_MS" --quiet --out "$OUT/capacity-$name" > "$OUT/capacity-$name.txt"
    local c1; c1=$(cpu $pids)
    echo "$name cpu_seconds=$(echo "$c1 - $c0" | bc) processes=$(wc -l < "$dir/pids") sai-im,mariadbd,redis-server,tansu,secantusd" >> "$OUT/cpu.txt"
    SAI_CLUSTER_DIR=$dir ./scripts/cluster.sh down
}

for what in "${@:-embedded-sqlite embedded-mysql cluster cluster-kafka cluster-kafka-2 cluster-kafka-memory}"; do
    for w in $what; do
        case "$w" in
            embedded-sqlite) run_embedded embedded-sqlite ;;
            embedded-mysql) drop_db sai_bench_embedded; run_embedded embedded-mysql --database-url "$MYSQL/sai_bench_embedded" ;;
            cluster) run_cluster cluster RATES --no-kafka --no-mongo ;;
            cluster-kafka) run_cluster cluster-kafka KAFKA_RATES --no-mongo ;;
            cluster-kafka-2) run_cluster cluster-kafka-2 KAFKA_RATES --services 2 --no-mongo ;;
            cluster-mongo) ./scripts/backends.sh mongo; run_cluster cluster-mongo MONGO_RATES --no-kafka ;;
            cluster-kafka-mongo) ./scripts/backends.sh mongo; run_cluster cluster-kafka-mongo MONGO_RATES ;;
            cluster-kafka-memory)
                # The same, on a tansu that keeps its topics in memory (what the broker's
                # storage costs).
                "$(tansu_bin)" broker --listener-url tcp://127.0.0.1:19092 --advertised-listener-url \
                    tcp://127.0.0.1:19092 --storage-engine memory://tansu/ > /tmp/bench-tansu-memory.log 2>&1 &
                tpid=$!
                sleep 1
                SAI_CLUSTER_KAFKA=127.0.0.1:19092 run_cluster cluster-kafka-memory KAFKA_RATES --no-mongo
                kill "$tpid"; wait "$tpid" || true ;;
        esac
    done
done
