"""Exact resume through the real CLI: runs stopped by SIGTERM, SIGINT and SIGKILL continue bit-identically."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

KILN = [sys.executable, "-m", "recipes.cli"]
REPO = Path(__file__).resolve().parents[3]
# Small and quick, but the real digits recipe: 2 epochs of 23 iterations at 16x16.
FAST = ["--epochs", "2", "--set", "data.image_size=16", "--set", "train.log_every=1",
        "--set", "checkpoint.every_iterations=4", "--quiet"]
TIMING_KEYS = {"epoch_seconds", "images_per_second"}


def kiln(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*KILN, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([*KILN, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_iteration(run_dir: Path, iteration: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Block until steps.jsonl (one line per iteration here) reaches ``iteration``."""
    steps = run_dir / "steps.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended before iteration {iteration}: {proc.communicate()}")
        if steps.exists():
            lines = steps.read_text().splitlines()
            if lines and json.loads(lines[-1])["iteration"] >= iteration:
                return
        time.sleep(0.01)
    raise AssertionError(f"iteration {iteration} not reached in {timeout} s")


def final_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)


def metric_lines(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in lines]


def assert_same_run(run_dir: Path, reference: Path) -> None:
    got, want = final_state(run_dir), final_state(reference)
    for key in ("model", "optimizer", "amp", "schedule"):
        flat_got, flat_want = _flatten(got[key]), _flatten(want[key])
        assert flat_got.keys() == flat_want.keys(), key
        for name in flat_want:
            a, b = flat_got[name], flat_want[name]
            assert (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b), f"{key}.{name} differs"
    assert got["trainer"]["iteration"] == want["trainer"]["iteration"]
    assert metric_lines(run_dir) == metric_lines(reference)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["best_val_accuracy"] == json.loads((reference / "summary.json").read_text())["best_val_accuracy"]


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(tree, (list, tuple)):
        out = {}
        for i, v in enumerate(tree):
            out.update(_flatten(v, f"{prefix}{i}."))
        return out
    return {prefix.rstrip("."): tree}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run every stopped-and-resumed run must equal."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    done = kiln("train", "digits", *FAST, "--out", str(run_dir))
    assert done.returncode == 0, done.stderr
    return run_dir


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

    resumed = kiln("resume", str(run_dir), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(run_dir, reference)


@pytest.mark.parametrize("kill_after", [9, 25])
def test_sigkill_then_resume_is_bit_identical(tmp_path, reference, kill_after):
    run_dir = tmp_path / "run"
    proc = start("train", "digits", *FAST, "--out", str(run_dir))
    wait_for_iteration(run_dir, kill_after, proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "running"

    resumed = kiln("resume", str(run_dir), "--quiet")
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
    assert kiln("resume", str(run_dir), "--quiet").returncode == 0
    assert_same_run(run_dir, reference)


def test_dataloader_workers_give_the_same_run(tmp_path, reference):
    """num_workers=2 loads through a DataLoader; stopped and resumed it still equals the in-memory run."""
    run_dir = tmp_path / "run"
    proc = start("train", "digits", *FAST, "--set", "data.num_workers=2", "--out", str(run_dir))
    wait_for_iteration(run_dir, 15, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    assert kiln("resume", str(run_dir), "--quiet").returncode == 0
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
    assert kiln("resume", str(run_dir), "--quiet").returncode == 0
    assert_same_run(run_dir, reference)
    assert final_state(run_dir)["amp"]["scaler"]["scale"] == ref_amp["scaler"]["scale"]


def test_tensorboard_continues_the_same_step_numbering(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    proc = start("train", "digits", *FAST, "--out", str(run_dir))
    wait_for_iteration(run_dir, 14, proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert kiln("resume", str(run_dir), "--quiet").returncode == 0
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
    extended = kiln("resume", str(run_dir), "--epochs", "3", "--new-schedule", "--quiet")
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
    done = kiln("resume", str(run_dir), "--epochs", "2", "--new-schedule")
    assert done.returncode == 0, done.stderr
    config = json.loads((run_dir / "config.json").read_text())
    assert config["runtime"]["precision"] == other and config["train"]["precision"] == other
    assert torch.load(last, weights_only=True)["kiln"]["precision"] == other
