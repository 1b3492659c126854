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

    @cached_property
    def probabilities(self) -> torch.Tensor:
        return torch.softmax(self.logits, dim=1)

    @cached_property
    def predictions(self) -> torch.Tensor:
        return self.logits.argmax(1)


def evaluate_run(run_dir: str | Path, *, dataset: str | None = None, split: str = "test", batch_size: int = 1024,
                 device: str = "cpu", progress: bool = True) -> dict[str, Any]:
    """Classify a whole split with the run's model; returns the report, also saved as eval.json."""
    run_dir = Path(run_dir)
    classifier = Classifier.load(run_dir, device=device)
    return score_split(run_dir, classifier, dataset=dataset, split=split, batch_size=batch_size,
                       progress=progress).report


def score_split(run_dir: Path, classifier: Classifier, *, dataset: str | None = None, split: str = "test",
                batch_size: int = 1024, progress: bool = True) -> ScoredSplit:
    """Classify a split of the run's dataset (or another with the same classes), write eval.json."""
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
    if len(bundle.class_names) != len(classifier.class_names):
        raise CnnlabError(f"{name} has {len(bundle.class_names)} classes but the model was trained on "
                          f"{len(classifier.class_names)}; pass the dataset it was trained on.")

    chunks = []
    for start in tqdm(range(0, len(data), batch_size), desc=f"evaluating {split}", unit="batch",
                      disable=not progress, file=sys.stderr, leave=False):
        chunks.append(classifier.logits(data.images[start:start + batch_size]).cpu())
    logits = torch.cat(chunks)
    report = {"dataset": bundle.name, "split": split,
              **classification_report(logits, data.labels, classifier.class_names)}
    RunDir(run_dir).write_eval(report)
    return ScoredSplit(bundle.name, data.images, data.labels, logits, report)
