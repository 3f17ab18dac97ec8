#!/usr/bin/env bash
# Sets up, builds the example functions and the host (release), and runs
# `lepton up` on lepton.toml. Extra arguments go to `lepton up`, e.g.
#   ./run.sh --listen 0.0.0.0:3000
# LEPTON_PROFILE=dev ./run.sh builds a debug host instead (minutes faster to build).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$root"
./setup.sh

profile="${LEPTON_PROFILE:-release}"
echo "run: building the example functions (wasm32-wasip2)" >&2
cargo build --quiet --release --target wasm32-wasip2 \
    --manifest-path guest-examples/Cargo.toml --target-dir target/guests
echo "run: building the host ($profile; the first release build of wasmtime takes ~15 min on 2 cores)" >&2
cargo build --quiet --profile "$profile" -p lepton-host --bin lepton
dir="$profile"; [ "$profile" = dev ] && dir=debug
exec "target/$dir/lepton" up lepton.toml "$@"
