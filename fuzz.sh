#!/usr/bin/env bash
# Long fuzzing runs, outside CI (CI runs the same targets with short counts):
# every in-process property target and the raw HTTP fuzzer against a real node.
#   ./fuzz.sh              # 1,000,000 cases per target
#   CASES=10000 ./fuzz.sh  # fewer
set -euo pipefail
cd "$(dirname "$0")"
cases="${CASES:-1000000}"
[ -e .cache/onnxruntime/libonnxruntime.so ] || ./setup.sh
# Compiling a generated component takes milliseconds: that target gets a hundredth.
PROPTEST_CASES="$cases" cargo test --release -p lepton-host --lib fuzz:: -- \
  --skip generated_components
PROPTEST_CASES="$(( cases / 100 > 0 ? cases / 100 : 1 ))" cargo test --release -p lepton-host --lib \
  fuzz::generated_components
LEPTON_FUZZ_CASES="$cases" LEPTON_FUZZ_SEED="${SEED:-$RANDOM}" cargo test --release -p lepton-host \
  --test integration -- --nocapture adversarial::raw_http_fuzzing
