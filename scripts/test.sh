#!/usr/bin/env bash
# Runs every check of the workspace on a fresh machine: formatting, clippy with the workspace lints
# as errors, unit, property and end-to-end tests, the benchmarks in test mode, and the
# load-generator smoke. They need the Rust toolchain and a MySQL server (MariaDB, which
# scripts/backends.sh installs and starts when missing): the embedded default (SQLite) is compiled
# in, protoc is vendored, and the end-to-end tests start the real `sai-im` binary on free loopback
# ports with their own data directories (and, in their MySQL run, their own databases).
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

# Formatting and the workspace lints are enforced, not only declared.
if ! cargo fmt --version >/dev/null 2>&1; then rustup component add rustfmt; fi
if ! cargo clippy --version >/dev/null 2>&1; then rustup component add clippy; fi
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

# The layering the README's architecture section promises: the contract crate names no runtime,
# socket library or driver, and the gateway and the services never import each other.
deps() { cargo tree --locked -e normal -p "$1" --prefix none --format '{p}' | cut -d' ' -f1 | sort -u; }
forbidden() { # crate, pattern
    if deps "$1" | grep -qE "^($2)$"; then
        echo "layering violated: $1 depends on $(deps "$1" | grep -E "^($2)$" | tr '\n' ' ')" >&2
        exit 1
    fi
}
forbidden sai-pipeline 'tokio|monoio|mio|sqlx|rusqlite|axum|tonic|sai-gateway|sai-services|sai-proto'
forbidden sai-services 'sai-gateway|sai-proto|monoio'
forbidden sai-gateway 'sai-services|sai-storage|sqlx|rusqlite'
forbidden sai-cluster 'sai-gateway|sai-services|sai-proto|monoio|sqlx|rusqlite'

# The MySQL adapter's conformance tests and the end-to-end suites on MySQL need a MySQL server
# (MariaDB on 127.0.0.1:3306, or SAI_TEST_MYSQL_URL's), the cluster's route directory a Redis
# (127.0.0.1:6379, or SAI_TEST_REDIS_URL's), the cluster's Kafka flows a Kafka-protocol broker
# (tansu on 127.0.0.1:9092, or SAI_TEST_KAFKA's), the MongoDB chat log a MongoDB-protocol server
# (SecantusDB on 127.0.0.1:27017, or SAI_TEST_MONGO_URL's): installed and started when missing.
./scripts/backends.sh mysql redis kafka mongo

# Every suite on the default engine, direct (the test harness checks that the server did not
# fall back to monoio), then the end-to-end suites once more on the monoio engine, and once
# more with each server on a MySQL database of its own instead of the embedded SQLite.
SAI_ENGINE=direct cargo test --workspace --locked "$@"
SAI_ENGINE=monoio cargo test --locked -p sai-im --tests "$@"
SAI_ENGINE=direct SAI_TEST_DATABASE=mysql cargo test --locked -p sai-im --tests "$@"

# The web client served by sai-im, through its whole story in headless Chromium (installed,
# with Node.js and playwright-core, when missing).
SAI_ENGINE=direct ./scripts/browser-test.sh

# Benchmarks must keep compiling and running (one iteration each, no timing).
cargo bench --locked -p sai-benches -p sai-bitmap -- --test

# Load-generator smoke on both engines: correctness counters only.
SAI_ENGINE=direct ./scripts/smoke.sh
SAI_ENGINE=monoio ./scripts/smoke.sh
# loadgen's peer targets against Mosquitto, nats-server and ejabberd (started here on ports of
# their own, ejabberd installed when missing): every scenario they support, correctness only.
./scripts/peers.sh smoke

# The benchmark regression report (about two minutes): a short benchmark compared with
# results/baseline/ci/, written to $BENCH_REPORT_DIR (default target/bench-report/report.md)
# for CI to publish; fails on any correctness failure, and on a speed figure worse than the
# reference beyond its noise band once scaled by the calibration measured in the same run.
python3 scripts/test_bench_report.py
./scripts/bench-report.sh

# The cluster script: a services process and two gateways up (each prints its ready line), down.
CLUSTER_DIR=$(mktemp -d /tmp/sai-cluster-ci.XXXXXX)
SAI_CLUSTER_DIR=$CLUSTER_DIR ./scripts/cluster.sh up --gateways 2
SAI_CLUSTER_DIR=$CLUSTER_DIR ./scripts/cluster.sh down

# Fuzzing (AFL++ through cargo-afl): the committed corpora replayed as tests, then one minute of
# coverage-guided fuzzing per target (frame codec, handshake, IM requests, bitmap); any crash or
# hang fails the run. scripts/fuzz.sh installs cargo-afl when missing.
cargo fmt --manifest-path fuzz/Cargo.toml -- --check
cargo clippy --manifest-path fuzz/Cargo.toml --all-targets --locked -- -D warnings
cargo test --manifest-path fuzz/Cargo.toml --locked
FUZZ_OUT=$(mktemp -d /tmp/sai-fuzz-ci.XXXXXX) ./scripts/fuzz.sh all "${FUZZ_SECS:-60}"
