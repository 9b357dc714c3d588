"""One writer per run directory: the lock, two writers at once, a run killed before its first checkpoint,
a stop signal during the end-of-run report, and an --out that cannot be written."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recipes.config import ConfigError
from recipes.run.lock import RunLock
from tests.conftest import tmpfs
from tests.runs import ENV, REPO, kiln, start, wait_for

#: One quick epoch; ONE_EPOCH skips the end-of-run report, which only the tests of a signal during it need, and
#: the race of two writers: the winner's report keeps its lock held ~2.5 s longer, a wider window for a loser
#: that a loaded machine starts late to still find the directory in use (not already finished).
REPORTED = ["--epochs", "1", "--set", "data.image_size=16", "--quiet"]
ONE_EPOCH = [*REPORTED, "--no-report"]
#: Holds RUN_DIR's lock in a process of its own until killed; prints "locked" once it holds it.
HOLDER = "import sys, time; from recipes.run.lock import RunLock; RunLock.take(sys.argv[1]); print('locked', flush=True); time.sleep(600)"


def one_line_error(result: subprocess.CompletedProcess | tuple[int, str], *fragments: str) -> str:
    code, err = (result.returncode, result.stderr) if isinstance(result, subprocess.CompletedProcess) else result
    assert code == 2, err
    assert err.startswith("kiln: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


# -- the lock itself ----------------------------------------------------------------------------------------

def test_another_process_is_refused_naming_its_pid_and_a_sigkill_frees_the_lock(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], cwd=REPO, env=ENV,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=rf"^{run_dir} is in use by another kiln process \(PID {holder.pid}\); "):
            RunLock.take(run_dir)
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock.take(run_dir)  # the kernel dropped the dead process's lock: nothing stale is left
    try:
        assert (run_dir / ".lock").read_text().strip() == str(os.getpid())
        assert RunLock.take(run_dir) is lock  # re-entrant: a run, then its report, in one process
    finally:
        lock.release()


def test_a_running_summary_under_a_free_lock_becomes_killed(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").write_text("4242\n")  # the writer's PID; nobody holds the lock
    (run_dir / "summary.json").write_text(json.dumps({"status": "running", "iterations": 7}))
    RunLock.take(run_dir, create=False).release()
    s = summary(run_dir)
    assert s["status"] == "killed" and s["iterations"] == 7 and "PID 4242" in s["reason"]


def test_a_run_that_fails_before_it_begins_leaves_no_directory(tmp_path):
    # the lock (and the check that --out can be written) come before the data loads; a data error
    # afterwards removes the lock file and the directories it made
    out = tmp_path / "new" / "run"
    result = kiln("train", "imagefolder", "--data-dir", str(tmp_path / "nowhere"), "--out", str(out))
    one_line_error(result, str(tmp_path / "nowhere"))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# -- two writers at once ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_trains_into_one_directory_at_once_six_times(tmp_path):
    for batch in range(3):  # two repetitions at a time, each in its own directory
        runs = {tmp_path / f"d{batch}-{i}": {seed: None for seed in (1, 2)} for i in range(2)}
        for run_dir, procs in runs.items():  # the two writers of a directory start together and race for it
            for seed in procs:
                procs[seed] = start("train", "digits", *REPORTED, "--seed", str(seed), "--out", str(run_dir))
        for run_dir, procs in runs.items():
            assert_one_run(run_dir, procs, {seed: p.communicate(timeout=300) for seed, p in procs.items()})


def assert_one_run(run_dir: Path, procs: dict[int, subprocess.Popen], outputs: dict[int, tuple[str, str]]) -> None:
    """One writer exited 0, the other 2 naming its PID, and the directory holds the winner's run only."""
    codes = {seed: p.returncode for seed, p in procs.items()}
    assert sorted(codes.values()) == [0, 2], (run_dir, codes, outputs)
    seed = next(s for s, code in codes.items() if code == 0)
    other = 3 - seed
    one_line_error((2, outputs[other][1]), f"{run_dir} is in use by another kiln process (PID {procs[seed].pid}); ")
    assert outputs[other][0] == ""
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [1], metrics  # one run's epochs, once
    assert json.loads((run_dir / "config.json").read_text())["train"]["seed"] == seed
    s = summary(run_dir)
    assert s["status"] == "completed" and s["best_val_accuracy"] == metrics[0]["val_accuracy"]
    best = list((run_dir / "checkpoints").glob("best-*.pt"))
    assert len(best) == 1 and f"val_accuracy={s['best_val_accuracy']:.4f}" in best[0].name
    last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert last["kiln"]["config"]["train"]["seed"] == seed


@pytest.mark.slow
def test_a_killed_run_is_reported_killed_and_two_resumes_at_once_run_it_once(tmp_path):
    run_dir = tmp_path / "run"
    proc = start("train", "digits", "--epochs", "2", "--set", "data.image_size=16", "--set", "train.log_every=1",
                 "--quiet", "--no-report", "--out", str(run_dir))
    wait_for(lambda: (run_dir / "checkpoints" / "last.pt").exists(), proc, what="the first epoch's checkpoint")
    proc.kill()
    proc.communicate(timeout=60)
    assert summary(run_dir)["status"] == "running"

    reported = kiln("report", str(run_dir))  # the lock is free: the process is gone, and kiln says so
    assert reported.returncode == 0, reported.stderr
    assert summary(run_dir)["status"] == "killed" and "killed" in (run_dir / "report.html").read_text()

    procs = [start("resume", str(run_dir), "--quiet", "--no-report") for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], (codes, outputs)
    winner = procs[codes.index(0)]
    one_line_error((2, outputs[codes.index(2)][1]), f"{run_dir} is in use by another kiln process (PID {winner.pid})")
    assert [m["epoch"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2]
    steps = [line["iteration"] for line in read_jsonl(run_dir / "steps.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == 46
    assert sum(e["event"] == "resume" for e in read_jsonl(run_dir / "events.jsonl")) == 1
    assert summary(run_dir)["status"] == "completed"


# -- a run killed before its first checkpoint ---------------------------------------------------------------

@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_is_started_over_with_force(tmp_path):
    run_dir = tmp_path / "run"
    proc = start("train", "digits", *ONE_EPOCH, "--out", str(run_dir))
    wait_for(lambda: (run_dir / "summary.json").exists(), proc, what="summary.json")
    proc.kill()
    proc.communicate(timeout=60)
    assert not (run_dir / "checkpoints" / "last.pt").exists() and summary(run_dir)["status"] == "running"

    one_line_error(kiln("resume", str(run_dir)), "stopped before its first checkpoint", "status killed",
                   f"start it over with: kiln train digits --out {run_dir} --force")
    assert summary(run_dir)["status"] == "killed"
    one_line_error(kiln("train", "digits", *ONE_EPOCH, "--out", str(run_dir)),
                   "stopped before its first checkpoint; start it over with --force")

    again = kiln("train", "digits", *ONE_EPOCH, "--out", str(run_dir), "--force")
    assert again.returncode == 0, again.stderr
    assert [m["epoch"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [1]
    assert summary(run_dir)["status"] == "completed" and "reason" not in summary(run_dir)
    # --force starts over only a run without checkpoints
    one_line_error(kiln("train", "digits", *ONE_EPOCH, "--out", str(run_dir), "--force"),
                   "holds a run with checkpoints; --force starts over only a run that stopped before its first "
                   f"checkpoint; continue it with `kiln resume {run_dir}`")
    assert summary(run_dir)["status"] == "completed"


def test_force_never_clears_files_kiln_did_not_write(tmp_path):
    run_dir = tmp_path / "mine"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("keep")
    one_line_error(kiln("train", "digits", *ONE_EPOCH, "--out", str(run_dir), "--force"), "not empty")
    assert sorted(p.name for p in run_dir.iterdir()) == ["notes.txt"]  # not even a lock file


# -- a stop signal during the end-of-run report ------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_a_stop_signal_during_the_report_skips_it_and_exits_with_the_runs_status(tmp_path, sig, status):
    run_dir = tmp_path / "run"
    proc = start("train", "digits", *REPORTED, "--out", str(run_dir))
    wait_for(lambda: (run_dir / "plots").exists(), proc, what="plots/ (the report being drawn)")
    assert not (run_dir / "report.html").exists()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == status, (out, err)
    assert f"kiln: {sig.name} while drawing the report: report skipped; draw it later with: kiln report {run_dir}" \
        in out.splitlines()
    assert f"run directory: {run_dir}" in out and "Traceback" not in err
    assert summary(run_dir)["status"] == "completed" and not (run_dir / "report.html").exists()
    later = kiln("report", str(run_dir))
    assert later.returncode == 0, later.stderr
    assert (run_dir / "report.html").exists() and (run_dir / "plots" / "loss.png").exists()


# -- an --out that cannot be written: one line, before any data is loaded ------------------------------------

@pytest.fixture
def read_only_dir(tmp_path):
    """A small tmpfs holding an empty folder ``parent``, remounted read-only."""
    with tmpfs(tmp_path / "ro", "1m") as mount:
        (mount / "parent").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True, capture_output=True)
        yield mount


def test_an_out_that_cannot_be_written_is_one_line_before_the_data_loads(read_only_dir, tmp_path):
    nowhere = str(tmp_path / "no-data")  # a data error, were the data loaded first
    one_line_error(kiln("train", "imagefolder", "--data-dir", nowhere, "--out", str(read_only_dir / "parent" / "run")),
                   f"cannot create the run directory: read-only file system: {read_only_dir / 'parent' / 'run'}")
    one_line_error(kiln("train", "imagefolder", "--data-dir", nowhere, "--out", str(read_only_dir / "parent")),
                   f"cannot write the run directory: read-only file system: {read_only_dir / 'parent'}")
    one_line_error(kiln("train", "imagefolder", "--data-dir", nowhere, cwd=read_only_dir),  # the default runs/
                   "cannot create the run directory: read-only file system: runs/imagefolder-")
    too_long = tmp_path / ("x" * 300)
    one_line_error(kiln("train", "imagefolder", "--data-dir", nowhere, "--out", str(too_long)),
                   f"cannot create the run directory: file name too long: {too_long}")
