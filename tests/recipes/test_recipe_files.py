"""Recipe files: YAML naming a base recipe and overrides; unknown keys refused with a did-you-mean; show and train."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from recipes import RECIPES
from recipes.cli import cli, main
from recipes.cli.options import resolve_config
from recipes.config import ConfigError, config_from_dict
from recipes.recipe_files import load_recipe_file


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_nested_sections_and_dotted_keys_override_the_base(tmp_path):
    recipe = write(tmp_path / "short.yaml", "base: cifar10\ntrain:\n  epochs: 5\n  seed: 3\nschedule.max_lr: 0.01\n"
                                            "model: {name: resnet18_32}\n")
    cfg = load_recipe_file(recipe)
    base = RECIPES["cifar10"]
    assert (cfg.train.epochs, cfg.train.seed, cfg.schedule.max_lr, cfg.model.name) == (5, 3, 0.01, "resnet18_32")
    assert cfg.data == base.data and cfg.optim == base.optim
    assert cfg.name == "short"  # the file's name, unless it sets one


def test_a_file_written_with_the_old_flat_guard_keys_still_loads(tmp_path):
    recipe = write(tmp_path / "old.yaml", "base: digits\ntrain: {epochs: 2, on_nan: stop, nan_check_every: 5}\n"
                                          "train.nan_max_rollbacks: 1\n")
    cfg = load_recipe_file(recipe)
    assert (cfg.train.epochs, cfg.guard.on_nan, cfg.guard.check_every, cfg.guard.max_rollbacks) == (2, "stop", 5, 1)


def test_precedence_is_recipe_then_file_then_set_then_options(tmp_path):
    recipe = write(tmp_path / "p.yml", "base: digits\nname: mine\ntrain: {epochs: 4, seed: 7}\ndata: {batch_size: 32}\n")
    cfg = resolve_config(str(recipe), ("train.seed=8", "data.batch_size=16"), batch_size=8)
    assert cfg.name == "mine"
    assert cfg.train.epochs == 4  # the file over the recipe
    assert cfg.train.seed == 8  # --set over the file
    assert cfg.data.batch_size == 8  # an explicit option over --set
    assert cfg.optim == RECIPES["digits"].optim


def test_a_base_may_be_another_recipe_file(tmp_path):
    write(tmp_path / "base.yaml", "base: digits\ntrain: {epochs: 3}\n")
    (tmp_path / "sub").mkdir()
    child = write(tmp_path / "sub" / "child.yaml", "base: ../base.yaml\ndata.batch_size: 16\n")
    cfg = load_recipe_file(child)
    assert (cfg.train.epochs, cfg.data.batch_size) == (3, 16)
    loop = write(tmp_path / "loop.yaml", "base: loop.yaml\n")
    with pytest.raises(ConfigError, match="in a loop"):
        load_recipe_file(loop)


@pytest.mark.parametrize("text, fragments", [
    ("base: digits\ntrain: {epoch: 3}\n", ["unknown key 'train.epoch'", "did you mean 'train.epochs'", "valid keys of train:",
                                           "label_smoothing"]),
    ("base: digits\nschedule.max_lrr: 0.1\n", ["did you mean 'schedule.max_lr'", "valid keys of schedule: max_lr"]),
    ("base: digits\nepochs: 3\n", ["unknown key 'epochs'", "did you mean 'train.epochs'"]),
    ("base: digits\nepohcs: 3\n", ["unknown key 'epohcs'", "did you mean 'train.epochs'", "train: {epochs: ...}"]),
    ("base: digits\ntrian.epochs: 3\n", ["unknown key 'trian.epochs'", "did you mean 'train.epochs'"]),
    ("base: digits\ntrian: {epochs: 3}\n", ["unknown key 'trian'", "did you mean 'train'", "valid top-level keys: base"]),
    ("bsae: digits\n", ["names no base recipe", "base: NAME"]),
    ("base: nope\n", ["unknown recipe 'nope'", "digits"]),
    ("base: digits\ntrain: {epochs: x}\n", ["bad value for train.epochs", "an integer"]),
    ("base: digits\ntrain: {epochs: 0}\n", ["train.epochs must be >= 1"]),
    ("base: digits\ntrain: 5\n", ["train must be a mapping"]),
    ("base: digits\ntrain: {epochs: [1\n", ["is not valid YAML at line"]),
    ("- base\n", ["must hold a mapping"]),
])
def test_bad_files_are_one_line_errors_naming_the_file(tmp_path, text, fragments):
    recipe = write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_recipe_file(recipe)
    message = str(info.value)
    assert "\n" not in message and str(recipe) in message
    for fragment in fragments:
        assert fragment in message, message


def test_kiln_show_prints_the_resolved_file_and_that_output_is_a_recipe_file_body(tmp_path):
    recipe = write(tmp_path / "my.yaml", "base: cifar10\ntrain: {epochs: 5}\n")
    result = CliRunner().invoke(cli, ["show", str(recipe), "--set", "data.batch_size=256"])
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.output)
    assert shown["name"] == "my" and shown["train"]["epochs"] == 5 and shown["data"]["batch_size"] == 256
    assert shown["model"]["name"] == "resnet9"
    again = write(tmp_path / "again.yaml", "base: digits\n" + result.output)
    assert load_recipe_file(again) == config_from_dict(shown)


def test_a_missing_file_and_a_bad_key_exit_2_with_one_line(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("KILN_MALLOC", "default")
    bad = write(tmp_path / "bad.yaml", "base: digits\ntrain: {epoch: 3}\n")
    for argv, fragment in ((["train", str(tmp_path / "none.yaml")], "no recipe file at"),
                           (["train", str(bad), "--out", str(tmp_path / "run")], "did you mean 'train.epochs'")):
        with pytest.raises(SystemExit) as info:
            main(argv)
        _, err = capfd.readouterr()
        assert info.value.code == 2 and err.count("\n") == 1 and fragment in err, err
    assert not (tmp_path / "run").exists()


def test_kiln_train_trains_a_recipe_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KILN_MALLOC", "default")
    recipe = write(tmp_path / "tiny.yaml", "base: synthetic\nname: tiny\ntrain: {epochs: 1}\n"
                                           "data: {samples: 160, image_size: 16, batch_size: 16}\n")
    with pytest.raises(SystemExit) as info:
        main(["train", str(recipe), "--quiet", "--no-report", "--out", str(tmp_path / "run"),
              "--set", "model.channels=4,8"])
    assert info.value.code == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["name"] == "tiny" and config["data"]["samples"] == 160 and config["model"]["channels"] == [4, 8]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "completed"
