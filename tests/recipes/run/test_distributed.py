"""Data parallelism through ignite.distributed on gloo: spawned by kiln, and under torchrun."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from tests.recipes.run.conftest import SMALL, summary
from tests.runs import ENV, REPO, assert_same_run, final_state, kiln, metric_lines, start, wait_for_iteration

pytestmark = pytest.mark.slow


def test_two_processes_train_in_step_and_write_one_run_directory(two_process_run, tmp_path):
    s = summary(two_process_run)
    assert s["status"] == "completed" and s["epochs_completed"] == 4
    checksums = s["rank_parameter_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1], "the ranks' parameters differ"
    assert sorted(p.name for p in two_process_run.parent.iterdir()) == ["run"], "only one run directory"
    config = json.loads((two_process_run / "config.json").read_text())
    assert config["runtime"]["world_size"] == 2 and config["runtime"]["global_batch_size"] == 64
    assert [line["epoch"] for line in metric_lines(two_process_run)] == [1, 2, 3, 4]

    single = tmp_path / "single"
    done = kiln("train", "digits", "--epochs", "4", "--batch-size", "64", *SMALL, "--out", str(single))
    assert done.returncode == 0, done.stderr
    assert abs(summary(single)["final_val_accuracy"] - s["final_val_accuracy"]) <= 0.02


def test_sigterm_to_the_launcher_stops_every_rank_and_resume_is_bit_identical(two_process_run, tmp_path):
    run_dir = tmp_path / "run"
    proc = start("train", "digits", "--epochs", "4", "--batch-size", "32", "--nproc-per-node", "2", *SMALL,
                 "--out", run_dir)
    wait_for_iteration(run_dir, 17, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-2000:]
    assert summary(run_dir)["status"] == "interrupted"
    state = final_state(run_dir)["trainer"]
    stopped = state["iteration"]
    assert 17 <= stopped < 48
    # the ranks agree on a stop every 10 iterations and at epoch ends, not after every step
    assert stopped % 10 == 0 or stopped % state["epoch_length"] == 0, stopped

    wrong = kiln("resume", str(run_dir))
    assert wrong.returncode == 2 and "--nproc-per-node 2" in wrong.stderr
    resumed = kiln("resume", str(run_dir), "--nproc-per-node", "2", "--quiet", "--no-report")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_run(run_dir, two_process_run)


@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None, reason="no torchrun")
def test_the_same_recipe_runs_under_torchrun(two_process_run, tmp_path):
    run_dir = tmp_path / "run"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    done = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "recipes.cli", "train", "digits",
                           "--epochs", "4", "--batch-size", "32", *SMALL, "--out", str(run_dir)],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 0, done.stderr[-2000:]
    # torchrun sets one thread per process, kiln's spawn shares the cores: same batches, same run
    assert summary(run_dir)["rank_parameter_checksums"] == summary(two_process_run)["rank_parameter_checksums"]
    assert metric_lines(run_dir) == metric_lines(two_process_run)
    got, want = final_state(run_dir)["model"], final_state(two_process_run)["model"]
    assert all(torch.equal(got[k], want[k]) for k in want)
