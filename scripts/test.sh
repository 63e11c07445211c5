#!/usr/bin/env bash
# Runs every test of the workspace on a fresh machine: unit, property and end-to-end tests, the
# benchmarks in test mode, and the load-generator smoke. They need nothing but the Rust toolchain:
# the embedded default (SQLite) is compiled in, protoc is vendored, and the end-to-end tests start
# the real `sai-im` binary on free loopback ports with their own data directories.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo not found: install Rust with rustup (https://rustup.rs) first" >&2
    exit 1
fi
# The bundled SQLite and the vendored protoc need a C compiler.
if ! command -v cc >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && apt-get install -y -qq build-essential
    else
        echo "a C compiler (cc) is required" >&2
        exit 1
    fi
fi

cargo test --workspace --locked "$@"

# Benchmarks must keep compiling and running (one iteration each, no timing).
cargo bench --locked -p sai-benches -p sai-bitmap -- --test

# Load-generator smoke: correctness counters only.
./scripts/smoke.sh
