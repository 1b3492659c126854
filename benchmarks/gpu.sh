#!/usr/bin/env bash
# Times cnnlab's recipes on one CUDA GPU, from a bare machine that has PyTorch but no internet.
#
#   bash benchmarks/gpu.sh [DATA_DIR]
#
# DATA_DIR (default .data, git-ignored) must hold fashion-mnist/*.gz (the four IDX files) and
# cifar10-jpeg.tar.gz; fill it on a machine with the data:
#   mkdir -p .data/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz .data/fashion-mnist/
#   cp ../shared/datasets/cifar10-jpeg.tar.gz .data/
# Python packages cnnlab needs beyond torch/torchvision (safetensors, torchmetrics, tqdm, pyyaml)
# are installed from PyPI when reachable, or from wheels in .whl/ when not.
# Results go to stdout and, as JSON, to ${OUT:-.}/gpu-*.json.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-.data}
OUTDIR=${OUT:-.}
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export CNNLAB_DATA="$PWD/$DATA" CNNLAB_CACHE="${TMPDIR:-/tmp}/cnnlab-cache"

python3 - <<'PY' || { echo "missing Python packages: see the header of benchmarks/gpu.sh"; exit 1; }
import importlib, subprocess, sys
need = [m for m in ("torchvision", "safetensors", "torchmetrics", "tqdm", "yaml") if importlib.util.find_spec(m) is None]
if need:
    names = {"yaml": "pyyaml"}
    cmd = [sys.executable, "-m", "pip", "install", "-q", *[names.get(m, m) for m in need]]
    import glob
    if glob.glob(".whl/*.whl"):
        cmd[4:4] = ["--no-index", "--find-links", ".whl"]
    subprocess.check_call(cmd)
import torch
assert torch.cuda.is_available(), "no CUDA GPU visible"
print("GPU:", torch.cuda.get_device_name(0), "torch", torch.__version__)
PY

mkdir -p "$CNNLAB_CACHE"
if [ ! -d "$CNNLAB_CACHE/cifar10-jpeg/train" ] && [ -f "$DATA/cifar10-jpeg.tar.gz" ]; then
    mkdir -p "$CNNLAB_CACHE/cifar10-jpeg" && tar -xzf "$DATA/cifar10-jpeg.tar.gz" -C "$CNNLAB_CACHE/cifar10-jpeg"
fi

python3 -m benchmarks recipes --dataset fashion-mnist --recipes fast,balanced,best --baseline-epochs 0 \
    --thresholds 0.93,0.94,0.95 --json "$OUTDIR/gpu-fashion-mnist.json" -- --device cuda
if [ -d "$CNNLAB_CACHE/cifar10-jpeg/train" ]; then
    # goal: >= 94% in < 5 s of training on one H100/H200-class GPU
    python3 -m benchmarks recipes --dataset "folder:$CNNLAB_CACHE/cifar10-jpeg" --recipes cifar,cifar-best \
        --baseline-epochs 0 --thresholds 0.90,0.93,0.94 --json "$OUTDIR/gpu-cifar10-jpeg.json" -- --device cuda
fi
