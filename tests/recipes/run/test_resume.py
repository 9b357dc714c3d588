"""Exact resume through the real CLI: runs stopped by SIGTERM, SIGINT and SIGKILL continue bit-identically."""
from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from tests.runs import FAST, assert_same_run, final_state, kiln, metric_lines, start, wait_for_iteration

pytestmark = pytest.mark.slow


@pytest.fixture
def reference(fast_digits_run) -> Path:
    """The uninterrupted run every stopped-and-resumed run must equal."""
    return fast_digits_run


@pytest.mark.parametrize("stop_at", [3, 22, 30])
def test_sigterm_saves_and_resume_is_bit_identical(tmp_path, reference, stop_at):
    run_dir = tmp_path / "run"
    proc = start("train", "digits", *FAST, "--out", str(run_dir))
    wait_for_iteration(run_dir, stop_at, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "stopped by SIGTERM" in out and f"kiln resume {run_dir}" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    stopped_at = final_state(run_dir)["trainer"]["iteration"]
    if stopped_at < 46:
        assert summary["status"] == "interrupted"
        events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
        assert {"event": "interrupted", "signal": "SIGTERM", "iteration": stopped_at} .items() <= {
            **[e for e in events if e["event"] == "interrupted"][-1]}.items()

    resumed = kiln("resume", str(run_dir), "--quiet", "--no-report")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(run_dir, reference)
    assert not (run_dir / "report.html").exists(), "kiln resume --no-report drew the report"


def test_no_report_leaves_the_report_to_kiln_report(reference, tmp_path):
    """``--no-report`` (tests.runs.FAST has it) skips the end-of-run report; ``kiln report`` draws it later."""
    assert not (reference / "report.html").exists() and not (reference / "plots").exists()
    run_dir = tmp_path / "run"
    subprocess.run(["cp", "-r", str(reference), str(run_dir)], check=True)
    drawn = kiln("report", str(run_dir))
    assert drawn.returncode == 0, drawn.stderr
    assert (run_dir / "report.html").is_file() and (run_dir / "plots" / "loss.png").is_file()


@pytest.mark.parametrize("kill_after", [9, 25])
def test_sigkill_then_resume_is_bit_identical(tmp_path, reference, kill_after):
    run_dir = tmp_path / "run"
    proc = start("train", "digits", *FAST, "--out", str(run_dir))
    wait_for_iteration(run_dir, kill_after, proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "running"

    resumed = kiln("resume", str(run_dir), "--quiet", "--no-report")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(run_dir, reference)
    steps = [json.loads(line)["iteration"] for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), "lines replayed after the checkpoint must not be duplicated"


def test_sigint_exits_130_and_resumes(tmp_path, reference):
    run_dir = tmp_path / "run"
    proc = start("train", "digits", *FAST, "--out", str(run_dir))
    wait_for_iteration(run_dir, 12, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "stopped by SIGINT" in out
    assert kiln("resume", str(run_dir), "--quiet", "--no-report").returncode == 0
    assert_same_run(run_dir, reference)


def test_dataloader_workers_give_the_same_run(tmp_path, reference):
    """num_workers=2 loads through a DataLoader; stopped and resumed it still equals the in-memory run."""
    run_dir = tmp_path / "run"
    proc = start("train", "digits", *FAST, "--set", "data.num_workers=2", "--out", str(run_dir))
    wait_for_iteration(run_dir, 15, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    assert kiln("resume", str(run_dir), "--quiet", "--no-report").returncode == 0
    assert_same_run(run_dir, reference)


def test_fp16_with_grad_scaler_resumes_bit_identically(tmp_path):
    args = ["--epochs", "1", "--precision", "fp16", "--set", "data.image_size=16", "--set", "model.channels=8,16",
            "--set", "train.log_every=1",
            "--set", "checkpoint.every_iterations=3", "--set", "train.init_scale=1e30", "--quiet"]
    reference = tmp_path / "reference"
    assert kiln("train", "digits", *args, "--out", str(reference)).returncode == 0
    ref_amp = final_state(reference)["amp"]
    assert ref_amp["skipped_steps"] > 0, "an init_scale of 1e30 must overflow and make the scaler skip steps"

    run_dir = tmp_path / "run"
    proc = start("train", "digits", *args, "--out", str(run_dir))
    wait_for_iteration(run_dir, 10, proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert kiln("resume", str(run_dir), "--quiet", "--no-report").returncode == 0
    assert_same_run(run_dir, reference)
    assert final_state(run_dir)["amp"]["scaler"]["scale"] == ref_amp["scaler"]["scale"]


def test_tensorboard_continues_the_same_step_numbering(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    proc = start("train", "digits", *FAST, "--out", str(run_dir))
    wait_for_iteration(run_dir, 14, proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert kiln("resume", str(run_dir), "--quiet", "--no-report").returncode == 0
    steps_by_tag: dict[str, list[int]] = {}
    for event_file in sorted((run_dir / "tb").iterdir()):
        acc = EventAccumulator(str(event_file), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            steps_by_tag.setdefault(tag, []).extend(e.step for e in acc.Scalars(tag))
    # the resumed writer purges points at or after its first step, so the kept series has no repeats
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    loss_steps = [e.step for e in acc.Scalars("train/loss")]
    assert loss_steps == list(range(1, 47))
    assert [e.step for e in acc.Scalars("val/accuracy")] == [23, 46]


def test_extending_a_finished_run_needs_a_new_schedule(tmp_path, reference):
    run_dir = tmp_path / "run"
    subprocess.run(["cp", "-r", str(reference), str(run_dir)], check=True)
    again = kiln("resume", str(run_dir))
    assert again.returncode == 0 and "already finished" in again.stdout
    refused = kiln("resume", str(run_dir), "--epochs", "3")
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "--new-schedule" in refused.stderr
    extended = kiln("resume", str(run_dir), "--epochs", "3", "--new-schedule", "--quiet", "--no-report")
    assert extended.returncode == 0, extended.stderr
    assert [line["epoch"] for line in metric_lines(run_dir)] == [1, 2, 3]
    assert json.loads((run_dir / "summary.json").read_text())["epochs_completed"] == 3


def test_train_resume_refuses_a_config_that_changes_the_run(tmp_path, reference):
    run_dir = tmp_path / "run"
    subprocess.run(["cp", "-r", str(reference), str(run_dir)], check=True)
    last = run_dir / "checkpoints" / "last.pt"
    before = last.read_bytes()
    refused = kiln("train", "digits", *FAST, "--max-lr", "0.05", "--set", "train.seed=3", "--resume", str(last))
    assert refused.returncode == 2
    assert refused.stderr.startswith("kiln: error:") and refused.stderr.count("\n") == 1
    assert "schedule.max_lr: 0.01 -> 0.05" in refused.stderr and "train.seed: 0 -> 3" in refused.stderr
    assert last.read_bytes() == before


def test_a_second_ctrl_c_stops_at_once(tmp_path):
    run_dir = tmp_path / "run"
    proc = start("train", "digits", "--epochs", "30", "--set", "train.log_every=1", "--quiet", "--out", str(run_dir))
    wait_for_iteration(run_dir, 3, proc)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"


def test_train_resume_with_force_continues_despite_a_changed_config(tmp_path):
    run_dir = tmp_path / "run"
    proc = start("train", "digits", *FAST, "--out", str(run_dir))
    wait_for_iteration(run_dir, 8, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    last = run_dir / "checkpoints" / "last.pt"
    forced = kiln("train", "digits", *FAST, "--set", "train.label_smoothing=0.2", "--resume", str(last), "--force")
    assert forced.returncode == 0, forced.stderr
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert json.loads((run_dir / "config.json").read_text())["train"]["label_smoothing"] == 0.2


def test_resume_keeps_the_precision_auto_resolved_to_when_the_run_began(tmp_path):
    # `auto` is bf16 on a CPU with AMX and fp32 elsewhere: a run begun on one machine and resumed on
    # another must not switch halfway. Make the checkpoint say it came from the other kind of CPU.
    run_dir = tmp_path / "run"
    assert kiln("train", "digits", *FAST, "--epochs", "1", "--out", str(run_dir)).returncode == 0
    began = json.loads((run_dir / "config.json").read_text())["runtime"]["precision"]
    last = run_dir / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    assert state["kiln"]["precision"] == began
    other = "fp32" if began == "bf16" else "bf16"
    state["kiln"]["precision"] = other
    torch.save(state, last)
    done = kiln("resume", str(run_dir), "--epochs", "2", "--new-schedule", "--quiet", "--no-report")
    assert done.returncode == 0, done.stderr
    config = json.loads((run_dir / "config.json").read_text())
    assert config["runtime"]["precision"] == other and config["train"]["precision"] == other
    assert torch.load(last, weights_only=True)["kiln"]["precision"] == other
