"""Divergence end to end: NanGuard in the assembled digits run, through ``recipes.run`` and the real CLI.

What a user relies on: ``--on-nan`` chooses the policy; a run that diverges stops with summary status
"diverged", exit status 3 and the diagnosis printed once; skipped steps and rollbacks reach
metrics.jsonl, TensorBoard and events.jsonl; and no checkpoint ever holds a NaN or Inf.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ignite.engine import Events

from recipes import get_recipe
from recipes.cli.jobs import EXIT_DIVERGED
from recipes.config import apply_overrides
from recipes.run import build, execute, write_config
from recipes.run.rundir import read_jsonl
from tests import runs

#: The digits recipe's bar: the accuracy a sound run reaches (the default run gets above 0.99).
DIGITS_BAR = 0.95
SMALL = {"data.image_size": 16, "train.log_every": 1, "checkpoint.every_iterations": 5, "checkpoint.every_minutes": 0}


def kiln(*args: str):
    return runs.kiln(*args, timeout=600)


#: A diverged run draws the end-of-run report too (its findings go to stdout); nothing here reads it, and the
#: diagnosis checked is the one on stderr: the CLI runs below skip it.
NO_REPORT = "--no-report"


def events(run_dir: Path, kind: str | None = None) -> list[dict]:
    path = run_dir / "events.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r for r in records if kind is None or r["event"] == kind]


def finite(tree) -> bool:
    if isinstance(tree, torch.Tensor):
        return not tree.is_floating_point() or bool(torch.isfinite(tree).all())
    if isinstance(tree, dict):
        return all(finite(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return all(finite(v) for v in tree)
    return True


def assert_checkpoints_finite(run_dir: Path) -> None:
    files = sorted((run_dir / "checkpoints").glob("*.pt"))
    assert files, "no checkpoint was written"
    for path in files:
        assert finite(torch.load(path, weights_only=True)), f"{path.name} holds NaN or Inf"


def test_a_nan_batch_is_skipped_and_recorded_in_the_run_directory(tmp_path):
    """In-process: the assembled digits run, one poisoned batch at iteration 7, --on-nan skip."""
    cfg = apply_overrides(get_recipe("digits"), {**SMALL, "train.epochs": 1, "guard.on_nan": "skip"})
    run = build(cfg, tmp_path / "run", quiet=True)
    write_config(run)
    every_save = []
    checkpointer = run.handlers["checkpointer"]
    original_save = checkpointer.save_last

    def save_and_inspect(engine):
        original_save(engine)
        every_save.append(finite(torch.load(checkpointer.last_path, weights_only=True)))

    checkpointer.save_last = save_and_inspect
    weights = {}

    @run.trainer.on(Events.ITERATION_STARTED)
    def _poison_and_record(engine):
        weights[engine.state.iteration] = [p.detach().clone() for p in run.model.parameters()]
        if engine.state.iteration == 7:
            x, y = engine.state.batch
            x = x.clone()
            x[0, 0, 0, 0] = float("inf")
            engine.state.batch = (x, y)

    execute(run)
    run_dir = run.run_dir
    assert run.status == "completed"
    assert all(torch.equal(a, b) for a, b in zip(weights[8], weights[7]))
    [skip] = events(run_dir, "nan_skip")
    assert (skip["iteration"], skip["cause"], skip["policy"]) == (7, "input", "skip")
    [metrics] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics["nan_skips"] == 1 and metrics["rollbacks"] == 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir / "tb"))
    accumulator.Reload()
    assert {"epoch/nan_skips", "epoch/rollbacks"} <= set(accumulator.Tags()["scalars"])
    assert every_save and all(every_save)
    assert_checkpoints_finite(run_dir)


@pytest.mark.slow
def test_on_nan_stop_exits_3_with_the_diagnosis_printed_once(tmp_path):
    run_dir = tmp_path / "run"
    result = kiln("train", "digits", "--max-lr", "1000", "--on-nan", "stop", "--epochs", "2", "--quiet", NO_REPORT,
                  "--out", str(run_dir), *[f"--set={k}={v}" for k, v in SMALL.items()])
    assert result.returncode == EXIT_DIVERGED == 3, result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["diagnosis"].startswith("training diverged: ")
    [diverged] = events(run_dir, "diverged")
    assert diverged["policy"] == "stop" and "max_lr 1e+03 is high" in diverged["hint"]
    assert result.stderr.count("  hint: ") == 1  # the full diagnosis, once
    assert_checkpoints_finite(run_dir)


@pytest.mark.slow
def test_rollback_with_an_absurd_max_lr_recovers_or_stops_and_never_writes_nan(tmp_path):
    """The acceptance run: digits at max_lr 1000 (the recipe's is 0.01), --on-nan rollback."""
    run_dir = tmp_path / "run"
    result = kiln("train", "digits", "--max-lr", "1000", "--on-nan", "rollback", "--epochs", "3", "--quiet", NO_REPORT,
                  "--out", str(run_dir), *[f"--set={k}={v}" for k, v in SMALL.items()])
    summary = json.loads((run_dir / "summary.json").read_text())
    rollbacks = events(run_dir, "rollback")
    assert rollbacks, "an absurd max_lr went unnoticed"
    assert [r["lr_scale"] for r in rollbacks] == [0.5 ** (i + 1) for i in range(len(rollbacks))]
    if result.returncode == 0:  # recovered at a lower LR
        assert summary["status"] == "completed" and summary["final_val_accuracy"] >= DIGITS_BAR
    else:  # or stopped, saying why
        assert result.returncode == EXIT_DIVERGED, result.stderr
        assert summary["status"] == "diverged" and len(rollbacks) == 3
        [diverged] = events(run_dir, "diverged")
        assert "3 rollbacks already" in diverged["why"] and "kiln lr-find" in diverged["hint"]
        assert "training diverged: " in result.stderr
    assert_checkpoints_finite(run_dir)


@pytest.mark.slow
def test_a_run_stopped_as_diverged_is_described_once(tmp_path):
    """The guard's one line and the CLI's diagnosis at the end begin alike: the CLI prints the diagnosis alone."""
    result = kiln("train", "digits", "--max-lr", "50", "--on-nan", "stop", "--epochs", "1", "--quiet", NO_REPORT,
                  "--out", str(tmp_path / "run"), *[f"--set={k}={v}" for k, v in SMALL.items()])
    assert result.returncode == EXIT_DIVERGED, result.stderr
    assert result.stderr.count("training diverged:") == 1 and "  hint: " in result.stderr, result.stderr


@pytest.mark.slow
def test_fp16_run_with_the_guard_completes_normally(tmp_path):
    """Single fp16 overflow skips are normal: a healthy fp16 run ends with no guard event. (A narrow model: fp16
    convolutions are slow on a CPU, 6x so at the recipe's width, and the width is not what this is about.)"""
    run_dir = tmp_path / "run"
    result = kiln("train", "digits", "--precision", "fp16", "--epochs", "1", "--quiet", NO_REPORT,
                  "--out", str(run_dir), "--set", "model.channels=8,16", *[f"--set={k}={v}" for k, v in SMALL.items()])
    assert result.returncode == 0, result.stderr
    assert not [e for e in events(run_dir) if e["event"] in ("nan_skip", "rollback", "diverged", "scale_collapse")]
    metrics = read_jsonl(run_dir / "metrics.jsonl")[-1]
    assert {"loss_scale", "skipped_steps", "nan_skips", "rollbacks", "scale_collapses"} <= metrics.keys()


def test_on_nan_option_reaches_the_config_and_bad_values_are_refused():
    from click.testing import CliRunner

    from recipes.cli import cli
    from recipes.cli.options import resolve_config

    assert resolve_config("digits", on_nan="stop").guard.on_nan == "stop"
    assert get_recipe("digits").guard.on_nan == "rollback"
    result = CliRunner().invoke(cli, ["train", "digits", "--on-nan", "ignore"])
    assert result.exit_code == 2 and "ignore" in result.output


# ---- a diverged run always leaves a loadable, finite last.pt holding the restored state -------------------
DIGITS_16 = ("--epochs", "3", "--quiet", NO_REPORT, "--set", "data.image_size=16")


@pytest.mark.slow
@pytest.mark.parametrize("options", [
    ("--max-lr", "100", "--on-nan", "stop", "--set", "guard.check_every=50"),
    ("--max-lr", "100", "--on-nan", "stop", "--set", "train.nan_check_every=50"),  # the old key name
    ("--max-lr", "1e9", "--on-nan", "skip"),
    ("--max-lr", "1e9", "--on-nan", "rollback"),
], ids=["stop", "stop-old-key", "skip", "rollback"])
def test_every_policy_that_ends_diverged_leaves_a_last_pt_that_kiln_eval_loads(tmp_path, options):
    """The runs of the issue: each stops at an epoch's last iteration (digits at 16 px: 23 per epoch)."""
    run_dir = tmp_path / "run"
    result = kiln("train", "digits", *DIGITS_16, *options, "--out", str(run_dir))
    assert result.returncode == EXIT_DIVERGED, result.stderr
    [diverged] = events(run_dir, "diverged")
    assert diverged["detected_at"] % 23 == 0  # found at an epoch's end, before that epoch's records
    last = run_dir / "checkpoints" / "last.pt"
    assert last.is_file(), "the diverged run wrote no last.pt"
    assert finite(torch.load(last, weights_only=True))
    assert [e for e in events(run_dir, "checkpoint") if e["kind"] == "last"][-1]["iteration"] == diverged["detected_at"]
    evaluated = kiln("eval", str(last), "--out", str(tmp_path))
    assert evaluated.returncode == 0, evaluated.stderr
    assert "accuracy" in evaluated.stdout.splitlines()[-1]


def test_stop_writes_the_restored_weights_not_the_diverged_ones(tmp_path):
    """--on-nan stop, checks every 50 steps: the first check is at the end of epoch 1, which restores the
    weights of the start; last.pt holds exactly those."""
    cfg = apply_overrides(get_recipe("digits"), {"data.image_size": 16, "train.epochs": 3, "schedule.max_lr": 100.0,
                                                  "guard.on_nan": "stop", "guard.check_every": 50})
    initial = {k: v.clone() for k, v in build(cfg, tmp_path / "initial", quiet=True).model.state_dict().items()}
    run = build(cfg, tmp_path / "run", quiet=True)
    write_config(run)
    execute(run)
    assert run.status == "diverged" and run.trainer.state.diverged["restored_iteration"] == 0
    saved = torch.load(run.run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert saved.keys() == initial.keys()
    assert all(torch.equal(saved[k], initial[k]) for k in initial)


@pytest.mark.parametrize("bad, restored", [(23, 20), (12, 0)], ids=["epoch-end", "mid-epoch"])
@pytest.mark.parametrize("policy", ["stop", "rollback", "skip"])
def test_a_bad_step_anywhere_leaves_the_last_sound_state_in_last_pt(tmp_path, policy, bad, restored):
    """A weight turns NaN at iteration ``bad`` (23: the last of epoch 1); no rollback is allowed, so every
    policy stops (skip cannot repair weights, and escalates). last.pt holds the weights of the last sound
    check (every 20 steps, and the start), and it loads as a kiln checkpoint."""
    from recipes.run.checkpoints import load_checkpoint

    cfg = apply_overrides(get_recipe("digits"), {"data.image_size": 16, "train.epochs": 2, "guard.on_nan": policy,
                                                  "guard.max_rollbacks": 0, "checkpoint.every_minutes": 0})
    run = build(cfg, tmp_path / "run", quiet=True)
    write_config(run)
    sound = {}

    @run.trainer.on(Events.STARTED)
    @run.trainer.on(Events.ITERATION_COMPLETED(once=20))
    def _keep_the_sound_weights(engine):
        sound[engine.state.iteration] = {k: v.clone() for k, v in run.model.state_dict().items()}

    @run.trainer.on(Events.ITERATION_STARTED(once=bad))
    def _poison(engine):
        with torch.no_grad():
            next(run.model.parameters()).view(-1)[0] = float("nan")

    execute(run)
    assert run.status == "diverged" and run.trainer.state.diverged["restored_iteration"] == restored
    checkpoint, _ = load_checkpoint(run.run_dir / "checkpoints" / "last.pt")
    assert finite(checkpoint)
    assert all(torch.equal(checkpoint["model"][k], v) for k, v in sound[restored].items())
