"""Classify image files, folders and globs, streaming in batches (`cnnlab predict`).

Paths are expanded first (names only), then images are decoded a batch at a time, so memory
stays flat however large the folder. A file that cannot be read gets its own row with the
reason and the rest are still classified. The onnx backend never imports torch.
"""

from __future__ import annotations

import csv
import glob
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

from tqdm import tqdm

from ..errors import CnnlabError, InvalidSetting
from ..images.spec import IMAGE_EXTENSIONS, UnreadableImage, walk_images


class Result(NamedTuple):
    path: str
    predictions: list[tuple[str, float]]  # (label, probability), best first
    error: str | None = None


class Backend(NamedTuple):
    read: Callable[[Path], Any]  # path -> one decoded image; raises on unreadable files
    classify: Callable[[list[Any], int], list[list[tuple[str, float]]]]


@dataclass(frozen=True)
class Counts:
    """What `predict_paths` did: files classified, and files that could not be read (each has its row)."""
    classified: int
    failed: int

    @property
    def total(self) -> int:
        return self.classified + self.failed


def expand_paths(specs: Sequence[str]) -> list[Path]:
    """Files as given, folders walked recursively (image extensions, no hidden files), globs
    expanded; sorted within each spec, duplicates dropped. A spec matching nothing is an error."""
    found: dict[Path, None] = {}
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            matches = sorted(walk_images(path))
        elif path.exists():
            matches = [path]
        elif glob.has_magic(spec):
            matches = []
            for hit in sorted(glob.glob(spec, recursive=True)):
                matches += sorted(walk_images(Path(hit))) if Path(hit).is_dir() else [Path(hit)]
        else:
            raise CnnlabError(f"{spec} does not exist; give image files, folders or glob patterns.")
        if not matches:
            raise CnnlabError(f"{spec} holds no image files ({', '.join(IMAGE_EXTENSIONS[:5])}, ...).")
        found.update(dict.fromkeys(matches))
    return list(found)


def make_backend(run_dir: str, backend: str, device: str = "cpu", precision: str = "fp32",
                 tta: str | None = None) -> Backend:
    """The torch Classifier, or the torch-free onnxruntime one, behind the same two calls.
    tta: override the test-time augmentation model.json records (None keeps it)."""
    # Imported here, not at the top, on purpose: the onnx path must never import torch, which
    # the torch backend's modules do, and the torch path need not load onnxruntime.
    if backend == "onnx":
        from .onnx_runtime import OnnxClassifier
        from .onnx_runtime import read_image as read_onnx

        if precision != "fp32":
            raise InvalidSetting("precision", f"{precision} is for the torch backend; "
                                              "the onnx backend computes in fp32.")
        model = OnnxClassifier.load(run_dir)
        read = read_onnx
    else:
        from ..images.tensors import read_image
        from ..models.classifier import Classifier

        model = Classifier.load(run_dir, device=device, precision=precision)
        read = read_image
    model.tta = tta or model.tta
    return Backend(read, lambda images, k: _pairs(model.predict(images, top_k=k)))


def _pairs(batch: list[list[Any]]) -> list[list[tuple[str, float]]]:
    return [[(p.label, p.probability) for p in row] for row in batch]


def classify_files(paths: Iterable[Path], backend: Backend, *, top_k: int = 1, batch_size: int = 256,
                   workers: int = 2) -> Iterator[Result]:
    """Yield one Result per path, in order. `workers` threads decode the next batch while the
    model classifies the current one, so at most two batches of images are held at once."""
    source = iter(paths)
    chunks = iter(lambda: list(islice(source, batch_size)), [])  # lists of paths until exhausted
    read = partial(_read_one, backend)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cnnlab-decode") as pool:
        upcoming = pool.map(read, next(chunks, []))
        while decoded := list(upcoming):
            upcoming = pool.map(read, next(chunks, []))  # submitted now: decodes while this batch runs
            ok = [image for _, image, _ in decoded if image is not None]
            rows = iter(backend.classify(ok, top_k) if ok else [])
            for path, image, error in decoded:
                yield Result(str(path), [], error) if image is None else Result(str(path), next(rows))


def _read_one(backend: Backend, path: Path) -> tuple[Path, Any, str | None]:
    """(path, decoded image or None, the reason it could not be read)."""
    try:
        return path, backend.read(path), None
    except UnreadableImage as exc:
        return path, None, f"not a readable image ({exc})"
    except OSError as exc:
        return path, None, f"cannot read the file ({exc.strerror or exc})"


def predict_paths(run_dir: str, specs: Sequence[str], *, top_k: int = 1, fmt: str = "table",
                  batch_size: int = 256, backend: str = "torch", device: str = "cpu", precision: str = "fp32",
                  tta: str | None = None, progress: bool = True, out=None) -> Counts:
    """Write one result per file to `out` (default stdout) as a table, JSON or CSV; a file that
    cannot be read gets a row with the reason. Returns how many were classified and how many failed."""
    if top_k < 1:
        raise InvalidSetting("top_k", f"must be at least 1, got {top_k}.")
    if batch_size < 1:
        raise InvalidSetting("batch_size", f"must be at least 1, got {batch_size}.")
    out = out or sys.stdout
    paths = expand_paths(specs)
    model = make_backend(run_dir, backend, device, precision, tta)
    bar = tqdm(paths, desc="predict", unit="img", disable=not progress, file=sys.stderr, leave=False)
    results = classify_files(bar, model, top_k=top_k, batch_size=batch_size)
    classified = _WRITERS[fmt](results, out, top_k)
    bar.close()
    return Counts(classified, len(paths) - classified)


def _write_table(results: Iterable[Result], out, top_k: int) -> int:
    classified = 0
    for r in results:
        if r.error:
            cells = f"ERROR: {r.error}"
        else:
            classified += 1
            cells = "  ".join(f"{label} {prob:.3f}" for label, prob in r.predictions)
        print(f"{r.path}\t{cells}", file=out)
    return classified


def _write_json(results: Iterable[Result], out, top_k: int) -> int:
    # written item by item: a JSON list that never has to sit in memory whole
    classified, first = 0, True
    out.write("[")
    for r in results:
        if r.error:
            item: dict[str, Any] = {"path": r.path, "error": r.error}
        else:
            classified += 1
            item = {"path": r.path, "predictions": [{"label": label, "probability": prob}
                                                    for label, prob in r.predictions]}
        out.write(("\n  " if first else ",\n  ") + json.dumps(item))
        first = False
    out.write("\n]\n" if not first else "]\n")
    return classified


def _write_csv(results: Iterable[Result], out, top_k: int) -> int:
    writer = csv.writer(out)
    writer.writerow(["path", *[f"{kind}_{i}" for i in range(1, top_k + 1) for kind in ("label", "probability")],
                     "error"])
    classified = 0
    for r in results:
        cells: list[Any] = []
        for label, prob in r.predictions:
            cells += [label, f"{prob:.6f}"]
        cells += [""] * (2 * top_k - len(cells))
        classified += r.error is None
        writer.writerow([r.path, *cells, r.error or ""])
    return classified


_WRITERS = {"table": _write_table, "json": _write_json, "csv": _write_csv}
