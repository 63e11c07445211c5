#!/usr/bin/env bash
# Coverage-guided fuzzing with AFL++ through cargo-afl (stable toolchain).
#
#   ./scripts/fuzz.sh <target> <seconds> [execs]   # one target: frame | handshake | im | bitmap
#   ./scripts/fuzz.sh all 60                        # each target for 60 s (what CI runs)
#
# Installs cargo-afl and builds AFL++'s runtime when missing, builds the instrumented targets,
# then runs afl-fuzz from the committed corpus (fuzz/corpus/<target>) until the time or the
# execution count (if given) is reached. Fails if AFL saved any crash or hang; the findings stay
# in $FUZZ_OUT/<target> (default /tmp/sai-fuzz). With MERGE=1 the final queue replaces the
# committed corpus. Prints one summary line per target.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=${1:?target: frame, handshake, im, bitmap or all}
SECS=${2:-60}
EXECS=${3:-}
OUT=${FUZZ_OUT:-/tmp/sai-fuzz}

if ! command -v cargo-afl >/dev/null 2>&1; then
    cargo install cargo-afl --locked
fi
# Builds AFL++ once per toolchain; says so (and fails) when it is already built.
cargo afl config --build >/dev/null 2>&1 || true

(cd fuzz && cargo afl build --release --locked --features afl)

# Headless, no core-dump handler or CPU governor requirements on CI machines.
export AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_QUIET=1
# Bind to a free core when there is one (4x the speed of an unbound run here), never fail for want
# of one.
export AFL_SKIP_CRASHES=1 AFL_TRY_AFFINITY=1

run() {
    local t=$1 dir="$OUT/$1"
    rm -rf "$dir"
    mkdir -p "$dir"
    local limit=(-V "$SECS")
    [ -n "$EXECS" ] && limit+=(-E "$EXECS")
    cargo afl fuzz -i "fuzz/corpus/$t" -o "$dir" "${limit[@]}" -- "fuzz/target/release/$t" \
        > "$dir/afl.log" 2>&1 || { tail -20 "$dir/afl.log"; return 1; }
    local stats="$dir/default/fuzzer_stats"
    local execs crashes hangs paths
    execs=$(awk -F': *' '/^execs_done/ {print $2}' "$stats")
    crashes=$(awk -F': *' '/^saved_crashes/ {print $2}' "$stats")
    hangs=$(awk -F': *' '/^saved_hangs/ {print $2}' "$stats")
    paths=$(awk -F': *' '/^corpus_count/ {print $2}' "$stats")
    echo "fuzz $t: ${execs} execs, corpus ${paths}, crashes ${crashes}, hangs ${hangs}"
    if [ "${MERGE:-0}" = 1 ] && [ "$crashes" = 0 ]; then
        # AFL keeps only inputs that reached new coverage, so its queue is the corpus. (afl-cmin
        # would shrink it further, but finds no coverage in persistent-mode Rust targets.)
        rm -rf "fuzz/corpus/$t"
        mkdir -p "fuzz/corpus/$t"
        # Short, stable names: the content's hash.
        for f in "$dir"/default/queue/id:*; do cp "$f" "fuzz/corpus/$t/$(sha1sum "$f" | cut -c1-16)"; done
    fi
    if [ "$crashes" != 0 ] || [ "$hangs" != 0 ]; then
        echo "fuzz $t: findings in $dir/default/crashes and hangs" >&2
        return 1
    fi
}

if [ "$TARGET" = all ]; then
    for t in frame handshake im bitmap; do run "$t"; done
else
    for t in $TARGET; do run "$t"; done
fi
