"""``--data-dir`` means what it says: a data set made in memory refuses it, as an option or as ``--set``."""
from __future__ import annotations

import pytest

from recipes import RECIPES
from recipes.config import FILE_DATASETS, ConfigError, apply_overrides, config_from_dict, config_to_dict
from recipes.data import LOADERS
from tests.runs import kiln


def test_the_data_sets_that_read_files_are_the_ones_not_made_in_memory():
    in_memory = {"recipes.data.digits", "recipes.data.synthetic"}  # their loaders make the images
    assert set(FILE_DATASETS) == {name for name, loader in LOADERS.items() if loader.__module__ not in in_memory}


@pytest.mark.slow
@pytest.mark.parametrize("recipe, given", [
    ("digits", ["--data-dir", "DIR"]), ("digits", ["--set", "data.data_dir=DIR"]), ("synthetic", ["--data-dir", "DIR"]),
])
def test_a_recipe_that_reads_no_files_refuses_a_data_dir_in_one_line(tmp_path, recipe, given):
    out = tmp_path / "run"
    args = [a.replace("DIR", str(tmp_path)) for a in given]
    result = kiln("train", recipe, *args, "--out", out, cwd=tmp_path, timeout=900)  # cwd: no runs/ in the repo
    assert result.returncode == 2
    assert result.stderr == (f"kiln: error: the {recipe} data set does not read files (kiln makes it in memory); "
                             "--data-dir (data.data_dir) is for cifar10, imagefolder, fashion-mnist and mnist\n")
    assert not out.exists()


def test_a_data_dir_recorded_by_an_older_kiln_for_digits_is_dropped_not_refused():
    record = config_to_dict(RECIPES["digits"])
    record["data"]["data_dir"] = "/nonexistent"  # what `kiln train digits --data-dir /nonexistent` used to record
    assert config_from_dict(record) == RECIPES["digits"]
    with pytest.raises(ConfigError, match="the digits data set does not read files"):
        apply_overrides(RECIPES["digits"], {"data_dir": "/nonexistent"})
