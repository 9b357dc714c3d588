"""The ``kiln`` command line: listing, showing, help, and bad input as one line on stderr with exit status 2."""
from __future__ import annotations

import subprocess
from pathlib import Path

import click
import pytest
import torch
import yaml
from click.testing import CliRunner

from recipes import RECIPES
from recipes.cli import cli, main
from recipes.config import ConfigError, config_from_dict
from tests.runs import ENV, KILN_SCRIPT


def test_recipes_lists_one_line_per_recipe():
    result = CliRunner().invoke(cli, ["recipes"])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert len(lines) == len(RECIPES)
    for line, (name, cfg) in zip(lines, RECIPES.items()):
        assert line.split()[0] == name
        assert line.endswith(cfg.description)


def test_show_applies_overrides():
    result = CliRunner().invoke(cli, ["show", "digits", "--set", "model.channels=16,32", "--set", "max_lr=0.02"])
    assert result.exit_code == 0, result.output
    data = yaml.safe_load(result.output)
    assert data["model"]["channels"] == [16, 32]
    assert data["schedule"]["max_lr"] == 0.02
    cfg = config_from_dict(data)
    assert cfg.model.channels == (16, 32) and cfg.schedule.max_lr == 0.02
    assert cfg.train == RECIPES["digits"].train


def test_show_explain_says_what_every_key_means_and_stays_a_recipe_file(tmp_path):
    plain = CliRunner().invoke(cli, ["show", "digits", "--set", "epochs=3"])
    explained = CliRunner().invoke(cli, ["show", "digits", "--set", "epochs=3", "--explain"])
    assert explained.exit_code == 0, explained.output
    assert yaml.safe_load(explained.output) == yaml.safe_load(plain.output)  # the comments change nothing
    keyed = [line for line in explained.output.splitlines() if line.startswith("  ")]
    assert keyed and all("  # " in line for line in keyed), [line for line in keyed if "  # " not in line]
    assert any(line.startswith("  epochs: 3") and line.endswith("# passes over the training data") for line in keyed)
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("base: digits\n" + explained.output)
    again = CliRunner().invoke(cli, ["show", str(recipe)])
    assert yaml.safe_load(again.output) == yaml.safe_load(plain.output)


def test_show_with_an_unknown_key_is_a_config_error():
    result = CliRunner().invoke(cli, ["show", "digits", "--set", "max_lrr=0.1"])
    assert isinstance(result.exception, ConfigError)
    assert "did you mean 'max_lr'" in str(result.exception)


@pytest.mark.parametrize("args, words", [
    (["--help"], ["recipes", "show", "train", "Usage: kiln"]),
    (["-h"], ["recipes", "show", "train"]),
    (["train", "--help"], ["RECIPE", "--set", "--out", "--epochs", "--precision", "--max-lr"]),
    (["show", "--help"], ["RECIPE", "--set"]),
])
def test_help(args, words):
    result = CliRunner().invoke(cli, args, prog_name="kiln")
    assert result.exit_code == 0
    for word in words:
        assert word in result.output


# -- bad input: one line on stderr starting "kiln: error:", exit status 2, no traceback ----------------

KEPT = "a file that was there before\n"
BAD_INPUT = {
    "unknown recipe": (["train", "nope"], "unknown recipe 'nope'"),
    "unknown --set key": (["train", "digits", "--set", "max_lrr=0.1"], "did you mean 'max_lr'"),
    "--set without =": (["train", "digits", "--set", "epochs"], "key=value"),
    "bad option value": (["train", "digits", "--epochs", "x"], "'x' is not a valid integer"),
    "bad precision": (["train", "digits", "--precision", "fp64"], "fp64"),
    "out-of-range value": (["train", "digits", "--set", "epochs=0"], "train.epochs must be >= 1"),
    "bad value for a new directory": (["train", "digits", "--set", "epochs=0", "--out", "{new}"], "train.epochs"),
    "non-empty --out": (["train", "digits", "--epochs", "1", "--out", "{full}"], "not empty"),
    "--out is a file": (["train", "digits", "--epochs", "1", "--out", "{file}"], "is a file"),
    "show an unknown recipe": (["show", "nope"], "unknown recipe 'nope'"),
    "unknown command": (["frobnicate"], "frobnicate"),
    "missing recipe": (["train"], "RECIPE"),
}
#: the cases also run as real processes of the console script (each pays torch's import time)
IN_A_PROCESS = ["unknown recipe", "bad option value", "bad value for a new directory", "non-empty --out"]


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A working directory holding a non-empty ``full`` directory; ``{new}`` names one that does not exist."""
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text(KEPT)
    (tmp_path / "file").write_text(KEPT)
    monkeypatch.chdir(tmp_path)
    return tmp_path, {"new": str(tmp_path / "new"), "full": str(full), "file": str(tmp_path / "file")}


def _args(case, paths):
    return [a.format(**paths) for a in BAD_INPUT[case][0]]


def _check_error(case, code, out, err):
    assert code == 2, (out, err)
    assert "Traceback" not in out + err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("kiln: error: ")
    assert BAD_INPUT[case][1] in lines[0]
    assert out == ""


def _check_untouched(root, paths):
    full = Path(paths["full"])
    assert sorted(p.name for p in full.iterdir()) == ["keep.txt"]
    assert (full / "keep.txt").read_text() == KEPT
    assert not Path(paths["new"]).exists()
    assert sorted(p.name for p in root.iterdir()) == ["file", "full"]  # no runs/ directory either
    assert (root / "file").read_text() == KEPT


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_through_the_entry_point(case, workspace, capfd):
    root, paths = workspace
    with pytest.raises(SystemExit) as info:
        main(_args(case, paths))
    out, err = capfd.readouterr()
    _check_error(case, info.value.code, out, err)
    _check_untouched(root, paths)


@pytest.fixture(scope="module")
def processes(tmp_path_factory):
    """Run this module's ``kiln`` processes at once: each one pays torch's import time."""
    root = tmp_path_factory.mktemp("cli")
    full = root / "full"
    full.mkdir()
    (full / "keep.txt").write_text(KEPT)
    (root / "file").write_text(KEPT)
    paths = {"new": str(root / "new"), "full": str(full), "file": str(root / "file")}
    commands = {case: _args(case, paths) for case in IN_A_PROCESS}
    commands["recipes"] = ["recipes"]
    running = {name: subprocess.Popen([KILN_SCRIPT, *args], cwd=root, env=ENV, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
               for name, args in commands.items()}
    results = {name: (p.communicate(timeout=180), p.returncode) for name, p in running.items()}
    return {name: (code, out, err) for name, ((out, err), code) in results.items()}, root, paths


@pytest.mark.parametrize("case", IN_A_PROCESS)
def test_bad_input_in_a_real_process(processes, case):
    results, root, paths = processes
    _check_error(case, *results[case])
    _check_untouched(root, paths)


def test_the_console_script_lists_recipes(processes):
    code, out, err = processes[0]["recipes"]
    assert code == 0 and err == ""
    assert [line.split()[0] for line in out.splitlines()] == list(RECIPES)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_cuda_without_it_is_an_error_and_creates_nothing(workspace, capfd):
    root, paths = workspace
    with pytest.raises(SystemExit) as info:
        main(["train", "digits", "--device", "cuda", "--out", paths["new"]])
    _, err = capfd.readouterr()
    assert info.value.code == 2
    assert len(err.splitlines()) == 1 and err.startswith("kiln: error: ")
    assert "--device cpu" in err
    _check_untouched(root, paths)


def test_a_missing_data_set_says_where_kiln_looked_and_creates_nothing(workspace, capfd):
    root, paths = workspace
    nowhere = root / "nowhere"
    with pytest.raises(SystemExit) as info:
        main(["train", "cifar10", "--set", f"data.data_dir={nowhere}", "--out", paths["new"]])
    out, err = capfd.readouterr()
    assert info.value.code == 2
    assert len(err.splitlines()) == 1 and err.startswith("kiln: error: ")
    assert str(nowhere) in err and "Traceback" not in out + err
    _check_untouched(root, paths)


def test_train_help_lists_every_option_once_in_sections_that_fit_a_screen():
    from recipes.cli.commands.run import TRAIN_SECTIONS

    text = CliRunner().invoke(cli, ["train", "--help"], terminal_width=80).output
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            current = sections.setdefault(line[:-1], [])
        elif current is not None:
            current.append(line)
    assert list(sections) == list(TRAIN_SECTIONS)  # nothing left over under "Other options"
    assert all(len(lines) <= 25 for lines in sections.values()), {k: len(v) for k, v in sections.items()}
    options = [p for p in cli.commands["train"].params if isinstance(p, click.Option)]
    for option in options:
        flag = option.opts[0]
        listed = [title for title, lines in sections.items()  # the option's own line, not a mention in a help text
                  if any(line.startswith(f"  {flag}") for line in lines)]
        assert len(listed) == 1, (flag, listed)


def test_every_flag_of_a_config_key_says_in_help_what_the_key_declares():
    from recipes.config import OPTION_KEYS, config_docs

    text = " ".join(CliRunner().invoke(cli, ["train", "--help"], terminal_width=100).output.split())
    guide = (Path(__file__).resolve().parents[3] / "docs" / "training.md").read_text()
    docs = config_docs()
    for name, key in OPTION_KEYS.items():
        flag = "--" + name.replace("_", "-")
        doc = docs[key]
        help_text = " ".join((doc[:1].upper() + doc[1:]).split())  # the field's #: comment, as a sentence
        assert f"{flag} " in text and help_text in text, (flag, help_text)
        assert f"`{flag}" in guide, f"docs/training.md's table of options lacks {flag}"


def test_shell_completion_offers_recipe_names_and_recipe_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("base: digits\n")
    (tmp_path / "notes.txt").write_text("")
    (tmp_path / "runs").mkdir()

    def complete(line: str) -> list[str]:
        words = line.split(" ")
        env = {"_KILN_COMPLETE": "bash_complete", "COMP_WORDS": line, "COMP_CWORD": str(len(words) - 1)}
        result = CliRunner().invoke(cli, [], prog_name="kiln", env=env)
        return [item.split(",", 1)[1] for item in result.output.splitlines()]

    assert complete("kiln train di") == ["digits"]
    offered = complete("kiln show ")
    assert set(RECIPES) <= set(offered) and "mine.yaml" in offered and "runs/" in offered
    assert "notes.txt" not in offered
    assert complete("kiln tr") == ["train"]
