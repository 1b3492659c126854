"""The `cnnlab` command: thin subcommands that parse flags and call the Python API.

A user's mistake (bad flag, unknown name, missing file) is one line on stderr and exit
status 2; an accuracy below `evaluate --min-accuracy` is exit status 3.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

from . import __version__
from .deploy import ENGINES
from .errors import CnnlabError, InvalidSetting, Preempted, missing_extra
from .images.spec import TTA_MODES
from .training.config import MACHINE_SETTINGS, TrainConfig, default_settings, field_types, load_yaml, make_config

EXIT_USAGE = 2
EXIT_BELOW_GATE = 3


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage plus a message
        self.exit(EXIT_USAGE, f"cnnlab: error: {message} (see `{self.prog} --help`)\n")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; unset flags stay absent so the YAML file's values hold.
    Each help shows what a run gets without the flag, and which recipe that comes from."""
    types_, defaults = field_types(), default_settings()
    recipe = TrainConfig.recipe
    parser.epilog = (f"Defaults marked 'from recipe {recipe}' are the {recipe} recipe's settings: another "
                     "--recipe brings its own (see `cnnlab recipes`); flags and --config override either.")
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("model_args", "split_folders"):
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = types_[f.name]
        help_text = f.metadata["help"]
        if "(default:" not in help_text:  # some say in words what an unset value means
            help_text += _default_text(*defaults[f.name])
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            metavar = None if f.metadata.get("choices") else f.metadata.get("metavar") or f.name.upper()
            parser.add_argument(flag, type=kind, choices=f.metadata.get("choices"), default=argparse.SUPPRESS,
                                metavar=metavar, help=help_text)
    model_args, source = defaults["model_args"]
    shown = ", ".join(f"{k}={v}" for k, v in model_args.items()) or "none"
    parser.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="an architecture argument, e.g. --model-arg widths=[48,96,192] (repeatable)"
                        + _default_text(shown, source))
    parser.add_argument("--split-folder", action="append", default=[], metavar="SPLIT=FOLDER",
                        help="folder datasets: the folder of a split (train, val or test), relative to the dataset "
                        "folder or absolute, e.g. --split-folder val=holdout (repeatable; default: found by name: "
                        "train, val/valid/validation/dev, test/testing)")
    parser.add_argument("--config", metavar="FILE.yaml", help="read settings from a YAML file; flags override it")


def _default_text(value: Any, recipe: str | None) -> str:
    return f" (default: {value}, from recipe {recipe})" if recipe else f" (default: {value})"


def _model_args(pairs: list[str]) -> dict[str, Any]:
    return _pairs(pairs, "--model-arg", "KEY=VALUE")


def _pairs(pairs: list[str], flag: str, form: str, parse: bool = True) -> dict[str, Any]:
    """KEY=VALUE flags as a dict; values read as YAML (numbers, lists) when `parse`."""
    args = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CnnlabError(f"{flag} expects {form}, got {pair!r}.")
        try:
            args[key] = yaml.safe_load(value) if parse else value
        except yaml.YAMLError:
            raise CnnlabError(f"{flag} {key}: cannot read the value {value!r}.") from None
    return args


def _config_from_flags(ns: argparse.Namespace) -> TrainConfig:
    """recipe < YAML file < flags, for train and lr-find."""
    values = {k: v for k, v in vars(ns).items() if k in field_types()}
    file_values = load_yaml(ns.config) if ns.config else {}
    if ns.model_arg:  # only when given: otherwise the file's or the recipe's model_args stand
        values["model_args"] = {**file_values.get("model_args", {}), **_model_args(ns.model_arg)}
    if ns.split_folder:
        values["split_folders"] = {**file_values.get("split_folders", {}), **_pairs(ns.split_folder, "--split-folder",
                                                                                     "SPLIT=FOLDER", parse=False)}
    return make_config(**{**file_values, **values})


AUTO = "auto"  # --resume auto


def cmd_train(ns: argparse.Namespace) -> int:
    from .training import distributed
    from .training.trainer import auto_resume, train

    if ns.resume and ns.resume != AUTO:
        given = sorted(k for k in vars(ns) if k in field_types() and k not in MACHINE_SETTINGS)
        if given or ns.config or ns.model_arg or ns.split_folder:
            flags = ", ".join("--" + k.replace("_", "-") for k in given) or "--config/--model-arg/--split-folder"
            raise CnnlabError(f"--resume continues a run with its own config.yaml; drop {flags}.")
        config = None
    else:
        config = _config_from_flags(ns)
    if ns.nproc is not None and not distributed.launched():
        if ns.nproc < 1:
            raise InvalidSetting("nproc", f"must be at least 1, got {ns.nproc}.")
        if config is not None and config.batch_size is not None and config.batch_size % ns.nproc:
            raise InvalidSetting("batch_size", f"must be divisible by --nproc {ns.nproc} (it is the global batch, "
                                               f"shared out equally), got {config.batch_size}.")
        if ns.nproc > 1:  # the same command again in N processes, through torchrun's launcher
            timeout = getattr(ns, "dist_timeout", TrainConfig.dist_timeout)
            return distributed.launch(ns.nproc, _without_nproc(ns.argv), timeout)
    resume, overwrite = (ns.resume, ns.overwrite) if ns.resume != AUTO else auto_resume(config)
    if resume is not None:
        train(resume=resume, **{k: getattr(ns, k) for k in MACHINE_SETTINGS if hasattr(ns, k)})
    else:
        train(config, overwrite=overwrite or ns.overwrite)
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    """The train arguments after `train`, less --nproc N."""
    args = list(argv[argv.index("train") + 1:])
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def cmd_evaluate(ns: argparse.Namespace) -> int:
    from .evaluation.evaluate import score_split
    from .evaluation.metrics import format_report
    from .models.classifier import Classifier

    if ns.min_accuracy is not None and not 0 <= ns.min_accuracy <= 1:
        raise CnnlabError(f"--min-accuracy is a fraction in [0, 1], got {ns.min_accuracy}.")
    scored = score_split(Path(ns.run_dir), Classifier.load(ns.run_dir, device=ns.device), dataset=ns.dataset,
                         split=ns.split, batch_size=ns.batch_size, progress=not ns.no_progress)
    report = scored.report
    if scored.note:
        print(f"note: {scored.note}")
    print(f"{report['dataset']} ({report['split']} split)")
    print(format_report(report, [row["class"] for row in report["per_class"]]))
    print(f"wrote {scored.path}")
    if ns.min_accuracy is not None and report["accuracy"] < ns.min_accuracy:
        print(f"FAILED: accuracy {report['accuracy']:.4f} is below the required {ns.min_accuracy:.4f}", file=sys.stderr)
        return EXIT_BELOW_GATE
    if ns.min_accuracy is not None:
        print(f"passed: accuracy {report['accuracy']:.4f} >= {ns.min_accuracy:.4f}")
    return 0


def cmd_datasets(ns: argparse.Namespace) -> int:
    from .data.builtin import dataset_status

    if ns.action == "show":
        from .insight.preview import preview_dataset

        preview = preview_dataset(ns.name, ns.out, per_class=ns.per_class, split=ns.split)
        if preview.origin_line:
            print(preview.origin_line)
        print(f"wrote {preview.path}")
        return 0
    if ns.action == "prepare":
        from .data.folder import prepare_folder

        if not ns.name.startswith("folder:"):
            raise CnnlabError(f"`datasets prepare` converts folder:PATH datasets, not {ns.name!r} "
                              "(the built-in datasets need no preparing).")
        done = prepare_folder(ns.name[len("folder:"):], image_size=ns.image_size, workers=ns.workers,
                              progress=not ns.no_progress)
        counts = (" / ".join(f"{n:,} {split}" for split, n in done.counts.items()) if done.folders else
                  f"{sum(done.counts.values()):,}")  # a flat folder: training holds out its test split later
        rate = sum(done.counts.values()) / max(done.seconds, 1e-9)
        took = f"converted in {done.seconds:.1f} s ({rate:,.0f} images/s)" if done.converted else "already prepared"
        folders = (", ".join(f"{split} <- {folder}" for split, folder in done.folders.items())
                   or "none (flat folder: training holds out a stratified test split)")
        print(f"prepared folder:{done.root}: {counts} images, {done.image_size}x{done.image_size} "
              f"{'RGB' if done.channels == 3 else 'grayscale'} ({done.nbytes / 2**20:,.1f} MiB) in {done.cache}; "
              f"split folders: {folders}; {took}; {len(done.skipped):,} file{'' if len(done.skipped) == 1 else 's'} "
              "skipped")
        return 0

    for name, description, where in dataset_status():
        print(f"{name:<14} {description}\n{'':<14} {where}")
    return 0


def cmd_models(ns: argparse.Namespace) -> int:
    from .models.registry import describe_model, list_models

    for name in list_models():
        print(f"{name:<16} {describe_model(name)}")
    print(f"{'tv:NAME':<16} any torchvision classification model, untrained (e.g. tv:resnet18)")
    return 0


def cmd_recipes(ns: argparse.Namespace) -> int:
    from .training.recipes import get_recipe, list_recipes

    for name in list_recipes():
        recipe = get_recipe(name)
        print(f"{name:<10} {recipe.purpose}")
        if recipe.settings:
            print(f"{'':<10} " + ", ".join(f"{k}={v}" for k, v in recipe.settings.items()))
    return 0


def cmd_predict(ns: argparse.Namespace) -> int:
    from .deploy.predict import predict_paths

    counts = predict_paths(ns.run_dir, ns.paths, top_k=ns.top_k, fmt=ns.format, batch_size=ns.batch_size,
                           backend=ns.backend, device=ns.device, precision=ns.precision,
                           tta=None if ns.tta == "model" else ns.tta, progress=not ns.no_progress)
    if counts.failed:
        print(f"cnnlab: {counts.failed} of {counts.total} files could not be classified (see their rows)",
              file=sys.stderr)
    return 0 if counts.classified else 1  # 1: not one file could be classified


def cmd_serve(ns: argparse.Namespace) -> int:
    from .deploy.serve import serve

    serve(ns.run_dir, host=ns.host, port=ns.port, max_batch=ns.max_batch, max_wait_ms=ns.max_wait_ms,
          api_key=ns.api_key, top_k=ns.top_k, max_bytes=ns.max_bytes, max_pixels=ns.max_pixels,
          max_queue=ns.max_queue, device=ns.device, engine=ns.engine, shutdown_timeout=ns.shutdown_timeout,
          access_log=ns.access_log)
    return 0


def cmd_export(ns: argparse.Namespace) -> int:
    from .deploy.export import export_model

    result = export_model(ns.run_dir, ns.format, ns.out, preprocessing=ns.with_preprocessing, layout=ns.layout,
                          triton=ns.triton)
    what = "probability" if ns.with_preprocessing else "logit"
    print(f"wrote {result.path} ({result.fmt}); checked on {result.images_checked} {result.checked_on}: "
          f"max |{what} difference| {result.max_abs_diff:.2e} <= {result.tolerance:.0e}")
    if ns.triton:
        print(f"wrote a Triton model repository in {ns.triton}")
    return 0


def cmd_report(ns: argparse.Namespace) -> int:
    from .insight.report import build_report

    path = build_report(ns.run_dir, dataset=ns.dataset, progress=not ns.no_progress)
    print(f"wrote {path}")
    return 0


def cmd_explain(ns: argparse.Namespace) -> int:
    from .insight.gradcam import explain_files

    for path in explain_files(ns.run_dir, ns.images, ns.out):
        print(f"wrote {path}")
    return 0


def cmd_lr_find(ns: argparse.Namespace) -> int:
    from .training.lrfind import lr_find

    result = lr_find(_config_from_flags(ns), min_lr=ns.min_lr, max_lr=ns.max_lr, steps=ns.steps)
    print(f"suggested learning rate: {result.suggestion:.3g} per 256 images ({result.rule})")
    print(f"wrote {result.plot}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cnnlab", description="Train, test and deploy convolutional image classifiers.")
    parser.add_argument("--version", action="version", version=f"cnnlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train a model into a run directory")
    _add_config_flags(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint; "
                   f"'{AUTO}': continue the run in --out when it holds one of this configuration, start it otherwise "
                   "(for schedulers and torchrun --max-restarts, which run the same command again)")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out (refused otherwise)")
    p.add_argument("--nproc", type=int, metavar="N", help="train data-parallel in N local processes "
                   "(the same as torchrun --standalone --nproc-per-node N -m cnnlab train ...)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="test a trained model: accuracy, per-class metrics, confusion matrix")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--dataset", help="dataset to test on (default: the one it was trained on); its classes are "
                   "matched to the model's by name, and its results go to eval-<dataset>.json")
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--min-accuracy", type=float, metavar="X", help="exit with status 3 if top-1 accuracy is below X")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "mps"))
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="classify image files, folders (recursive) or globs")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (or, with --backend onnx, an exported .onnx file)")
    p.add_argument("paths", metavar="PATH", nargs="+", help="image files, folders or glob patterns")
    p.add_argument("--top-k", type=int, default=1, metavar="K", help="classes to report per image (default: 1)")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table", help="output format (default: table)")
    p.add_argument("--batch-size", type=int, default=256, metavar="B", help="images per forward pass (default: 256)")
    p.add_argument("--backend", choices=("torch", "onnx"), default="torch",
                   help="torch, or onnx: the exported model.onnx through onnxruntime, without PyTorch (default: torch)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "mps"), help="torch backend only (default: cpu)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                   help="torch backend: bf16 is faster on CPUs with AVX512-BF16 and on GPUs (default: fp32)")
    p.add_argument("--tta", default="model", choices=("model", *TTA_MODES),
                   help="test-time augmentation: as model.json records it, or another; none is fastest (default: model)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("serve", help="serve a model over HTTP: JSON API, web page, OpenAPI docs")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--max-batch", type=int, default=64, metavar="N",
                   help="most images one forward pass takes from concurrent requests (default: 64)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, metavar="M",
                   help="longest wait for requests on their way to join a batch, in milliseconds (default: 5)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require this key in the X-API-Key header (default: $CNNLAB_API_KEY, or none)")
    p.add_argument("--top-k", type=int, default=5, metavar="K", help="classes returned per image (default: 5)")
    p.add_argument("--max-bytes", type=int, default=10_000_000, metavar="BYTES",
                   help="largest accepted upload per image (default: 10,000,000)")
    p.add_argument("--max-pixels", type=int, default=40_000_000, metavar="PIXELS",
                   help="largest accepted image area, checked before decoding (default: 40,000,000)")
    p.add_argument("--max-queue", type=int, default=256, metavar="N",
                   help="classification requests in progress beyond which new ones are refused with 503 and "
                   "Retry-After, so overload sheds requests instead of growing latency and memory (default: 256)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "mps"), help="where the model runs (default: cpu)")
    p.add_argument("--engine", default="auto", choices=ENGINES,
                   help="what runs the model: onnxruntime on the graph exported at start-up (CPU only, 1.6-4x "
                   "PyTorch's speed for batches of 16 to 1, needs cnnlab[export]) or torch; auto: onnxruntime on the CPU when it is "
                   "installed and the network exports, torch otherwise (default: auto)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, the longest wait for requests in progress to be answered (default: 30)")
    p.add_argument("--access-log", action="store_true", help="log one line per request")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export", help="export a model to ONNX or TorchScript, checked against PyTorch")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx", help="(default: onnx)")
    p.add_argument("--out", default=None, metavar="PATH",
                   help="output file (default: RUN_DIR/model.onnx or RUN_DIR/model.torchscript.pt)")
    p.add_argument("--with-preprocessing", action="store_true",
                   help="ONNX: a self-contained graph: uint8 images at the model's size in, normalisation and the "
                   "model's test-time augmentation inside, probabilities out (default: the plain network, "
                   "normalised float input, logits out)")
    p.add_argument("--layout", choices=("nhwc", "nchw"), default="nhwc",
                   help="--with-preprocessing: the input's layout; OpenCV and PIL arrays are nhwc (default: nhwc)")
    p.add_argument("--triton", default=None, metavar="DIR",
                   help="also write a Triton model repository to DIR: NAME/1/model.onnx, config.pbtxt with "
                   "dynamic batching, labels.txt")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("datasets", help="list datasets and where each was found; `datasets show NAME` draws samples, "
                       "`datasets prepare folder:PATH` converts a folder")
    p.set_defaults(func=cmd_datasets, action=None)
    actions = p.add_subparsers(dest="action", parser_class=_Parser)
    q = actions.add_parser("show", help="save a grid of sample images with their class names")
    q.add_argument("name", metavar="NAME", help="dataset name or folder:PATH")
    q.add_argument("--out", default=None, metavar="FILE.png", help="output image (default: NAME-samples.png)")
    q.add_argument("--per-class", type=int, default=8, metavar="N", help="images per class (default: 8)")
    q.add_argument("--split", choices=("train", "test"), default="train", help="(default: train)")
    q = actions.add_parser("prepare", help="convert folder:PATH to the on-disk cache that training reads "
                           "(the first `train` does it otherwise)")
    q.add_argument("name", metavar="folder:PATH", help="a folder of class sub-folders, or of split "
                   "folders (train/, valid/, test/ and the like) of class sub-folders")
    q.add_argument("--image-size", type=int, default=None, metavar="N",
                   help="image side in pixels (default: the median side, capped at 64)")
    q.add_argument("--workers", type=int, default=None, metavar="N",
                   help="decoding threads (default: one per CPU, at most 8)")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("report", help="write RUN_DIR/report.html: curves, confusion, calibration, top losses, Grad-CAM")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--dataset", help="dataset to test on (default: the one it was trained on); its classes are "
                   "matched to the model's by name, and the page goes to report-<dataset>.html")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("explain", help="Grad-CAM heat maps over images: what the model looks at")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("images", metavar="IMAGE", nargs="+", help="image files")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: RUN_DIR/explain)")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("lr-find", help="learning-rate range test: plot loss against learning rate, suggest one")
    _add_config_flags(p)
    p.add_argument("--min-lr", type=float, default=1e-4,
                   help="the sweep's first learning rate, per 256 images (default: 1e-4)")
    p.add_argument("--max-lr", type=float, default=10.0,
                   help="the sweep's last learning rate, per 256 images (default: 10)")
    p.add_argument("--steps", type=int, default=100, help="training steps in the sweep (default: 100)")
    p.set_defaults(func=cmd_lr_find)

    p = sub.add_parser("models", help="list the registered architectures")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("recipes", help="list the training recipes and what each sets")
    p.set_defaults(func=cmd_recipes)
    return parser


def _in_flags(exc: CnnlabError) -> str:
    """The error as the command line says it: a setting named by its flag."""
    if isinstance(exc, InvalidSetting):
        flag = {"model_args": "model-arg", "split_folders": "split-folder"}.get(exc.setting, exc.setting)
        return f"--{flag.replace('_', '-')} {exc.problem}"
    return str(exc)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = build_parser().parse_args(argv)
    ns.argv = argv
    try:
        return ns.func(ns)
    except Preempted as exc:  # stopped on SIGTERM/SIGINT with a checkpoint: as a signal would end it, with a line
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"cnnlab: {exc}", file=sys.stderr)
        return exc.exit_status
    except CnnlabError as exc:
        rank = int(os.environ.get("RANK", "0"))  # each process of a distributed run names itself
        print(f"cnnlab: error{f' (process {rank})' if rank else ''}: {_in_flags(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except ImportError as exc:  # an optional extra that is not installed: say which; anything else is a bug
        error = missing_extra(exc)
        if error is None:
            raise
        print(f"cnnlab: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("cnnlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
