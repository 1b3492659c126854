"""bundle_from_arrays and bundle_from_dataset: the user's arrays, tensors and torch Datasets become
DatasetBundles of uint8 images, in memory or streamed to disk, on 500 real Fashion-MNIST images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from conftest import needs_fmnist
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torchvision.datasets import FakeData

import cnnlab.data.memory
from cnnlab.data.load import load_dataset
from cnnlab.data.memory import FLOAT_NOTE, bundle_from_arrays, bundle_from_dataset
from cnnlab.data.prepared import META_FILE, DiskImages
from cnnlab.errors import CnnlabError
from cnnlab.images.tensors import read_image

pytestmark = [needs_fmnist, pytest.mark.usefixtures("use_cache_env")]

PER_CLASS = 50


@pytest.fixture(scope="module")
def gray() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The first 50 training images of each Fashion-MNIST class: uint8 (500, 1, 28, 28), labels, class names."""
    bundle = load_dataset("fashion-mnist", val_split=0, progress=False)
    labels = bundle.train.labels
    index = torch.cat([torch.nonzero(labels == c).flatten()[:PER_CLASS] for c in range(10)]).sort().values
    return bundle.train.images[index].numpy(), labels[index].numpy(), bundle.class_names


@pytest.fixture(scope="module")
def rgb(gray: tuple[np.ndarray, np.ndarray, list[str]]) -> np.ndarray:
    """Colour images whose three channels are three different photos: (500, 3, 28, 28)."""
    x = gray[0]
    return np.concatenate([x, np.roll(x, 1, 0), np.roll(x, 2, 0)], axis=1)


def one_sentence(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and message[0].isupper() and message.endswith(".") and ". " not in message, message
    return message


def as_given(images: Any, labels: Any, **kw: Any):
    """A bundle whose train and test splits are `images` as given (no hold-out drawn)."""
    return bundle_from_arrays(images, labels, test=(images, labels), **kw)


# ---------------------------------------------------------------- arrays: layouts and values

GRAY_FORMS = {
    "numpy NCHW uint8": lambda x: x,
    "numpy NHW uint8": lambda x: x[:, 0],
    "numpy NHWC uint8": lambda x: x.transpose(0, 2, 3, 1),
    "torch NCHW uint8": lambda x: torch.from_numpy(x),
    "torch NHW uint8": lambda x: torch.from_numpy(x[:, 0]),
    "numpy int64": lambda x: x.astype(np.int64),
    "torch int16 NHWC": lambda x: torch.from_numpy(x.astype(np.int16)).permute(0, 2, 3, 1),
    "list of lists": lambda x: x[:, 0].tolist(),
    "numpy float32 0-1": lambda x: x.astype(np.float32) / 255,
    "numpy float64 0-1 NHW": lambda x: x[:, 0] / 255.0,
    "torch float32 0-1 (ToTensor)": lambda x: torch.from_numpy(x).float() / 255,
    "torch float16 0-1": lambda x: (torch.from_numpy(x).float() / 255).half(),
}


@pytest.mark.parametrize("form", GRAY_FORMS)
def test_every_grayscale_layout_and_dtype_gives_the_same_uint8_images(gray, form):
    x, y, names = gray
    bundle = as_given(GRAY_FORMS[form](x), y, class_names=names)
    assert bundle.train.images.dtype == torch.uint8 and torch.equal(bundle.train.images, torch.from_numpy(x))
    assert torch.equal(bundle.train.labels, torch.from_numpy(y)) and bundle.class_names == names
    assert (FLOAT_NOTE in bundle.name) == ("float" in form)


RGB_FORMS = {
    "numpy NCHW": lambda x: x,
    "numpy NHWC": lambda x: x.transpose(0, 2, 3, 1),
    "torch NHWC": lambda x: torch.from_numpy(x).permute(0, 2, 3, 1),
    "numpy NHWC RGBA, opaque": lambda x: np.concatenate([x, np.full_like(x[:, :1], 255)], 1).transpose(0, 2, 3, 1),
    "torch NCHW float 0-1": lambda x: torch.from_numpy(x).double() / 255,
    "numpy NHWC float 0-1": lambda x: x.transpose(0, 2, 3, 1).astype(np.float32) / 255,
}


@pytest.mark.parametrize("form", RGB_FORMS)
def test_every_colour_layout_and_dtype_gives_the_same_uint8_images(rgb, gray, form):
    bundle = as_given(RGB_FORMS[form](rgb), gray[1])
    assert bundle.in_channels == 3 and torch.equal(bundle.train.images, torch.from_numpy(rgb))


def test_uint8_images_in_torch_layout_are_shared_not_copied(gray):
    x, y, _ = gray
    images = torch.from_numpy(x.copy())
    assert as_given(images, y).train.images.data_ptr() == images.data_ptr()


def test_float_levels_scale_back_to_every_uint8_level_and_overshoot_is_clipped():
    levels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16).repeat(2, 0)
    for dtype in (np.float32, np.float64):
        assert torch.equal(as_given(levels.astype(dtype) / 255, [0, 1]).train.images[:, 0], torch.from_numpy(levels))
    resampled = np.array([[[-1e-4, 0.5], [1.0001, 1.0]]] * 2)  # bilinear resampling overshoots a little
    assert as_given(resampled, [0, 1]).train.images[0, 0].tolist() == [[0, 128], [255, 255]]


def test_rgba_is_composited_over_white_as_a_png_file_is_decoded(rgb, gray, tmp_path):
    alpha = np.random.default_rng(0).integers(0, 256, (8, 28, 28, 1), dtype=np.uint8)
    rgba = np.concatenate([rgb[:8].transpose(0, 2, 3, 1), alpha], axis=-1)
    bundle = as_given(rgba, gray[1][:8])
    for i in range(8):
        Image.fromarray(rgba[i], "RGBA").save(tmp_path / f"{i}.png")
        assert torch.equal(bundle.train.images[i], read_image(tmp_path / f"{i}.png"))


def test_an_ambiguous_shape_follows_the_containers_convention():
    x = np.random.default_rng(0).integers(0, 256, (4, 3, 8, 3), dtype=np.uint8)
    assert tuple(as_given(x, [0, 1, 0, 1]).train.images.shape) == (4, 3, 3, 8)  # numpy: channels last
    assert tuple(as_given(torch.from_numpy(x), [0, 1, 0, 1]).train.images.shape) == (4, 3, 8, 3)  # torch: first


REFUSED = {
    "normalised": (lambda x: T.Normalize((0.286,), (0.353,))(torch.from_numpy(x).float() / 255),
                   "Float values from -0.8102 to 2.023 in the train images lie outside [0, 1]"),
    "float 0-255": (lambda x: x.astype(np.float32), "Float values from 0 to 255 in the train images are on the 0-255"),
    "NaN": (lambda x: np.where(x == 0, np.nan, x / 255), "There are NaN values in the train images"),
    "16-bit": (lambda x: x.astype(np.uint16) * 257, "Integer values from 0 to 65535 in the train images are not 0-255"),
    "bool": (lambda x: x > 0, "The train images cannot be of dtype bool"),
    "two channels": (lambda x: np.concatenate([x, x], 1), "Shape (500, 2, 28, 28) of the train images has no channel"),
    "one image, not a batch": (lambda x: x[0, 0], "Shape (28, 28) of the train images is not an image shape"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_images_that_are_not_0_255_or_0_1_are_refused_in_one_sentence(gray, case):
    make, start = REFUSED[case]
    with pytest.raises(CnnlabError) as exc:
        bundle_from_arrays(make(gray[0]), gray[1][:1] if case == "one image, not a batch" else gray[1])
    assert one_sentence(exc).startswith(start)


LABELS_REFUSED = {
    "one short": (lambda y: y[:-1], None, "There are 500 train images but 499 labels"),
    "negative": (lambda y: np.where(y == 3, -1, y), None, "The train labels include -1"),
    "beyond the names": (lambda y: y, [str(i) for i in range(9)], "The train labels go up to 9, but there are 9 class"),
    "floats": (lambda y: y.astype(np.float32), None, "The train labels are of dtype float32"),
    "one-hot": (lambda y: np.eye(10, dtype=np.int64)[y], None, "The train labels have shape (500, 10)"),
    "a repeated name": (lambda y: y, ["a"] * 10, "class_names holds 'a' more than once"),
}


@pytest.mark.parametrize("case", LABELS_REFUSED)
def test_labels_that_are_not_class_indices_are_refused_in_one_sentence(gray, case):
    make, names, start = LABELS_REFUSED[case]
    with pytest.raises(CnnlabError) as exc:
        bundle_from_arrays(gray[0], make(gray[1]), names)
    message = str(exc.value)
    assert message.startswith(start) and "\n" not in message and message.endswith("."), message


def test_class_names_default_to_the_label_numbers(gray):
    assert bundle_from_arrays(gray[0], gray[1] % 4).class_names == ["0", "1", "2", "3"]


# ---------------------------------------------------------------- arrays: splits

def test_hold_outs_are_stratified_seeded_and_disjoint(gray):
    x, y, names = gray
    bundle = bundle_from_arrays(x, y, names, val_split=0.2, test_split=0.1, seed=3)
    counts = {s: torch.bincount(getattr(bundle, s).labels, minlength=10).tolist() for s in ("train", "val", "test")}
    assert counts == {"train": [36] * 10, "val": [9] * 10, "test": [5] * 10}  # 5 of 50, then 9 of 45
    rows = {s: {bytes(r.numpy()) for r in getattr(bundle, s).images} for s in counts}
    assert not (rows["train"] & rows["val"] or rows["train"] & rows["test"] or rows["val"] & rows["test"])
    again = bundle_from_arrays(x, y, names, val_split=0.2, test_split=0.1, seed=3)
    assert torch.equal(again.test.images, bundle.test.images) and torch.equal(again.val.images, bundle.val.images)
    other = bundle_from_arrays(x, y, names, val_split=0.2, test_split=0.1, seed=4)
    assert not torch.equal(other.test.images, bundle.test.images)
    assert bundle_from_arrays(x, y, names).val is None


def test_given_test_and_val_splits_are_used_as_they_are(gray, rgb):
    x, y, _ = gray
    bundle = bundle_from_arrays(x[:300], y[:300], test=(x[300:400] / 255, y[300:400]), val=(x[400:], y[400:]))
    assert len(bundle.train) == 300 and torch.equal(bundle.test.images, torch.from_numpy(x[300:400]))
    assert torch.equal(bundle.val.images, torch.from_numpy(x[400:])) and FLOAT_NOTE in bundle.name
    with pytest.raises(CnnlabError) as exc:
        bundle_from_arrays(x, y, test=(rgb[:10], y[:10]))
    assert one_sentence(exc).startswith("The test images are 3x28x28 but the train images are 1x28x28")


def test_a_hold_out_with_nothing_to_hold_out_is_refused(gray):
    x, y, _ = gray
    first = [int(np.flatnonzero(y == c)[0]) for c in range(10)]
    with pytest.raises(CnnlabError) as exc:
        bundle_from_arrays(x[first], y[first])
    assert "at least 2 images" in one_sentence(exc)
    with pytest.raises(CnnlabError, match="test_split must be between 0 and 1"):
        bundle_from_arrays(x, y, test_split=0)


# ---------------------------------------------------------------- torch datasets

class PhotoDataset(Dataset):
    """Each image as a PIL image (or through a torchvision transform), as torchvision datasets yield them."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: list[str] | None = None,
                 transform: Any = None):
        self.images, self.labels, self.transform = images, labels, transform
        if classes is not None:
            self.classes = classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        pil = Image.fromarray(self.images[i].transpose(1, 2, 0).squeeze(-1) if self.images.shape[1] == 1
                              else self.images[i].transpose(1, 2, 0))
        return (self.transform(pil) if self.transform else pil), int(self.labels[i])


class Stream(IterableDataset):
    """(H, W, C) numpy arrays and numpy labels, with no length."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, fail_at: int | None = None):
        self.images, self.labels, self.fail_at = images, labels, fail_at

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.int64]]:
        for i, (image, label) in enumerate(zip(self.images, self.labels)):
            if i == self.fail_at:
                raise RuntimeError("the source went away")
            yield image.transpose(1, 2, 0), label


def test_a_dataset_of_pil_images_equals_the_arrays(gray, rgb):
    x, y, names = gray
    bundle = bundle_from_dataset(PhotoDataset(x, y, names), val_split=0.1, progress=False)
    arrays = bundle_from_arrays(x, y, names, val_split=0.1)
    assert bundle.class_names == names and bundle.name == "dataset:PhotoDataset"
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(bundle, split).images, getattr(arrays, split).images)
        assert torch.equal(getattr(bundle, split).labels, getattr(arrays, split).labels)
    colour = bundle_from_dataset(PhotoDataset(rgb, y), test=(rgb, y), progress=False)
    assert torch.equal(colour.train.images, torch.from_numpy(rgb)) and colour.class_names == [str(i) for i in range(10)]


def test_totensor_arrays_and_iterable_datasets_equal_the_arrays(gray, rgb):
    x, y, _ = gray
    floats = bundle_from_dataset(PhotoDataset(x, y, transform=T.ToTensor()), test=(x, y), progress=False)
    assert torch.equal(floats.train.images, torch.from_numpy(x)) and floats.name.endswith(f"({FLOAT_NOTE})")
    stream = bundle_from_dataset(Stream(rgb, y), test=Stream(rgb[:20], y[:20]), val=(rgb[20:40], y[20:40]),
                                 progress=False)
    assert torch.equal(stream.train.images, torch.from_numpy(rgb))
    assert torch.equal(stream.test.images, torch.from_numpy(rgb[:20]))
    assert torch.equal(stream.val.images, torch.from_numpy(rgb[20:40]))


def test_torchvisions_fakedata_converts_to_its_pixels():
    fake = FakeData(size=40, image_size=(3, 16, 20), num_classes=4)
    bundle = bundle_from_dataset(fake, test=fake, progress=False)
    pixels = np.stack([np.asarray(fake[i][0]).transpose(2, 0, 1) for i in range(40)])
    assert bundle.image_size == (16, 20) and torch.equal(bundle.train.images, torch.from_numpy(pixels))
    assert bundle.train.labels.tolist() == [fake[i][1] for i in range(40)] and bundle.name == "dataset:FakeData"


def test_a_large_dataset_streams_to_disk_with_the_same_rows(gray, tmp_path):
    x, y, names = gray
    kept = tmp_path / "converted"
    bundle = bundle_from_dataset(PhotoDataset(x, y, names), val_split=0.1, max_memory_bytes=1, cache_dir=kept,
                                 progress=False)
    arrays = bundle_from_arrays(x, y, names, val_split=0.1)
    for split in ("train", "val", "test"):
        images = getattr(bundle, split).images
        assert isinstance(images, DiskImages) and images.path.parent == kept
        assert torch.equal(images.tensor(), getattr(arrays, split).images)
    meta = json.loads((kept / META_FILE).read_text())
    assert meta["splits"] == {"train": {"count": 500}} and meta["classes"] == names and meta["image_size"] == 28


def test_a_dataset_without_a_length_moves_to_disk_once_past_the_budget(gray, rgb, monkeypatch):
    monkeypatch.setattr(cnnlab.data.memory, "FLUSH_BYTES", 7 * rgb[0].nbytes)  # several buffers, one partly full
    y = gray[1]
    bundle = bundle_from_dataset(Stream(rgb, y), test=(rgb[:10], y[:10]), max_memory_bytes=100 * rgb[0].nbytes,
                                 progress=False)
    assert isinstance(bundle.train.images, DiskImages) and isinstance(bundle.test.images, torch.Tensor)
    assert torch.equal(bundle.train.images.tensor(), torch.from_numpy(rgb))
    assert torch.equal(bundle.train.labels, torch.from_numpy(y))
    assert bundle.train.images.path.parent.parent == cnnlab.files.cache_dir() / "datasets"


def converted_folders() -> set[Path]:
    return set((cnnlab.files.cache_dir() / "datasets").glob("*"))


def test_a_failed_conversion_leaves_no_files(gray, rgb):
    before = converted_folders()
    with pytest.raises(RuntimeError, match="went away"):
        bundle_from_dataset(Stream(rgb, gray[1], fail_at=300), max_memory_bytes=1, progress=False)
    assert converted_folders() == before


def test_the_converted_files_are_removed_when_the_process_exits(monkeypatch):
    at_exit = []
    monkeypatch.setattr(cnnlab.data.memory.atexit, "register", lambda fn, *args: at_exit.append((fn, args)))
    dataset = [(np.zeros((4, 4), np.uint8), i % 2) for i in range(8)]
    folder = bundle_from_dataset(dataset, max_memory_bytes=1, progress=False).train.images.path.parent
    [(remove, args)] = at_exit
    monkeypatch.setattr(cnnlab.data.memory.os, "getpid", lambda: -1)
    remove(*args)  # a forked child exiting leaves the folder to its parent
    assert folder.is_dir() and folder.parent == cnnlab.files.cache_dir() / "datasets"
    monkeypatch.undo()
    remove(*args)
    assert not folder.exists()


def test_images_of_different_sizes_or_channels_are_refused_naming_the_image(gray):
    x, y, _ = gray
    sizes = PhotoDataset(x[:8], y[:8], transform=lambda pil: pil.resize((30, 28)) if pil.getpixel((0, 0)) > 200
                         else pil)
    mixed = [(Image.fromarray(x[i, 0]), 0) for i in range(3)] + [(Image.fromarray(x[3, 0]).convert("RGB"), 1)]
    shifted = np.where(np.arange(8) == 3, 31, 28)
    sizes.transform = lambda pil, it=iter(shifted): pil.resize((int(next(it)), 28))
    with pytest.raises(CnnlabError) as exc:
        bundle_from_dataset(sizes, progress=False)
    assert one_sentence(exc) == ("Image 3 of the train dataset is 1x28x31 but image 0 is 1x28x28 (CxHxW); give the "
                                 "dataset a transform that makes all images alike: "
                                 "torchvision.transforms.Resize((28, 28)) for the size.")
    with pytest.raises(CnnlabError) as exc:
        bundle_from_dataset(mixed, progress=False)
    assert one_sentence(exc).startswith("Image 3 of the train dataset is 3x28x28 but image 0 is 1x28x28")
    with pytest.raises(CnnlabError) as exc:
        bundle_from_dataset(PhotoDataset(x, y), test=PhotoDataset(x[:5], y[:5], transform=lambda p: p.convert("RGB")),
                            progress=False)
    assert one_sentence(exc).startswith("Image 0 of the test dataset is 3x28x28 but the train images are 1x28x28")


def test_datasets_that_yield_something_else_are_refused_in_one_sentence(gray):
    x, y, _ = gray
    normalised = PhotoDataset(x, y, transform=T.Compose([T.ToTensor(), T.Normalize((0.5,), (0.5,))]))
    cases = {
        "Float values from -1 to 1 in the image of item 0 of the train dataset lie outside [0, 1]": normalised,
        "Item 0 of the train dataset has label 'T-shirt'": [(x[0, 0], "T-shirt")],
        "Item 1 of the train dataset has label 10; class indices must be 0 or more and below 10": [
            (x[0, 0], 0), (x[1, 0], 10)],
        "Item 0 of the train dataset holds a batch of shape (4, 1, 28, 28)": DataLoader(PhotoDataset(
            x[:8], y[:8], transform=T.PILToTensor()), batch_size=4),
        "Item 0 of the train dataset is of type int": list(range(3)),
    }
    for start, dataset in cases.items():
        with pytest.raises(CnnlabError) as exc:
            bundle_from_dataset(dataset, class_names=[str(i) for i in range(10)], progress=False)
        assert one_sentence(exc).startswith(start)
