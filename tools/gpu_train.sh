#!/usr/bin/env bash
# One prepared training run on a lent GPU machine (docs/training.md, "GPU route").
#
# Here, first:  python -m lungnode.training pack ct-gpu
#               pip download --no-deps --only-binary=:all: -d .devcarry/wheels monai==1.6.1
# On the device (run tool, carry [".devcarry"]):  bash tools/gpu_train.sh [RECIPE]
# Back in $OUT: metrics.csv, curves.png, train.log and the bundle split into parts under 16 MiB
# (join them: cat bundle.part-* > lungnode-ct.safetensors).
set -euo pipefail
recipe="${1:-ct-gpu}"
out="${OUT:-/tmp/gpu-out}"
mkdir -p "$out"
python3 -m pip install --quiet --no-deps --no-index .devcarry/wheels/*.whl
export PYTHONPATH="$PWD"
nvidia-smi -L || true
run=/tmp/lungnode-run
python3 -m lungnode.training train "$recipe" --out "$run" --export "$run/bundle.safetensors" \
    --no-progress 2>&1 | tee "$out/train.log"
cp "$run/metrics.csv" "$run/curves.png" "$out/" 2>/dev/null || true
split -b 15m -d "$run/bundle.safetensors" "$out/bundle.part-"
sha256sum "$run/bundle.safetensors" | tee "$out/bundle.sha256"
