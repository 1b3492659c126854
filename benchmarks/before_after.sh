#!/usr/bin/env bash
# Speed of this checkout against an earlier revision, side by side with the same Python and the same
# packages: the fast recipe's training time (alternating runs), then `cnnlab serve` under 16 clients
# and `cnnlab predict` over 10,000 PNGs, each tree in turn on the same model.
#
#   benchmarks/before_after.sh REV [ROUNDS]     e.g. benchmarks/before_after.sh cd3bf59 2
#
# Run from the repository root with the project's venv (make install); it writes nothing here.
set -euo pipefail
rev=${1:?usage: benchmarks/before_after.sh REV [ROUNDS]}
rounds=${2:-2}
python=${PYTHON:-.venv/bin/python}
work=$(mktemp -d /tmp/cnnlab-before-after-XXXXXX)
trap 'rm -rf "$work"' EXIT

mkdir -p "$work/before"
git archive "$rev" | tar -x -C "$work/before"
trees=("before:$work/before" "after:$(pwd)")

# how a tree runs its benchmarks: inside the package before they moved to benchmarks/
bench() {  # TREE ARGS...
    local tree=$1; shift
    if [ -f "$tree/src/cnnlab/bench.py" ]; then
        (cd "$tree" && PYTHONPATH="$tree/src" "$python" -m cnnlab.bench "$@")
    else
        (cd "$tree" && PYTHONPATH="$tree/src:$tree" "$python" -m benchmarks "$@")
    fi
}

echo "revision $rev against $(git rev-parse --short HEAD)$(git diff --quiet || echo ' (with uncommitted changes)')"
for round in $(seq "$rounds"); do
    for entry in "${trees[@]}"; do
        name=${entry%%:*} tree=${entry#*:}
        PYTHONPATH="$tree/src" "$python" -m cnnlab train --recipe fast --no-progress --out "$work/$name-$round" >/dev/null
        "$python" -c "import json, sys; s = json.load(open(sys.argv[1])); \
print(f'train fast  {sys.argv[2]:<6} round {sys.argv[3]}: {s[\"train_seconds\"]:.1f} s, test accuracy {s[\"test_accuracy\"]:.4f}')" \
            "$work/$name-$round/summary.json" "$name" "$round"
    done
done

model="$work/after-1"  # one model for both trees' deployment benchmarks
for entry in "${trees[@]}"; do
    name=${entry%%:*} tree=${entry#*:}
    echo "== $name: serve, 16 clients"
    bench "$tree" serve "$model" --clients 16 --seconds 30 | grep "^{"
    echo "== $name: predict, 10,000 PNGs"
    bench "$tree" predict "$model" --images 10000 | grep "^{"
done
