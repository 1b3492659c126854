"""`cnnlab report`: the self-contained HTML page, as files and in a real headless Chromium.

The browser test uses Debian's /usr/bin/chromium through Playwright; it never downloads a browser."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchmetrics.functional.classification import multiclass_calibration_error

from cnnlab import cli
from cnnlab.card import ModelCard
from cnnlab.evaluation.metrics import classification_report
from cnnlab.insight.report import ScoredSplit, calibration_bins, make_sections, render_page
from cnnlab.models.classifier import Classifier
from cnnlab.models.registry import create_model
from cnnlab.rundir import RunDir

os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
FIGURES = ["curves", "confusion", "per_class", "calibration", "top_losses", "gradcam"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class _Tags(HTMLParser):
    """Every start tag of a page with its attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))


def parse_tags(page: str) -> list[tuple[str, dict[str, str]]]:
    parser = _Tags()
    parser.feed(page)
    return parser.tags


@pytest.fixture(scope="module")
def reported(fmnist_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """A copy of the Fashion-MNIST run after `python -m cnnlab report RUN --no-progress`."""
    run = tmp_path_factory.mktemp("report") / "run"
    shutil.copytree(fmnist_run, run)
    proc = subprocess.run([sys.executable, "-m", "cnnlab", "report", str(run), "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    return run, proc


def test_report_is_one_self_contained_page_with_its_figures_beside_it(reported):
    run, proc = reported
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"wrote {run / 'report.html'}"
    page = (run / "report.html").read_text(encoding="utf-8")
    assert len(page.encode()) < 3_000_000

    tags = parse_tags(page)
    assert not [tag for tag, _ in tags if tag in ("script", "link", "iframe", "object", "embed")]
    for tag, attrs in tags:
        for name in ("src", "href"):
            assert not attrs.get(name, "").startswith(("http://", "https://", "//")), (tag, attrs)
    assert "url(" not in page and "@import" not in page
    sources = [attrs["src"] for tag, attrs in tags if tag == "img"]
    assert len(sources) == len(FIGURES)
    prefix = "data:image/png;base64,"
    assert all(src.startswith(prefix) for src in sources)
    for name, src in zip(FIGURES, sources):  # the embedded images are the files in report/
        assert base64.b64decode(src[len(prefix):]) == (run / RunDir.REPORT_FIGURES / f"{name}.png").read_bytes()
    assert sorted(p.name for p in (run / RunDir.REPORT_FIGURES).iterdir()) == sorted(f"{n}.png" for n in FIGURES)

    accuracy = json.loads((run / "eval.json").read_text())["accuracy"]
    assert f"<span id='test-accuracy'>{accuracy:.2%}</span>" in page


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


def test_report_renders_in_chromium_with_every_figure_and_the_eval_accuracy(reported, browser, tmp_path):
    run, proc = reported
    assert proc.returncode == 0, proc.stderr
    page = browser.new_page(viewport={"width": 1000, "height": 1400})
    try:
        page.set_default_timeout(60_000)
        page.goto((run / "report.html").as_uri(), wait_until="load")
        widths = page.evaluate("() => Array.from(document.images, img => img.complete ? img.naturalWidth : 0)")
        accuracy_text = page.text_content("#test-accuracy")
        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot), full_page=True)
    finally:
        page.close()

    assert len(widths) == len(FIGURES) and all(w > 0 for w in widths), widths
    accuracy = json.loads((run / "eval.json").read_text())["accuracy"]
    assert accuracy_text == f"{accuracy:.2%}"
    assert shot.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(shot) as image:
        assert image.width == 1000 and image.height > 3000  # every section, not just the first screen
    assert shot.stat().st_size > 100_000


@pytest.mark.parametrize("case", ["missing directory", "no metrics.jsonl"])
def test_a_run_directory_without_training_records_is_one_line_and_exit_2(case, fmnist_run, tmp_path, capsys):
    run = tmp_path / "run"
    if case == "no metrics.jsonl":
        shutil.copytree(fmnist_run, run)
        (run / "metrics.jsonl").unlink()
    assert cli.main(["report", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert ("does not exist" if case == "missing directory" else "metrics.jsonl") in err
    assert not (run / "report.html").exists()


def test_the_reliability_bins_give_torchmetrics_calibration_error():
    generator = torch.Generator().manual_seed(0)
    probabilities = torch.softmax(3 * torch.randn(2000, 7, generator=generator), dim=1)
    labels = torch.randint(0, 7, (2000,), generator=generator)
    _, accuracy, confidence, counts = calibration_bins(probabilities, labels)
    ece = float((counts / counts.sum() * abs(accuracy - confidence)).sum())
    expected = multiclass_calibration_error(probabilities, labels, 7, n_bins=15, norm="l1").item()
    assert ece == pytest.approx(expected, abs=1e-5)


def test_a_hundred_classes_still_make_every_figure(tmp_path):
    """Figures for 100 classes (heat map labels, bar chart and Grad-CAM grid capped) on random data."""
    names = [f"class-{i:03d}" for i in range(100)]
    model = create_model("fastnet", 3, 100, widths=[8, 16, 16])
    card = ModelCard(architecture="fastnet", model_args={"widths": [8, 16, 16]}, class_names=names, in_channels=3,
                     image_size=(16, 16), mean=[0.5] * 3, std=[0.25] * 3, dataset="synthetic")
    classifier = Classifier(model, card)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (300, 3, 16, 16), dtype=torch.uint8, generator=generator)
    labels = torch.arange(300) % 100
    logits = classifier.logits(images)
    results = ScoredSplit("synthetic", images, labels, logits, classification_report(logits, labels, names))
    history = [{"epoch": e, "train_loss": 4.0 / e, "train_accuracy": 0.1 * e, "val_accuracy": None, "lr": 0.1}
               for e in (1, 2, 3)]

    sections = make_sections(history, classifier, results, progress=False)
    assert [s.slug for s in sections] == FIGURES
    for section in sections:
        assert section.png[:8] == PNG_SIGNATURE
        with Image.open(io.BytesIO(section.png)) as image:
            assert image.width <= 800 and image.height <= 2000, (section.slug, image.size)
    page = render_page(tmp_path, history, classifier, results, sections)
    assert len([t for t, _ in parse_tags(page) if t == "img"]) == len(FIGURES)
    assert page.count("<tr>") == 1 + 100 + 1 + 10  # per-class table (all classes) and the confused pairs
