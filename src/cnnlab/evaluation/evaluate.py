"""`evaluate_run`: score a run directory's model on a dataset split and write eval.json."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..data.load import load_dataset
from ..data.memory import load_saved_split
from ..errors import CnnlabError, InvalidSetting
from ..models.classifier import Classifier
from ..rundir import RunDir
from .metrics import classification_report


@dataclass
class ScoredSplit:
    """A split classified by a run's model: what eval.json summarises, kept for further analysis."""
    dataset: str
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor
    logits: torch.Tensor  # float32 (N, classes), with the model's test-time augmentation
    report: dict[str, Any]  # the contents of eval.json
    path: Path | None = None  # where it was written: eval.json, or eval-<dataset>.json for another dataset
    other: str | None = None  # the dataset, when it is not the one the run was trained on
    note: str | None = None  # how its classes were matched to the model's, when not one to one

    @cached_property
    def probabilities(self) -> torch.Tensor:
        return torch.softmax(self.logits, dim=1)

    @cached_property
    def predictions(self) -> torch.Tensor:
        return self.logits.argmax(1)


def evaluate_run(run_dir: str | Path, *, dataset: str | None = None, split: str = "test", batch_size: int = 1024,
                 device: str = "cpu", progress: bool = True) -> dict[str, Any]:
    """Classify a whole split with the run's model; returns the report, also saved as eval.json
    (eval-<dataset>.json when `dataset` is not the one the run was trained on)."""
    run_dir = Path(run_dir)
    classifier = Classifier.load(run_dir, device=device)
    return score_split(run_dir, classifier, dataset=dataset, split=split, batch_size=batch_size,
                       progress=progress).report


def score_split(run_dir: Path, classifier: Classifier, *, dataset: str | None = None, split: str = "test",
                batch_size: int = 1024, progress: bool = True) -> ScoredSplit:
    """Classify a split of the run's dataset, or of another whose classes the model knows (matched
    by name), and write eval.json (eval-<dataset>.json for another dataset)."""
    run = RunDir(run_dir)
    config = run.read_config()
    name = dataset or classifier.card.dataset or config.get("dataset")
    if not name:
        raise InvalidSetting("dataset", f"must be given: {run_dir} does not record its dataset.")
    if dataset is None and (run / run.TEST_DATA).is_dir():  # data given from Python: the copy the run kept
        bundle = load_saved_split(run / run.TEST_DATA, name)
    else:
        # The run's own seed and hold-out fraction reproduce its validation split exactly.
        bundle = load_dataset(name, val_split=float(config.get("val_split", 0.1)), seed=int(config.get("seed", 0)),
                              image_size=config.get("image_size"), download=bool(config.get("download", True)),
                              progress=progress, split_folders=config.get("split_folders") or None)
    data = {"test": bundle.test, "val": bundle.val}.get(split)
    if data is None:
        raise CnnlabError(f"{name} has no {split} split for this run (it was trained with val_split 0).")
    labels = data.labels
    to_model = match_classes(bundle.class_names, classifier.class_names, name)
    note = None
    if to_model is not None:  # the same classes in another order, or some of them: labels by name
        labels = to_model[labels]
        some = len(bundle.class_names) < len(classifier.class_names)
        note = (f"{name} has {len(bundle.class_names)} of the model's {len(classifier.class_names)} classes"
                if some else f"{name} lists the model's classes in another order")
        note += "; its labels were matched to the model's by class name"

    chunks = []
    for start in tqdm(range(0, len(data), batch_size), desc=f"evaluating {split}", unit="batch",
                      disable=not progress, file=sys.stderr, leave=False):
        chunks.append(classifier.logits(data.images[start:start + batch_size]).cpu())
    logits = torch.cat(chunks)
    other = dataset if dataset is not None and not same_dataset(dataset, classifier.card.dataset) else None
    report = {"dataset": bundle.name, "split": split, "weights_sha256": classifier.card.weights_sha256,
              **classification_report(logits, labels, classifier.class_names)}
    path = run.write_eval(report, other)
    return ScoredSplit(bundle.name, data.images, labels, logits, report, path, other, note)


def match_classes(data_classes: list[str], model_classes: list[str], name: str) -> torch.Tensor | None:
    """The model's index of each of the data's classes, matched by name; None when they are the
    model's own list. Classes the model does not know are refused: their images cannot be scored."""
    if list(data_classes) == list(model_classes):
        return None
    index = {c: i for i, c in enumerate(model_classes)}
    unknown = [c for c in data_classes if c not in index]
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise CnnlabError(f"{name} has classes the model was not trained on ({shown}); the model knows "
                          f"{', '.join(model_classes[:10])}{' ...' if len(model_classes) > 10 else ''}: score it on "
                          "data with those classes.")
    return torch.tensor([index[c] for c in data_classes])


def same_dataset(given: str, recorded: str | None) -> bool:
    """`given` names the dataset the run was trained on (a folder by any path to it)."""
    if recorded is None:
        return False
    if given.startswith("folder:") and recorded.startswith("folder:"):
        return Path(given[7:]).expanduser().resolve() == Path(recorded[7:]).expanduser().resolve()
    return given == recorded
