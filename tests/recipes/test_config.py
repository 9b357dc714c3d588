"""Recipe configs: frozen typed data, overridable by ``section.key=value`` with type coercion and clear errors."""
from __future__ import annotations

import dataclasses
import json

import pytest

from recipes import RECIPES
from recipes.config import (SECTIONS, Config, ConfigError, apply_overrides, config_from_dict, config_to_dict,
                            field_paths)

BASE = Config(name="test")


def test_configs_are_frozen_and_hashable():
    cfg = Config(name="x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.name = "y"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.epochs = 3
    assert hash(cfg) == hash(Config(name="x"))
    assert {cfg: 1}[Config(name="x")] == 1


def test_field_paths_name_every_field_of_every_section():
    paths = field_paths(BASE)
    expected = [f"{s}.{f.name}" for s in SECTIONS for f in dataclasses.fields(getattr(BASE, s))]
    assert paths == expected
    assert "train.epochs" in paths and "schedule.max_lr" in paths and "model.channels" in paths


@pytest.mark.parametrize("key, value, section, name, expected", [
    ("model.channels", "16,32", "model", "channels", (16, 32)),
    ("model.channels", "(8, 16, 32)", "model", "channels", (8, 16, 32)),
    ("max_lr", "0.02", "schedule", "max_lr", 0.02),  # a bare key that names one field
    ("schedule.max_lr", "2e-2", "schedule", "max_lr", 0.02),
    ("epochs", "3", "train", "epochs", 3),
    ("train.log_every", "1e2", "train", "log_every", 100),
    ("cycle_momentum", "false", "schedule", "cycle_momentum", False),
    ("schedule.cycle_momentum", "yes", "schedule", "cycle_momentum", True),
    ("precision", "bf16", "train", "precision", "bf16"),
    ("data.batch_size", 32, "data", "batch_size", 32),  # YAML gives typed values
    ("optim.weight_decay", 0, "optim", "weight_decay", 0.0),
])
def test_overrides_are_coerced_to_the_field_type(key, value, section, name, expected):
    cfg = apply_overrides(BASE, {key: value})
    got = getattr(getattr(cfg, section), name)
    assert got == expected and type(got) is type(expected)


def test_overrides_return_a_new_config_and_leave_the_rest():
    cfg = apply_overrides(BASE, {"epochs": "3", "max_lr": "0.05"})
    assert BASE.train.epochs == 10 and BASE.schedule.max_lr == 0.01  # untouched
    assert dataclasses.replace(cfg, train=BASE.train, schedule=BASE.schedule) == BASE


def test_name_and_description_are_top_level_keys():
    cfg = apply_overrides(BASE, {"name": "mine", "description": "my run"})
    assert (cfg.name, cfg.description, cfg.model.name) == ("mine", "my run", BASE.model.name)


@pytest.mark.parametrize("key, hint", [
    ("max_lrr", "max_lr"), ("schedule.maxlr", "schedule.max_lr"), ("epoch", "epochs"), ("trian.epochs", "train.epochs"),
])
def test_an_unknown_key_gets_a_did_you_mean(key, hint):
    with pytest.raises(ConfigError) as info:
        apply_overrides(BASE, {key: "1"})
    message = str(info.value)
    assert f"unknown config key {key!r}" in message
    assert f"did you mean {hint!r}" in message
    assert "\n" not in message


def test_an_unknown_key_with_nothing_close():
    with pytest.raises(ConfigError, match="unknown config key 'zzzzzz'") as info:
        apply_overrides(BASE, {"zzzzzz": "1"})
    assert "did you mean" not in str(info.value)


@pytest.mark.parametrize("key, value, kind", [
    ("epochs", "x", "an integer"), ("epochs", "2.5", "an integer"), ("epochs", "2.5e0", "an integer"),
    ("max_lr", "fast", "a number"),
    ("cycle_momentum", "maybe", "true or false"), ("model.channels", "a,b", "comma-separated list of integers"),
])
def test_a_value_of_the_wrong_type_is_refused(key, value, kind):
    with pytest.raises(ConfigError, match=kind):
        apply_overrides(BASE, {key: value})


@pytest.mark.parametrize("overrides, fragment", [
    ({"epochs": "0"}, "train.epochs must be >= 1"),
    ({"precision": "fp64"}, "train.precision must be one of"),
    ({"data.val_fraction": "1.5"}, "data.val_fraction"),
    ({"model.channels": ""}, "model.channels"),
    ({"optim.lr": "0.5"}, "must not exceed schedule.max_lr"),
    ({"label_smoothing": "1"}, "label_smoothing"),
    ({"train.device": "tpu"}, "train.device"),
])
def test_a_value_the_section_refuses_is_a_config_error(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment) as info:
        apply_overrides(BASE, overrides)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("key", ["schedule.max_lr", "optim.weight_decay", "train.init_scale"])
@pytest.mark.parametrize("value", ["inf", "nan"])
def test_non_finite_numbers_are_refused(key, value):
    # an infinite peak LR, weight decay or loss scale makes every step overflow: a typo, not a setting
    with pytest.raises(ConfigError, match=key):
        apply_overrides(BASE, {key: value})


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_to_dict_is_json_and_from_dict_rebuilds_the_config(name):
    cfg = RECIPES[name]
    data = json.loads(json.dumps(config_to_dict(cfg)))
    assert set(SECTIONS) <= data.keys()
    assert isinstance(data["model"]["channels"], list)
    assert config_from_dict(data) == cfg


def test_from_dict_ignores_extra_top_level_keys_and_keeps_defaults():
    data = {"name": "partial", "train": {"epochs": 2}, "versions": {"torch": "x"}, "runtime": {}}
    cfg = config_from_dict(data)
    assert cfg == dataclasses.replace(Config(name="partial"), train=dataclasses.replace(BASE.train, epochs=2))


def test_from_dict_refuses_unknown_keys_in_a_section():
    with pytest.raises(ConfigError, match="unknown config key"):
        config_from_dict({"name": "x", "train": {"epochz": 2}})
