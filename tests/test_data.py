"""Dataset loaders (IDX, CIFAR pickles, image folders) and the in-memory data path.

Everything runs offline on files the tests write themselves (plus Debian's Fashion-MNIST
when it is installed); $CNNLAB_CACHE and $CNNLAB_DATA always point into tmp_path.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from original_formats import CIFAR10_CLASSES, WRITERS, py2_pickle, write_cifar10, write_cifar100, write_idx, write_mnist
from PIL import Image

import cnnlab.data.folder
from cnnlab.data.batches import BatchLoader, Normalize, channel_stats
from cnnlab.data.builtin import DEBIAN_FASHION_MNIST, FASHION_CLASSES, get_source
from cnnlab.data.load import load_dataset
from cnnlab.data.split import Split
from cnnlab.errors import CnnlabError, DatasetNotFound
from cnnlab.images.tensors import read_image


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """Never touch the user's cache or data: both roots live in tmp_path."""
    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CNNLAB_DATA", str(data))
    return data


# --------------------------------------------------------------------------- IDX (MNIST family)

def test_write_idx_header_matches_the_original_format(tmp_path):
    write_idx(tmp_path / "imgs", np.zeros((2, 28, 28), np.uint8), gz=False)
    write_idx(tmp_path / "lbls", np.zeros(2, np.uint8), gz=False)
    assert (tmp_path / "imgs").read_bytes()[:16] == bytes.fromhex("00000803 00000002 0000001c 0000001c")
    assert (tmp_path / "lbls").read_bytes()[:8] == bytes.fromhex("00000801 00000002")


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(),
                    reason=f"{DEBIAN_FASHION_MNIST} missing (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_from_debian_location():
    assert get_source("fashion-mnist").locate() == DEBIAN_FASHION_MNIST
    bundle = load_dataset("fashion-mnist", val_split=0.1, seed=0, download=False, progress=False)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (54000, 6000, 10000)
    for split in (bundle.train, bundle.val, bundle.test):
        assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (1, 28, 28)
        assert split.labels.dtype == torch.int64
    assert bundle.class_names == FASHION_CLASSES and len(bundle.class_names) == 10
    assert bundle.in_channels == 1 and bundle.image_size == (28, 28)
    assert bundle.allow_flip is True
    assert torch.bincount(bundle.val.labels, minlength=10).tolist() == [600] * 10  # stratified
    assert torch.bincount(bundle.train.labels, minlength=10).tolist() == [5400] * 10
    assert torch.bincount(bundle.test.labels, minlength=10).tolist() == [1000] * 10
    assert bundle.test.labels[0].item() == 9  # the first Fashion-MNIST test item is an ankle boot


@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "plain"])
def test_mnist_idx_round_trip(isolated_env, gz):
    arrays = write_mnist(isolated_env / "mnist", gz)
    bundle = load_dataset("mnist", val_split=0, download=False, progress=False)
    assert bundle.val is None
    assert bundle.class_names == [str(d) for d in range(10)]
    assert bundle.allow_flip is False
    assert bundle.train.images.shape == (50, 1, 28, 28) and bundle.train.images.dtype == torch.uint8
    assert bundle.test.images.shape == (20, 1, 28, 28)
    assert torch.equal(bundle.train.images[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"]))
    assert torch.equal(bundle.test.images[:, 0], torch.from_numpy(arrays["t10k-images-idx3-ubyte"]))
    assert bundle.train.labels.dtype == torch.int64
    assert bundle.train.labels.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert bundle.test.labels.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()


def test_mnist_torchvision_layout_and_stratified_holdout(isolated_env):
    arrays = write_mnist(isolated_env / "MNIST" / "raw", gz=True, n_train=100)
    bundle = load_dataset("mnist", val_split=0.2, seed=3, download=False, progress=False)
    assert (len(bundle.train), len(bundle.val)) == (80, 20)
    assert torch.bincount(bundle.val.labels, minlength=10).tolist() == [2] * 10
    # train + val are exactly the original training images, nothing duplicated or lost
    merged = torch.cat([bundle.train.images, bundle.val.images])[:, 0].reshape(100, -1)
    original = torch.from_numpy(arrays["train-images-idx3-ubyte"]).reshape(100, -1)
    assert sorted(map(bytes, merged.numpy())) == sorted(map(bytes, original.numpy()))
    again = load_dataset("mnist", val_split=0.2, seed=3, download=False, progress=False)
    assert torch.equal(again.val.images, bundle.val.images)


def test_truncated_idx_is_a_user_error(isolated_env):
    write_mnist(isolated_env / "mnist", gz=False)
    path = isolated_env / "mnist" / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CnnlabError, match="truncated"):
        load_dataset("mnist", download=False, progress=False)


# --------------------------------------------------------------------------- CIFAR pickles

@pytest.mark.parametrize("writer", WRITERS.values(), ids=WRITERS.keys())
def test_cifar10_pickle_layout(isolated_env, writer):
    batches = write_cifar10(isolated_env / "cifar-10-batches-py", writer)
    bundle = load_dataset("cifar10", val_split=0, download=False, progress=False)
    assert bundle.train.images.shape == (50, 3, 32, 32) and bundle.train.images.dtype == torch.uint8
    assert bundle.test.images.shape == (10, 3, 32, 32)
    assert bundle.allow_flip is True and bundle.in_channels == 3
    # batches are concatenated in order 1..5
    assert bundle.train.labels.tolist() == sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    assert bundle.test.labels.dtype == torch.int64
    # data rows are 1024 red, 1024 green, 1024 blue values, each plane row-major
    for (n, c, y, x) in [(0, 0, 0, 0), (3, 1, 5, 17), (9, 2, 31, 30), (7, 0, 12, 31)]:
        row = batches["data_batch_2"][b"data"][n]
        assert bundle.train.images[10 + n, c, y, x].item() == row[c * 1024 + y * 32 + x]
    assert torch.equal(bundle.test.images.reshape(10, -1), torch.from_numpy(batches["test_batch"][b"data"]))
    if writer is py2_pickle:
        assert bundle.class_names == CIFAR10_CLASSES


def test_cifar10_pixel_position_with_a_planted_value(isolated_env):
    folder = isolated_env / "cifar-10-batches-py"
    batches = write_cifar10(folder, py2_pickle)
    data = np.zeros((10, 3072), np.uint8)
    data[4, 1 * 1024 + 7 * 32 + 20] = 200  # green plane, row 7, column 20 of image 4
    batches["test_batch"][b"data"] = data
    (folder / "test_batch").write_bytes(py2_pickle(batches["test_batch"]))
    test = load_dataset("cifar10", download=False, progress=False).test
    assert test.images[4, 1, 7, 20].item() == 200
    assert int(test.images.sum()) == 200


def test_cifar10_holdout_is_stratified(isolated_env):
    write_cifar10(isolated_env / "cifar-10-batches-py", py2_pickle, per_batch=20)  # 10 per class
    bundle = load_dataset("cifar10", val_split=0.2, seed=1, download=False, progress=False)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (80, 20, 20)
    assert torch.bincount(bundle.val.labels, minlength=10).tolist() == [2] * 10


@pytest.mark.parametrize("writer", WRITERS.values(), ids=WRITERS.keys())
def test_cifar100_pickle_layout(isolated_env, writer):
    files = write_cifar100(isolated_env / "cifar-100-python", writer)
    bundle = load_dataset("cifar100", val_split=0, download=False, progress=False)
    assert bundle.train.images.shape == (30, 3, 32, 32) and bundle.test.images.shape == (30, 3, 32, 32)
    assert bundle.train.labels.tolist() == files["train"][b"fine_labels"]  # fine, not coarse
    assert bundle.test.labels.tolist() == files["test"][b"fine_labels"]
    row = files["train"][b"data"][11]
    for c, y, x in [(0, 0, 0), (1, 16, 3), (2, 31, 31)]:
        assert bundle.train.images[11, c, y, x].item() == row[c * 1024 + y * 32 + x]
    if writer is py2_pickle:
        assert len(bundle.class_names) == 100
        assert bundle.class_names[:2] == ["fine00", "fine01"] and bundle.class_names[-1] == "fine99"


def test_cifar10_bytes_label_names_are_decoded(isolated_env):
    write_cifar10(isolated_env / "cifar-10-batches-py", WRITERS["py3-protocol2"])
    assert load_dataset("cifar10", download=False, progress=False).class_names == CIFAR10_CLASSES


class _Evil:
    """Unpickling this runs a shell command that creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


class _EvilEval:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


@pytest.mark.parametrize("target", ["data_batch_1", "data_batch_4", "test_batch", "batches.meta"])
@pytest.mark.parametrize("evil", [_Evil, _EvilEval], ids=["os.system", "eval"])
def test_malicious_cifar_pickle_is_refused(isolated_env, tmp_path, target, evil):
    folder = isolated_env / "cifar-10-batches-py"
    batches = write_cifar10(folder, py2_pickle)
    marker = tmp_path / "pwned"
    payload = dict(batches[target])
    payload[b"labels" if target != "batches.meta" else b"label_names"] = evil(marker)
    (folder / target).write_bytes(pickle.dumps(payload, protocol=2))  # live: see the control test below
    with pytest.raises(CnnlabError, match="not a valid CIFAR batch"):
        load_dataset("cifar10", download=False, progress=False)
    assert not marker.exists()


def test_malicious_pickle_payload_is_live(tmp_path):
    """Control for the test above: the planted payload does fire under plain pickle."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps({b"data": _Evil(marker)}, protocol=2))
    assert marker.exists()


def test_malicious_cifar100_meta_is_refused(isolated_env, tmp_path):
    folder = isolated_env / "cifar-100-python"
    write_cifar100(folder, py2_pickle)
    marker = tmp_path / "pwned"
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": _Evil(marker)}, protocol=2))
    with pytest.raises(CnnlabError):
        load_dataset("cifar100", download=False, progress=False)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"garbage, not a pickle", b"", pickle.dumps([1, 2, 3], protocol=2)],
                         ids=["garbage", "empty", "not-a-dict"])
def test_broken_cifar_batch_is_a_user_error(isolated_env, content):
    folder = isolated_env / "cifar-10-batches-py"
    write_cifar10(folder, py2_pickle)
    (folder / "test_batch").write_bytes(content)
    with pytest.raises(CnnlabError, match="test_batch"):
        load_dataset("cifar10", download=False, progress=False)


@pytest.mark.parametrize("payload", [{b"labels": [0] * 10},
                                     {b"data": np.zeros((10, 3000), np.uint8), b"labels": [0] * 10}],
                         ids=["no-data-key", "wrong-row-size"])
def test_malformed_cifar_batch_is_a_user_error(isolated_env, payload):
    folder = isolated_env / "cifar-10-batches-py"
    write_cifar10(folder, py2_pickle)
    (folder / "test_batch").write_bytes(py2_pickle(payload))
    with pytest.raises(CnnlabError):
        load_dataset("cifar10", download=False, progress=False)


# --------------------------------------------------------------------------- missing / offline

@pytest.mark.parametrize("name,files,subdir", [
    ("cifar10", ["data_batch_1", "data_batch_5", "test_batch", "batches.meta"], "cifar-10-batches-py"),
    ("cifar100", ["train", "test", "meta"], "cifar-100-python"),
    ("mnist", ["train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"], "mnist"),
])
def test_offline_missing_dataset_names_files_and_folders(isolated_env, tmp_path, name, files, subdir):
    with pytest.raises(DatasetNotFound) as info:
        load_dataset(name, download=False, progress=False)
    message = str(info.value)
    for f in files:
        assert f in message
    assert str(isolated_env / subdir) in message  # $CNNLAB_DATA/...
    assert str(tmp_path / "cache" / subdir) in message  # $CNNLAB_CACHE/...
    assert "\n" not in message
    assert isinstance(info.value, CnnlabError)


def test_incomplete_cifar_folder_is_not_found(isolated_env):
    folder = isolated_env / "cifar-10-batches-py"
    write_cifar10(folder, py2_pickle)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFound, match="data_batch_3"):
        load_dataset("cifar10", download=False, progress=False)


def test_unknown_dataset_name():
    with pytest.raises(CnnlabError, match="nosuchset"):
        load_dataset("nosuchset", download=False)


# --------------------------------------------------------------------------- folder datasets

def save(path: Path, mode: str, size: tuple[int, int], color, **kw) -> Path:
    """A solid image of `size` (width, height) in PIL `mode`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **kw)
    return path


def palette_image(path: Path, size, rgb) -> Path:
    img = Image.new("P", size, 5)
    palette = [0] * 768
    palette[15:18] = rgb
    img.putpalette(palette)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def all_images(bundle) -> tuple[torch.Tensor, torch.Tensor]:
    splits = [bundle.train] + ([bundle.val] if bundle.val is not None else [])
    if bundle.test is not bundle.val:
        splits.append(bundle.test)
    return torch.cat([s.images for s in splits]), torch.cat([s.labels for s in splits])


def solid_colours(images: torch.Tensor) -> list[tuple[int, ...]]:
    """The colour of each image that is one flat colour (images that are not are left out)."""
    out = []
    for img in images:
        flat = img.reshape(img.shape[0], -1)
        if bool((flat == flat[:, :1]).all()):
            out.append(tuple(flat[:, 0].tolist()))
    return out


@pytest.fixture
def mixed_folder(tmp_path) -> Path:
    """Flat layout: apple (5 mixed-mode images), banana (empty), cherry (3 + one corrupt file)."""
    root = tmp_path / "fruit"
    a, c = root / "apple", root / "cherry"
    save(a / "rgb.png", "RGB", (40, 30), (200, 10, 10))
    save(a / "gray.png", "L", (24, 24), 77)
    save(a / "rgba.png", "RGBA", (30, 30), (255, 0, 0, 128))  # half-transparent red over white
    save(a / "la.png", "LA", (20, 20), (100, 255))
    palette_image(a / "palette.png", (50, 20), (10, 200, 30))
    (a / ".hidden.png").write_bytes(b"not an image, must be ignored")
    (a / "notes.txt").write_text("not an image either")
    (root / "banana").mkdir()
    (root / "banana" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    save(c / "one.png", "RGB", (36, 36), (0, 0, 250))
    save(c / "two.jpg", "RGB", (28, 20), (128, 128, 128), quality=95)
    save(c / "nested" / "three.PNG", "RGB", (32, 32), (5, 6, 7))  # sub-folders and upper-case extensions count
    (c / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    save(c / ".thumbs" / "thumb.png", "RGB", (8, 8), (1, 1, 1))  # hidden folder: ignored
    save(root / ".git" / "x" / "y.png", "RGB", (8, 8), (1, 1, 1))  # hidden class folder: ignored
    return root


def test_folder_flat_mixed_modes(mixed_folder, capsys):
    bundle = load_dataset(f"folder:{mixed_folder}", val_split=0.1, seed=0, progress=False)
    assert bundle.name == f"folder:{mixed_folder.resolve()}"
    assert bundle.class_names == ["apple", "banana", "cherry"]  # empty class keeps its place
    assert bundle.allow_flip is True
    # one corrupt file, reported with its path relative to the root
    assert len(bundle.skipped) == 1 and bundle.skipped[0].startswith(os.path.join("cherry", "broken.jpg") + ":")
    assert "broken.jpg" in capsys.readouterr().err
    # flat layout: hold-out is 1 per class (rounding up to at least one), and it doubles as the test split
    assert bundle.test is bundle.val
    assert sorted(bundle.val.labels.tolist()) == [0, 2]
    images, labels = all_images(bundle)
    assert len(images) == 8  # 5 apple + 3 cherry; hidden, .txt and corrupt files left out
    assert sorted(labels.tolist()) == [0] * 5 + [2] * 3  # cherry is still index 2
    # any colour image makes the dataset RGB; default side = median of the longest sides
    # (20, 24, 28, 30, 32, 36, 40, 50) -> 31
    assert images.dtype == torch.uint8 and images.shape[1:] == (3, 31, 31)
    assert bundle.in_channels == 3 and bundle.image_size == (31, 31)
    colours = solid_colours(images)
    assert (200, 10, 10) in colours  # RGB
    assert (77, 77, 77) in colours  # grayscale expanded to 3 equal channels
    assert (255, 127, 127) in colours  # RGBA composited over white
    assert (100, 100, 100) in colours  # LA
    assert (0, 0, 250) in colours and (5, 6, 7) in colours


def test_folder_train_test_layout(tmp_path):
    root = tmp_path / "split"
    for cls, n in (("a", 6), ("b", 6), ("c", 6)):
        for i in range(n):
            save(root / "train" / cls / f"{i}.png", "L", (12, 12), 10 * i)
    for cls in ("a", "c"):  # no b in test
        for i in range(2):
            save(root / "test" / cls / f"{i}.png", "L", (12, 12), 200 + i)
    save(root / "test" / "d" / "only_in_test.png", "L", (12, 12), 250)  # a class seen only in test
    bundle = load_dataset(f"folder:{root}", val_split=0.5, seed=0, progress=False)
    assert bundle.class_names == ["a", "b", "c", "d"]
    assert bundle.in_channels == 1 and bundle.image_size == (12, 12)
    assert bundle.test is not bundle.val
    assert bundle.test.labels.tolist() == [0, 0, 2, 2, 3]
    assert bundle.test.images[:, 0, 0, 0].tolist() == [200, 201, 200, 201, 250]
    assert torch.bincount(bundle.val.labels, minlength=4).tolist() == [3, 3, 3, 0]
    assert torch.bincount(bundle.train.labels, minlength=4).tolist() == [3, 3, 3, 0]
    assert bundle.skipped == []


def test_folder_with_val_folder_uses_it(tmp_path):
    root = tmp_path / "tvt"
    for split, value in (("train", 1), ("val", 2), ("test", 3)):
        for cls in ("x", "y"):
            for i in range(3):
                save(root / split / cls / f"{i}.png", "RGB", (10, 10), (value, value, value))
    bundle = load_dataset(f"folder:{root}", val_split=0.3, progress=False)
    assert len(bundle.train) == len(bundle.val) == len(bundle.test) == 6  # val_split not applied
    assert set(bundle.train.images.flatten().tolist()) == {1}
    assert set(bundle.val.images.flatten().tolist()) == {2}
    assert set(bundle.test.images.flatten().tolist()) == {3}


def test_folder_all_grayscale_gives_one_channel(tmp_path):
    root = tmp_path / "gray"
    save(root / "a" / "l.png", "L", (16, 16), 40)
    save(root / "a" / "l.jpg", "L", (16, 16), 90)
    save(root / "b" / "la.png", "LA", (16, 16), (60, 255))
    Image.fromarray(np.full((16, 16), 65535, np.uint16)).save(root / "b" / "deep.png")  # 16-bit gray
    bundle = load_dataset(f"folder:{root}", val_split=0.5, progress=False)
    images, _ = all_images(bundle)
    assert images.shape == (4, 1, 16, 16)
    assert (255,) in solid_colours(images) and (40,) in solid_colours(images)


def test_folder_one_colour_image_makes_it_rgb(tmp_path):
    root = tmp_path / "mostly_gray"
    for i in range(3):
        save(root / "a" / f"{i}.png", "L", (16, 16), 50 + i)
    save(root / "b" / "colour.png", "RGB", (16, 16), (1, 2, 3))
    save(root / "b" / "gray.png", "L", (16, 16), 9)
    bundle = load_dataset(f"folder:{root}", val_split=0.5, progress=False)
    images, _ = all_images(bundle)
    assert images.shape == (5, 3, 16, 16)
    assert sorted(solid_colours(images)) == [(1, 2, 3), (9, 9, 9), (50, 50, 50), (51, 51, 51), (52, 52, 52)]


def test_folder_image_size_default_is_capped_and_explicit_is_honoured(tmp_path):
    root = tmp_path / "big"
    for i, size in enumerate([(100, 80), (120, 90), (90, 150)]):
        save(root / "a" / f"{i}.png", "RGB", size, (i, i, i))
        save(root / "b" / f"{i}.jpg", "RGB", size, (i, i, i))
    assert load_dataset(f"folder:{root}", progress=False).image_size == (64, 64)
    bundle = load_dataset(f"folder:{root}", image_size=20, progress=False)
    assert bundle.train.images.shape[1:] == (3, 20, 20) and bundle.val.images.shape[1:] == (3, 20, 20)
    assert load_dataset(f"folder:{root}", image_size=96, progress=False).image_size == (96, 96)


def test_folder_resize_changes_content_sensibly(tmp_path):
    """A left-black, right-white image stays left-dark, right-bright after resizing."""
    root = tmp_path / "halves"
    arr = np.zeros((40, 40), np.uint8)
    arr[:, 20:] = 255
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        Image.fromarray(arr).save(root / cls / "h.png")
    img = load_dataset(f"folder:{root}", image_size=10, val_split=0.5, progress=False).train.images[0, 0]
    assert img.shape == (10, 10)
    assert img[:, :4].max() <= 5 and img[:, 6:].min() >= 250


@pytest.fixture
def numbered_folder(tmp_path) -> Path:
    """3 classes x 10 images; image k of class c is filled with value 10*c + k, so it can be identified."""
    root = tmp_path / "numbered"
    for c in range(3):
        for k in range(10):
            save(root / f"class{c}" / f"{k:02d}.png", "L", (8, 8), 10 * c + k)
    return root


def ids(split: Split) -> list[int]:
    return sorted(split.images[:, 0, 0, 0].tolist())


def test_folder_holdout_stratified_and_seeded(numbered_folder):
    spec = f"folder:{numbered_folder}"
    first = load_dataset(spec, val_split=0.2, seed=7, progress=False)
    assert torch.bincount(first.val.labels).tolist() == [2, 2, 2]
    assert sorted(ids(first.train) + ids(first.val)) == list(range(30))  # a partition
    assert all(v // 10 == label for v, label in zip(first.val.images[:, 0, 0, 0].tolist(), first.val.labels.tolist()))
    again = load_dataset(spec, val_split=0.2, seed=7, progress=False)
    assert torch.equal(again.val.images, first.val.images) and torch.equal(again.train.labels, first.train.labels)
    others = {tuple(ids(load_dataset(spec, val_split=0.2, seed=s, progress=False).val)) for s in range(6)}
    assert len(others) > 1  # the seed matters


def test_folder_cache_is_reused_and_invalidated(numbered_folder, tmp_path, monkeypatch):
    spec = f"folder:{numbered_folder}"
    cache = tmp_path / "cache" / "folders"
    first = load_dataset(spec, progress=False)
    files = prepared_dirs(cache)
    assert len(files) == 1 and files[0].name.startswith("numbered-")

    def no_decoding(path):
        raise AssertionError(f"decoded {path} although the cache is valid")

    with monkeypatch.context() as m:
        m.setattr(cnnlab.data.folder, "read_image", no_decoding)
        second = load_dataset(spec, progress=False)
        assert second.class_names == first.class_names
        for name in ("train", "val", "test"):
            assert torch.equal(getattr(second, name).images, getattr(first, name).images)
            assert torch.equal(getattr(second, name).labels, getattr(first, name).labels)
        # adding a file changes the key: the folder must be decoded again
        save(numbered_folder / "class1" / "10.png", "L", (8, 8), 99)
        with pytest.raises(AssertionError, match="decoded"):
            load_dataset(spec, progress=False)
    third = load_dataset(spec, progress=False)
    assert len(third.train) + len(third.val) == 31 and 99 in ids(third.train) + ids(third.val)
    assert len(prepared_dirs(cache)) == 2
    # an explicit image size is a different cache entry too
    assert load_dataset(spec, image_size=4, progress=False).image_size == (4, 4)
    assert len(prepared_dirs(cache)) == 3


def prepared_dirs(cache: Path) -> list[Path]:
    """The prepared datasets in a cache's folders/ directory (not their lock files)."""
    return sorted(p for p in cache.iterdir() if p.is_dir())


def test_folder_cache_invalidated_by_modified_file(numbered_folder):
    spec = f"folder:{numbered_folder}"
    load_dataset(spec, progress=False)
    target = numbered_folder / "class2" / "00.png"
    save(target, "L", (8, 8), 123)
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    bundle = load_dataset(spec, progress=False)
    assert 123 in ids(bundle.train) + ids(bundle.val) and 20 not in ids(bundle.train) + ids(bundle.val)


def test_folder_damaged_cache_is_rebuilt(numbered_folder, tmp_path):
    spec = f"folder:{numbered_folder}"
    expected = load_dataset(spec, progress=False).train.images[:]  # read now: the file itself is damaged next
    (prepared,) = prepared_dirs(tmp_path / "cache" / "folders")
    (prepared / "train.images.u8").write_bytes(b"\0" * 100)
    second = load_dataset(spec, progress=False)
    assert torch.equal(second.train.images, expected)


def test_folder_cache_sees_new_empty_class(numbered_folder):
    spec = f"folder:{numbered_folder}"
    load_dataset(spec, progress=False)
    (numbered_folder / "zzz_new").mkdir()
    assert load_dataset(spec, progress=False).class_names == ["class0", "class1", "class2", "zzz_new"]


def test_palette_png_is_decoded_to_its_colours(tmp_path):
    img = read_image(palette_image(tmp_path / "p.png", (6, 4), (10, 200, 30)))
    assert img.shape == (3, 4, 6)
    assert img[:, 0, 0].tolist() == [10, 200, 30]


def test_missing_folder_is_a_user_error(tmp_path):
    missing = tmp_path / "no" / "such" / "folder"
    with pytest.raises(CnnlabError, match="does not exist") as info:
        load_dataset(f"folder:{missing}", progress=False)
    assert str(missing) in str(info.value)


def test_folder_without_classes_or_images(tmp_path):
    root = tmp_path / "flat_files"
    save(root / "loose.png", "RGB", (8, 8), (0, 0, 0))
    with pytest.raises(CnnlabError, match="no class sub-folders"):
        load_dataset(f"folder:{root}", progress=False)
    (root / "empty_class").mkdir()
    with pytest.raises(CnnlabError, match="holds no image files"):
        load_dataset(f"folder:{root}", progress=False)
    (root / "empty_class" / "bad.png").write_bytes(b"nope")
    with pytest.raises(CnnlabError, match="could be read"):
        load_dataset(f"folder:{root}", progress=False)


def test_flat_folder_always_holds_out_a_test_split(numbered_folder):
    """With --val-split 0 a flat folder still gets a stratified 10% test hold-out, disjoint from train."""
    bundle = load_dataset(f"folder:{numbered_folder}", val_split=0, progress=False)
    total = len(bundle.train) + len(bundle.test)
    assert len(bundle.test) == pytest.approx(total * 0.1, abs=len(bundle.class_names))
    assert bundle.val is bundle.test
    train_rows = {bytes(x.numpy()) for x in bundle.train.images.flatten(1)}
    assert not any(bytes(x.numpy()) in train_rows for x in bundle.test.images.flatten(1))


# --------------------------------------------------------------------------- data.py

def test_channel_stats_matches_torch():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (37, 3, 9, 11), generator=gen, dtype=torch.uint8)
    mean, std = channel_stats(images, chunk=8)  # several chunks, the last one ragged
    x = images.double() / 255
    assert mean == pytest.approx(x.mean(dim=(0, 2, 3)).tolist(), abs=1e-9)
    assert std == pytest.approx(x.std(dim=(0, 2, 3), unbiased=False).tolist(), abs=1e-9)
    const_mean, const_std = channel_stats(torch.full((4, 1, 3, 3), 51, dtype=torch.uint8))
    assert const_mean == pytest.approx([0.2]) and 0 < const_std[0] < 1e-5  # clamped, never zero


def test_normalize_matches_formula():
    mean, std = [0.1, 0.5, 0.9], [0.2, 0.25, 0.5]
    images = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    out = Normalize(mean, std, torch.device("cpu"), channels_last=True)(images)
    expected = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert out.dtype == torch.float32 and torch.allclose(out, expected, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last)


def one_batch(images: torch.Tensor, seed: int, **augment) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole split as one unshuffled batch through BatchLoader, as training draws it, and the
    same images normalised but not augmented."""
    normalize = Normalize([0.0] * images.shape[1], [1.0] * images.shape[1], torch.device("cpu"), False)
    split = Split(images, torch.zeros(len(images), dtype=torch.int64))
    (x, _), = BatchLoader(split, len(images), normalize, shuffle=False, seed=seed, **augment)
    return x, normalize(images)


def test_translate_zero_leaves_the_images_alone():
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out, plain = one_batch(images, seed=0, translate=0)
    assert torch.equal(out, plain)


def test_translate_is_a_crop_of_the_reflect_padded_input():
    pad, n, c, h, w = 2, 64, 2, 6, 7
    images = torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out, plain = one_batch(images, seed=5, translate=pad)
    assert out.shape == images.shape
    padded = np.pad(plain.numpy(), ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="reflect")  # independent reference
    shifts = []
    for i in range(n):
        matches = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                   if np.array_equal(out[i].numpy(), padded[i, :, dy:dy + h, dx:dx + w])]
        assert len(matches) == 1, f"image {i} is not a shifted crop"
        shifts.append(matches[0])
    assert len(set(shifts)) >= 10  # varied shifts (25 possible)
    assert torch.equal(out, one_batch(images, seed=5, translate=pad)[0])


def test_flip_mirrors_about_half_deterministically():
    n = 1000
    images = torch.randint(0, 256, (n, 1, 2, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out, plain = one_batch(images, seed=3, flip=True)
    flipped = (out == plain.flip(3)).flatten(1).all(1)
    unchanged = (out == plain).flatten(1).all(1)
    assert bool((flipped ^ unchanged).all())  # every image is either itself or its mirror, never both
    assert 400 < int(flipped.sum()) < 600
    assert torch.equal(out, one_batch(images, seed=3, flip=True)[0])
    assert not torch.equal(out, one_batch(images, seed=4, flip=True)[0])


def make_loader(n: int, batch_size: int, **kw) -> BatchLoader:
    """Image i is filled with value i and labelled i, so batches can be checked for alignment."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    split = Split(images, torch.arange(n, dtype=torch.int64))
    return BatchLoader(split, batch_size, Normalize([0.0], [1.0], torch.device("cpu"), False), **kw)


def epoch(loader: BatchLoader) -> list[torch.Tensor]:
    batches = []
    for x, y in loader:
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert torch.allclose(x * 255, y.float().view(-1, 1, 1, 1).expand_as(x), atol=1e-3)  # aligned
        batches.append(y)
    return batches


@pytest.mark.parametrize("augment", [{}, {"translate": 1, "flip": True}], ids=["plain", "augmented"])
def test_batch_loader_covers_each_index_once(augment):
    loader = make_loader(23, 5, shuffle=True, seed=0, **augment)
    assert len(loader) == 5
    for _ in range(3):
        batches = epoch(loader)
        assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
        assert sorted(torch.cat(batches).tolist()) == list(range(23))


def test_batch_loader_shuffles_per_epoch_and_is_seeded():
    a, b = make_loader(40, 8, shuffle=True, seed=1), make_loader(40, 8, shuffle=True, seed=1)
    a1, a2 = torch.cat(epoch(a)), torch.cat(epoch(a))
    assert torch.equal(a1, torch.cat(epoch(b))) and torch.equal(a2, torch.cat(epoch(b)))
    assert not torch.equal(a1, a2)  # a new order each epoch
    assert not torch.equal(a1, torch.arange(40))
    assert not torch.equal(a1, torch.cat(epoch(make_loader(40, 8, shuffle=True, seed=2))))
    assert torch.equal(torch.cat(epoch(make_loader(40, 8, shuffle=False))), torch.arange(40))


def test_batch_loader_drop_last():
    loader = make_loader(10, 3, shuffle=True, seed=0, drop_last=True)
    assert len(loader) == 3
    batches = epoch(loader)
    assert [len(b) for b in batches] == [3, 3, 3]
    assert len(set(torch.cat(batches).tolist())) == 9
    small = make_loader(2, 3, shuffle=True, drop_last=True)  # never drop everything
    assert len(small) == 1 and [len(b) for b in epoch(small)] == [2]
    exact = make_loader(9, 3, shuffle=False, drop_last=True)
    assert [b.tolist() for b in epoch(exact)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


def test_failed_download_is_one_clear_error(isolated_env, monkeypatch):
    """With the files missing and the mirror unreachable, the user gets one sentence, not a traceback."""
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])
    with pytest.raises(DatasetNotFound) as info:
        load_dataset("mnist", download=True, progress=False)
    message = str(info.value)
    assert "download failed" in message and "train-images-idx3-ubyte" in message and "MNIST/raw" in message
