from pathlib import Path

import pytest

from agegender.core.config import Config, load_config, to_toml, valid_keys
from agegender.core.errors import ConfigError

RECIPES = sorted((Path(__file__).parents[1] / "configs").glob("*.toml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipes_load_and_round_trip(recipe, tmp_path):
    cfg = load_config(recipe)
    (tmp_path / "resolved.toml").write_text(to_toml(cfg))
    assert load_config(tmp_path / "resolved.toml") == cfg


def test_study_recipe_is_the_study():
    cfg = load_config(Path(__file__).parents[1] / "configs/seed.toml")
    assert (cfg.model.name, cfg.train.optimizer, cfg.train.lr, cfg.train.batch_size) == (
        "seed-cnn",
        "adam",
        1e-3,
        32,
    )
    assert (cfg.train.epochs, cfg.train.augment, cfg.train.scheduler) == (30, False, "none")
    assert (cfg.loss.w_age, cfg.loss.w_gender) == (1.0, 1.0)


def test_overrides_are_typed():
    cfg = load_config(
        None,
        [
            "train.lr=5e-4",
            "train.epochs=3",
            "train.augment=false",
            "model.name=seed-cnn",
            'run.out="x y"',
            "loss.w_age=2",
        ],
    )
    assert cfg.train.lr == 5e-4 and cfg.train.epochs == 3 and cfg.train.augment is False
    assert cfg.model.name == "seed-cnn" and cfg.run.out == "x y" and cfg.loss.w_age == 2.0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epoch=3", r"unknown key 'train.epoch' \(did you mean train.epochs\?\)"),
        ("trian.epochs=3", "did you mean train.epochs"),
        ("epochs=3", "unknown key 'epochs'"),
        ("train.epochs=three", "train.epochs must be int"),
        ("train.epochs=1.5", "train.epochs must be int"),
        ("train.augment=1", "train.augment must be bool"),
        ("train.optimizer=lion", "train.optimizer must be one of 'sgd', 'rmsprop'"),
        ("train.scheduler=step", "train.scheduler must be one of"),
        ("train.epochs", "not key=value"),
    ],
)
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.bogus=1"])
    assert "train.batch_size" in str(e.value) and "train.lr" in str(e.value)


def test_bad_recipe_files(tmp_path):
    (tmp_path / "bad.toml").write_text("[train]\nepochs = \n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(tmp_path / "bad.toml")
    (tmp_path / "unknown.toml").write_text("[training]\nepochs = 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'training\.epochs'"):
        load_config(tmp_path / "unknown.toml")
    with pytest.raises(ConfigError, match="no such recipe"):
        load_config(tmp_path / "missing.toml")


def test_fixed_key_names():
    """Scripts use these names: they must not move."""
    required = {
        "data.cache",
        "data.root",
        "data.size",
        "data.color",
        "data.limit",
        "model.name",
        "model.age_head",
        "train.epochs",
        "train.batch_size",
        "train.lr",
        "train.optimizer",
        "train.scheduler",
        "train.early_stopping",
        "train.weight_decay",
        "train.augment",
        "train.seed",
        "run.out",
        "train.device",
    }
    assert required <= set(valid_keys(Config()))
