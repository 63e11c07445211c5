#!/usr/bin/env bash
# The hostile set of issue 10 against the release binary: builds sai-im and loadgen, runs
# scripts/hostile.py (every check on a fresh server) and writes results/reliability/hostile.md
# (the table) and hostile.json. Exit status 1 if any check did not hold.
#
#   ./scripts/reliability.sh                 # every check
#   ONLY=kill ./scripts/reliability.sh       # checks whose name contains "kill"
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/reliability}
cargo build --release --locked -p sai-im -p loadgen
exec python3 scripts/hostile.py --bin target/release/sai-im --loadgen target/release/loadgen \
    --out "$OUT" ${ONLY:+--only "$ONLY"}
