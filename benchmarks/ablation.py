"""The airbench tricks one by one: a recipe trained whole, then once without each trick (and once
with Muon), epochs and seconds to each accuracy; and the training GFLOP/s each run achieved
against the machine's measured bf16 matrix-multiply peak.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# (name, `cnnlab train` flags that take the trick away). Test-time augmentation needs no
# training: the whole recipe's model is scored again without it.
TRICKS: list[tuple[str, list[str]]] = [
    ("without whitening (stem trained from random)", ["--no-whiten", "--whiten-bias-epochs", "0"]),
    ("without dirac init", ["--model-arg", "dirac=false"]),  # with the recipe's own model_args, see _flags
    ("without the 64x batch-norm-bias rate", ["--bias-lr-scale", "1"]),
    ("without lookahead", ["--lookahead-every", "0"]),
    ("without alternating flip (random flips)", ["--no-alternate-flip"]),
    ("without label smoothing", ["--label-smoothing", "0"]),
    ("with Muon for the filters", ["--optimizer", "muon"]),
]


def peak_gflops(device: str = "cpu", seconds: float = 3.0) -> float:
    """The measured bf16 matrix-multiply rate on this machine's CPU (2048x2048) or GPU (8192x8192), GFLOP/s."""
    import torch
    size = 8192 if device == "cuda" else 2048
    a = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    b = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    a @ b
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
        if device == "cuda":
            torch.cuda.synchronize()
    return 2 * size ** 3 * n / (time.perf_counter() - start) / 1e9


def flops_per_image(run: Path) -> float:
    """FLOPs of one training step (forward and backward) per image, torch.utils.flop_counter's count,
    for the model a run saved."""
    from cnnlab.card import ModelCard
    from cnnlab.models.registry import model_from_card

    card = ModelCard.read(run / "model.json")
    return model_flops_per_image(model_from_card(card, str(run)), card.in_channels, tuple(card.image_size))


def model_flops_per_image(model: Any, channels: int, size: tuple[int, int]) -> float:
    """FLOPs of a training step (forward and backward) per image for `model` at this input shape."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(8, channels, *size)
    with FlopCounterMode(display=False) as counter:
        model.train()(x).sum().backward()
    return counter.get_total_flops() / len(x)


def _train(dataset: str, recipe: str, out: Path, flags: list[str]) -> dict[str, Any]:
    args = [sys.executable, "-m", "cnnlab", "train", "--recipe", recipe, "--dataset", dataset, "--eval-test",
            "--no-progress", "--out", str(out), *flags]
    proc = subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    return {"records": records, "final": summary["test_accuracy"], "seconds": summary["train_seconds"],
            "epochs": summary["epochs"], "images_per_second": summary["images_per_second"]}


def _evaluate(run: Path, tta: str) -> float:
    """The run's test accuracy with another test-time augmentation (`cnnlab evaluate` has none to choose)."""
    from cnnlab.evaluation.evaluate import score_split
    from cnnlab.models.classifier import Classifier

    classifier = Classifier.load(run)
    classifier.tta = tta
    return score_split(run, classifier, progress=False).report["accuracy"]


def _flags(recipe: str, flags: list[str]) -> list[str]:
    """`flags`, with the recipe's own model_args first where a --model-arg is given: --model-arg
    replaces the recipe's model_args rather than adding to them."""
    if "--model-arg" not in flags:
        return flags
    from cnnlab.training.recipes import get_recipe

    own = get_recipe(recipe).settings.get("model_args", {})
    return [x for k, v in own.items() for x in ("--model-arg", f"{k}={json.dumps(v)}")] + flags


def _reached(records: list[dict], threshold: float) -> str:
    """'epochs / seconds' of the first epoch whose test accuracy reaches the threshold, else '-'."""
    for r in records:
        if (r.get("test_accuracy") or 0) >= threshold:
            return f"{r['epoch']} / {r['elapsed_seconds']:.0f}"
    return "-"


def run(dataset: str, recipe: str, thresholds: tuple[float, ...], workdir: Path, only: list[str] | None) -> str:
    peak = peak_gflops()
    print(f"bf16 matmul peak: {peak:.0f} GFLOP/s", flush=True)
    head = ("| run | " + " | ".join(f"epochs / s to {t:.0%}" for t in thresholds)
            + " | final acc | train s | img/s | GFLOP/s (share of peak) |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    variants = [("whole recipe", [])] + [t for t in TRICKS if only is None or any(o in t[0] for o in only)]
    whole_run = None
    for name, flags in variants:
        out = workdir / f"run{len(rows)}"
        result = _train(dataset, recipe, out, _flags(recipe, flags))
        if "error" in result:
            rows.append(f"| {name} | failed: {result['error']} |")
        else:
            rate = flops_per_image(out) * result["images_per_second"] / 1e9
            reached = " | ".join(_reached(result["records"], t) for t in thresholds)
            rows.append(f"| {name} | {reached} | {result['final']:.2%} | {result['seconds']:.0f} | "
                        f"{result['images_per_second']:.0f} | {rate:.0f} ({rate / peak:.0%}) |")
            whole_run = whole_run or (out if not flags else None)
        print(rows[-1], flush=True)
    if whole_run is not None:
        for tta in ("flip", "none"):
            rows.append(f"| whole recipe, scored with test-time augmentation `{tta}` instead | | | "
                        f"{_evaluate(whole_run, tta):.2%} | | | |")
            print(rows[-1], flush=True)
    return "\n".join(rows)
