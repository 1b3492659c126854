"""Configuration: defaults < recipe < YAML file < flags; recipes are real presets."""

from __future__ import annotations

from pathlib import Path

import pytest

from cnnlab.errors import CnnlabError, InvalidSetting
from cnnlab.training.config import ADAMW_LR, TrainConfig, default_settings, make_config
from cnnlab.training.recipes import get_recipe, list_recipes


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


@pytest.mark.parametrize("key, value, message", [
    ("ema_decay", 1.5, "ema_decay must be in [0, 1), got 1.5."),
    ("tta", "rotate", "tta must be one of none, flip, flip-translate, got 'rotate'."),
    ("epochs", 0, "epochs must be at least 1, got 0."),
    ("schedule", "step", "schedule must be one of linear, cosine, constant, got 'step'."),
])
def test_bad_values_are_named_as_the_fields(key: str, value, message: str) -> None:
    with pytest.raises(InvalidSetting) as caught:
        make_config(**{key: value})
    assert str(caught.value) == message and caught.value.setting == key


def test_default_settings_are_what_a_run_gets() -> None:
    defaults = default_settings()
    assert {name: value for name, (value, _) in defaults.items()} == make_config().to_dict()
    fast = get_recipe(TrainConfig.recipe)
    assert {name for name, (_, source) in defaults.items() if source == fast.name} == set(fast.settings)
    assert defaults["momentum"] == (TrainConfig.momentum, None)


def test_choosing_another_model_drops_the_recipes_model_args() -> None:
    assert make_config(model="simple").model_args == {}
    assert make_config(model="fastnet", model_args={"widths": [8, 16]}).model_args == {"widths": [8, 16]}


def test_each_optimizer_gets_its_own_rate_unless_one_is_given(tmp_path) -> None:
    """A rerun of a recorded config.yaml with another optimizer takes that optimizer's default rate:
    SGD's 0.2 made AdamW diverge (27.9% against 77.3% at AdamW's 0.002 in the same short run)."""
    assert make_config(optimizer="adamw").lr == ADAMW_LR
    assert make_config(optimizer="sgd").lr == 0.2 and make_config(optimizer="adamw", lr=0.01).lr == 0.01
    recorded = tmp_path / "config.yaml"
    recorded.write_text("recipe: fast\noptimizer: sgd\nlr: 0.3\n")
    assert make_config(recorded).lr == 0.3
    assert make_config(recorded, optimizer="adamw").lr == ADAMW_LR
    assert make_config(recorded, optimizer="adamw", lr=0.004).lr == 0.004
    assert make_config(recorded, optimizer="sgd").lr == 0.3  # the same optimizer keeps the file's rate
    recorded.write_text("recipe: fast\noptimizer: adamw\nlr: 0.001\n")
    assert make_config(recorded, optimizer="adamw").lr == 0.001
    assert make_config(recorded, optimizer="sgd").lr == 0.2
