"""Fixtures shared by the deployment tests: one small model really trained on Fashion-MNIST."""

from __future__ import annotations

from pathlib import Path

import pytest

from cnnlab.data.builtin import DEBIAN_FASHION_MNIST

HAVE_FMNIST = (DEBIAN_FASHION_MNIST / "t10k-images-idx3-ubyte.gz").is_file()
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST,
                                  reason="Fashion-MNIST is not installed (make test installs dataset-fashion-mnist)")


@pytest.fixture(scope="session")
def fmnist_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory of a fastnet trained for two epochs on 8,000 Fashion-MNIST images
    (about 85% test accuracy, ~10 s), with flip test-time augmentation recorded in model.json."""
    if not HAVE_FMNIST:
        pytest.skip("Fashion-MNIST is not installed (make test installs dataset-fashion-mnist)")
    import cnnlab

    out = tmp_path_factory.mktemp("fmnist-run") / "run"
    return cnnlab.train(recipe="fast", dataset="fashion-mnist", limit_train=8000, epochs=2,
                        model_args={"widths": [16, 32, 64]}, out=str(out), progress=False)


@pytest.fixture(scope="session")
def fmnist_test_images(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[str]]:
    """The first 64 Fashion-MNIST test images written as PNG files, with their true class names."""
    if not HAVE_FMNIST:
        pytest.skip("Fashion-MNIST is not installed (make test installs dataset-fashion-mnist)")
    from PIL import Image

    from cnnlab.data.load import load_dataset

    bundle = load_dataset("fashion-mnist", val_split=0, progress=False)
    folder = tmp_path_factory.mktemp("fmnist-png")
    paths, labels = [], []
    for i in range(64):
        path = folder / f"test-{i:03d}.png"
        Image.fromarray(bundle.test.images[i, 0].numpy(), mode="L").save(path)
        paths.append(path)
        labels.append(bundle.class_names[int(bundle.test.labels[i])])
    return paths, labels


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A test module's environment: a fresh $CNNLAB_CACHE and no $CNNLAB_DATA (pass it to subprocesses)."""
    return {"CNNLAB_CACHE": str(tmp_path_factory.mktemp("cache")), "CNNLAB_DATA": ""}


@pytest.fixture
def use_cache_env(cache_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """cache_env for in-process calls too; a module opts in with pytest.mark.usefixtures."""
    for key, value in cache_env.items():
        monkeypatch.setenv(key, value)
    return cache_env
