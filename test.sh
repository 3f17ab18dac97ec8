#!/usr/bin/env bash
# Sets up and runs every test of the workspace (debug builds), and checks that
# the benchmarks compile. This is what CI runs (.ci/run).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$root"
./setup.sh

# The ops tests read the metrics page with Prometheus' own Python parser
# (prometheus-client, in the venv setup.sh made) and drive the status page in
# Debian's Chromium, headless.
# Python functions build with componentize-py (tests/integration/python.rs).
if ! .cache/venv/bin/python -c "import prometheus_client, tritonclient.http" 2>/dev/null \
    || [ "$(.cache/venv/bin/componentize-py --version 2>/dev/null)" != "componentize-py 0.25.1" ]; then
    echo "test: installing prometheus-client, tritonclient[http] and componentize-py into .cache/venv" >&2
    .cache/venv/bin/python -m pip install --quiet --disable-pip-version-check \
        --only-binary=:all: prometheus-client==0.21.1 "tritonclient[http]==2.73.0" componentize-py==0.25.1
fi
if ! command -v chromium >/dev/null 2>&1; then
    echo "test: installing Debian's chromium (headless browser tests)" >&2
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

# Benchmarks are compiled (dev profile: no second, release build of wasmtime), not run.
cargo build --workspace --benches
cargo test --workspace
