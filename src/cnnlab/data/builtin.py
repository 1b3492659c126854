"""The built-in dataset sources by name: Fashion-MNIST, MNIST, CIFAR-10/100.

Each source says which files it needs, where to look for them and how to download them,
and reads them into whole uint8 (N, C, H, W) splits with int64 labels.
"""

from __future__ import annotations

import gzip
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import CnnlabError, DatasetNotFound
from ..files import cache_dir
from ..registry import Registry
from .split import Split


@dataclass
class DatasetSource:
    name: str
    description: str
    files: tuple[str, ...]  # what must be present in one of the folders searched
    folders: Callable[[], list[Path]]  # where to look, in order
    read: Callable[[Path], tuple[Split, Split, list[str]]]
    download: Callable[[Path], None]
    allow_flip: bool
    shape: tuple[int, int] = (1, 28)  # (channels, side) of its images

    def locate(self) -> Path | None:
        """The first folder that holds every file (plain or .gz for IDX files), or None."""
        for folder in self.folders():
            if all(_exists_maybe_gz(folder / f) for f in self.files):
                return folder
        return None


_SOURCES: Registry[DatasetSource] = Registry("dataset", also="folder:PATH")


def register_dataset(source: DatasetSource) -> DatasetSource:
    return _SOURCES.register(source.name, source)


def list_datasets() -> list[str]:
    return _SOURCES.names()


def get_source(name: str) -> DatasetSource:
    return _SOURCES.get(name)


def _user_folders(*subdirs: str) -> Callable[[], list[Path]]:
    """$CNNLAB_DATA/<subdir> and <cache>/<subdir> for each subdir, in that order."""
    def folders() -> list[Path]:
        roots = [Path(os.environ["CNNLAB_DATA"])] if os.environ.get("CNNLAB_DATA") else []
        return [root / sub for root in roots + [cache_dir()] for sub in subdirs]
    return folders


def _exists_maybe_gz(path: Path) -> bool:
    return path.is_file() or path.with_name(path.name + ".gz").is_file()


def _open_maybe_gz(path: Path) -> bytes:
    if path.is_file():
        return path.read_bytes()
    return gzip.decompress(path.with_name(path.name + ".gz").read_bytes())


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (plain or gzipped) of unsigned bytes, as in the MNIST distributions.

    Written here rather than through torchvision's reader because that one needs the files
    uncompressed, while Debian installs them gzipped in a read-only folder.
    """
    data = _open_maybe_gz(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise CnnlabError(f"{path} is not an IDX file of unsigned bytes; re-download it.")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise CnnlabError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {array.size}.")
    return array.reshape(shape)


_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _read_idx_splits(folder: Path, classes: list[str]) -> tuple[Split, Split, list[str]]:
    arrays = [read_idx(folder / name) for name in _IDX_FILES]

    def split(images: np.ndarray, labels: np.ndarray) -> Split:
        return Split(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))

    return split(arrays[0], arrays[1]), split(arrays[2], arrays[3]), classes


def _torchvision_download(cls_name: str) -> Callable[[Path], None]:
    def download(root: Path) -> None:
        # imported here: torchvision takes seconds to import, and listing or reading datasets never needs it
        import torchvision.datasets as tvd

        root.mkdir(parents=True, exist_ok=True)
        cls = getattr(tvd, cls_name)
        for train in (True, False):
            cls(root=str(root), train=train, download=True)
    return download


DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]

register_dataset(DatasetSource(
    name="fashion-mnist",
    description="Zalando's Fashion-MNIST: 60k+10k grayscale 28x28 clothing images, 10 classes",
    files=_IDX_FILES,
    folders=lambda: _user_folders("fashion-mnist", "FashionMNIST/raw")() + [DEBIAN_FASHION_MNIST],
    read=lambda folder: _read_idx_splits(folder, FASHION_CLASSES),
    download=_torchvision_download("FashionMNIST"),
    allow_flip=True,
))

register_dataset(DatasetSource(
    name="mnist",
    description="MNIST handwritten digits: 60k+10k grayscale 28x28 images, 10 classes",
    files=_IDX_FILES,
    folders=_user_folders("mnist", "MNIST/raw"),
    read=lambda folder: _read_idx_splits(folder, [str(d) for d in range(10)]),
    download=_torchvision_download("MNIST"),
    allow_flip=False,  # a mirrored 2 is not a 2
))


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickle CIFAR batches allowing only the numpy globals they need.

    torchvision's CIFAR classes call plain `pickle.load`, which runs any code a planted
    file asks for; this loader refuses every other global.
    """

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            obj = _ArrayUnpickler(fh, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise CnnlabError(f"{path} is not a valid CIFAR batch ({exc}); delete it and download again.") from None
    if not isinstance(obj, dict):
        raise CnnlabError(f"{path} is not a valid CIFAR batch; delete it and download again.")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_split(folder: Path, names: list[str], label_key: str) -> Split:
    batches = [_unpickle(folder / name) for name in names]
    try:
        data = np.concatenate([np.asarray(b["data"], dtype=np.uint8).reshape(-1, 3, 32, 32) for b in batches])
        labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
    except (KeyError, ValueError, TypeError) as exc:
        raise CnnlabError(f"The CIFAR batches in {folder} are malformed ({type(exc).__name__}: {exc}); "
                          "delete them and download again.") from None
    if len(data) != len(labels):
        raise CnnlabError(f"The CIFAR batches in {folder} hold {len(data)} images but {len(labels)} labels.")
    return Split(torch.from_numpy(data.copy()), torch.from_numpy(labels))


def _names(meta: dict, key: str) -> list[str]:
    return [n.decode() if isinstance(n, bytes) else str(n) for n in meta[key]]


def _read_cifar10(folder: Path) -> tuple[Split, Split, list[str]]:
    train = _cifar_split(folder, [f"data_batch_{i}" for i in range(1, 6)], "labels")
    test = _cifar_split(folder, ["test_batch"], "labels")
    classes = _names(_unpickle(folder / "batches.meta"), "label_names")
    return train, test, classes


def _read_cifar100(folder: Path) -> tuple[Split, Split, list[str]]:
    train = _cifar_split(folder, ["train"], "fine_labels")
    test = _cifar_split(folder, ["test"], "fine_labels")
    classes = _names(_unpickle(folder / "meta"), "fine_label_names")
    return train, test, classes


register_dataset(DatasetSource(
    name="cifar10",
    description="CIFAR-10: 50k+10k colour 32x32 images, 10 classes (python pickle release)",
    files=tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta"),
    folders=_user_folders("cifar-10-batches-py"),
    read=_read_cifar10,
    download=_torchvision_download("CIFAR10"),
    allow_flip=True,
    shape=(3, 32),
))

register_dataset(DatasetSource(
    name="cifar100",
    description="CIFAR-100: 50k+10k colour 32x32 images, 100 fine classes (python pickle release)",
    files=("train", "test", "meta"),
    folders=_user_folders("cifar-100-python"),
    read=_read_cifar100,
    download=_torchvision_download("CIFAR100"),
    allow_flip=True,
    shape=(3, 32),
))


def _not_found(source: DatasetSource, reason: str) -> DatasetNotFound:
    folders = ", ".join(str(p) for p in source.folders())
    hint = "run `apt-get install dataset-fashion-mnist`, " if source.name == "fashion-mnist" else ""
    return DatasetNotFound(
        f"Dataset {source.name} not found: looked for {', '.join(source.files)} in {folders}, and {reason}; "
        f"{hint}put the files in one of those folders (or set CNNLAB_DATA), or connect to the internet.")


def locate_or_download(source: DatasetSource, download: bool = True) -> Path:
    folder = source.locate()
    if folder is not None:
        return folder
    if not download:
        raise _not_found(source, "downloading is switched off")
    try:
        source.download(cache_dir())
    except Exception as exc:  # any network or HTTP failure means: offline, or the mirror is gone
        raise _not_found(source, f"the download failed ({type(exc).__name__})") from None
    folder = source.locate()
    if folder is None:
        raise _not_found(source, "the download did not produce them")
    return folder


def dataset_status() -> list[tuple[str, str, str]]:
    """(name, description, where it was found or why it is missing) for `cnnlab datasets`; here, not
    beside load_dataset, so that listing does not import the folder reader (and torchvision)."""
    rows = []
    for source in map(get_source, list_datasets()):
        folder = source.locate()
        where = f"found in {folder}" if folder else "missing: will be downloaded on first use (needs internet)"
        rows.append((source.name, source.description, where))
    rows.append(("folder:PATH", "your own images, one sub-folder per class (ImageFolder layout)", "-"))
    return rows
