#!/usr/bin/env bash
# The trainings whose figures docs/tutorial.md (and its Chinese version) quote, in full, one after
# the other: the tutorial's own net.py on Fashion-MNIST (section 6 and the tips of section 10) and on
# CIFAR-10's JPEG copy (section 9). Prints each setting's test accuracy: the mean over the seeds
# (SEEDS, default "0 1 2": one seed alone cannot tell a tip's effect from chance) and each seed's.
#
#   benchmarks/tutorial.sh [CIFAR_FOLDER]     (default ~/.cache/cnnlab/cifar10-jpeg; missing: skipped)
#   WITH_RECIPE=1 benchmarks/tutorial.sh      also the cifar recipe (about 7 minutes more)
#
# Run from the repository root with the project's venv (make install); it writes nothing here.
set -euo pipefail
cifar=${1:-$HOME/.cache/cnnlab/cifar10-jpeg}
root=$(pwd)
work=$(mktemp -d /tmp/cnnlab-tutorial-XXXXXX)
trap 'rm -rf "$work"' EXIT
export PATH="$root/.venv/bin:$PATH"
cd "$work"

# net.py exactly as the tutorial writes it: the block after its `test: file net.py` marker
awk '/<!-- test: file net.py -->/ {found=1; next} found && /^```python/ {inside=1; next}
     inside && /^```/ {exit} inside {print}' "$root/docs/tutorial.md" > net.py
[ -s net.py ] || { echo "no net.py block found in docs/tutorial.md"; exit 1; }

run() {  # NAME SEEDS FLAGS...: one run per seed, then the mean and the range of the test accuracy
    local name=$1 seeds=$2; shift 2
    for seed in $seeds; do
        cnnlab train --model "${MODEL:-net.py:Net}" "$@" --seed "$seed" --out "runs/$name-s$seed" --no-progress \
            > "$name-s$seed.log" 2>&1 || { tail -5 "$name-s$seed.log"; exit 1; }
    done
    python - "$name" "$seeds" "$*" <<'PY'
import json, sys
name, seeds, flags = sys.argv[1], sys.argv[2].split(), sys.argv[3]
runs = [json.load(open(f"runs/{name}-s{seed}/summary.json")) for seed in seeds]
acc = [100 * r["test_accuracy"] for r in runs]
secs = [r["train_seconds"] for r in runs]
each = " ".join(f"{a:.2f}" for a in acc)
kept = " ".join(str(r.get("kept_epoch", "-")) for r in runs)
print(f"{name:<26} test {sum(acc) / len(acc):6.2f}%  (seeds {sys.argv[2]}: {each})  train {min(secs):5.1f}-"
      f"{max(secs):5.1f} s  kept epochs {kept}  [{flags}]", flush=True)
PY
}

seeds=${SEEDS:-0 1 2}
echo "$(python -c 'import platform, torch; print(platform.processor() or platform.machine(), "torch", torch.__version__)'), $(nproc) cores; seeds $seeds"
run fmnist-net "$seeds" --epochs 10                                      # section 6; 10.3's baseline
run tip-aug-on "$seeds" --epochs 5                                       # 10.1
run tip-aug-off "$seeds" --epochs 5 --translate 0 --flip off
run tip-small-aug-on "$seeds" --epochs 20 --limit-train 5000             # 10.1, 5,000 training images
run tip-small-aug-off "$seeds" --epochs 20 --limit-train 5000 --translate 0 --flip off
run tip-sgd "$seeds" --epochs 5 --optimizer sgd                          # 10.2
run tip-adamw-constant "$seeds" --epochs 5 --schedule constant
MODEL=fastnet run tip-fastnet-small-aug-on "$seeds" --epochs 20 --limit-train 5000   # 10.1, a larger network
MODEL=fastnet run tip-fastnet-small-aug-off "$seeds" --epochs 20 --limit-train 5000 --translate 0 --flip off
run tip-val "$seeds" --epochs 10 --val-split 0.1 --early-stop 2          # 10.3
run tip-python 0 --epochs 10 --translate 0 --flip off --optimizer sgd --schedule cosine --val-split 0.1 --early-stop 2
if [ -d "$cifar/train" ]; then
    run cifar-net 0 --dataset "folder:$cifar" --epochs 5                 # section 9
    if [ -n "${WITH_RECIPE:-}" ]; then
        /usr/bin/time -f "cifar recipe: %e s wall" cnnlab train --dataset "folder:$cifar" --recipe cifar \
            --out runs/cifar-recipe --no-progress > recipe.log 2>&1
        grep -E "^(training|schedule|epoch|test accuracy)" recipe.log
    fi
else
    echo "no CIFAR-10 JPEG copy in $cifar: section 9 skipped"
fi
