"""Every registered recipe: frozen and hashable, shown as YAML that rebuilds it, and runnable."""
from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from recipes import RECIPES, get_recipe
from recipes.cli import cli
from recipes.config import Config, ConfigError, apply_overrides, config_from_dict
from recipes.run import build
from tests.recipes.data.test_idx import write_idx_set

NAMES = sorted(RECIPES)
#: settings that make any recipe tiny: small batches, logging every step, no timed checkpoints
TINY = {"data.batch_size": 8, "train.log_every": 1, "checkpoint.every_minutes": 0, "train.device": "cpu"}


def _fake_cifar10(root: Path) -> dict:
    """torchvision's CIFAR-10 layout with 8 random images per batch file (no download)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    generator = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {"data": generator.integers(0, 256, (8, 3 * 32 * 32), dtype=np.uint8),
                 "labels": generator.integers(0, 10, 8).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    return {"data.data_dir": str(root)}


def _fake_image_folder(root: Path) -> dict:
    """DIR/train/CLASS/*.png and DIR/val/CLASS/*.png: two classes of small random images."""
    from PIL import Image

    generator = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 2)):
        for label in ("cat", "dog"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = generator.integers(0, 256, (40, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return {"data.data_dir": str(root), "data.num_workers": 0, "data.image_size": 32}


#: per data set: what makes a tiny run of it possible here (data on disk is made in tmp_path)
PREPARE: dict[str, Callable[[Path], dict]] = {
    "digits": lambda root: {"data.image_size": 16, "model.channels": "4,8"},
    "synthetic": lambda root: {"data.image_size": 16, "model.channels": "4,8", "data.samples": 64},
    "cifar10": _fake_cifar10,
    "imagefolder": _fake_image_folder,
    "fashion-mnist": lambda root: {"data.data_dir": str(write_idx_set(root, train=64, test=16)), "model.channels": "4,8"},
    "mnist": lambda root: {"data.data_dir": str(write_idx_set(root, train=64, test=16)), "model.channels": "4,8"},
}

def test_the_registry_is_a_plain_dict_of_configs():
    assert NAMES, "no recipes registered"
    for name, cfg in RECIPES.items():
        assert isinstance(cfg, Config)
        assert cfg.name == name
        assert cfg.description


@pytest.mark.parametrize("name", NAMES)
def test_a_recipe_is_frozen_and_hashable(name):
    cfg = RECIPES[name]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.epochs = 1
    for section in ("data", "model", "optim", "schedule", "train"):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(getattr(cfg, section), dataclasses.fields(getattr(cfg, section))[0].name, None)
    assert hash(cfg) == hash(dataclasses.replace(cfg))


@pytest.mark.parametrize("name", NAMES)
def test_show_prints_yaml_that_rebuilds_the_recipe(name):
    result = CliRunner().invoke(cli, ["show", name])
    assert result.exit_code == 0, result.output
    assert config_from_dict(yaml.safe_load(result.output)) == RECIPES[name]


def test_get_recipe():
    assert get_recipe("digits") is RECIPES["digits"]
    with pytest.raises(ConfigError, match="unknown recipe 'nope'; known recipes: " + ", ".join(NAMES)):
        get_recipe("nope")


@pytest.mark.parametrize("name", NAMES)
def test_a_recipe_runs_two_iterations(name, tmp_path):
    dataset = RECIPES[name].data.dataset
    if dataset not in PREPARE:
        pytest.fail(f"recipe {name!r} trains on {dataset!r}, which has no entry in PREPARE in "
                    "tests/recipes/test_registry.py: add how to make a tiny run of it")
    cfg = apply_overrides(RECIPES[name], {**TINY, **PREPARE[dataset](tmp_path / "data")})
    run = build(cfg, tmp_path / "run", quiet=True)
    try:
        state = run.trainer.run(run.train_data, max_epochs=1, epoch_length=2)
    finally:
        run.handlers["tensorboard"].close()
    assert state.iteration == 2 and state.optimizer_step == 2
    assert 0.0 <= state.metrics["val_accuracy"] <= 1.0
    assert state.metrics["train_loss"] > 0
    assert (tmp_path / "run" / "metrics.jsonl").exists()
