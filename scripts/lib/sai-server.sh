# Sourced by the load scripts (smoke.sh, bench-report.sh, peers.sh): one embedded sai-im at a
# time on ephemeral loopback ports, with benchmark settings.
#
#   sai_start BIN DATA_DIR [sai-im flags...]   starts it (--require-friendship false), waits for
#       its ready line, sets SERVER_PID, WS (host:port) and HTTP (http://host:port); its ready
#       line and log go to DATA_DIR/ready and DATA_DIR/server.log. Exits the script, showing
#       both, if it does not start.
#   sai_stop                                   SIGTERM, and waits for it to exit.

SERVER_PID=

sai_start() {
    local bin=$1 dir=$2
    shift 2
    "$bin" --data-dir "$dir" --require-friendship false "$@" \
        --ws-listen 127.0.0.1:0 --http-listen 127.0.0.1:0 --grpc-listen 127.0.0.1:0 > "$dir/ready" 2> "$dir/server.log" &
    SERVER_PID=$!
    for _ in $(seq 600); do grep -q "sai-im ready" "$dir/ready" && break; sleep 0.05; done
    WS=$(grep -o 'ws=[^ ]*' "$dir/ready" | cut -d= -f2 || true)
    HTTP=http://$(grep -o 'http=[^ ]*' "$dir/ready" | cut -d= -f2 || true)
    [ -n "$WS" ] || { echo "sai-im did not start"; cat "$dir/ready" "$dir/server.log"; exit 1; }
}

sai_stop() {
    if [ -n "$SERVER_PID" ]; then
        kill -TERM "$SERVER_PID" 2> /dev/null || true
        wait "$SERVER_PID" 2> /dev/null || true
    fi
    SERVER_PID=
}
