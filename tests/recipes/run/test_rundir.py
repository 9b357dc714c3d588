"""The run directory has one owner: recipes/run/rundir.py names its files, and a lost summary.json means the
same to every command (rebuilt from the records, said in one line)."""
from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest

from recipes.config import ConfigError
from recipes.run import rundir
from recipes.run.rundir import RunDir, read_summary
from tests.runs import REPO, kiln

#: Every name a run directory's files and folders have.
NAMES = {rundir.CONFIG, rundir.SUMMARY, *rundir.RECORDS, rundir.LR_FIND, rundir.LR_FIND_PLOT, rundir.MISTAKES,
         rundir.REPORT, rundir.EVAL_CONFUSION, rundir.SCHEDULE, rundir.SCHEDULE_PLOT, rundir.PLOTS, rundir.TENSORBOARD,
         rundir.CHECKPOINTS, rundir.LOCK, RunDir(".").last.name, *rundir.RUN_PLOTS, *rundir.CHECKPOINT_PLOTS}


#: A line that spells another tool's folder of the same name (torch hub's checkpoints/) says so with this.
ANOTHER_TOOLS = "# not a run directory's:"


def _spelled_names(path: Path) -> list[str]:
    """``line: name`` for each string constant of ``path`` that is a run-directory file name (docstrings, help
    text, dict keys and lines marked :data:`ANOTHER_TOOLS` aside: a JSON record may have a key "plots")."""
    text = path.read_text()
    marked = {i for i, line in enumerate(text.splitlines(), 1) if ANOTHER_TOOLS in line}
    tree = ast.parse(text)
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                skip.add(id(first.value))  # a docstring
        if isinstance(node, ast.Dict):
            skip.update(id(k) for k in node.keys if k is not None)
    return [f"{node.lineno}: {node.value}" for node in ast.walk(tree) if isinstance(node, ast.Constant)
            and node.value in NAMES and id(node) not in skip and node.lineno not in marked]


def test_no_module_but_rundir_spells_a_run_directory_file_name():
    spelled = {str(p.relative_to(REPO)): found for p in sorted((REPO / "recipes").rglob("*.py"))
               if p.name != "rundir.py" and (found := _spelled_names(p))}
    assert not spelled, f"use recipes.run.rundir (RunDir's paths, its name constants) instead: {spelled}"


@pytest.fixture
def finished(fast_digits_run, tmp_path) -> Path:
    """A copy of a finished 2-epoch digits run."""
    return Path(shutil.copytree(fast_digits_run, tmp_path / "run"))


def test_a_readable_summary_is_read_as_written(finished):
    summary, note = read_summary(finished)
    assert note is None and summary == json.loads(RunDir(finished).summary.read_text())


@pytest.mark.parametrize("damage", ["missing", "torn"])
def test_a_lost_summary_of_a_finished_run_is_rebuilt_completed(finished, damage):
    written = json.loads(RunDir(finished).summary.read_text())
    if damage == "missing":
        RunDir(finished).summary.unlink()
    else:
        RunDir(finished).summary.write_text(RunDir(finished).summary.read_text()[:20])
    summary, note = read_summary(finished)
    assert summary["status"] == "completed" and summary["rebuilt"] is True
    for key in ("best_val_accuracy", "final_val_accuracy", "epochs_completed", "iterations"):
        assert summary[key] == written[key], key
    what = "is missing" if damage == "missing" else "does not parse"
    assert note == f"{RunDir(finished).summary} {what}: rebuilt from the run's records (status completed, 2 epochs)"


def test_a_lost_summary_of_a_run_short_of_its_epochs_is_rebuilt_interrupted(finished):
    paths = RunDir(finished)
    paths.summary.unlink()
    first_epoch = paths.metrics.read_text().splitlines()[0]
    paths.metrics.write_text(first_epoch + "\n")  # as if it stopped after epoch 1 of 2
    summary, note = read_summary(finished)
    assert summary["status"] == "interrupted" and summary["epochs_completed"] == 1
    assert "(status interrupted, 1 epoch)" in note


def test_without_a_summary_or_records_it_is_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is missing and there are no records .* is not a kiln run directory"):
        read_summary(tmp_path)


@pytest.mark.slow
def test_kiln_report_on_a_lost_summary_says_so_in_one_line_and_draws_it(finished):
    RunDir(finished).summary.unlink()
    done = kiln("report", finished)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("kiln:")]
    assert lines == [f"kiln: {RunDir(finished).summary} is missing: rebuilt from the run's records "
                     "(status completed, 2 epochs)"], done.stderr
    assert "kiln report: digits (completed)" in RunDir(finished).report.read_text()


@pytest.mark.slow
def test_kiln_resume_on_a_torn_summary_says_so_in_one_line_and_the_resumed_run_writes_it_anew(finished):
    paths = RunDir(finished)
    paths.summary.write_text(paths.summary.read_text()[:20])
    note = f"kiln: {paths.summary} does not parse: rebuilt from the run's records (status completed, 2 epochs)"
    done = kiln("resume", finished)
    assert done.returncode == 0 and done.stderr.splitlines() == [note], done.stderr
    assert "has already finished (2 of 2 epochs)" in done.stdout
    more = kiln("resume", finished, "--epochs", "3", "--new-schedule", "--quiet", "--no-report")
    assert more.returncode == 0 and more.stderr.splitlines() == [note], more.stderr
    summary, note = read_summary(finished)
    assert note is None and summary["status"] == "completed" and summary["epochs_completed"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("command, status", [
    (("eval", "{run}/checkpoints/last.pt"), 0),  # reads the checkpoint, not the summary
    (("lr-find", "{run}", "--num-iter", "20"), 0),  # reads config.json
    (("schedule", "{run}", "--out", "{run}-schedule"), 0),
    (("train", "digits", "--out", "{run}"), 2),  # refused as for any run with checkpoints: one line
])
def test_every_other_command_on_a_torn_summary_goes_on_or_refuses_in_one_line(finished, command, status):
    RunDir(finished).summary.write_text(RunDir(finished).summary.read_text()[:20])
    done = kiln(*(arg.format(run=finished) for arg in command))
    assert done.returncode == status, done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    if status:
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("kiln: error: "), done.stderr
