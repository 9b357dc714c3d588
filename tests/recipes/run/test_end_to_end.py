"""End to end: ``kiln train digits`` as a real process, and the run directory it leaves (DESIGN.md's contract)."""
from __future__ import annotations

import json
import subprocess

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from recipes import RECIPES
from recipes.config import SECTIONS, config_to_dict
from recipes.run.parts import resolve_freeze_epochs
from tests.runs import ENV, KILN_SCRIPT

pytestmark = pytest.mark.slow

EPOCH_KEYS = ("epoch", "iteration", "train_loss", "val_loss", "val_accuracy", "lr", "epoch_seconds", "images_per_second")
TRAIN_TAGS = ("train/loss", "train/lr", "train/grad_norm")
EPOCH_TAGS = ("val/loss", "val/accuracy", "epoch/images_per_second")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The digits recipe for its 10 epochs, and a 1-epoch fp16 run beside it: each is run once. Neither draws the
    end-of-run report: nothing here reads it (the tests in tests/recipes/report do). Through the console script
    a user types."""
    root = tmp_path_factory.mktemp("e2e")
    commands = {
        "digits": [KILN_SCRIPT, "train", "digits", "--no-report", "--out", str(root / "digits")],
        # fp16 convolutions are slow on a CPU: a smaller network keeps this run quick
        "fp16": [KILN_SCRIPT, "train", "digits", "--epochs", "1", "--precision", "fp16", "--quiet", "--no-report",
                 "--out", str(root / "fp16"), "--set", "data.image_size=16", "--set", "model.channels=8,16",
                 "--set", "log_every=5"],
    }
    processes = {name: subprocess.Popen(args, cwd=root, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
                 for name, args in commands.items()}
    results = {}
    for name, process in processes.items():
        out, err = process.communicate(timeout=600)
        results[name] = {"code": process.returncode, "out": out, "err": err, "dir": root / name}
    return results


@pytest.fixture(scope="module")
def digits(runs):
    run = runs["digits"]
    assert run["code"] == 0, run["err"][-3000:]
    return run


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _scalars(log_dir):
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def test_it_exits_cleanly(digits):
    assert "Traceback" not in digits["err"]


def test_config_json_holds_the_resolved_recipe_and_versions(digits):
    config = json.loads((digits["dir"] / "config.json").read_text())
    expected = config_to_dict(resolve_freeze_epochs(RECIPES["digits"], head_replaced=False))  # auto: no weights
    for section in SECTIONS:
        assert config[section] == expected[section], section
    assert config["name"] == "digits"
    versions = config["versions"]
    assert versions["torch"] == torch.__version__
    assert {"python", "torch", "torchvision", "ignite", "kiln"} <= versions.keys()


def test_metrics_jsonl_has_one_line_per_epoch(digits):
    lines = _jsonl(digits["dir"] / "metrics.jsonl")
    assert [line["epoch"] for line in lines] == list(range(1, 11))
    batches_per_epoch = lines[0]["iteration"]
    for line in lines:
        for key in EPOCH_KEYS:
            assert isinstance(line.get(key), (int, float)) and not isinstance(line.get(key), bool), (key, line)
        assert line["iteration"] == line["epoch"] * batches_per_epoch
        assert 0.0 <= line["val_accuracy"] <= 1.0
        assert line["epoch_seconds"] > 0 and line["images_per_second"] > 0
        assert line["lr"] > 0
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]


def test_summary_json_says_completed_and_accurate(digits):
    summary = json.loads((digits["dir"] / "summary.json").read_text())
    accuracies = [line["val_accuracy"] for line in _jsonl(digits["dir"] / "metrics.jsonl")]
    assert summary["status"] == "completed"
    assert summary["best_val_accuracy"] >= 0.97
    assert summary["best_val_accuracy"] == pytest.approx(max(accuracies))
    assert summary["final_val_accuracy"] == pytest.approx(accuracies[-1])
    assert summary["epochs_completed"] == 10
    assert summary["wall_seconds"] > 0


def test_tensorboard_reads_the_event_files(digits):
    scalars = _scalars(digits["dir"] / "tb")
    for tag in TRAIN_TAGS + EPOCH_TAGS:
        assert scalars.get(tag), tag
    assert len(scalars["val/accuracy"]) == 10
    last_iteration = _jsonl(digits["dir"] / "metrics.jsonl")[-1]["iteration"]
    assert scalars["val/accuracy"][-1][0] == last_iteration


def test_stdout_has_an_epoch_line_each_and_the_run_directory_last(digits):
    lines = digits["out"].splitlines()
    epoch_lines = [line for line in lines if line.startswith("epoch")]
    assert [line.split()[1] for line in epoch_lines] == [f"{e}/10" for e in range(1, 11)]
    assert lines[-1] == f"run directory: {digits['dir']}"


def test_fp16_records_the_loss_scale(runs):
    run = runs["fp16"]
    assert run["code"] == 0, run["err"][-3000:]
    (line,) = _jsonl(run["dir"] / "metrics.jsonl")
    assert line["loss_scale"] > 0
    assert "skipped_steps" in line
    scalars = _scalars(run["dir"] / "tb")
    assert scalars.get("train/loss_scale")
    assert json.loads((run["dir"] / "summary.json").read_text())["status"] == "completed"
    assert run["out"].splitlines()[-1] == f"run directory: {run['dir']}"
