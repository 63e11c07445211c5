#!/usr/bin/env bash
# Starts the external servers the tests use when they are not running, installing them first on a
# fresh machine; skips whatever already answers. Source it and call the function, or run it:
#   ./scripts/backends.sh mysql redis
# MySQL: SAI_TEST_MYSQL_URL (default mysql://root@127.0.0.1:3306) names the server the tests
# use. When it is set, nothing is installed or started: the server is yours.
set -euo pipefail

# True when something accepts TCP connections on 127.0.0.1:$1.
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Waits up to 10 s for server $2 to listen on port $1; else shows the end of its log $3.
await_listening() {
    for _ in $(seq 1 100); do
        listening "$1" && return 0
        sleep 0.1
    done
    echo "$2 did not start; its log:" >&2
    tail -20 "$3" >&2
    return 1
}

ensure_mysql() {
    if [ -n "${SAI_TEST_MYSQL_URL:-}" ]; then
        return 0
    fi
    if listening 3306; then
        return 0
    fi
    if [ ! -x /usr/sbin/mariadbd ]; then
        echo "installing MariaDB (the MySQL adapter's tests)" >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mariadb-server >/dev/null
        local fresh=1
    fi
    echo "starting MariaDB on 127.0.0.1:3306" >&2
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld 2>/dev/null || true
    start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd -- --bind-address=127.0.0.1
    for _ in $(seq 1 100); do
        listening 3306 && break
        sleep 0.2
    done
    if ! listening 3306; then
        echo "MariaDB did not start" >&2
        return 1
    fi
    if [ -n "${fresh:-}" ]; then
        # A fresh Debian install lets root in only through the Unix socket: the tests connect
        # over TCP as root without a password, as on the CI machine.
        mysql -uroot -e "ALTER USER 'root'@'localhost' IDENTIFIED VIA mysql_native_password USING PASSWORD('');
            CREATE USER IF NOT EXISTS 'root'@'127.0.0.1' IDENTIFIED BY '';
            GRANT ALL ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION;"
    fi
}

# Redis: SAI_TEST_REDIS_URL (default redis://127.0.0.1:6379). The route directory's restart test
# also runs a private redis-server of its own, so the binary is installed even when a server is
# set.
ensure_redis() {
    if ! command -v redis-server >/dev/null 2>&1; then
        echo "installing Redis (the route directory's tests)" >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
    fi
    if [ -n "${SAI_TEST_REDIS_URL:-}" ] || listening 6379; then
        return 0
    fi
    echo "starting Redis on 127.0.0.1:6379" >&2
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
    for _ in $(seq 1 50); do
        listening 6379 && return 0
        sleep 0.1
    done
    echo "Redis did not start" >&2
    return 1
}

# Kafka: SAI_TEST_KAFKA (default 127.0.0.1:9092) names the broker the tests use; when it is set,
# nothing is started. Otherwise tansu (a Kafka-protocol broker in Rust) is installed with cargo
# once per machine (about 10 minutes on 2 cores; cargo skips it when that version is there) and
# started on 127.0.0.1:9092, its data in SQLite under $SAI_KAFKA_DIR (default
# /tmp/sai-tansu), so that it keeps topics and offsets across its own restarts. The broker-kill
# test runs a private tansu of its own, so the binary is installed even when a broker is set.
TANSU_VERSION=${TANSU_VERSION:-0.6.0}
tansu_bin() { command -v tansu 2>/dev/null || echo "${CARGO_HOME:-$HOME/.cargo}/bin/tansu"; }
ensure_kafka() {
    if [ ! -x "$(tansu_bin)" ]; then
        echo "installing tansu $TANSU_VERSION (the Kafka flows' tests; ~10 minutes, once)" >&2
        cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore,libsql >&2
    fi
    if [ -n "${SAI_TEST_KAFKA:-}" ] || listening 9092; then
        return 0
    fi
    local dir=${SAI_KAFKA_DIR:-/tmp/sai-tansu}
    mkdir -p "$dir"
    echo "starting tansu on 127.0.0.1:9092 ($dir)" >&2
    (cd "$dir" && setsid "$(tansu_bin)" broker --listener-url tcp://127.0.0.1:9092 \
        --advertised-listener-url tcp://127.0.0.1:9092 --storage-engine sqlite://tansu.db \
        > "$dir/tansu.log" 2>&1 < /dev/null &)
    await_listening 9092 tansu "$dir/tansu.log"
}

# MongoDB: SAI_TEST_MONGO_URL (default mongodb://127.0.0.1:27017) names the server of the chat
# log's tests; when it is set, nothing is installed or started. Otherwise SecantusDB (a
# MongoDB-protocol server over WiredTiger, from PyPI: a test server, never shipped) is installed
# into a virtualenv once per machine (about 10 s) and started on 127.0.0.1:27017, its data under
# $SAI_MONGO_DIR (default /tmp/sai-mongo).
SECANTUS_VERSION=${SECANTUS_VERSION:-0.7.0b3}
mongo_venv() { echo "${SAI_MONGO_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/sai-im/venv-mongo-$SECANTUS_VERSION}"; }
ensure_mongo() {
    if [ -n "${SAI_TEST_MONGO_URL:-}" ] || listening 27017; then
        return 0
    fi
    local venv
    venv=$(mongo_venv)
    if [ ! -x "$venv/bin/secantusd-py" ]; then
        echo "installing SecantusDB $SECANTUS_VERSION into $venv (the MongoDB chat log's tests)" >&2
        python3 -m venv "$venv"
        "$venv/bin/pip" install -q "SecantusDB==$SECANTUS_VERSION" >&2
    fi
    local dir=${SAI_MONGO_DIR:-/tmp/sai-mongo}
    mkdir -p "$dir/data"
    echo "starting SecantusDB on 127.0.0.1:27017 ($dir)" >&2
    (setsid "$venv/bin/secantusd-py" --host 127.0.0.1 --port 27017 --storage-path "$dir/data" \
        > "$dir/secantus.log" 2>&1 < /dev/null &)
    await_listening 27017 SecantusDB "$dir/secantus.log"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    for b in "$@"; do
        case "$b" in
            mysql) ensure_mysql ;;
            redis) ensure_redis ;;
            kafka) ensure_kafka ;;
            mongo) ensure_mongo ;;
            *) echo "unknown backend $b (mysql, redis, kafka, mongo)" >&2; exit 2 ;;
        esac
    done
fi
