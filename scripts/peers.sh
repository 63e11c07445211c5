#!/usr/bin/env bash
# The servers SAI-IM is compared with, on 127.0.0.1, each on a port of its own with the
# configuration in scripts/peers/ (which states its durability), and the comparison itself.
#
#   scripts/peers.sh start [mqtt|nats|xmpp ...]   start them (default: all three), installing the
#                                                 Debian package when missing
#   scripts/peers.sh stop [mqtt|nats|xmpp ...]
#   scripts/peers.sh pid mqtt|nats|xmpp           the server's pid (loadgen --server-pid)
#   scripts/peers.sh smoke                        loadgen's peer targets against each of them,
#                                                 correctness only (the test command runs it)
#   scripts/peers.sh bench [OUT]                  the same scenarios against SAI-IM (embedded
#                                                 default, each ack mode) and each peer, one after
#                                                 the other; summaries, table and charts in OUT
#                                                 (default results/peers)
#
# Ports: MQTT_PORT (11883, Mosquitto), NATS_PORT (14222, nats-server with JetStream),
# XMPP_PORT (15280, ejabberd's XMPP over WebSocket at /ws); state in PEERS_DIR (/tmp/sai-peers).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/sai-server.sh
export PATH=$PATH:/usr/sbin:/sbin
DIR=${PEERS_DIR:-/tmp/sai-peers}
MQTT_PORT=${MQTT_PORT:-11883}
NATS_PORT=${NATS_PORT:-14222}
XMPP_PORT=${XMPP_PORT:-15280}
NODE=sai-peers@localhost
# As the ejabberd user without su (whose PAM session would cut the descriptor limit to 1,024);
# HOME for the Erlang cookie.
EJ=(env HOME="$DIR/xmpp" setpriv --reuid ejabberd --regid ejabberd --init-groups ejabberdctl --config-dir "$DIR/xmpp" --ctl-config "$DIR/xmpp/ejabberdctl.cfg" --node "$NODE")

install() { # package, program
    command -v "$2" > /dev/null && return 0
    echo "installing $1"
    DEBIAN_FRONTEND=noninteractive apt-get install -y "$1" > /dev/null 2>&1 ||
        { apt-get update > /dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y "$1" > /dev/null; }
    # Debian packages may start or enable their own service: ours run on their own ports.
}

wait_port() {
    for _ in $(seq 600); do
        (echo > "/dev/tcp/127.0.0.1/$1") 2> /dev/null && return 0
        sleep 0.1
    done
    echo "nothing listens on 127.0.0.1:$1" >&2
    return 1
}

conf() { # template, out, dir, port
    sed -e "s|@PORT@|$4|g" -e "s|@DIR@|$3|g" "$1" > "$2"
}

pid_of() {
    case $1 in
        mqtt | nats) cat "$DIR/$1/pid" 2> /dev/null || true ;;
        xmpp) pgrep -f "beam.smp.*$NODE" | head -1 || true ;;
    esac
}

start_one() {
    [ -n "$(pid_of "$1")" ] && kill -0 "$(pid_of "$1")" 2> /dev/null && return 0
    mkdir -p "$DIR/$1"
    case $1 in
        mqtt)
            install mosquitto mosquitto
            conf scripts/peers/mosquitto.conf "$DIR/mqtt/mosquitto.conf" "$DIR/mqtt" "$MQTT_PORT"
            id mosquitto > /dev/null 2>&1 && chown -R mosquitto "$DIR/mqtt"
            mosquitto -c "$DIR/mqtt/mosquitto.conf" > /dev/null 2>&1 &
            echo $! > "$DIR/mqtt/pid"
            wait_port "$MQTT_PORT"
            ;;
        nats)
            install nats-server nats-server
            conf scripts/peers/nats.conf "$DIR/nats/nats.conf" "$DIR/nats" "$NATS_PORT"
            nats-server -c "$DIR/nats/nats.conf" > "$DIR/nats/log" 2>&1 &
            echo $! > "$DIR/nats/pid"
            wait_port "$NATS_PORT"
            ;;
        xmpp)
            install ejabberd ejabberdctl
            # ejabberd's Debian service would hold 5222/5280 on every interface: not ours.
            systemctl disable --now ejabberd > /dev/null 2>&1 || true
            conf scripts/peers/ejabberd.yml "$DIR/xmpp/ejabberd.yml" "$DIR/xmpp" "$XMPP_PORT"
            printf 'INET_DIST_INTERFACE=127.0.0.1\nERL_EPMD_ADDRESS=127.0.0.1\nERLANG_NODE=%s\n' "$NODE" \
                > "$DIR/xmpp/ejabberdctl.cfg"
            pgrep -x epmd > /dev/null || touch "$DIR/xmpp/our-epmd"
            mkdir -p "$DIR/xmpp/spool" "$DIR/xmpp/logs"
            touch "$DIR/xmpp/inetrc" # Erlang resolver settings: none, but it asks for the file
            id ejabberd > /dev/null 2>&1 && chown -R ejabberd "$DIR/xmpp"
            "${EJ[@]}" --config "$DIR/xmpp/ejabberd.yml" --spool "$DIR/xmpp/spool" --logs "$DIR/xmpp/logs" start
            "${EJ[@]}" started
            wait_port "$XMPP_PORT"
            ;;
        *)
            echo "unknown peer $1 (mqtt, nats, xmpp)" >&2
            return 2
            ;;
    esac
    echo "$1 on 127.0.0.1:$(port "$1"), pid $(pid_of "$1")"
}

port() {
    case $1 in mqtt) echo "$MQTT_PORT" ;; nats) echo "$NATS_PORT" ;; xmpp) echo "$XMPP_PORT" ;; esac
}

stop_one() {
    local p
    p=$(pid_of "$1")
    case $1 in
        xmpp)
            [ -n "$p" ] && { "${EJ[@]}" stop > /dev/null 2>&1 || kill "$p"; }
            for _ in $(seq 100); do [ -z "$(pid_of xmpp)" ] && break; sleep 0.1; done
            # ejabberdctl stop leaves epmd running: stop it if we started it.
            if [ -f "$DIR/xmpp/our-epmd" ]; then
                pkill -x epmd || true
                rm -f "$DIR/xmpp/our-epmd"
            fi
            ;;
        *)
            [ -n "$p" ] && kill "$p" 2> /dev/null && { wait "$p" 2> /dev/null || tail --pid="$p" -f /dev/null; }
            rm -f "$DIR/$1/pid"
            ;;
    esac
}

bench() {
    local out=${1:-results/peers}
    local users=${USERS:-2000}
    cargo build --release --locked -p sai-im -p loadgen
    local bin=target/release/sai-im lg=target/release/loadgen
    # Globals: the EXIT trap runs after this function has returned.
    data=$(mktemp -d /tmp/sai-peers-bench.XXXXXX)
    trap 'sai_stop; for p in mqtt nats xmpp; do stop_one $p; done; rm -rf "$data"' EXIT
    # ONLY="xmpp nats" measures those again and keeps the other runs.
    local only=${ONLY:-sai-none sai-only sai-rigor mqtt nats xmpp}
    for t in $only; do rm -rf "${out:?}/$t"; done
    "$bin" --data-dir "$data/seed" admin seed-users --count "$users" --prefix load > /dev/null
    # The scenarios, each on a fresh server: handshakes and memory (connections offered at
    # 20,000/s), p99 at one offered rate, the capacity search, group fan-out. The traffic
    # scenarios connect at 1,000/s, which every target takes (ejabberd's logins top out near
    # 1,400/s here), so that their measured phase starts with every user online.
    local scenarios=(
        "connect|connect --users $users --connect-rate 20000 --hold 3"
        "chat|chat --users $users --connect-rate 1000 --rate ${CHAT_RATE:-2000} --duration 8"
        "group|group --groups 10 --size $((users / 20)) --connect-rate 1000 --rate-per-group 10 --duration 5"
    )
    # The capacity search is the noisiest figure on two shared cores: CAP_REPS searches
    # (default 3), each on a fresh server; the report takes the median.
    local r
    for r in $(seq "${CAP_REPS:-3}"); do
        scenarios+=("capacity-$r|capacity --users $users --connect-rate 1000 --start-rate 2000 --step-rate 2000 --max-rate 40000 --step-secs 5 --drain 5")
    done
    run() { # target label scenario-line extra-args...
        local target=$1 label=$2 line=$3
        shift 3
        local name=${line%%|*} args=${line#*|}
        mkdir -p "$out/$label"
        # shellcheck disable=SC2086
        timeout 300 "$lg" $args --target "$target" --prefix load --quiet --out "$out/$label/$name" "$@" \
            > "$out/$label/$name.txt" 2>&1 || echo "($label $name exited $?)"
        grep -E "^(verdict|e2e |handshake |rate   (capacity_msgs_per_s|connect_per_s))" "$out/$label/$name.txt" |
            sed "s/^/  $label $name: /" || true
    }
    for mode in none only rigor; do
        [[ " $only " == *" sai-$mode "* ]] || continue
        for line in "${scenarios[@]}"; do
            rm -rf "$data/run"
            cp -r "$data/seed" "$data/run"
            sai_start "$bin" "$data/run" --ack-mode "$mode"
            run sai "sai-$mode" "$line" --ws "$WS" --http "$HTTP" --data-dir "$data/run" --ack-mode "$mode" --server-pid "$SERVER_PID"
            sai_stop
        done
    done
    rm -rf "$DIR"
    for p in mqtt nats xmpp; do
        [[ " $only " == *" $p "* ]] || continue
        local extra=()
        [ "$p" = xmpp ] && extra=(--peer-password loadgen-pw)
        for line in "${scenarios[@]}"; do
            start_one "$p" > /dev/null
            if [ "$p" = xmpp ]; then
                # Accounts first (in-band registration), so handshakes below are logins only;
                # again until none failed (an existing account is fine). Every scenario gets
                # this pass: the first logins after ejabberd starts can hang (one in 2,000 timed
                # out in each run without it).
                for _ in 1 2 3; do
                    "$lg" connect --target xmpp --ws "127.0.0.1:$XMPP_PORT" --xmpp-register "${extra[@]}" \
                        --users "$users" --connect-rate 500 --hold 0 --prefix load --quiet > "$DIR/xmpp-register.txt" 2>&1 || true
                    grep -q "^fail" "$DIR/xmpp-register.txt" || break
                done
            fi
            run "$p" "$p" "$line" --ws "127.0.0.1:$(port "$p")" --ack-mode only --server-pid "$(pid_of "$p")" "${extra[@]}"
            stop_one "$p"
        done
    done
    python3 scripts/peers_report.py "$out"
}

smoke() {
    cargo build --release --locked -p loadgen
    local lg=target/release/loadgen
    log=$(mktemp /tmp/sai-peers-smoke.XXXXXX) # global: the EXIT trap uses it
    trap 'for p in mqtt nats xmpp; do stop_one $p; done; rm -f "$log"' EXIT
    rm -rf "$DIR"
    for p in mqtt nats xmpp; do
        start_one "$p"
        local common=(--target "$p" --ws "127.0.0.1:$(port "$p")" --server-pid "$(pid_of "$p")" --quiet --drain 10)
        [ "$p" = xmpp ] && common+=(--peer-password smoke-pw --xmpp-register)
        for args in "connect --users 300 --hold 1" "chat --users 300 --rate 300 --duration 2" \
            "group --groups 3 --size 20 --rate-per-group 5 --duration 2" \
            "capacity --users 200 --start-rate 200 --step-rate 200 --max-rate 400 --step-secs 1" \
            "chat --users 100 --rate 100 --duration 1 --ack-mode none"; do
            # shellcheck disable=SC2086
            timeout 120 "$lg" $args "${common[@]}" > "$log" 2>&1 || { cat "$log"; echo "peers smoke: $p $args failed"; exit 1; }
            if grep -qE "^fail" "$log" || ! grep -q "^verdict: ok" "$log"; then
                cat "$log"
                echo "peers smoke: $p $args: failures above"
                exit 1
            fi
            echo "  $p ${args%% *}: $(grep -E '^count  (delivered|missing) ' "$log" | tr -s ' ' | tr '\n' ' ')"
        done
        stop_one "$p"
    done
    echo "peers smoke: ok"
}

cmd=${1:-}
shift || true
case $cmd in
    start) for p in "${@:-mqtt nats xmpp}"; do for q in $p; do start_one "$q"; done; done ;;
    stop) for p in "${@:-mqtt nats xmpp}"; do for q in $p; do stop_one "$q"; done; done ;;
    pid) pid_of "$1" ;;
    bench) bench "$@" ;;
    smoke) smoke ;;
    *)
        sed -n '2,16p' "$0"
        exit 2
        ;;
esac
