"""Named training presets: `cnnlab train --recipe NAME` (flags and YAML keys still override).

Each recipe fixes the model, epochs, batch size, schedule, augmentation, label smoothing,
weight averaging and test-time augmentation. The figures each reaches are in BENCHMARKS.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..registry import Registry


@dataclass(frozen=True)
class Recipe:
    name: str
    purpose: str
    settings: dict[str, Any] = field(default_factory=dict)


_RECIPES: Registry[Recipe] = Registry("recipe")


def register_recipe(recipe: Recipe) -> Recipe:
    return _RECIPES.register(recipe.name, recipe)


def list_recipes() -> list[str]:
    return _RECIPES.names()


def get_recipe(name: str) -> Recipe:
    return _RECIPES.get(name)


register_recipe(Recipe("none", "no preset: TrainConfig's plain defaults"))

# Every recipe trains at least 500 optimiser steps: a small training set gets more epochs (and
# a smaller batch), since a few hundred images at 4 epochs are a handful of steps and end near
# chance. Full Fashion-MNIST (234 steps per epoch) is not affected.
# All recipes train on the whole training split (val_split 0: the hold-out costs accuracy and
# the time budget), and score with flip test-time augmentation, which measured better than
# adding one-pixel translations on Fashion-MNIST (93.02% vs 92.97% on the same model).
_COMMON = dict(model="fastnet", lr=0.2, weight_decay=5e-4, schedule="linear", warmup_epochs=0.5,
               label_smoothing=0.1,
               ema_decay=0.0, tta="flip", val_split=0.0, low_res=None, low_res_epochs=0, whiten=False,
               translate_off_epochs=0, min_steps=500)

# `fast` starts from a frozen first layer of 16 whitening filters (8 patch components, +/-) and
# trains its last epoch on unshifted images: +0.5% over the same network without, and 10%
# faster than a 32-filter first layer (BENCHMARKS.md, third round of experiments).
register_recipe(Recipe(
    "fast",
    "the default: a good model in under a minute on a 2-core CPU (make demo)",
    dict(_COMMON, model_args={"widths": [32, 64, 128], "stem": 16}, epochs=4, translate=1, whiten=True,
         translate_off_epochs=1),
))

register_recipe(Recipe(
    "balanced",
    "more accuracy for under three minutes on a 2-core CPU",
    dict(_COMMON, model_args={"widths": [32, 64, 128], "stem": 16}, epochs=12, translate=2, whiten=True,
         translate_off_epochs=1),
))

register_recipe(Recipe(
    "best",
    "the most accuracy within about 15 minutes on a 2-core CPU",
    dict(_COMMON, model_args={"widths": [64, 128, 256]}, epochs=14, translate=2),
))

register_recipe(Recipe(
    "cifar",
    "colour photos like CIFAR-10 (32x32): about 3 minutes on a 2-core CPU",
    dict(_COMMON, model_args={"widths": [32, 64, 128]}, epochs=10, translate=2),
))
