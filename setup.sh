#!/usr/bin/env bash
# Installs what building, running and testing Lepton needs. Safe to run again:
# each step is skipped when its result is already there.
#
#   ./setup.sh    # then `cargo test`, `cargo run -p lepton-host -- up`, ...
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$root"

say() { printf 'setup: %s\n' "$*" >&2; }

# Guests are built for wasm32-wasip2.
if ! rustup target list --installed | grep -qx wasm32-wasip2; then
    say "adding the wasm32-wasip2 Rust target"
    rustup target add wasm32-wasip2
fi
