"""The training configuration: one typed dataclass, mirrored by CLI flags and YAML files.

Flags override the YAML file, unknown keys are errors, and the resolved config is saved
as `config.yaml` in every run directory.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import CnnlabError, InvalidSetting
from ..images.spec import DEFAULT_TTA, TTA_MODES
from .recipes import DEFAULT_RECIPE, get_recipe, recipe_for

BATCH = 256  # images per optimiser step, unless the training set is small
MIN_BATCHES = 16  # a small training set's batch is halved until an epoch has this many steps...
MIN_AUTO_BATCH = 32  # ...down to this
ADAMW_LR = 0.002  # per 256 images: AdamW's usual 1e-3 at batch 128; SGD's 0.2 makes it diverge
# The recipe settings that belong to its own network: its architecture arguments, its whitened
# first layer (which rewrites the first convolution) and that layer's trained bias, and the
# batch-norm-bias rate tuned for airnet's scale-free norms. Another model never gets them.
OWN_MODEL_SETTINGS = ("model_args", "whiten", "whiten_bias_epochs", "bias_lr_scale")
# For networks cnnlab's recipes were not tuned on (tv:NAME, your own), AdamW at ADAMW_LR
# instead of the recipe's SGD rate: robust across architectures, with or without batch norm.
FOREIGN_MODEL_SETTINGS = {"optimizer": "adamw", "lr": ADAMW_LR}


def _opt(default: Any, help: str, choices: tuple[str, ...] | None = None, metavar: str | None = None,
         **kw: Any) -> Any:
    metadata = {"help": help, "choices": choices, "metavar": metavar}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


# Settings of the machine and of checkpointing, not of what the run computes: --resume takes them,
# and --resume auto does not compare them
MACHINE_SETTINGS = ("progress", "threads", "dist_timeout", "checkpoint_every_steps", "checkpoint_every_seconds",
                    "keep_checkpoints")


@dataclass
class TrainConfig:
    recipe: str = _opt(DEFAULT_RECIPE, "training preset (see `cnnlab recipes`); other settings override it. Default: "
                                       "cifar for 32x32 colour images (unless --model is given), else fast")
    # data
    dataset: str = _opt("fashion-mnist", "dataset name (see `cnnlab datasets`) or folder:PATH")
    split_folders: dict = _opt({}, "folder datasets: the sub-folder (or any folder) of each split, e.g. "
                                   "{val: holdout}; default: found by name (train, val/valid/dev, test)")
    val_split: float = _opt(0.1, "fraction of the training split held out for validation (0 = none)")
    limit_train: int | None = _opt(None, "train on a stratified subset of this many images")
    image_size: int | None = _opt(None, "side in pixels for folder datasets (default: median size, capped at 64)")
    download: bool = _opt(True, "download torchvision datasets that are not on disk")
    # augmentation (whole-batch tensor ops)
    translate: int = _opt(2, "random translation in pixels (reflect-padded random crop); 0 = off")
    translate_off_epochs: int = _opt(0, "train the last N epochs without random translation (flips stay)")
    low_res: int | None = _opt(None, "progressive resizing: image side for the first --low-res-epochs epochs")
    low_res_epochs: int = _opt(0, "epochs trained at --low-res before switching to the full size")
    flip: str = _opt("auto", "random horizontal flips: auto = on unless the dataset is digits", ("auto", "on", "off"))
    alternate_flip: bool = _opt(False, "flip each image on alternate epochs (at random in the first) instead of at "
                                       "random every epoch: every image is seen both ways in every two epochs")
    # model
    model: str = _opt("fastnet", "architecture (see `cnnlab models`), tv:NAME for torchvision's, or your own as "
                                 "path/to/file.py:Name or package.module:Name (a class or factory)")
    model_args: dict = _opt({}, "keyword arguments for the architecture, e.g. {widths: [32, 64, 128]}")
    init_from: str | None = _opt(None, "start from this run directory's weights (same architecture; the classifier "
                                       "head is new when the classes differ)", metavar="RUN_DIR")
    pretrained: bool = _opt(False, "start a torchvision model (tv:NAME) from its pretrained ImageNet weights")
    whiten: bool = _opt(False, "start the first convolution as whitening filters of the training images' patches, "
                               "frozen (faster early learning)")
    whiten_bias_epochs: int = _opt(0, "with --whiten: train the whitened layer's bias for the first N epochs, then "
                                      "freeze it")
    # optimisation
    epochs: int = _opt(4, "passes over the training set (more on a small training set, see --min-steps)")
    min_steps: int = _opt(0, "train at least this many optimiser steps: a small training set gets more epochs "
                             "(0 = exactly --epochs; giving --epochs sets it to 0)")
    batch_size: int | None = _opt(None, f"images per optimiser step (default: --base-batch, halved for a small "
                                        f"training set until an epoch has {MIN_BATCHES} steps, down to "
                                        f"{MIN_AUTO_BATCH})")
    base_batch: int = _opt(BATCH, "the batch size a large training set gets when --batch-size is not given")
    optimizer: str = _opt("sgd", "sgd (Nesterov momentum), adamw, or muon (orthogonalised updates for the "
                                 "convolution filters, Nesterov SGD for the rest)", ("sgd", "adamw", "muon"))
    lr: float = _opt(0.2, f"peak learning rate, per 256 images (scaled linearly with batch size; "
                          f"adamw's default is {ADAMW_LR})")
    momentum: float = _opt(0.9, "SGD momentum / AdamW beta1")
    weight_decay: float = _opt(5e-4, "decoupled for AdamW, L2 for SGD; not applied to norms and biases")
    bias_lr_scale: float = _opt(1.0, "learning-rate multiplier for batch-norm biases (their weight decay per step "
                                     "stays the other weights')")
    warmup_epochs: float = _opt(0.5, "linear warm-up from lr/10 to the peak, in epochs")
    schedule: str = _opt("linear", "decay after warm-up: linear or cosine to --lr-end, or constant",
                         ("linear", "cosine", "constant"))
    lr_end: float = _opt(0.0, "the learning rate at the end of the decay, as a fraction of the peak")
    label_smoothing: float = _opt(0.1, "label smoothing of the cross-entropy loss (0 = off)")
    ema_decay: float = _opt(0.0, "keep an exponential moving average of the weights, per step (0 = off)")
    lookahead_every: int = _opt(0, "every N steps, pull the weights towards a slow average of them, ever more "
                                   "strongly, and end on the average (lookahead as in airbench; 0 = off)")
    keep: str = _opt("best", "the weights a run ends with: the best epoch's on the validation split (where there "
                             "is one apart from the test split), or the last", ("best", "last"))
    early_stop: int = _opt(0, "stop after N epochs without a better validation accuracy (0 = never)")
    tta: str = _opt(DEFAULT_TTA, "test-time augmentation used by evaluate/predict, recorded in model.json",
                    TTA_MODES)
    # machine
    seed: int = _opt(0, "seed for weights, data order, hold-out and augmentation")
    device: str = _opt("auto", "auto picks cuda, then mps, then cpu", ("auto", "cpu", "cuda", "mps"))
    precision: str = _opt("auto", "auto = bf16 autocast where the hardware supports it", ("auto", "bf16", "fp32"))
    channels_last: bool = _opt(True, "NHWC memory layout (faster convolutions on CPU and GPU)")
    threads: int | None = _opt(None, "CPU threads for PyTorch (default: PyTorch's choice)")
    # distributed (torchrun or --nproc)
    sync_bn: bool = _opt(False, "share batch-norm statistics across distributed processes (SyncBatchNorm; GPUs only)")
    dist_timeout: float = _opt(300.0, "seconds a distributed process waits for the others before it gives up")
    # output
    out: str | None = _opt(None, "run directory (default: runs/<dataset>-<model>-<timestamp>)")
    progress: bool = _opt(True, "show a progress bar per epoch")
    eval_test: bool = _opt(False, "also measure test accuracy after every epoch (for benchmarks; not timed)")
    checkpoint_every_steps: int = _opt(0, "also save the training state every N batches, mid-epoch (0 = once per epoch)")
    keep_checkpoints: int = _opt(1, "checkpoints to keep: with K > 1, the last K also in RUN_DIR/checkpoints/, "
                                      "to go back to (1 = checkpoint.pt alone)")
    checkpoint_every_seconds: float = _opt(0.0, "also save the training state every S seconds, mid-epoch: the most "
                                           "a SIGKILL can lose (0 = off)")
    tensorboard: bool = _opt(False, "also write TensorBoard event files to RUN_DIR/tensorboard (needs the tensorboard package)")

    def validate(self) -> "TrainConfig":
        """Check values a user can get wrong; raise InvalidSetting naming the field, in one sentence."""
        self._require("epochs", self.epochs >= 1, "must be at least 1")
        if self.batch_size is not None:
            self._require("batch_size", self.batch_size >= 1, "must be at least 1")
        if self.limit_train is not None:
            self._require("limit_train", self.limit_train >= 1, "must be at least 1")
        if self.image_size is not None:
            self._require("image_size", 4 <= self.image_size <= 1024, "must be between 4 and 1024 pixels")
        if self.low_res is not None:
            self._require("low_res", self.low_res >= 8, "must be at least 8 pixels")
        for name in ("checkpoint_every_steps", "translate_off_epochs", "low_res_epochs", "min_steps",
                     "early_stop", "whiten_bias_epochs", "lookahead_every"):
            self._require(name, getattr(self, name) >= 0, "must not be negative")
        self._require("keep_checkpoints", self.keep_checkpoints >= 1, "must be at least 1")
        self._require("val_split", 0 <= self.val_split < 1, "must be in [0, 1)")
        self._require("lr", self.lr > 0, "must be positive")
        self._require("bias_lr_scale", self.bias_lr_scale > 0, "must be positive")
        self._require("base_batch", self.base_batch >= 1, "must be at least 1")
        self._require("lr_end", 0 <= self.lr_end <= 1, "must be in [0, 1]")
        for name in ("weight_decay", "warmup_epochs", "translate", "checkpoint_every_seconds"):
            self._require(name, getattr(self, name) >= 0, "must not be negative")
        for name in ("label_smoothing", "ema_decay", "momentum"):
            self._require(name, 0 <= getattr(self, name) < 1, "must be in [0, 1)")
        self._require("dist_timeout", self.dist_timeout > 0, "must be a positive number of seconds")
        if self.threads is not None:
            self._require("threads", self.threads >= 1, "must be at least 1")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices:
                self._require(f.name, getattr(self, f.name) in choices, f"must be one of {', '.join(choices)}")
        if self.pretrained and not self.model.startswith("tv:"):
            raise InvalidSetting("pretrained", f"works for torchvision models (tv:NAME), not {self.model}; start from "
                                               "one of your own runs with init_from instead.")
        if self.pretrained and self.init_from:
            raise InvalidSetting("init_from", "and pretrained both choose the starting weights; give one of them.")
        if not isinstance(self.split_folders, dict):
            raise InvalidSetting("split_folders", "must be a mapping of split names (train, val, test) to folders.")
        if not isinstance(self.model_args, dict):
            raise InvalidSetting("model_args", "must be a mapping of argument names to values.")
        return self

    def _require(self, name: str, ok: bool, problem: str) -> None:
        if not ok:
            value = getattr(self, name)
            raise InvalidSetting(name, f"{problem}, got {repr(value) if isinstance(value, str) else value}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def field_types() -> dict[str, type]:
    """The plain type of each config field (Optional[X] -> X)."""
    hints = typing.get_type_hints(TrainConfig)
    plain = {}
    for name, hint in hints.items():
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            hint = args[0]
        plain[name] = typing.get_origin(hint) or hint
    return plain


def coerce(name: str, value: Any) -> Any:
    """Convert a YAML or keyword value to the field's type, or raise CnnlabError."""
    types_ = field_types()
    if name not in types_:
        known = ", ".join(sorted(types_))
        raise CnnlabError(f"Unknown configuration key {name!r}; known keys: {known}.")
    want = types_[name]
    if value is None:
        default = next(f for f in dataclasses.fields(TrainConfig) if f.name == name).default
        if default is None:
            return None
        raise CnnlabError(f"Configuration key {name!r} must not be empty.")
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is bool and not isinstance(value, bool):
        raise CnnlabError(f"Configuration key {name!r} must be true or false, got {value!r}.")
    if want is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise CnnlabError(f"Configuration key {name!r} must be an integer, got {value!r}.")
    if not isinstance(value, want):
        raise CnnlabError(f"Configuration key {name!r} must be of type {want.__name__}, got {value!r}.")
    return value


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict of checked values."""
    path = Path(path)
    if not path.is_file():
        raise CnnlabError(f"Config file {path} does not exist.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where else ""
        raise CnnlabError(f"Config file {path} is not valid YAML{at}; fix its syntax.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CnnlabError(f"Config file {path} must hold a mapping of keys to values.")
    return {_key(k): coerce(_key(k), v) for k, v in data.items()}


def _key(k: Any) -> str:
    return str(k).replace("-", "_")


def make_config(config_file: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Defaults, then the recipe's settings, then the YAML file, then keyword overrides; validated."""
    from_file = load_yaml(config_file) if config_file is not None else {}
    flags = {_key(k): coerce(_key(k), v) for k, v in overrides.items()}
    given = {**from_file, **flags}
    if "optimizer" in flags and "lr" not in flags and flags["optimizer"] != from_file.get("optimizer",
                                                                                      TrainConfig.optimizer):
        given.pop("lr", None)  # the file's rate was its optimizer's: another one gets its own default
    if "recipe" not in given and "model" not in given:
        given["recipe"] = default_recipe(given.get("dataset", TrainConfig.dataset))
    settings = dict(get_recipe(given.get("recipe", TrainConfig.recipe)).settings)
    sgd_lr = settings.get("lr", TrainConfig.lr)
    model = given.get("model", settings.get("model", TrainConfig.model))
    if model != settings.get("model", TrainConfig.model):
        for key in OWN_MODEL_SETTINGS:
            settings.pop(key, None)
        if not _is_own_model(model):
            settings.update(FOREIGN_MODEL_SETTINGS)
    if "optimizer" in given and "lr" not in given:  # that optimizer's rate, not the other's
        settings["lr"] = ADAMW_LR if given["optimizer"] == "adamw" else sgd_lr
    if "epochs" in given and "min_steps" not in given:
        given["min_steps"] = 0  # the epochs asked for, exactly
    return TrainConfig(**{**settings, **given}).validate()


def default_recipe(dataset: str) -> str:
    """The recipe for a dataset when none is named (recipes.recipe_for), from a look at its images."""
    from ..data.load import image_shape  # reads a few image headers: only when no recipe is named

    return recipe_for(image_shape(dataset))


def _is_own_model(name: str) -> bool:
    """One of cnnlab's own networks, which the recipes' learning rates suit."""
    if name.startswith("tv:") or ":" in name:
        return False
    from ..models.registry import (
        is_builtin,  # imports torchvision: only when a model other than the recipe's is asked for
    )

    return is_builtin(name)


def recipe_note(config: TrainConfig) -> str | None:
    """One line when the recipe's network-specific settings were not applied to config.model."""
    recipe = get_recipe(config.recipe)
    own = recipe.settings.get("model", TrainConfig.model)
    if config.model == own or not any(k in recipe.settings for k in OWN_MODEL_SETTINGS):
        return None
    return (f"recipe {recipe.name} is tuned for {own}; for {config.model} it uses optimizer {config.optimizer}, "
            f"lr {config.lr:g}, whiten {'on' if config.whiten else 'off'}, model_args {config.model_args or 'none'} "
            "(set them to choose)")


def default_settings() -> dict[str, tuple[Any, str | None]]:
    """What a run gets for each field that is not given: (value, the recipe it comes from, or
    None for TrainConfig's own default). The default recipe's settings stand over the dataclass's."""
    recipe = get_recipe(TrainConfig.recipe)
    plain = TrainConfig().to_dict()
    return {name: (recipe.settings[name], recipe.name) if name in recipe.settings else (value, None)
            for name, value in plain.items()}
