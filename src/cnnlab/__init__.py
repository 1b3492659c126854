"""cnnlab: train, test and deploy convolutional image classifiers with PyTorch."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public names and the modules that hold them. Imported on first use, so `cnnlab --help`
# and `cnnlab models` do not pay for importing torch and torchvision up front.
_EXPORTS = {
    "Classifier": "models.classifier", "Prediction": "card", "ModelCard": "card", "RunDir": "rundir",
    "TrainConfig": "training.config", "CnnlabError": "errors",
    "create_model": "models.registry", "list_models": "models.registry", "register_model": "models.registry",
    "list_datasets": "data.builtin", "load_dataset": "data.load", "train": "training.trainer",
    "save_run": "training.save",
    "evaluate_run": "evaluation.evaluate", "export_model": "deploy.export", "OnnxClassifier": "deploy.onnx_runtime",
    "build_report": "insight.report", "show_dataset": "insight.preview",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'cnnlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
