"""Run directories and checkpoints written before the ``guard`` config section still load and resume.

``tests/data/pre_guard_run`` was written by kiln at commit 914fbf2 (``make_old_run.py`` there): a tiny
digits run stopped by SIGTERM at iteration 15 of 24 (its config has the old flat ``train.nan_*`` keys,
two of them changed from the defaults), and the final weights and metrics of the same run left
uninterrupted. It was bit-identical to that run until the digits became 8-bit images (the
commit that made checkpoints record their preprocessing: pixels moved by at most 0.5/255); the last 9
iterations now train on those, so the weights must agree to within what that moves them (measured:
2.3e-4 at most) and the accuracy to within one image.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from recipes import get_recipe
from recipes.config import LEGACY_KEYS, ConfigError, apply_overrides, config_from_dict
from recipes.run.checkpoints import load_checkpoint
from tests.recipes import kiln_in_process

FIXTURE = Path(__file__).resolve().parents[2] / "data" / "pre_guard_run"


def test_an_old_checkpoint_loads_with_its_guard_settings_mapped():
    _, cfg = load_checkpoint(FIXTURE / "stopped" / "checkpoints" / "last.pt", resumable=True)
    assert (cfg.guard.check_every, cfg.guard.max_rollbacks) == (7, 2)  # the run's own, non-default values
    assert cfg.guard.on_nan == "rollback" and cfg.guard.max_loss_ratio == 100.0
    old = json.loads((FIXTURE / "stopped" / "config.json").read_text())
    assert config_from_dict(old) == cfg


def test_an_old_run_directory_resumes_to_the_run_it_would_have_been(tmp_path):
    run_dir = tmp_path / "stopped"
    shutil.copytree(FIXTURE / "stopped", run_dir)
    assert kiln_in_process("resume", str(run_dir), "--quiet", "--no-report") == 0  # the report is not compared

    config = json.loads((run_dir / "config.json").read_text())  # rewritten in today's layout
    assert config["guard"]["check_every"] == 7 and config["guard"]["max_rollbacks"] == 2
    assert not [key for key in config["train"] if key.startswith("nan_") or key == "on_nan"]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"

    final = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    reference = torch.load(FIXTURE / "reference_final.pt", weights_only=True)
    assert final["trainer"]["optimizer_step"] == reference["optimizer_step"] == 24
    ours = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    theirs = [json.loads(line) for line in (FIXTURE / "reference_metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in ours] == [m["epoch"] for m in theirs] == [1, 2]
    for name, tensor in reference["model"].items():
        torch.testing.assert_close(final["model"][name], tensor, rtol=1e-2, atol=1e-3)
    assert ours[-1]["val_accuracy"] == pytest.approx(theirs[-1]["val_accuracy"], abs=1.5 / 359)


@pytest.mark.parametrize("old, new", sorted(LEGACY_KEYS.items()))
def test_every_renamed_key_is_still_accepted(old, new):
    section, name = new.split(".")
    default = getattr(getattr(get_recipe("digits"), section), name)
    value = "stop" if isinstance(default, str) else (default * 2 if name != "lr_factor" else 0.25)
    cfg = apply_overrides(get_recipe("digits"), {old: value})
    assert getattr(cfg.guard, name) == value


def test_a_bad_value_under_an_old_key_is_refused_in_the_new_name():
    with pytest.raises(ConfigError, match="guard.check_every must be >= 1"):
        apply_overrides(get_recipe("digits"), {"train.nan_check_every": 0})
