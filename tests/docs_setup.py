"""What the docs tests (test_docs.py, test_docs_tutorial.py) share: the blocks of a Markdown file,
the fixtures of the world the docs assume, and running one block in it.

The blocks of one file share a workspace (the current folder of every command) and run in order,
on one xdist worker (`--dist loadfile`). What the docs assume is there: Fashion-MNIST (the real
one), tiny MNIST and CIFAR-10/100 in $CNNLAB_DATA, a fresh $CNNLAB_CACHE, and a few images of
Fashion-MNIST's test split in the workspace (see `_images`). A test module imports the fixtures
it uses from here (pytest finds fixtures by name in the module).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Iterator

import mddocs
import pytest
import torch
from conftest import HAVE_FMNIST
from original_formats import write_tiny_datasets
from PIL import Image

from cnnlab.data.builtin import DEBIAN_FASHION_MNIST, FASHION_CLASSES, read_idx

needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST,
                                  reason="Fashion-MNIST is not installed (make test installs dataset-fashion-mnist)")

ROOT = Path(__file__).resolve().parent.parent


def blocks(doc: str) -> list[mddocs.Block]:
    return [b for b in mddocs.parse(ROOT / doc, doc) if b.acted_on] if (ROOT / doc).is_file() else []


def params(docs: list[str]) -> list:
    params = [pytest.param(block, id=block.id) for doc in docs for block in blocks(doc)]
    return params or [pytest.param(None, id="none", marks=pytest.mark.skip(reason=f"{', '.join(docs)}: not written"))]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One PyTorch thread here and in the commands started from here: `make test` runs two workers
    on two cores, and with more threads than cores OpenMP's waiting threads starve each other (a
    one-epoch training on a busy machine took 17 s with two threads, 0.2 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """$CNNLAB_DATA for every doc: tiny MNIST, CIFAR-10 and CIFAR-100 in their original formats."""
    return write_tiny_datasets(tmp_path_factory.mktemp("docs-data"))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, Path]]:
    """doc -> (its workspace, its $CNNLAB_CACHE), made on the doc's first block."""
    made: dict[str, tuple[Path, Path]] = {}

    def get(doc: str) -> tuple[Path, Path]:
        if doc not in made:
            name = re.sub(r"\W", "-", doc)
            made[doc] = (_images(tmp_path_factory.mktemp(name)), tmp_path_factory.mktemp(f"{name}-cache"))
        return made[doc]

    return get


def _images(folder: Path) -> Path:
    """Fashion-MNIST test images under the names the docs use: photos/<class>/ (40 images in each of
    3 classes), shoe.png, shirt.png, bag.jpg, photo.png, one.png and more/*.jpg."""
    images = read_idx(DEBIAN_FASHION_MNIST / "t10k-images-idx3-ubyte")
    labels = read_idx(DEBIAN_FASHION_MNIST / "t10k-labels-idx1-ubyte").tolist()
    by_class = {name: [images[i] for i, label in enumerate(labels) if label == c]
                for c, name in enumerate(FASHION_CLASSES)}
    for name in ("Sneaker", "Shirt", "Bag"):
        (folder / "photos" / name.lower()).mkdir(parents=True)
        for n, image in enumerate(by_class[name][:40]):
            Image.fromarray(image).save(folder / "photos" / name.lower() / f"{n:03d}.png")
    files = {"shoe.png": ("Sneaker", 100), "shirt.png": ("Shirt", 100), "bag.jpg": ("Bag", 100),
             "photo.png": ("Ankle boot", 0), "one.png": ("Trouser", 0),
             "more/dress.jpg": ("Dress", 0), "more/coat.jpg": ("Coat", 0), "more/sandal.jpg": ("Sandal", 0)}
    (folder / "more").mkdir()
    for path, (name, n) in files.items():
        Image.fromarray(by_class[name][n]).save(folder / path)
    return folder


def run_in_workspace(block: mddocs.Block, workspace, data_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The block runs in its file's workspace (or is written, or its flags checked, or skipped)."""
    if block.problem:
        pytest.fail(block.problem, pytrace=False)
    if (reason := block.get("skip")) is not None:
        pytest.skip(reason)
    cwd, cache = workspace(block.doc)
    monkeypatch.setenv("CNNLAB_DATA", str(data_folder))
    monkeypatch.setenv("CNNLAB_CACHE", str(cache))
    monkeypatch.delenv("CNNLAB_API_KEY", raising=False)
    mddocs.run_block(block, cwd)
