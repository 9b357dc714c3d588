"""Tuning never looks at the test split: on a recipe that validates there (fashion-mnist), ``kiln lr-find`` and
``kiln sweep`` hold out part of the training split and say so, and the sweep's best.yaml trains and reports on
the test split again; an explicit ``data.val_fraction`` wins."""
from __future__ import annotations

import json

import yaml

from recipes.tools.holdout import TUNING_VAL_FRACTION
from tests.recipes import kiln_in_process as kiln
from tests.recipes.data.test_idx import write_idx_set


def test_a_sweep_on_a_test_split_recipe_tunes_on_a_hold_out_and_best_yaml_reports_on_the_test_split(tmp_path, capsys):
    data = write_idx_set(tmp_path / "fm", train=200, test=50)
    common = ["--set", f"data.data_dir={data}", "--set", "model.channels=8,8", "--set", "data.batch_size=50"]
    assert kiln("sweep", "fashion-mnist", "--trials", "2", "--epochs", "1", "--pruner", "none", *common,
                "--out", str(tmp_path / "sweep")) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"kiln: tuning on {TUNING_VAL_FRACTION:.0%} of the training split held out: fashion-mnist "
                          "validates on fashion-mnist's test split")
    for trial in sorted((tmp_path / "sweep" / "trials").iterdir()):
        config = json.loads((trial / "config.json").read_text())
        assert config["data"]["val_fraction"] == TUNING_VAL_FRACTION
        assert config["runtime"]["val_samples"] == round(200 * TUNING_VAL_FRACTION)  # not the 50 test images
    best = yaml.safe_load((tmp_path / "sweep" / "best.yaml").read_text())
    assert "data.val_fraction" not in best  # trained from best.yaml, the run reports on the test split

    assert kiln("lr-find", "fashion-mnist", "--num-iter", "5", *common, "--out", str(tmp_path / "lrf")) == 0
    assert capsys.readouterr().out.startswith("kiln: tuning on 10% of the training split held out")
    assert kiln("lr-find", "fashion-mnist", "--num-iter", "5", *common, "--set", "data.val_fraction=0",
                "--out", str(tmp_path / "lrf0")) == 0
    assert "held out" not in capsys.readouterr().out  # asked for: tunes on the test split
