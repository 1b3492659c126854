"""The model card: `model.json` as a typed, validated dataclass, torch-free.

Everything a trained model needs beside its weights to classify an image (architecture, classes,
input channels and size, normalisation, test-time augmentation) travels in it. It is parsed and
checked here and nowhere else: the torch classifier, serve, export, the report and the ONNX
runtime all read it through `ModelCard.read` (model.json) or `ModelCard.from_json` (the metadata
an exported file carries).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from .errors import CnnlabError
from .files import write_json
from .images.spec import DEFAULT_TTA, TTA_MODES

FORMAT_VERSION = 1
EXPORT_FORMAT = 1  # version of the metadata layout an exported model carries; a newer one is refused
# the card's fields an exported model carries: all it needs to run (its graph is the architecture)
EXPORTED_FIELDS = ("architecture", "num_classes", "class_names", "in_channels", "image_size", "mean", "std",
                   "tta", "tta_flip", "weights_sha256")
MAX_IMAGE_SIDE = 4096  # pixels; larger sides in model.json are damage, not a model


class Prediction(NamedTuple):
    """One class of a classifier's answer for one image."""
    label: str  # the class name
    probability: float  # softmax probability
    index: int  # position in the model's output and in the card's class_names


class DamagedCard(CnnlabError):
    """A model card that is missing fields, or holds values no model could have."""


@dataclass(frozen=True)
class ModelCard:
    architecture: str  # a registered model name, tv:NAME, or the import path of the user's own (file.py:Name)
    model_args: dict[str, Any]  # keyword arguments the architecture was built with
    class_names: list[str]  # index i of the output is class_names[i]
    in_channels: int  # 1 (grayscale) or 3 (RGB)
    image_size: tuple[int, int]  # (height, width) in pixels that images are resized to
    mean: list[float]  # per channel, on the 0-1 scale, measured on the training split
    std: list[float]
    weights_sha256: str = ""  # of model.safetensors; set when the weights are written
    tta: str = DEFAULT_TTA  # test-time augmentation evaluate, predict, serve and exports use
    tta_flip: bool = True  # whether mirrored views are label-safe (not for digits)
    source_sha256: str | None = None  # of the file defining a user's own model: loading checks it is unchanged
    dataset: str | None = None  # what it was trained on
    recipe: str | None = None
    cnnlab_version: str | None = None
    format_version: int = FORMAT_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_json(self) -> dict[str, Any]:
        """The dict written as model.json (num_classes included for readers of the file)."""
        data = dataclasses.asdict(self)
        data["image_size"] = list(self.image_size)
        order = ("format_version", "architecture", "model_args")
        return {**{k: data[k] for k in order}, "num_classes": self.num_classes,
                **{k: v for k, v in data.items() if k not in order and v is not None}}

    def with_weights(self, sha256: str) -> "ModelCard":
        return dataclasses.replace(self, weights_sha256=sha256)

    @classmethod
    def read(cls, path: Path) -> "ModelCard":
        """Parse and check a model.json file."""
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise DamagedCard(f"{path} is not valid JSON; the run directory is damaged.") from None
        return cls.from_json(data, str(path))

    def write(self, path: Path) -> None:
        write_json(path, self.to_json())

    def exported(self, version: str) -> dict[str, Any]:
        """What an exported model carries (TorchScript as one JSON file)."""
        fields = self.to_json()
        return {"cnnlab_export_format": EXPORT_FORMAT, "cnnlab_version": version,
                **{key: fields[key] for key in EXPORTED_FIELDS}}

    def to_properties(self, version: str) -> dict[str, str]:
        """`exported` as an ONNX file's metadata: string properties, each JSON-encoded."""
        return {key: json.dumps(value) for key, value in self.exported(version).items()}

    @classmethod
    def from_properties(cls, props: dict[str, str], source: str) -> "ModelCard":
        """The inverse of to_properties; a model cnnlab did not export is a CnnlabError."""
        missing = [key for key in ("cnnlab_export_format", *EXPORTED_FIELDS) if key not in props]
        if missing:
            raise DamagedCard(f"{source} lacks the cnnlab metadata {', '.join(missing)}; "
                              "export it with `cnnlab export RUN_DIR --format onnx`.")
        try:
            values = {key: json.loads(props[key]) for key in ("cnnlab_export_format", *EXPORTED_FIELDS)}
        except json.JSONDecodeError:
            raise DamagedCard(f"{source} holds malformed cnnlab metadata; export it again.") from None
        version = values.pop("cnnlab_export_format")
        if not _is(version, int) or version > EXPORT_FORMAT:
            raise DamagedCard(f"{source} was exported by a newer cnnlab (format {version}); upgrade cnnlab.")
        # the exported graph is the architecture: its arguments are not needed to run it
        return cls.from_json({**values, "model_args": {}, "format_version": FORMAT_VERSION},
                             f"the cnnlab metadata of {source}")

    @classmethod
    def from_json(cls, data: Any, source: str = "the model card") -> "ModelCard":
        """Check a parsed model.json and build the card; anything wrong is one DamagedCard sentence
        naming `source`."""
        if not isinstance(data, dict):
            raise DamagedCard(f"{source} must hold a JSON object.")
        version = data.get("format_version")
        if _is(version, int) and version > FORMAT_VERSION:
            raise DamagedCard(f"{source} was written by a newer cnnlab (format {version}); upgrade cnnlab.")
        problem = _problem(data)
        if problem:
            raise DamagedCard(f"{source} {problem}; the run directory is damaged or was not written by cnnlab.")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["image_size"] = tuple(data["image_size"])
        return cls(**values)


_REQUIRED = {"format_version": int, "architecture": str, "model_args": dict, "num_classes": int,
             "class_names": list, "in_channels": int, "image_size": list, "mean": list, "std": list,
             "weights_sha256": str}


def _is(value: Any, kind: type | tuple[type, ...]) -> bool:
    """isinstance, except that JSON's true and false are not numbers."""
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def _problem(meta: dict[str, Any]) -> str | None:
    """What is wrong with a model card's contents (the end of a sentence), or None."""
    for key, kind in _REQUIRED.items():
        if not _is(meta.get(key), kind):
            return f"lacks a valid {key!r} ({kind.__name__})"
    names, channels, size = meta["class_names"], meta["in_channels"], meta["image_size"]
    if meta["format_version"] != FORMAT_VERSION:
        return f"has format_version {meta['format_version']}; this cnnlab reads format {FORMAT_VERSION}"
    if meta["num_classes"] < 1:
        return f"has num_classes {meta['num_classes']}; a model needs at least one class"
    if len(names) != meta["num_classes"]:
        return f"lists {len(names)} class names for {meta['num_classes']} classes"
    if not all(_is(name, str) for name in names):
        return "has class names that are not strings"
    if channels not in (1, 3):
        return f"has in_channels {channels}; models take 1 (grayscale) or 3 (RGB)"
    if len(size) != 2 or not all(_is(side, int) and 1 <= side <= MAX_IMAGE_SIDE for side in size):
        return f"has image_size {size}; it must be [height, width] in pixels, at most {MAX_IMAGE_SIDE}"
    for key in ("mean", "std"):  # measured on the 0-1 scale; the comparisons also reject NaN
        if len(meta[key]) != channels or not all(_is(v, (int, float)) and 0 <= v <= 1 for v in meta[key]):
            return f"has {key} {meta[key]}; it must hold {channels} number(s) in [0, 1], one per channel"
    if 0 in meta["std"]:
        return f"has std {meta['std']}; a standard deviation of 0 cannot normalise"
    if not re.fullmatch(r"[0-9a-f]{64}", meta["weights_sha256"]):
        return "has a weights_sha256 that is not 64 hexadecimal digits"
    if meta.get("tta", DEFAULT_TTA) not in TTA_MODES or not _is(meta.get("tta_flip", True), bool):
        return f"has an unknown test-time augmentation {meta.get('tta')!r} (tta_flip {meta.get('tta_flip')!r})"
    if not all(_is(meta.get(key, ""), str) for key in ("dataset", "recipe", "cnnlab_version")):
        return "has a dataset, recipe or cnnlab_version that is not a string"
    if meta.get("source_sha256") is not None and not re.fullmatch(r"[0-9a-f]{64}", str(meta["source_sha256"])):
        return "has a source_sha256 that is not 64 hexadecimal digits"
    return None
