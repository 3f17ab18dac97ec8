#!/usr/bin/env bash
# Sets up and runs every test of the workspace (debug builds), and checks that
# the benchmarks compile. This is what CI runs (.ci/run).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$root"
./setup.sh

# Benchmarks are compiled (dev profile: no second, release build of wasmtime), not run.
cargo build --workspace --benches
cargo test --workspace
