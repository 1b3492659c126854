"""A user's own network, as a tutorial reader writes it: trained through `--model file.py:Name`,
then evaluated, predicted with, exported, served and reported on, each in a fresh process;
and the ways it can go wrong, each one clear line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest
from conftest import needs_fmnist
from serving import running_server
from usage import usage_error

pytestmark = [needs_fmnist, pytest.mark.usefixtures("use_cache_env")]

# The PyTorch tutorial's network, for 28x28 grayscale images, written as a reader of it would.
NET_PY = textwrap.dedent('''
    import torch
    import torch.nn.functional as F
    from torch import nn


    class Net(nn.Module):
        def __init__(self, num_classes=10):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 6, 5)
            self.pool = nn.MaxPool2d(2, 2)
            self.conv2 = nn.Conv2d(6, 16, 5)
            self.fc1 = nn.Linear(16 * 4 * 4, 120)
            self.fc2 = nn.Linear(120, 84)
            self.fc3 = nn.Linear(84, num_classes)

        def forward(self, x):
            x = self.pool(F.relu(self.conv1(x)))
            x = self.pool(F.relu(self.conv2(x)))
            x = torch.flatten(x, 1)
            x = F.relu(self.fc1(x))
            x = F.relu(self.fc2(x))
            return self.fc3(x)


    class Net32(Net):
        """Sized for 32x32 images: its first Linear does not fit 28x28 ones."""
        def __init__(self, num_classes=10):
            super().__init__(num_classes)
            self.fc1 = nn.Linear(16 * 5 * 5, 120)


    def lazy_net(in_channels, num_classes, hidden=32):
        """A factory; the Linear layers take their input size from the first batch."""
        return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Flatten(), nn.LazyLinear(hidden), nn.ReLU(), nn.LazyLinear(num_classes))
''')


def cnnlab(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnnlab", *args], capture_output=True, text=True, timeout=600,
                          cwd=cwd, env={**os.environ, **(env or {})})


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cnnlab: error:"), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("project")
    (folder / "net.py").write_text(NET_PY)
    return folder


@pytest.fixture(scope="module")
def own_run(project: Path, cache_env: dict[str, str]) -> tuple[Path, subprocess.CompletedProcess]:
    """`cnnlab train --model net.py:Net`, with the default recipe otherwise (so its step budget:
    500 steps of 64 images), from the project folder."""
    result = cnnlab("train", "--model", "net.py:Net", "--limit-train", "1200", "--out", "run",
                    "--no-progress", cwd=project, env=cache_env)
    assert result.returncode == 0, result.stderr
    return project / "run", result


def test_own_model_trains_without_the_recipes_fastnet_settings(own_run):
    run, result = own_run
    card = json.loads((run / "model.json").read_text())
    assert card["architecture"] == f"{run.parent / 'net.py'}:Net"  # absolute: later commands run from anywhere
    assert len(card["source_sha256"]) == 64
    # the fast recipe's whitened first layer and SGD rate are fastnet's: said in one line, not applied
    assert "recipe fast is tuned for fastnet" in result.stdout
    assert "optimizer adamw" in result.stdout and "whiten off" in result.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_accuracy"] > 0.7  # far above chance (0.1)


def test_every_command_rebuilds_it_in_a_fresh_process(own_run, fmnist_test_images, tmp_path, cache_env):
    run, _ = own_run
    elsewhere = tmp_path  # not the folder net.py is in
    summary = json.loads((run / "summary.json").read_text())

    result = cnnlab("evaluate", str(run), "--no-progress", cwd=elsewhere, env=cache_env)
    assert result.returncode == 0, result.stderr
    assert json.loads((run / "eval.json").read_text())["accuracy"] == pytest.approx(summary["test_accuracy"])

    paths, _ = fmnist_test_images
    result = cnnlab("predict", str(run), *map(str, paths[:8]), "--format", "csv", "--no-progress", cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    torch_labels = [line.split(",")[1] for line in result.stdout.splitlines()[1:]]
    assert len(torch_labels) == 8

    result = cnnlab("export", str(run), cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    result = cnnlab("predict", str(run / "model.onnx"), *map(str, paths[:8]), "--backend", "onnx", "--format", "csv",
                    "--no-progress", cwd=elsewhere)
    assert [line.split(",")[1] for line in result.stdout.splitlines()[1:]] == torch_labels

    result = cnnlab("report", str(run), "--no-progress", cwd=elsewhere, env=cache_env)
    assert result.returncode == 0, result.stderr
    assert "net.py:Net" in (run / "report.html").read_text()

    with running_server(run) as url:
        model = httpx.get(f"{url}/v1/model").json()
        assert model["architecture"].endswith("net.py:Net")
        with open(paths[0], "rb") as fh:
            answer = httpx.post(f"{url}/v1/predict", files={"files": fh}).json()
        assert answer["predictions"][0]["predictions"][0]["label"] == torch_labels[0]


def test_a_changed_or_vanished_source_is_one_line(own_run, fmnist_test_images, tmp_path):
    run, _ = own_run
    source = run.parent / "net.py"
    original = source.read_text()
    try:
        source.write_text(original + "\n# edited\n")
        line = one_error_line(cnnlab("evaluate", str(run), cwd=tmp_path))
        assert "has changed since this run was trained" in line and str(source) in line
        source.unlink()
        line = one_error_line(cnnlab("predict", str(run), str(fmnist_test_images[0][0]), cwd=tmp_path))
        assert "no longer exists" in line
    finally:
        source.write_text(original)


def test_train_resume_rebuilds_it_too(own_run, tmp_path):
    run, _ = own_run
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "summary.json").unlink()  # as if stopped after its last checkpoint
    result = cnnlab("train", "--resume", str(copy), "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (copy / "model.safetensors").read_bytes() == (run / "model.safetensors").read_bytes()


def test_explain_and_lr_find_take_it(own_run, fmnist_test_images, tmp_path, capsys):
    from cnnlab.cli import main

    run, _ = own_run
    assert main(["explain", str(run), str(fmnist_test_images[0][0]), "--out", str(tmp_path / "explain")]) == 0
    assert len(list((tmp_path / "explain").glob("*.png"))) == 1
    assert main(["lr-find", "--model", f"{run.parent / 'net.py'}:Net", "--limit-train", "300", "--steps", "8",
                 "--out", str(tmp_path / "lr"), "--no-progress"]) == 0
    assert "suggested learning rate" in capsys.readouterr().out


def test_lazy_layers_are_materialised_and_reload(project, tmp_path):
    import cnnlab as api

    run = api.train(model=f"{project / 'net.py'}:lazy_net", model_args={"hidden": 16}, limit_train=300,
                       epochs=1, out=str(tmp_path / "lazy"), progress=False)
    clf = api.Classifier.load(run)
    assert clf.model[4].in_features == 8 * 14 * 14  # the LazyLinear, sized by the dummy batch
    result = cnnlab("evaluate", str(run), "--no-progress")
    assert result.returncode == 0, result.stderr


def test_a_model_that_does_not_fit_the_data_is_named_before_training(project, capsys):
    line = usage_error(["train", "--model", f"{project / 'net.py'}:Net32", "--limit-train", "100", "--epochs", "1",
                        "--no-progress"], capsys)
    assert "layer 'fc1' (Linear) expects 400 input features but gets 256" in line
    assert "1x28x28 images" in line


@pytest.mark.parametrize("spec, fragment", [
    ("net.py:Nett", "defines no 'Nett'; it has Net, Net32, lazy_net"),
    ("missing.py:Net", "does not exist"),
    ("no_such_package.models:Net", "No module named 'no_such_package.models'"),
])
def test_a_bad_import_path_is_one_line(project, spec, fragment, capsys, monkeypatch):
    monkeypatch.chdir(project)
    assert fragment in usage_error(["train", "--model", spec, "--no-progress"], capsys)


def test_a_model_from_a_notebook_is_refused_before_training(tmp_path, cache_env):
    """`python -c` runs code the way a notebook does: no file a later process could import."""
    code = textwrap.dedent('''
        import cnnlab
        from torch import nn
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(784, 10)
            def forward(self, x):
                return self.fc(x.flatten(1))
        try:
            cnnlab.train(model=Net, limit_train=100, epochs=1, progress=False)
        except cnnlab.CnnlabError as exc:
            print(exc)
    ''')
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, **cache_env}, timeout=300)
    assert "defined in a notebook or an interactive session" in result.stdout, result.stderr
    assert "move it into a file such as net.py" in result.stdout
    assert not (tmp_path / "runs").exists()


def test_a_script_trains_its_own_class_and_instance(tmp_path, cache_env):
    """A script (run as __main__) that trains the class it defines; later commands import the
    script again, where its main guard keeps it from training again."""
    script = tmp_path / "train_mine.py"
    script.write_text(NET_PY + textwrap.dedent('''
        if __name__ == "__main__":
            import sys
            import cnnlab
            model = Net(num_classes=10) if sys.argv[1] == "instance" else Net
            cnnlab.train(model=model, limit_train=300, epochs=1, out=sys.argv[2], progress=False)
            try:
                changed = Net()
                changed.fc3 = torch.nn.Linear(84, 10, bias=False)  # what Net() alone does not build
                cnnlab.train(model=changed, limit_train=300, epochs=1, progress=False)
            except cnnlab.CnnlabError as exc:
                print("refused:", exc)
    '''))
    for kind in ("instance",):
        result = subprocess.run([sys.executable, str(script), kind, str(tmp_path / kind)], capture_output=True,
                                text=True, cwd=tmp_path, env={**os.environ, **cache_env}, timeout=300)
        assert result.returncode == 0, result.stderr
        # an instance its class cannot rebuild is refused, saying what to pass instead
        refusal = result.stdout.split("refused:")[1]
        assert "does not rebuild (e.g. 'fc3.bias' differs)" in refusal and "pass the class" in refusal
        card = json.loads((tmp_path / kind / "model.json").read_text())
        assert card["architecture"] == f"{script}:Net"
        evaluated = cnnlab("evaluate", str(tmp_path / kind), "--no-progress", env=cache_env)
        assert evaluated.returncode == 0, evaluated.stderr
        assert "epoch" not in evaluated.stdout  # the script's main block did not run again


def test_a_model_registered_in_user_code_is_recorded_by_import_path(tmp_path, cache_env):
    (tmp_path / "mynets.py").write_text(textwrap.dedent('''
        import cnnlab
        from torch import nn

        @cnnlab.register_model("tiny", "a one-layer net")
        def tiny(in_channels, num_classes):
            return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(4, num_classes))
    '''))
    code = ("import cnnlab, mynets; "
            f"cnnlab.train(model='tiny', limit_train=200, epochs=1, out={str(tmp_path / 'run')!r}, progress=False)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, **cache_env}, timeout=300)
    assert result.returncode == 0, result.stderr
    # a module beside the script is recorded by its file: importable from any folder
    assert json.loads((tmp_path / "run" / "model.json").read_text())["architecture"] == f"{tmp_path}/mynets.py:tiny"
    evaluated = cnnlab("evaluate", str(tmp_path / "run"), "--no-progress", env=cache_env)
    assert evaluated.returncode == 0, evaluated.stderr


def test_packages_register_models_through_entry_points(tmp_path, cache_env):
    """An installed package's `cnnlab.models` entry point: listed, trained and loaded by name."""
    site = tmp_path / "site"
    (site / "acme_nets").mkdir(parents=True)
    (site / "acme_nets" / "__init__.py").write_text(textwrap.dedent('''
        from torch import nn

        def small(in_channels, num_classes, width=8):
            return nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(width, num_classes))
    '''))
    dist = site / "acme_nets-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-nets\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[cnnlab.models]\nacme-small = acme_nets:small\n")
    env = {**cache_env, "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    listed = cnnlab("models", env=env)
    assert "acme-small" in listed.stdout and "acme-nets" in listed.stdout
    result = cnnlab("train", "--model", "acme-small", "--model-arg", "width=4", "--limit-train", "200", "--epochs", "1",
                    "--out", str(tmp_path / "run"), "--no-progress", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "run" / "model.json").read_text())["architecture"] == "acme-small"
    assert cnnlab("evaluate", str(tmp_path / "run"), "--no-progress", env=env).returncode == 0


def test_torchvision_models_get_the_foreign_model_defaults():
    from cnnlab.training.config import make_config, recipe_note

    config = make_config(model="tv:resnet18")
    assert (config.optimizer, config.lr, config.whiten, config.model_args) == ("adamw", 0.002, False, {})
    assert "recipe fast is tuned for fastnet; for tv:resnet18 it uses optimizer adamw" in recipe_note(config)
    # asked for explicitly, they are kept
    config = make_config(model="tv:resnet18", optimizer="sgd", lr=0.05, whiten=True)
    assert (config.optimizer, config.lr, config.whiten) == ("sgd", 0.05, True)
    assert make_config(optimizer="adamw").lr == 0.002  # the recipe's 0.2 is SGD's rate
    assert make_config(model="tv:resnet18", optimizer="sgd").lr == 0.2  # and SGD gets SGD's
    assert make_config(model="simple").optimizer == "sgd"  # cnnlab's own networks keep the recipe's SGD
    assert recipe_note(make_config()) is None


def test_a_model_from_your_own_training_loop_becomes_a_run(project, tmp_path, cache_env):
    """A plain PyTorch loop (ToTensor + Normalize, SGD), then save_run: cnnlab evaluate in a new
    process scores the test images exactly as the loop's own evaluation did."""
    script = project / "own_loop.py"
    script.write_text(textwrap.dedent('''
        import json, sys
        import torch
        import cnnlab
        from cnnlab.data.load import load_dataset
        from net import Net

        bundle = load_dataset("fashion-mnist", val_split=0, progress=False)
        x = (bundle.train.images[:2000].float() / 255 - 0.5) / 0.5  # ToTensor, then Normalize((0.5,), (0.5,))
        y = bundle.train.labels[:2000]
        torch.manual_seed(0)
        model = Net()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        for epoch in range(2):
            for i in range(0, 2000, 50):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x[i:i + 50]), y[i:i + 50]).backward()
                opt.step()
        model.eval()
        test_x, test_y = bundle.test.images[:500], bundle.test.labels[:500]
        with torch.no_grad():
            mine = (model((test_x.float() / 255 - 0.5) / 0.5).argmax(1) == test_y).float().mean().item()
        run = cnnlab.save_run(model, sys.argv[1], class_names=bundle.class_names, mean=[0.5], std=[0.5],
                              image_size=28, test_data=(test_x, test_y))
        print(json.dumps({"accuracy": mine}))
    '''))
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "run")], capture_output=True, text=True,
                            cwd=project, env={**os.environ, **cache_env}, timeout=300)
    assert result.returncode == 0, result.stderr
    mine = json.loads(result.stdout.strip().splitlines()[-1])["accuracy"]
    assert mine > 0.6
    evaluated = cnnlab("evaluate", str(tmp_path / "run"), "--no-progress", cwd=tmp_path, env=cache_env)
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert report["images"] == 500 and report["accuracy"] == pytest.approx(mine, abs=1e-9)
    # a finished run is not overwritten unless asked
    import cnnlab as api

    reloaded = api.Classifier.load(tmp_path / "run")
    with pytest.raises(api.CnnlabError, match="holds a finished run"):
        api.save_run(reloaded.model, tmp_path / "run", class_names=reloaded.class_names, mean=[0.5], std=[0.5],
                     image_size=28, dataset="fashion-mnist")


def test_a_config_object_with_overrides_follows_the_same_rules(project):
    from cnnlab.training.config import make_config
    from cnnlab.training.trainer import _with_overrides

    config = _with_overrides(make_config(), {"model": f"{project / 'net.py'}:Net", "epochs": 3})
    assert (config.model_args, config.whiten, config.optimizer, config.min_steps) == ({}, False, "adamw", 0)
    kept = _with_overrides(make_config(lr=0.1, label_smoothing=0.0), {"seed": 3})
    assert (kept.lr, kept.label_smoothing, kept.seed, kept.whiten) == (0.1, 0.0, 3, True)


def test_a_module_imported_normally_is_not_run_twice(project, monkeypatch):
    from cnnlab.models.source import resolve, source_of

    monkeypatch.syspath_prepend(str(project))
    import net  # as a script beside it would

    source = source_of(net.Net)
    assert source.spec == f"{project / 'net.py'}:Net"
    assert resolve(source.spec)[1] is net.Net


def test_tied_weights_are_saved_and_reload(project, tmp_path):
    """safetensors refuses tensors that share memory; the run stores each and loading ties them again."""
    import cnnlab as api

    (project / "tied.py").write_text(textwrap.dedent('''
        from torch import nn

        class Tied(nn.Module):
            def __init__(self, num_classes=10):
                super().__init__()
                self.conv = nn.Conv2d(1, 8, 3, stride=2)
                self.a = nn.Linear(8, 8)
                self.b = nn.Linear(8, 8)
                self.b.weight = self.a.weight  # tied
                self.head = nn.Linear(8, num_classes)

            def forward(self, x):
                x = self.conv(x).mean((2, 3))
                return self.head(self.b(self.a(x).relu()))
    '''))
    run = api.train(model=f"{project / 'tied.py'}:Tied", limit_train=200, epochs=1, out=str(tmp_path / "run"),
                    progress=False)
    model = api.Classifier.load(run).model
    assert model.a.weight is model.b.weight
