"""Dataset files written byte for byte in their original formats, for tests that need small real files:
IDX files as in the MNIST distributions, and CIFAR-10/100's pickled batches as Python 2 wrote them."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np

# --------------------------------------------------------------------------- IDX (MNIST family)

def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    """An IDX file exactly as in the MNIST distribution: 0 0 0x08 ndim, big-endian dims, bytes."""
    assert array.dtype == np.uint8
    magic = 0x00000800 | array.ndim  # 0x803 for images, 0x801 for labels
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def write_mnist(folder: Path, gz: bool, seed: int = 0, n_train: int = 50, n_test: int = 20):
    """The four MNIST files of random images (training labels cycle through the 10 classes)."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, array in arrays.items():
        write_idx(folder / name, array, gz)
    return arrays


# --------------------------------------------------------------------------- CIFAR pickles

def py2_pickle(obj) -> bytes:
    """Pickle `obj` byte for byte the way Python 2's cPickle (protocol 2) wrote the CIFAR files.

    `bytes` become Python 2 `str` (BINSTRING opcodes), uint8 arrays go through
    numpy.core.multiarray._reconstruct with their data as a str, as numpy 1.x wrote them.
    """
    out = bytearray(b"\x80\x02")

    def ser(o):
        if isinstance(o, bool):
            out.extend(b"\x88" if o else b"\x89")
        elif o is None:
            out.extend(b"N")
        elif isinstance(o, int):
            if 0 <= o < 256:
                out.extend(b"K" + bytes([o]))
            elif 0 <= o < 65536:
                out.extend(b"M" + struct.pack("<H", o))
            else:
                out.extend(b"J" + struct.pack("<i", o))
        elif isinstance(o, bytes):
            out.extend((b"U" + bytes([len(o)]) if len(o) < 256 else b"T" + struct.pack("<i", len(o))) + o)
        elif isinstance(o, tuple):
            out.extend(b"(")
            for x in o:
                ser(x)
            out.extend(b"t")
        elif isinstance(o, list):
            out.extend(b"](")
            for x in o:
                ser(x)
            out.extend(b"e")
        elif isinstance(o, dict):
            out.extend(b"}(")
            for k, v in o.items():
                ser(k)
                ser(v)
            out.extend(b"u")
        elif isinstance(o, np.ndarray):
            assert o.dtype == np.uint8
            out.extend(b"cnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\n")
            ser((0,))
            ser(b"b")
            out.extend(b"tR(K\x01")
            ser(tuple(o.shape))
            out.extend(b"cnumpy\ndtype\n")
            ser((b"u1", 0, 1))
            out.extend(b"R")
            ser((3, b"|", None, None, None, -1, -1, 0))
            out.extend(b"b\x89")
            ser(np.ascontiguousarray(o).tobytes())
            out.extend(b"tb")
        else:
            raise TypeError(type(o))

    ser(obj)
    out.extend(b".")
    return bytes(out)


WRITERS = {
    "py2-original": py2_pickle,  # what the real cifar-*-python.tar.gz files contain
    "py3-protocol2": lambda obj: pickle.dumps(obj, protocol=2),  # a re-pickled copy
}

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def cifar_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


def write_cifar10(folder: Path, writer, per_batch: int = 10) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for i in range(1, 6):
        batches[f"data_batch_{i}"] = {
            b"batch_label": f"training batch {i} of 5".encode(),
            b"labels": [(j + i) % 10 for j in range(per_batch)],
            b"data": cifar_images(per_batch, seed=i),
            b"filenames": [f"img_{i}_{j}.png".encode() for j in range(per_batch)],
        }
    batches["test_batch"] = {b"batch_label": b"testing batch 1 of 1", b"labels": [j % 10 for j in range(per_batch)],
                             b"data": cifar_images(per_batch, seed=99),
                             b"filenames": [f"test_{j}.png".encode() for j in range(per_batch)]}
    batches["batches.meta"] = {b"num_cases_per_batch": per_batch, b"label_names": [n.encode() for n in CIFAR10_CLASSES],
                               b"num_vis": 3072}
    for name, obj in batches.items():
        (folder / name).write_bytes(writer(obj))
    return batches


def write_cifar100(folder: Path, writer, n: int = 30) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    fine = [f"fine{i:02d}" for i in range(100)]
    coarse = [f"coarse{i:02d}" for i in range(20)]
    files = {}
    for name, seed in (("train", 1), ("test", 2)):
        fine_labels = [(7 * j + seed) % 100 for j in range(n)]
        files[name] = {b"filenames": [f"{name}_{j}.png".encode() for j in range(n)],
                       b"batch_label": f"{name}ing batch 1 of 1".encode(),
                       b"fine_labels": fine_labels, b"coarse_labels": [f // 5 for f in fine_labels],
                       b"data": cifar_images(n, seed)}
    files["meta"] = {b"fine_label_names": [s.encode() for s in fine],
                     b"coarse_label_names": [s.encode() for s in coarse]}
    for name, obj in files.items():
        (folder / name).write_bytes(writer(obj))
    return files


def write_tiny_datasets(root: Path) -> Path:
    """A $CNNLAB_DATA folder where `mnist`, `cifar10` and `cifar100` are found: a few hundred random
    images each, in the files and formats of the original downloads (gzipped IDX, Python 2 pickles)."""
    write_mnist(root / "mnist", gz=True, n_train=300, n_test=100)
    write_cifar10(root / "cifar-10-batches-py", py2_pickle, per_batch=60)
    write_cifar100(root / "cifar-100-python", py2_pickle, n=300)
    return root
