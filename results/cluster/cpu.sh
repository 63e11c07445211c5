# Sourced by the cluster benchmark scripts.
cpu() { # pids -> total CPU seconds (user + system) they have used, from /proc
    local t=0
    for p in "$@"; do
        if [ -r "/proc/$p/stat" ]; then
            t=$(awk -v t="$t" '{print t + ($14 + $15) / 100}' "/proc/$p/stat")
        fi
    done
    echo "$t"
}
