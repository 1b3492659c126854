"""`RunDir`: the one place that knows a run directory's files, and reads and writes each of them.

What training leaves: config.yaml (the resolved settings), metrics.jsonl (one record per epoch),
checkpoint.pt (the training state), model.safetensors + model.json (weights and model card, never
a pickle), summary.json, skipped.txt (files a folder dataset could not read). What later
commands add: eval.json, report.html with report/ (eval-<dataset>.json, report-<dataset>.html
for another dataset), model.onnx, model.torchscript.pt, explain/: derived from the weights, and
removed when new weights are written.
Every file is written atomically with the usual permissions (files.atomic_write).

Importing this module needs neither PyTorch nor safetensors (the ONNX runtime uses it); the
methods that handle tensors import them when called.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

from .card import ModelCard
from .errors import CnnlabError, first_line
from .files import atomic_write, sha256_file, write_json, write_text


class RunDir:
    CONFIG = "config.yaml"
    METRICS = "metrics.jsonl"
    CHECKPOINT = "checkpoint.pt"
    WEIGHTS = "model.safetensors"
    CARD = "model.json"
    SUMMARY = "summary.json"
    SKIPPED = "skipped.txt"
    EVAL = "eval.json"
    REPORT = "report.html"
    REPORT_FIGURES = "report"
    ONNX = "model.onnx"
    TORCHSCRIPT = "model.torchscript.pt"
    TENSORBOARD = "tensorboard"
    EXPLAIN = "explain"
    BEST = "best.safetensors"  # the best epoch's weights so far, while training keeps the best
    TEST_DATA = "test-data"  # the test split of data given from Python, as a prepared directory
    CHECKPOINTS = "checkpoints"  # the last --keep-checkpoints checkpoints, checkpoint.pt's included
    # everything a run directory may hold: what --overwrite removes
    ALL = (CONFIG, METRICS, CHECKPOINT, WEIGHTS, CARD, SUMMARY, SKIPPED, EVAL, REPORT, REPORT_FIGURES, ONNX,
           TORCHSCRIPT, TENSORBOARD, EXPLAIN, BEST, TEST_DATA, CHECKPOINTS)

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def exists(self) -> bool:
        return self.path.is_dir()

    def is_started(self) -> bool:
        """Training has begun here (a config.yaml was written)."""
        return (self / self.CONFIG).is_file()

    def occupied(self) -> str | None:
        """Why a new run may not be written here (one sentence), or None."""
        if self.is_finished():
            return f"{self} holds a finished run; choose another output directory, or overwrite it (--overwrite)."
        if self.is_started():
            return (f"{self} holds an unfinished run; resume it (--resume {self}), choose another output directory, "
                    "or overwrite it (--overwrite).")
        return None

    def clear(self) -> None:
        """Remove every file a run writes (for --overwrite): nothing stale, such as an old eval.json
        or model.onnx, outlives the run it belonged to."""
        _remove([self / name for name in self.ALL] + self.derived_files())

    # ------------------------------------------------------------ settings and progress

    def write_config(self, settings: dict[str, Any]) -> None:
        write_text(self / self.CONFIG, yaml.safe_dump(settings, sort_keys=False))

    def has_config(self) -> bool:
        return (self / self.CONFIG).is_file()

    def read_config(self) -> dict[str, Any]:
        """config.yaml as a dict; empty when it is missing or unreadable (a model can be used without it)."""
        try:
            data = yaml.safe_load((self / self.CONFIG).read_text())
        except (OSError, yaml.YAMLError):
            return {}
        return data if isinstance(data, dict) else {}

    def start_metrics(self) -> None:
        write_text(self / self.METRICS, "")

    def append_metrics(self, record: dict[str, Any]) -> None:
        path = self / self.METRICS
        try:
            with open(path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
        except OSError as exc:
            raise CnnlabError(f"Cannot write {path}: {exc.strerror or exc}.") from None

    def read_metrics(self) -> list[dict[str, Any]]:
        """The per-epoch records, in order; [] when there are none. A damaged line is an error."""
        path = self / self.METRICS
        try:
            lines = [line for line in path.read_text().splitlines() if line.strip()]
        except OSError:
            return []
        try:
            return [json.loads(line) for line in lines]
        except json.JSONDecodeError:
            raise CnnlabError(f"{path} holds a line that is not JSON; the run directory is damaged.") from None

    def keep_metrics(self, epochs: int) -> None:
        """Keep the records of the first `epochs` epochs only (a resumed run rewrites the rest)."""
        kept = [r for r in self.read_metrics() if r["epoch"] <= epochs]
        write_text(self / self.METRICS, "".join(json.dumps(r) + "\n" for r in kept))

    def write_skipped(self, lines: list[str]) -> None:
        """The files a folder dataset left out, one `path: reason` a line."""
        if lines:
            write_text(self / self.SKIPPED, "".join(f"{line}\n" for line in lines))

    # ------------------------------------------------------------ training state

    def has_checkpoint(self) -> bool:
        return (self / self.CHECKPOINT).is_file()

    def write_checkpoint(self, state: dict[str, Any], keep: int = 1) -> None:
        """Replace checkpoint.pt atomically. keep > 1: also keep it as checkpoints/checkpoint-eE-bB.pt
        (E epochs and B batches of the next done; a hard link where the file system allows), and
        remove the oldest there beyond `keep`, once the new one is in place."""
        import torch

        def write(tmp: Path) -> None:
            try:
                torch.save(state, tmp)
            except RuntimeError as exc:  # torch's file writer reports a full disk this way
                raise OSError(str(exc).splitlines()[0]) from None
        atomic_write(self / self.CHECKPOINT, write)
        if keep > 1:
            folder = self / self.CHECKPOINTS
            folder.mkdir(exist_ok=True)
            kept = folder / f"checkpoint-e{state['epochs_done']:04d}-b{state['step']:06d}.pt"

            def link(tmp: Path) -> None:
                tmp.unlink(missing_ok=True)
                try:
                    os.link(self / self.CHECKPOINT, tmp)
                except OSError:  # no hard links here: a copy
                    tmp.write_bytes((self / self.CHECKPOINT).read_bytes())
            atomic_write(kept, link)
            for old in sorted(folder.glob("checkpoint-e*-b*.pt"))[:-keep]:
                old.unlink(missing_ok=True)

    def read_checkpoint(self) -> dict[str, Any]:
        """The training state, without unpickling arbitrary objects (weights_only=True)."""
        import torch

        path = self / self.CHECKPOINT
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CnnlabError(f"{path} is not a valid cnnlab checkpoint ({type(exc).__name__}).") from None

    # ------------------------------------------------------------ the model

    def write_model(self, state: dict[str, Any], card: ModelCard) -> ModelCard:
        """Write model.safetensors, then model.json with the weights' sha256; returns that card."""
        from safetensors.torch import save_file

        tensors = _separate(state)
        weights = self / self.WEIGHTS
        atomic_write(weights, lambda tmp: save_file(tensors, str(tmp)))
        card = card.with_weights(sha256_file(weights))
        if self.recorded_weights() not in (None, card.weights_sha256):
            self.remove_derived()  # made from the weights this replaces: remade on demand, never served
        card.write(self / self.CARD)
        return card

    def write_best(self, state: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        tensors = _separate(state)
        atomic_write(self / self.BEST, lambda tmp: save_file(tensors, str(tmp)))

    def read_best(self) -> dict[str, Any] | None:
        """The best epoch's weights so far, or None when none were kept."""
        from safetensors.torch import load_file

        path = self / self.BEST
        if not path.is_file():
            return None
        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types for malformed files
            raise CnnlabError(f"{path} is not a valid safetensors file ({first_line(exc)}); delete it and resume "
                              "to keep the last epoch's weights.") from None

    def remove_best(self) -> None:
        (self / self.BEST).unlink(missing_ok=True)

    def read_card(self) -> ModelCard:
        """model.json, checked; a missing, malformed or inconsistent file is a CnnlabError."""
        path = self / self.CARD
        if not self.exists():
            raise CnnlabError(f"Run directory {self} does not exist.")
        if not path.is_file():
            raise CnnlabError(f"{self} holds no {self.CARD}; is it a finished cnnlab run directory?")
        return ModelCard.read(path)

    def recorded_weights(self) -> str | None:
        """The weights' sha256 model.json records, or None without a readable model.json."""
        try:
            sha = json.loads((self / self.CARD).read_text()).get("weights_sha256")
        except (OSError, ValueError, AttributeError):
            return None
        return sha if isinstance(sha, str) else None

    def check_derived(self, path: Path, weights_sha256: str, remake: str) -> None:
        """Refuse a file made from other weights than this run's (a model.onnx exported before the
        run was trained again): `remake` is the command that makes it anew."""
        recorded = self.recorded_weights()
        if recorded is not None and recorded != weights_sha256:
            raise CnnlabError(f"{path.name} was exported from other weights than {self.path / self.CARD}'s; "
                              f"run `{remake}` again.")

    def read_weights(self, card: ModelCard) -> dict[str, Any]:
        """The state dict from model.safetensors, after checking its sha256 against the card."""
        from safetensors.torch import load_file

        path = self / self.WEIGHTS
        if not path.is_file():
            raise CnnlabError(f"{self} holds no {self.WEIGHTS}.")
        if sha256_file(path) != card.weights_sha256:
            raise CnnlabError(f"{path} does not match the sha256 in {self.CARD}; the weights were changed or damaged.")
        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types for malformed files
            raise CnnlabError(f"{path} is not a valid safetensors file ({first_line(exc)}).") from None

    # ------------------------------------------------------------ results

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json(self / self.SUMMARY, summary)

    def is_finished(self) -> bool:
        return (self / self.SUMMARY).is_file()

    def read_summary(self) -> dict[str, Any]:
        """summary.json, or {} when it is missing or damaged: the model can be used without it."""
        try:
            summary = json.loads((self / self.SUMMARY).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return {}
        return summary if isinstance(summary, dict) else {}

    def write_eval(self, report: dict[str, Any], other: str | None = None) -> Path:
        """eval.json, or eval-<dataset>.json for `other`, a dataset the run was not trained on."""
        path = self.eval_path(other)
        write_json(path, report)
        return path

    def eval_path(self, other: str | None = None) -> Path:
        return self / _for_dataset(self.EVAL, other)

    def report_path(self, other: str | None = None) -> Path:
        return self / _for_dataset(self.REPORT, other)

    def report_figures(self, other: str | None = None) -> Path:
        return self / _for_dataset(self.REPORT_FIGURES, other)

    def derived_files(self) -> list[Path]:
        """The files later commands made from the weights (eval, reports, exports, explain/), those
        of other datasets included."""
        names = [self.EVAL, self.REPORT, self.REPORT_FIGURES, self.ONNX, self.TORCHSCRIPT, self.EXPLAIN]
        patterns = [_for_dataset(name, "*") for name in (self.EVAL, self.REPORT, self.REPORT_FIGURES)]
        found = [self / name for name in names if (self / name).exists()]
        return found + sorted({p for pattern in patterns for p in self.path.glob(pattern)})

    def remove_derived(self) -> None:
        _remove(self.derived_files())


def _for_dataset(name: str, other: str | None) -> str:
    """A result file's name for a dataset other than the run's: eval.json -> eval-<slug>.json, where
    the slug is the dataset's name with a folder reduced to its last part (folder:/x/photos -> folder-photos)."""
    if other is None:
        return name
    if other != "*":
        if other.startswith("folder:"):
            other = "folder-" + (Path(other[7:]).expanduser().resolve().name or "root")
        other = re.sub(r"[^A-Za-z0-9._-]+", "-", other).strip("-.") or "dataset"
    stem, dot, suffix = name.partition(".")
    return f"{stem}-{other}{dot}{suffix}"


def _remove(paths: list[Path]) -> None:
    import shutil

    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def _separate(state: dict[str, Any]) -> dict[str, Any]:
    """The state dict's tensors on the CPU, each with memory of its own: safetensors refuses
    tensors that share memory (tied weights), and loading copies the values into both again."""
    seen: set[tuple[int, int]] = set()
    tensors = {}
    for key, value in state.items():
        tensor = value.detach().cpu().contiguous()
        where = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        tensors[key] = tensor.clone() if where in seen or tensor.untyped_storage().nbytes() != tensor.nbytes else tensor
        seen.add(where)
    return tensors
