"""`build_report`: one self-contained HTML page about a trained run, RUN_DIR/report.html.

It re-scores the test split (also writing eval.json), then shows the training curves, confusion,
per-class scores, calibration, the worst mistakes and Grad-CAM maps; every figure is an embedded PNG.
"""

from __future__ import annotations

import base64
import html
import json
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import multiclass_calibration_error
from tqdm import tqdm

from .. import __version__
from ..errors import CnnlabError
from ..evaluation.evaluate import ScoredSplit, score_split
from ..files import atomic_write, write_text
from ..models.classifier import Classifier
from ..models.registry import count_parameters
from ..rundir import RunDir
from . import plots
from .gradcam import gradcam, overlay

EVAL_BATCH = 1024  # images per forward pass
CALIBRATION_BINS = 15  # equal-width confidence bins, as torchmetrics' calibration error uses
CONFUSED_PAIRS = 10
TOP_LOSSES = 24
TOP_LOSS_COLUMNS = 6
CAM_PANELS = 30  # Grad-CAM examples in all: up to 3 per class, one per class for the first 30 when many
CAM_COLUMNS = 6  # three image and heat map pairs per row


@dataclass
class Section:
    """One figure of the page with its heading, how to read it, and optional HTML after it."""
    slug: str
    title: str
    caption: str
    png: bytes
    after: str = ""


def build_report(run_dir: str | Path, dataset: str | None = None, progress: bool = True) -> Path:
    """Score the run's model on the test split and write RUN_DIR/report.html; returns its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CnnlabError(f"Run directory {run_dir} does not exist.")
    history = read_history(run_dir)
    classifier = Classifier.load(run_dir)
    results = score_split(run_dir, classifier, dataset=dataset, batch_size=EVAL_BATCH, progress=progress)
    sections = make_sections(history, classifier, results, progress)
    run = RunDir(run_dir)
    folder = run.report_figures(results.other)  # report/, or report-<dataset>/ for another dataset
    for section in sections:
        atomic_write(folder / f"{section.slug}.png", lambda tmp, png=section.png: tmp.write_bytes(png))
    path = run.report_path(results.other)
    write_text(path, render_page(run_dir, history, classifier, results, sections))
    return path


# ---------------------------------------------------------------- inputs

def read_history(run_dir: Path) -> list[dict[str, Any]]:
    """The per-epoch records of metrics.jsonl; a missing, empty or damaged file is a CnnlabError."""
    run = RunDir(run_dir)
    path = run / run.METRICS
    if not path.is_file():
        raise CnnlabError(f"{run_dir} holds no {run.METRICS}; is it a cnnlab training run directory?")
    history = run.read_metrics()
    if not history:
        raise CnnlabError(f"{path} records no finished epoch; the training did not get through one.")
    return history


# ---------------------------------------------------------------- analyses

def calibration_bins(probabilities: torch.Tensor, labels: torch.Tensor,
                     bins: int = CALIBRATION_BINS) -> tuple[np.ndarray, ...]:
    """Bin edges, accuracy, mean confidence and count per equal-width confidence bin.

    The bins are torchmetrics' (left-closed, from torch.linspace(0, 1, bins + 1)), except that a
    confidence of exactly 1 falls into the last bin rather than one of its own."""
    confidence, predicted = probabilities.max(1)
    edges = torch.linspace(0, 1, bins + 1)
    index = (torch.bucketize(confidence, edges, right=True) - 1).clamp(0, bins - 1)
    counts = torch.bincount(index, minlength=bins).double()
    correct = torch.bincount(index, weights=(predicted == labels).double(), minlength=bins)
    summed = torch.bincount(index, weights=confidence.double(), minlength=bins)
    safe = counts.clamp(min=1)
    return edges.numpy(), (correct / safe).numpy(), (summed / safe).numpy(), counts.numpy()


def expected_calibration_error(results: ScoredSplit) -> float:
    return multiclass_calibration_error(results.probabilities, results.labels, len(results.report["per_class"]),
                                        n_bins=CALIBRATION_BINS, norm="l1").item()


def confused_pairs(report: dict[str, Any], top: int = CONFUSED_PAIRS) -> list[dict[str, Any]]:
    """The off-diagonal cells of the confusion matrix with the most images, largest first."""
    matrix = np.array(report["confusion_matrix"])
    names = [row["class"] for row in report["per_class"]]
    np.fill_diagonal(matrix, 0)
    pairs = []
    for flat in np.argsort(-matrix, axis=None, kind="stable")[:top]:
        true, predicted = np.unravel_index(flat, matrix.shape)
        count = int(matrix[true, predicted])
        if count == 0:
            break
        support = report["per_class"][true]["support"]
        pairs.append({"true": names[true], "predicted": names[predicted], "count": count,
                      "share": count / max(support, 1)})
    return pairs


def row_normalised(report: dict[str, Any]) -> np.ndarray:
    """The confusion matrix with each row divided by its true class's image count."""
    matrix = np.array(report["confusion_matrix"], dtype=np.float64)
    return matrix / np.maximum(matrix.sum(1, keepdims=True), 1)


def display_image(image: torch.Tensor) -> np.ndarray:
    """uint8 (C, H, W) -> (H, W) for grayscale or (H, W, 3) for colour, as matplotlib shows them."""
    return image[0].numpy() if image.shape[0] == 1 else image.permute(1, 2, 0).numpy()


def short(name: str, width: int = 14) -> str:
    return name if len(name) <= width else name[:width - 1] + "…"


def prediction_title(results: ScoredSplit, names: list[str], i: int) -> str:
    """'pred Coat 93%': the predicted class of test image i and the probability given to it."""
    predicted = int(results.predictions[i])
    return f"pred {short(names[predicted])} {float(results.probabilities[i, predicted]):.0%}"


def mistake_color(results: ScoredSplit, i: int) -> str:
    return "#b00020" if results.predictions[i] != results.labels[i] else "black"


def cam_examples(results: ScoredSplit, classes: int) -> tuple[list[int], int]:
    """Test images to explain and the number of classes they cover: per class the first correctly
    classified ones (misclassified ones only when too few are right), CAM_PANELS at most."""
    per_class = max(1, min(3, CAM_PANELS // classes))
    shown = min(classes, CAM_PANELS // per_class)
    right = results.predictions == results.labels
    chosen = []
    for c in range(shown):
        of_class = results.labels == c
        ranked = torch.cat([torch.nonzero(of_class & right).flatten(), torch.nonzero(of_class & ~right).flatten()])
        chosen += ranked[:per_class].tolist()
    return chosen, shown


# ---------------------------------------------------------------- figures

def make_sections(history: list[dict[str, Any]], classifier: Classifier, results: ScoredSplit,
                  progress: bool) -> list[Section]:
    """Every figure of the page, in order."""
    steps = [curves_section, confusion_section, per_class_section, calibration_section, top_losses_section,
             gradcam_section]
    bar = tqdm(steps, desc="drawing figures", unit="figure", disable=not progress, file=sys.stderr, leave=False)
    return [step(history, classifier, results) for step in bar]


def curves_section(history: list[dict[str, Any]], classifier: Classifier, results: ScoredSplit) -> Section:
    same_data = results.dataset == classifier.card.dataset
    fig = plots.training_curves(history, results.report["accuracy"] if same_data else None)
    return Section("curves", "Training curves", "Per epoch, from metrics.jsonl: the training loss should fall "
                   "steadily; a validation or test accuracy that stalls while training accuracy climbs means "
                   "overfitting; the star is the test accuracy measured for this report.", plots.png_bytes(fig))


def confusion_section(history: list[dict[str, Any]], classifier: Classifier, results: ScoredSplit) -> Section:
    fig = plots.confusion_heatmap(row_normalised(results.report), classifier.class_names)
    rows = "".join(f"<tr><td>{html.escape(p['true'])}</td><td>{html.escape(p['predicted'])}</td>"
                   f"<td class='num'>{p['count']}</td><td class='num'>{p['share']:.1%}</td></tr>"
                   for p in confused_pairs(results.report))
    after = ("<h3>Most confused pairs</h3><table id='confused-pairs'><tr><th>true class</th><th>predicted as</th>"
             f"<th>images</th><th>share of the true class</th></tr>{rows}</table>"
             if rows else "<p>No test image was misclassified.</p>")
    return Section("confusion", "Confusion matrix", "Each row is a true class and sums to 100%: the diagonal is "
                   "that class's recall, and a dark cell off the diagonal is a class the model mistakes it for.",
                   plots.png_bytes(fig), after)


def per_class_section(history: list[dict[str, Any]], classifier: Classifier, results: ScoredSplit) -> Section:
    per_class = results.report["per_class"]
    fig = plots.per_class_bars(per_class)
    rows = "".join(f"<tr><td>{html.escape(r['class'])}</td><td class='num'>{r['precision']:.1%}</td>"
                   f"<td class='num'>{r['recall']:.1%}</td><td class='num'>{r['f1']:.1%}</td>"
                   f"<td class='num'>{r['support']}</td></tr>" for r in per_class)
    table = ("<table id='per-class'><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th>"
             f"<th>images</th></tr>{rows}</table>")
    many = len(per_class) > plots.MAX_BAR_CLASSES
    caption = ("Precision: of the images predicted as the class, the share that are it; recall: of the class's "
               "images, the share found; F1 combines both." +
               (f" The chart shows the {plots.MAX_BAR_CLASSES} classes with the lowest F1; the table lists all."
                if many else ""))
    return Section("per_class", "Per-class precision, recall and F1", caption, plots.png_bytes(fig), table)


def calibration_section(history: list[dict[str, Any]], classifier: Classifier, results: ScoredSplit) -> Section:
    ece = expected_calibration_error(results)
    fig = plots.reliability_diagram(*calibration_bins(results.probabilities, results.labels), ece=ece)
    return Section("calibration", "Calibration", "Test images grouped by the probability the model gave its "
                   "prediction: bars on the dashed diagonal mean that probability can be trusted; bars below it "
                   "mean overconfidence. The expected calibration error is the image-weighted mean gap.",
                   plots.png_bytes(fig))


def top_losses_section(history: list[dict[str, Any]], classifier: Classifier, results: ScoredSplit) -> Section:
    losses = F.cross_entropy(results.logits, results.labels, reduction="none")
    index = losses.argsort(descending=True)[:TOP_LOSSES].tolist()
    names = classifier.class_names
    titles = [f"true {short(names[int(results.labels[i])])}\n{prediction_title(results, names, i)}" for i in index]
    colors = [mistake_color(results, i) for i in index]
    fig = plots.image_grid([display_image(results.images[i]) for i in index], titles, TOP_LOSS_COLUMNS, colors)
    return Section("top_losses", "Top losses", f"The {len(index)} test images with the highest cross-entropy loss: "
                   "the true label, the prediction and the probability given to it (red when wrong). Confident "
                   "mistakes here are often mislabelled or ambiguous images.", plots.png_bytes(fig))


def gradcam_section(history: list[dict[str, Any]], classifier: Classifier, results: ScoredSplit) -> Section:
    names = classifier.class_names
    index, classes = cam_examples(results, len(names))
    images = classifier.fit(results.images[index])
    # explain the class the page reports as predicted (with test-time augmentation), not a re-prediction
    targets = results.predictions[index].to(classifier.device)
    heat = gradcam(classifier.model, classifier.prepare(images), target=targets).cpu()
    panels, titles, colors = [], [], []
    for k, i in enumerate(index):
        panels += [display_image(images[k]), overlay(images[k], heat[k])]
        titles += [short(names[int(results.labels[i])]), prediction_title(results, names, i)]
        colors += ["black", mistake_color(results, i)]
    fig = plots.image_grid(panels, titles, CAM_COLUMNS, colors)
    caption = ("Each test image next to its Grad-CAM map for the predicted class: warm colours mark the regions "
               "that raised that class's score most. Maps on the object itself are reassuring; maps on background "
               "or borders suggest a shortcut." +
               (f" Shown for the first {classes} classes." if classes < len(names) else ""))
    return Section("gradcam", "What the model looks at (Grad-CAM)", caption, plots.png_bytes(fig))


# ---------------------------------------------------------------- page

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; color: #1b1b1b;
       max-width: 760px; margin: 24px auto; padding: 0 16px; line-height: 1.45; }
h1 { font-size: 1.5em; margin-bottom: 4px; } h2 { font-size: 1.2em; margin-top: 32px;
border-bottom: 1px solid #ddd; padding-bottom: 4px; } h3 { font-size: 1em; }
.run { color: #555; margin-top: 0; word-break: break-all; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 3px 16px; margin: 16px 0; }
dl.facts dt { color: #555; } dl.facts dd { margin: 0; }
#test-accuracy { font-size: 1.25em; font-weight: 600; }
figure { margin: 12px 0; } figure img { max-width: 100%; height: auto; display: block; }
figcaption { color: #444; font-size: 0.9em; margin-top: 6px; }
table { border-collapse: collapse; font-size: 0.9em; margin: 8px 0; }
th, td { padding: 3px 10px; border-bottom: 1px solid #e4e4e4; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
footer { color: #777; font-size: 0.8em; margin: 32px 0; }
"""


def format_percent(value: float) -> str:
    """How the page shows accuracies: 0.929 -> '92.90%'."""
    return f"{100 * value:.2f}%"


def format_duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{seconds:.1f} s" if seconds < 60 else f"{minutes} min {rest} s"


def header_facts(run_dir: Path, history: list[dict[str, Any]], classifier: Classifier,
                 results: ScoredSplit) -> list[tuple[str, str, str]]:
    """(label, value, element id) rows of the page header."""
    card, summary, config = classifier.card, RunDir(run_dir).read_summary(), RunDir(run_dir).read_config()
    seconds = summary.get("train_seconds", history[-1].get("elapsed_seconds"))
    args = json.dumps(card.model_args, separators=(", ", ": ")) if card.model_args else ""
    report = results.report
    return [
        ("test accuracy", format_percent(report["accuracy"]), "test-accuracy"),
        ("test images", f"{report['images']:,} ({results.dataset})", "test-images"),
        ("macro F1", format_percent(report["macro_f1"]), "macro-f1"),
        ("trained on", str(card.dataset or config.get("dataset", "?")), "dataset"),
        ("model", f"{card.architecture} {args}".strip(), "model"),
        ("parameters", f"{count_parameters(classifier.model):,}", "parameters"),
        ("recipe", str(card.recipe or config.get("recipe", "?")), "recipe"),
        ("epochs", str(summary.get("epochs", len(history))), "epochs"),
        ("training time", format_duration(float(seconds)) if seconds is not None else "?", "training-time"),
        ("test-time augmentation", classifier.tta, "tta"),
        ("weights (sha256)", card.weights_sha256[:16], "weights-sha256"),
    ]


def render_page(run_dir: Path, history: list[dict[str, Any]], classifier: Classifier, results: ScoredSplit,
                sections: list[Section]) -> str:
    facts = "".join(f"<dt>{html.escape(label)}</dt><dd><span id='{key}'>{html.escape(value)}</span></dd>"
                    for label, value, key in header_facts(run_dir, history, classifier, results))
    body = "".join(_render_section(section) for section in sections)
    stamp = datetime.now().strftime("%Y-%m-%d %H:%M")
    title = f"cnnlab report: {run_dir.resolve().name}"
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<meta name='cnnlab-weights-sha256' content='{classifier.card.weights_sha256}'>"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p class='run'>{html.escape(str(run_dir))}</p>"
            f"<dl class='facts'>{facts}</dl>{body}"
            f"<footer>Written by cnnlab {__version__} on {stamp}; the test figures are also in "
            f"{results.path.name if results.path else RunDir.EVAL} and the images in {RunDir(run_dir).report_figures(results.other).name}/."
            f"</footer></body></html>\n")


def _render_section(section: Section) -> str:
    data = base64.b64encode(section.png).decode("ascii")
    return (f"<section id='{section.slug}'><h2>{html.escape(section.title)}</h2><figure>"
            f"<img src='data:image/png;base64,{data}' alt='{html.escape(section.title)}'>"
            f"<figcaption>{html.escape(section.caption)}</figcaption></figure>{section.after}</section>")
