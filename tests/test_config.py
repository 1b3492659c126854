"""Configuration: defaults < recipe < YAML file < flags; recipes are real presets."""

from __future__ import annotations

from pathlib import Path

import pytest

from cnnlab.config import TrainConfig, make_config
from cnnlab.errors import CnnlabError
from cnnlab.recipes import get_recipe, list_recipes


def test_every_recipe_resolves_to_a_valid_config() -> None:
    assert {"fast", "balanced", "best"} <= set(list_recipes())
    for name in list_recipes():
        recipe = get_recipe(name)
        assert recipe.purpose
        config = make_config(recipe=name)
        for key, value in recipe.settings.items():
            assert getattr(config, key) == value, (name, key)


def test_precedence_recipe_then_file_then_flags(tmp_path: Path) -> None:
    best = get_recipe("best").settings
    config_file = tmp_path / "c.yaml"
    config_file.write_text("recipe: best\nepochs: 2\nlr: 0.05\n")
    config = make_config(config_file, lr=0.07)
    assert config.recipe == "best"
    assert config.model == best["model"] and config.tta == best["tta"]  # from the recipe
    assert config.epochs == 2  # the file overrides the recipe
    assert config.lr == 0.07  # flags override the file


def test_default_is_the_fast_recipe() -> None:
    config = make_config()
    assert config.recipe == "fast"
    for key, value in get_recipe("fast").settings.items():
        assert getattr(config, key) == value


def test_none_recipe_keeps_dataclass_defaults() -> None:
    assert make_config(recipe="none").to_dict() == {**TrainConfig().to_dict(), "recipe": "none"}


def test_unknown_recipe_is_a_user_error() -> None:
    with pytest.raises(CnnlabError, match="Unknown recipe 'turbo'"):
        make_config(recipe="turbo")


@pytest.mark.parametrize("key, value, fragment", [
    ("ema_decay", 1.5, "--ema-decay"),
    ("tta", "rotate", "--tta"),
    ("epochs", 0, "--epochs"),
    ("schedule", "step", "--schedule"),
])
def test_bad_values(key: str, value, fragment: str) -> None:
    with pytest.raises(CnnlabError, match=fragment):
        make_config(**{key: value})


def test_choosing_another_model_drops_the_recipes_model_args() -> None:
    assert make_config(model="simple").model_args == {}
    assert make_config(model="fastnet", model_args={"widths": [8, 16]}).model_args == {"widths": [8, 16]}
