"""`save_run`: a model trained in your own loop, written as a run directory that evaluate,
predict, serve, export, report and explain accept like any run `train` writes."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from .. import __version__
from ..card import FORMAT_VERSION, ModelCard
from ..data.memory import own_bundle, save_split
from ..errors import CnnlabError, InvalidSetting
from ..images.spec import TTA_MODES
from ..models.fitting import check_fits
from ..models.registry import check_rebuilds, count_parameters, recorded_name
from ..models.source import source_of
from ..rundir import RunDir


def save_run(model: nn.Module, out: str | Path, *, class_names: Sequence[str], mean: Sequence[float],
             std: Sequence[float], image_size: int | tuple[int, int], model_args: dict[str, Any] | None = None,
             dataset: str | None = None, test_data: Any = None, tta: str = "none", tta_flip: bool = True,
             overwrite: bool = False) -> Path:
    """Write `model` (trained in your own loop) with its model card as the run directory `out`.

    The card must say what your loop fed the model, so that every command prepares images the same
    way: mean and std per channel on the 0-1 scale (Normalize((0.5,), (0.5,)) after ToTensor is
    mean [0.5], std [0.5]; ToTensor alone is mean [0], std [1]), and image_size (height, width).
    The model's class must live in a .py file, and rebuild from its class with `model_args` (plus
    in_channels and num_classes where its signature takes them): later commands import it.

    dataset: what evaluate and report test on by default (a dataset name or folder:PATH), or
    test_data: your test images and labels as `train(data=...)` takes them, kept in the run."""
    run = RunDir(out)
    problem = run.occupied()
    if problem and not overwrite:
        raise CnnlabError(problem)
    in_channels, size = len(mean), (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(std) != in_channels:
        raise InvalidSetting("std", f"must hold one number per channel, like mean ({in_channels}), got {len(std)}.")
    if tta not in TTA_MODES:
        raise InvalidSetting("tta", f"must be one of {', '.join(TTA_MODES)}, got {tta!r}.")
    if dataset is None and test_data is None:
        raise InvalidSetting("dataset", "or test_data must say what the model is tested on.")
    source = source_of(model)
    spec = recorded_name(source.spec)
    model_args = dict(model_args or {})
    model = model.cpu().eval()
    check_fits(model, spec, in_channels, size, len(class_names))
    check_rebuilds(model, spec, model_args, in_channels, size, len(class_names))
    fields = {  # checked as model.json is, before anything is written
        "format_version": FORMAT_VERSION, "architecture": spec, "model_args": model_args,
        "num_classes": len(class_names),
        "class_names": list(class_names), "in_channels": in_channels, "image_size": list(size),
        "mean": [float(m) for m in mean], "std": [float(s) for s in std], "weights_sha256": "0" * 64,
        "tta": tta, "tta_flip": tta_flip, "dataset": dataset, "cnnlab_version": __version__,
        "source_sha256": source.sha256}
    card = ModelCard.from_json({k: v for k, v in fields.items() if v is not None}, "the model card")
    test = None
    if test_data is not None:
        test = own_bundle(test_data, test_data, None, list(class_names), progress=False)
        if dataset is None:
            card = dataclasses.replace(card, dataset=test.name)
    if problem:
        run.clear()
    run.path.mkdir(parents=True, exist_ok=True)
    if test is not None:
        save_split(test.test, list(class_names), run / run.TEST_DATA)
    run.write_model(model.state_dict(), card)
    run.write_summary({"saved_from": "a training loop of your own (cnnlab.save_run)", "model": spec,
                       "params": count_parameters(model), "dataset": card.dataset,
                       "finished": datetime.now().isoformat(timespec="seconds")})
    return run.path

