"""Benchmarks (not tests): time-to-accuracy of the recipes against a conventional baseline,
and the measured effect of each speed lever. `python -m benchmarks --help`.

Every measurement runs in its own subprocess, so peak RSS is per run and runs do not share
warm caches. Times are training wall time (evaluation excluded), as in metrics.jsonl.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

THRESHOLDS = (0.90, 0.915, 0.93, 0.94, 0.95)
# benchmarks/ is not installed: a child running `-m benchmarks` finds it through the repository root.
REPO_ROOT = Path(__file__).resolve().parent.parent


def _child_env() -> dict[str, str]:
    """This process's environment with the repository root first on PYTHONPATH, whatever the cwd."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), *([path] if path else [])])}


def machine() -> str:
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        cpu += " with AVX512-BF16" if "avx512_bf16" in info else ""
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {os.cpu_count()} CPU threads{gpu}, torch {torch.__version__}, Python {platform.python_version()}"


def _run_child(args: list[str]) -> tuple[float, int, int]:
    """Run a child process; (wall seconds, exit status, peak RSS in MiB)."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_child_env())
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read() if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        print(err[-2000:], file=sys.stderr)
    return wall, proc.returncode, usage.ru_maxrss // 1024


def _time_to(records: list[dict], threshold: float) -> float | None:
    for r in records:
        if r.get("test_accuracy") is not None and r["test_accuracy"] >= threshold:
            return r["elapsed_seconds"]
    return None


def bench_recipe(recipe: str, dataset: str, workdir: Path, extra: list[str]) -> dict[str, Any]:
    out = workdir / f"recipe-{recipe}"
    wall, code, rss = _run_child([sys.executable, "-m", "cnnlab", "train", "--recipe", recipe, "--dataset", dataset,
                                  "--eval-test", "--no-progress", "--out", str(out), *extra])
    if code != 0:
        return {"name": recipe, "error": f"exit status {code}"}
    from benchmarks.ablation import flops_per_image

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    return {"name": recipe, "records": records, "final_accuracy": summary["test_accuracy"],
            "train_seconds": summary["train_seconds"], "images_per_second": summary["images_per_second"],
            "process_seconds": round(wall, 1), "peak_rss_mib": rss, "epochs": summary["epochs"],
            "gflops": round(flops_per_image(out) * summary["images_per_second"] / 1e9, 1)}


def bench_baseline(dataset: str, workdir: Path, epochs: int) -> dict[str, Any]:
    out = workdir / "baseline.json"
    wall, code, rss = _run_child([sys.executable, "-m", "benchmarks", "_baseline", "--dataset", dataset,
                                  "--epochs", str(epochs), "--json", str(out)])
    if code != 0:
        return {"name": "baseline", "error": f"exit status {code}"}
    from benchmarks.ablation import model_flops_per_image
    from cnnlab.models.registry import create_model

    result = json.loads(out.read_text())
    flops = model_flops_per_image(create_model("simple", 1, 10), 1, (28, 28))  # defined on fashion-mnist
    return {**result, "process_seconds": round(wall, 1), "peak_rss_mib": rss,
            "gflops": round(flops * result["images_per_second"] / 1e9, 1)}


def bench_ddp(nprocs: list[int], recipe: str, extra: list[str]) -> str:
    """The same training in 1 and in N data-parallel processes, one after another."""
    rows = ["| processes | train s | test accuracy | train img/s | peak RSS per process MiB | peak RSS total MiB "
            "| process wall s |", "|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="cnnlab-ddp-bench-") as tmp:
        for n in nprocs:
            out = Path(tmp) / f"n{n}"
            wall, code, _ = _run_child([sys.executable, "-m", "cnnlab", "train", "--recipe", recipe, "--nproc", str(n),
                                        "--no-progress", "--out", str(out), *extra])
            if code != 0:
                rows.append(f"| {n} | failed: exit status {code} | | | | | |")
                continue
            s = json.loads((out / "summary.json").read_text())
            rss = s["peak_rss_mib"]
            rows.append(f"| {n} | {s['train_seconds']:.1f} | {100 * s['test_accuracy']:.2f}% | "
                        f"{s['images_per_second']:.0f} | {' / '.join(map(str, rss))} | {sum(rss)} | {wall:.1f} |")
            print(rows[-1], flush=True)
    return "\n".join(rows)


def run_baseline(dataset: str, epochs: int, json_out: Path) -> None:
    """The conventional way: torchvision dataset object, per-sample transforms, DataLoader, the
    `simple` model, Adadelta (lr 1.0, x0.7 per epoch), batch 64, fp32, as in PyTorch's MNIST example."""
    import torch
    import torchvision
    from torch.utils.data import DataLoader
    from torchvision import transforms

    from cnnlab.data.builtin import get_source, locate_or_download
    from cnnlab.models.registry import create_model

    if dataset != "fashion-mnist":
        raise SystemExit("the conventional baseline is defined on fashion-mnist")
    torch.manual_seed(0)
    # torchvision's class wants uncompressed files under FashionMNIST/raw: prepare them (not timed).
    root = Path(tempfile.mkdtemp(prefix="cnnlab-baseline-"))
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    src = locate_or_download(get_source("fashion-mnist"))
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        plain, packed = src / name, src / f"{name}.gz"
        (raw / name).write_bytes(plain.read_bytes() if plain.is_file() else gzip.decompress(packed.read_bytes()))
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.2860,), (0.3530,))])
    train_set = torchvision.datasets.FashionMNIST(str(root), train=True, transform=tf)
    test_set = torchvision.datasets.FashionMNIST(str(root), train=False, transform=tf)
    train_loader = DataLoader(train_set, batch_size=64, shuffle=True)
    test_loader = DataLoader(test_set, batch_size=1000)
    model = create_model("simple", 1, 10)
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    records, elapsed, seen = [], 0.0, 0
    for epoch in range(1, epochs + 1):
        model.train()
        start = time.perf_counter()
        for images, labels in train_loader:
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            seen += len(labels)
        scheduler.step()
        elapsed += time.perf_counter() - start
        model.eval()
        correct = 0
        with torch.no_grad():
            for images, labels in test_loader:
                correct += (model(images).argmax(1) == labels).sum().item()
        records.append({"epoch": epoch, "elapsed_seconds": round(elapsed, 3), "test_accuracy": correct / len(test_set)})
        print(f"baseline epoch {epoch}: {records[-1]}", file=sys.stderr, flush=True)
    shutil.rmtree(root, ignore_errors=True)
    json_out.write_text(json.dumps({"name": "baseline (simple, DataLoader)", "records": records,
                                    "final_accuracy": records[-1]["test_accuracy"], "train_seconds": round(elapsed, 3),
                                    "images_per_second": round(seen / elapsed, 1), "epochs": epochs}))


def _step_rate(bundle, model_name: str, model_args: dict, *, batch: int, bf16: bool, channels_last: bool,
               augment: bool = True, compile_model: bool = False, steps: int = 40) -> tuple[float, float]:
    """(training images/s over `steps` steps after warm-up, seconds of warm-up incl. any compilation),
    on the CPU, set up as `cnnlab train` sets up (cnnlab.training.setup) from the `none` recipe."""
    import torch

    from cnnlab.devices import autocast
    from cnnlab.training.config import make_config
    from cnnlab.training.setup import build_setup

    config = make_config(recipe="none", model=model_name, model_args=model_args, batch_size=batch,
                         precision="bf16" if bf16 else "fp32", channels_last=channels_last, device="cpu",
                         translate=2 if augment else 0, flip="on" if augment else "off", progress=False)
    setup = build_setup(config, bundle=bundle)
    step_fn = torch.compile(setup.model) if compile_model else setup.model
    setup.model.train()
    batches = (batch_ for _ in range(steps + 5) for batch_ in setup.data.train_loader)  # as many epochs as it takes
    start = time.perf_counter()
    for i in range(steps + 5):
        if i == 5:
            warm = time.perf_counter() - start
            start = time.perf_counter()
        x, y = next(batches)
        with autocast(setup.device, setup.bf16):
            loss = setup.loss_fn(step_fn(x), y)
        setup.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        setup.optimizer.step()
        setup.scheduler.step()
    return steps * batch / (time.perf_counter() - start), warm


def bench_levers(dataset: str, include_compile: bool) -> str:
    """Each speed lever switched on its own against the reference setting, side by side."""
    import torch

    from cnnlab.data.load import load_dataset
    from cnnlab.data.split import Split
    from cnnlab.devices import bf16_supported

    bundle = load_dataset(dataset, val_split=0.0, progress=False)
    bundle.train = Split(bundle.train.images[:20480], bundle.train.labels[:20480])
    ref = dict(model_name="fastnet", model_args={}, batch=256, bf16=bf16_supported(torch.device("cpu")),
               channels_last=True)
    variants: list[tuple[str, dict]] = [
        ("reference: fastnet 32-64-128, batch 256, bf16 autocast, channels_last, batch augmentation", {}),
        ("fp32 instead of bf16", {"bf16": False}),
        ("contiguous (NCHW) instead of channels_last", {"channels_last": False}),
        ("fp32 and NCHW (PyTorch defaults)", {"bf16": False, "channels_last": False}),
        ("no augmentation (cost of the batch augmentation)", {"augment": False}),
        ("batch 128", {"batch": 128}),
        ("batch 512", {"batch": 512}),
        ("widths 24-48-96", {"model_args": {"widths": [24, 48, 96]}}),
        ("widths 48-96-192", {"model_args": {"widths": [48, 96, 192]}}),
        ("widths 64-128-256", {"model_args": {"widths": [64, 128, 256]}}),
        ("simple (tutorial CNN)", {"model_name": "simple"}),
    ]
    if include_compile:
        variants.append(("torch.compile (warm-up column includes compilation)", {"compile_model": True}))
    threads = torch.get_num_threads()
    lines = ["| variant | train img/s | ratio to reference | warm-up s |", "|---|---|---|---|"]
    base = None
    for name, change in variants:
        rate, warm = _step_rate(bundle, **{**ref, **change})
        base = base or rate
        lines.append(f"| {name} | {rate:.0f} | {rate / base:.2f} | {warm:.1f} |")
        print(lines[-1], flush=True)
    torch.set_num_threads(1)
    rate, warm = _step_rate(bundle, **ref)
    torch.set_num_threads(threads)
    lines.append(f"| 1 thread instead of {threads} | {rate:.0f} | {rate / base:.2f} | {warm:.1f} |")
    print(lines[-1], flush=True)
    return "\n".join(lines)


def _fmt(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f}"


def table(results: list[dict], thresholds: tuple[float, ...], peak: float | None = None) -> str:
    """`peak`: the machine's bf16 matmul GFLOP/s, for the share of it each run's training achieved."""
    head = "| run | epochs | " + " | ".join(f"s to {t:.1%}" for t in thresholds) + \
        " | final acc | train s | img/s | GFLOP/s | peak RSS MiB |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error']} |")
            continue
        times = " | ".join(_fmt(_time_to(r["records"], t)) for t in thresholds)
        rate = r.get("gflops")
        share = f" ({rate / peak:.0%})" if rate and peak else ""
        lines.append(f"| {r['name']} | {r['epochs']} | {times} | {r['final_accuracy']:.2%} | {r['train_seconds']:.1f} "
                     f"| {r['images_per_second']:.0f} | {_fmt(rate)}{share} | {r['peak_rss_mib']} |")
    return "\n".join(lines)


def ratios(results: list[dict], threshold: float = 0.915) -> list[str]:
    base = next((r for r in results if r["name"].startswith("baseline") and "error" not in r), None)
    if base is None:
        return []
    base_t = _time_to(base["records"], threshold)
    out = []
    for r in results:
        if r is base or "error" in r:
            continue
        t = _time_to(r["records"], threshold)
        if base_t is None or t is None:
            out.append(f"{r['name']}: time to {threshold:.1%}: {_fmt(t)} s vs baseline {_fmt(base_t)} s")
        else:
            out.append(f"{r['name']}: time to {threshold:.1%} {t:.1f} s vs baseline {base_t:.1f} s: "
                       f"baseline time / recipe time = {base_t / t:.2f}")
    return out


def build_parser() -> argparse.ArgumentParser:
    """`python -m benchmarks`'s flags (the docs test checks the commands in BENCHMARKS.md against them)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("recipes", help="time-to-accuracy of recipes vs the conventional baseline (the default)")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--recipes", default="fast,balanced,best", help="comma-separated recipe names")
    p.add_argument("--baseline-epochs", type=int, default=5, help="0 skips the baseline")
    p.add_argument("--thresholds", default=",".join(map(str, THRESHOLDS)))
    p.add_argument("--json", type=Path, help="also write the raw results here")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: extra `cnnlab train` flags for every recipe")
    p = sub.add_parser("levers", help="training throughput with each speed lever switched, side by side")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--compile", action="store_true", help="include torch.compile (slow to compile on small CPUs)")
    p = sub.add_parser("serve", help="cnnlab serve under concurrent single-image requests: requests/s, latency")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--clients", default="1,16,32", help="comma-separated numbers of concurrent clients")
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--serve-arg", action="append", default=[], metavar="FLAG",
                   help="an extra `cnnlab serve` flag, e.g. --serve-arg=--max-wait-ms=2 (repeatable)")
    p.add_argument("--engines", help="comma-separated `cnnlab serve --engine` values to compare side by side, "
                   "e.g. torch,onnxruntime (default: the server's own choice)")
    p.add_argument("--rounds", type=int, default=1, help="times each engine runs, interleaved (default: 1)")
    p = sub.add_parser("allreduce", help="gradient bytes per step, their all-reduce over gloo on loopback, one "
                       "process's compute per step, and the projected step time on N nodes")
    p.add_argument("--recipes", default="fast,cifar")
    p.add_argument("--steps", type=int, default=30)
    p = sub.add_parser("engines", help="cnnlab serve's engines (torch, onnxruntime) in-process: ms per batch")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--batches", default="1,8,16,64", help="comma-separated batch sizes")
    p = sub.add_parser("soak", help="cnnlab serve under valid and malformed uploads mixed: drops, 5xx, memory")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--invalid-share", type=float, default=0.5, help="fraction of requests that are malformed")
    p = sub.add_parser("overload", help="cnnlab serve with more clients than it can serve: with --max-queue "
                       "and without, answers by status, latency, memory")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--clients", type=int, default=64, help="4x the 16 clients that saturate a 2-core server")
    p.add_argument("--max-queue", type=int, default=16)
    p.add_argument("--seconds", type=float, default=30)
    p = sub.add_parser("predict", help="cnnlab predict over a folder of PNGs, torch and onnx backends")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--images", type=int, default=10000)
    p.add_argument("--batch-size", type=int, default=256)
    p = sub.add_parser("ddp", help="one training run in 1 and in N processes (cnnlab train --nproc): time, accuracy, RSS")
    p.add_argument("--nproc", default="1,2", help="comma-separated numbers of processes")
    p.add_argument("--recipe", default="fast")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="extra `cnnlab train` flags after --")
    p = sub.add_parser("own-data", help="small folders with the default recipe, tv:resnet18 with the defaults, "
                       "fine-tuning against training from scratch")
    p.add_argument("--cifar", type=Path, help="a CIFAR-10 copy in class folders (train/, test/) for the 5,000-image runs")
    p.add_argument("--torchvision", action="store_true", help="also tv:resnet18 on the CIFAR subset (about 10 minutes)")
    p.add_argument("--workdir", type=Path, help="where to build the folders and runs (default: a new temporary folder)")
    p = sub.add_parser("ablation", help="a recipe whole, then without each airbench trick: epochs and seconds to "
                       "accuracy, GFLOP/s")
    p.add_argument("--dataset", required=True, help="e.g. folder:$HOME/.cache/cnnlab/cifar10-jpeg")
    p.add_argument("--recipe", default="cifar")
    p.add_argument("--thresholds", default="0.9,0.93")
    p.add_argument("--only", help="comma-separated words: only the tricks whose row names contain one")
    p = sub.add_parser("_baseline")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--json", type=Path, required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv if argv is not None else (sys.argv[1:] or ["recipes"]))
    if ns.command == "_baseline":
        run_baseline(ns.dataset, ns.epochs, ns.json)
        return 0
    if ns.command is None:
        ns = parser.parse_args(["recipes", *(argv or [])])
    if ns.command in ("serve", "soak", "overload", "predict", "engines"):
        from benchmarks.deploy import bench_engines, bench_overload, bench_predict, bench_serve, bench_soak

        print(f"machine: {machine()}", flush=True)
        if ns.command == "serve":
            bench_serve(ns.run_dir, [int(n) for n in ns.clients.split(",")], ns.seconds, ns.serve_arg,
                        ns.engines.split(",") if ns.engines else None, ns.rounds)
        elif ns.command == "engines":
            bench_engines(ns.run_dir, [int(n) for n in ns.batches.split(",")])
        elif ns.command == "soak":
            bench_soak(ns.run_dir, ns.clients, ns.seconds, ns.invalid_share)
        elif ns.command == "overload":
            bench_overload(ns.run_dir, ns.clients, ns.max_queue, ns.seconds)
        else:
            bench_predict(ns.run_dir, ns.images, ns.batch_size)
        return 0
    if ns.command == "allreduce":
        from benchmarks.allreduce import run as run_allreduce

        print(f"machine: {machine()}", flush=True)
        run_allreduce(ns.recipes.split(","), ns.steps)
        return 0
    if ns.command == "own-data":
        from benchmarks.own_data import run as run_own_data
        from benchmarks.own_data import table as own_data_table

        print(f"machine: {machine()}", flush=True)
        results = run_own_data(ns.cifar, ns.torchvision, ns.workdir)
        print(own_data_table(results))
        for r in results:
            print(f"{r['name']}: {r.get('command', '')}\n    {r.get('schedule', '')}")
        return 0
    if ns.command == "ddp":
        print(f"machine: {machine()}")
        print(bench_ddp([int(n) for n in ns.nproc.split(",")], ns.recipe, [a for a in ns.train_args if a != "--"]))
        return 0
    if ns.command == "ablation":
        from benchmarks.ablation import run as run_ablation

        print(f"machine: {machine()}")
        print(f"command: python -m benchmarks {' '.join(argv if argv is not None else sys.argv[1:])}", flush=True)
        with tempfile.TemporaryDirectory(prefix="cnnlab-ablation-") as tmp:
            print(run_ablation(ns.dataset, ns.recipe, tuple(float(t) for t in ns.thresholds.split(",")), Path(tmp),
                               ns.only.split(",") if ns.only else None))
        return 0
    if ns.command == "levers":
        print(f"machine: {machine()}")
        print(bench_levers(ns.dataset, ns.compile))
        return 0
    from benchmarks.ablation import peak_gflops

    thresholds = tuple(float(t) for t in ns.thresholds.split(","))
    extra = [a for a in ns.train_args if a != "--"]
    print(f"machine: {machine()}")
    peak = peak_gflops("cuda" if "cuda" in extra else "cpu")
    print(f"bf16 matmul peak: {peak:.0f} GFLOP/s", flush=True)
    print(f"command: python -m benchmarks {' '.join(argv if argv is not None else sys.argv[1:])}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="cnnlab-recipes-bench-") as tmp:
        if ns.baseline_epochs > 0:
            results.append(bench_baseline(ns.dataset, Path(tmp), ns.baseline_epochs))
            print(table(results[-1:], thresholds, peak).splitlines()[-1], flush=True)
        for recipe in ns.recipes.split(","):
            results.append(bench_recipe(recipe.strip(), ns.dataset, Path(tmp), extra))
            print(table(results[-1:], thresholds, peak).splitlines()[-1], flush=True)
    print()
    print(table(results, thresholds, peak))
    for line in ratios(results):
        print(line)
    if ns.json:
        ns.json.write_text(json.dumps({"machine": machine(), "dataset": ns.dataset, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
