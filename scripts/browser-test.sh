#!/usr/bin/env bash
# The web client's story in headless Chromium against a real sai-im (web/tests/chat.test.mjs).
# Installs what it needs when missing: Debian's chromium, Node.js and npm, and the pinned
# playwright-core (web/tests/package-lock.json; it drives the system chromium, it downloads no
# browser of its own). SAI_SCREENSHOTS=<dir> also saves the screenshots (docs/screenshots/ is
# made this way).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt() { # package...
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "install $* first" >&2
        exit 1
    fi
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
command -v chromium >/dev/null 2>&1 || need_apt chromium
command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || need_apt nodejs npm

if [ ! -d web/tests/node_modules/playwright-core ]; then
    npm ci --prefix web/tests --no-audit --no-fund --loglevel=error
fi
cargo build --locked -p sai-im
SAI_IM_BIN="$PWD/target/debug/sai-im" CHROMIUM="$(command -v chromium)" \
    timeout 300 node web/tests/chat.test.mjs
