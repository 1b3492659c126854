"""Matplotlib figures of a trained model: curves, confusion, per-class scores, calibration, image grids.

Figures are built with `matplotlib.figure.Figure` (no pyplot state) and rendered by the Agg
canvas to PNG bytes; each is sized to read well at about 700 pixels wide.
"""

from __future__ import annotations

import io
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure

WIDTH = 7.0  # inches; at DPI this is the width the report shows them at
DPI = 100
MAX_TICK_LABELS = 40  # class names on a heat map axis; beyond this only every k-th is named
MAX_BAR_CLASSES = 30  # classes in the per-class bar chart; beyond this the lowest-F1 ones
COLORS = {"train": "#1f77b4", "val": "#ff7f0e", "test": "#2ca02c"}


def png_bytes(fig: Figure) -> bytes:
    """Render a figure to PNG (Agg, DPI dots per inch, trimmed to its contents)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.05,
                metadata={"Software": None})
    return buffer.getvalue()


def _series(history: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of one metrics.jsonl field, skipping epochs that did not record it."""
    points = [(r["epoch"], r[key]) for r in history if r.get(key) is not None and r.get("epoch") is not None]
    return [p[0] for p in points], [p[1] for p in points]


def training_curves(history: list[dict[str, Any]], final_test: float | None = None) -> Figure:
    """Loss, accuracy (train, val, test where recorded) and learning rate per epoch, side by side.

    final_test: a test accuracy measured after training, drawn as a star at the last epoch."""
    fig = Figure(figsize=(WIDTH, 2.5), layout="constrained")
    loss_ax, acc_ax, lr_ax = fig.subplots(1, 3)
    marker = "o" if len(history) <= 30 else None
    loss_ax.plot(*_series(history, "train_loss"), marker=marker, color=COLORS["train"])
    for split in ("train", "val", "test"):
        epochs, values = _series(history, f"{split}_accuracy")
        if epochs:
            acc_ax.plot(epochs, [100 * v for v in values], marker=marker, color=COLORS[split], label=split)
    if final_test is not None and history:
        acc_ax.plot([history[-1]["epoch"]], [100 * final_test], marker="*", markersize=11, linestyle="none",
                    color=COLORS["test"], label="test (final)")
    lr_ax.plot(*_series(history, "lr"), marker=marker, color="#7f7f7f")
    for ax, title in ((loss_ax, "training loss"), (acc_ax, "accuracy (%)"), (lr_ax, "learning rate (end of epoch)")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    if acc_ax.get_legend_handles_labels()[0]:
        acc_ax.legend(fontsize=7)
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    return fig


def confusion_heatmap(matrix: np.ndarray, class_names: Sequence[str]) -> Figure:
    """A row-normalised confusion matrix (rows: true class) as a heat map; cells annotated up to 15 classes."""
    n = len(class_names)
    side = WIDTH if n > 15 else 6.0
    fig = Figure(figsize=(side, side * 0.9), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true class")
    step = max(1, -(-n // MAX_TICK_LABELS))
    ticks = np.arange(0, n, step)
    size = 8 if n <= 15 else 6 if n <= 40 else 5
    ax.set_xticks(ticks, [class_names[i] for i in ticks], rotation=90, fontsize=size)
    ax.set_yticks(ticks, [class_names[i] for i in ticks], fontsize=size)
    ax.set_xlabel("predicted class", fontsize=9)
    ax.set_ylabel("true class", fontsize=9)
    if n <= 15:
        for (row, col), value in np.ndenumerate(matrix):
            if round(100 * value) >= 1:  # no "0" labels on cells with a stray image or two
                ax.text(col, row, f"{100 * value:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if value > 0.5 else "black")
    return fig


def per_class_bars(rows: list[dict[str, Any]]) -> Figure:
    """Precision, recall and F1 per class as grouped horizontal bars (the lowest-F1 classes when many)."""
    if len(rows) > MAX_BAR_CLASSES:
        rows = sorted(rows, key=lambda r: r["f1"])[:MAX_BAR_CLASSES]
    rows = rows[::-1]  # first class on top
    y = np.arange(len(rows))
    fig = Figure(figsize=(WIDTH, 0.75 + 0.32 * len(rows)), layout="constrained")
    ax = fig.subplots()
    height = 0.27
    bars = ((height, "precision", "precision", "#1f77b4"), (0.0, "recall", "recall", "#ff7f0e"),
            (-height, "f1", "F1", "#2ca02c"))
    for offset, key, label, color in bars:
        ax.barh(y + offset, [100 * r[key] for r in rows], height=height, color=color, label=label)
    ax.set_yticks(y, [r["class"] for r in rows], fontsize=8)
    lowest = min(100 * min(r["precision"], r["recall"], r["f1"]) for r in rows)
    ax.set_xlim(max(0.0, np.floor(lowest / 10) * 10 - 10), 100)
    ax.set_xlabel("%", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="lower left", ncols=3, bbox_to_anchor=(0, 1.0), frameon=False)
    return fig


def reliability_diagram(edges: np.ndarray, accuracy: np.ndarray, confidence: np.ndarray, counts: np.ndarray,
                        ece: float) -> Figure:
    """Accuracy against mean confidence per confidence bin, with the number of images in each bin below."""
    fig = Figure(figsize=(WIDTH * 0.75, 4.6), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1.2])
    centers, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    filled = counts > 0
    top.bar(centers[filled], accuracy[filled], width=width[filled], color="#1f77b4", edgecolor="white",
            label="accuracy in the bin")
    top.errorbar(centers[filled], confidence[filled], xerr=width[filled] / 2, fmt="none", ecolor="#d62728",
                 elinewidth=2, label="mean confidence in the bin")
    top.plot([0, 1], [0, 1], linestyle="--", color="#555555", linewidth=1, label="perfect calibration")
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy", fontsize=8)
    top.set_title(f"expected calibration error {100 * ece:.2f}% ({len(counts)} bins)", fontsize=9)
    top.legend(fontsize=7, loc="upper left")
    bottom.bar(centers, counts, width=width, color="#7f7f7f", edgecolor="white")
    bottom.set_yscale("symlog", linthresh=1)
    bottom.set_ylim(0, max(10, counts.max()) * 8)
    for x, n in zip(centers[filled], counts[filled]):
        bottom.text(x, n * 1.3, f"{int(n)}", ha="center", va="bottom", fontsize=6)
    bottom.set_ylabel("images", fontsize=8)
    bottom.set_xlabel("confidence (probability of the predicted class)", fontsize=8)
    bottom.set_xlim(0, 1)
    for ax in (top, bottom):
        ax.tick_params(labelsize=7)
    return fig


def image_grid(images: Sequence[np.ndarray], titles: Sequence[str], columns: int,
               colors: Sequence[str] | None = None) -> Figure:
    """Images (H, W) grayscale or (H, W, 3) uint8 in a grid, each with a small title."""
    rows = max(1, -(-len(images) // columns))
    cell = WIDTH / columns
    fig = Figure(figsize=(WIDTH, rows * (cell + 0.35)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    for i, ax in enumerate(axes):
        ax.set_axis_off()
        if i >= len(images):
            continue
        image = images[i]
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(titles[i], fontsize=7, color=colors[i] if colors else "black", pad=2)
    return fig
