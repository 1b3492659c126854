"""Optional TensorBoard logging of the per-epoch metrics (`train --tensorboard`).

metrics.jsonl stays the record of a run; the event files are a copy for TensorBoard's UI.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from ..errors import InvalidSetting

# metrics.jsonl key -> TensorBoard tag; the prefixes group the charts in TensorBoard's UI
TAGS = {
    "train_loss": "loss/train",
    "train_accuracy": "accuracy/train",
    "val_accuracy": "accuracy/val",
    "test_accuracy": "accuracy/test",
    "lr": "optimizer/lr",
    "images_per_second": "speed/images_per_second",
}


def require_tensorboard() -> None:
    """Raise InvalidSetting unless the tensorboard package is importable (checked before training)."""
    try:
        importlib.import_module("tensorboard")
    except ImportError:
        raise InvalidSetting("tensorboard", "needs the tensorboard package: pip install 'cnnlab[tensorboard]'.") from None


class TensorBoardLog:
    """Writes one scalar per metric per epoch to event files in `log_dir`."""

    def __init__(self, log_dir: str | Path):
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log_epoch(self, record: dict[str, Any]) -> None:
        """A metrics.jsonl record; metrics not measured this epoch (None, absent) are skipped."""
        for key, tag in TAGS.items():
            if record.get(key) is not None:
                self.writer.add_scalar(tag, record[key], global_step=record["epoch"])
        self.writer.flush()  # each epoch on disk, so TensorBoard follows a run as it trains

    def close(self) -> None:
        self.writer.close()
