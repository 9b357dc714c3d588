"""Two nodes: two torchrun launchers (``--nnodes 2 --nproc-per-node 1``, c10d rendezvous on the loopback
address, gloo) train one run into one run directory that both see, as on a filesystem shared by nodes.

Each launcher runs in a session of its own, so "a node dies" is its launcher and its training process
killed together. The run is the one ``test_distributed.py`` makes with two processes on one node (the same
global batch of 64), so the two must match bit for bit: with one thread per process, as there (torchrun
sets OMP_NUM_THREADS=1 only for several processes per node; two "nodes" on this machine share its cores,
and a different thread count sums in another order).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from recipes.cli.launch import free_port
from recipes.run.checkpoints import load_checkpoint
from tests.recipes.run.conftest import SMALL, summary
from tests.runs import ENV, REPO, assert_same_run, final_state, metric_lines, wait_for_iteration

TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which(TORCHRUN) is None, reason="no torchrun")]

TRAIN = ["train", "digits", "--epochs", "4", "--batch-size", "32", *SMALL]


def two_nodes(*kiln_args: str) -> list[subprocess.Popen]:
    """Two node launchers of ``kiln KILN_ARGS`` meeting at a c10d rendezvous on 127.0.0.1. Their output goes
    to files (read by :func:`finish`): a pipe nobody reads while the other launcher is waited for can fill up
    and stop a training process mid-write."""
    port = free_port()
    launchers = []
    for _ in range(2):
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        launcher = subprocess.Popen(
            [TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
             f"127.0.0.1:{port}", "--rdzv-id", f"kiln-{port}", "-m", "recipes.cli", *kiln_args],
            cwd=REPO, stdout=out, stderr=err, text=True, start_new_session=True,
            env=ENV)
        launcher.logs = (out, err)
        launchers.append(launcher)
        time.sleep(0.3)  # the first one hosts the rendezvous
    return launchers


def _output(launcher: subprocess.Popen) -> tuple[str, str]:
    texts = []
    for f in launcher.logs:
        f.seek(0)
        texts.append(f.read())
    return texts[0], texts[1]


def kill_node(launcher: subprocess.Popen) -> None:
    """SIGKILL a launcher and every process under it (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, ppid = int(stat.parent.name), int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(pid)
    tree, todo = [], [launcher.pid]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    launcher.wait()


def finish(launchers: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str, str]]:
    """Wait for the launchers; (exit status, stdout, stderr) of each. Kills what is left on a timeout."""
    deadline = time.monotonic() + timeout
    try:
        for p in launchers:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in launchers:
            if p.poll() is None:
                kill_node(p)
    return [(p.returncode, *_output(p)) for p in launchers]


def wait_for_steps(run_dir: Path, steps: int, launchers: list[subprocess.Popen]) -> None:
    """Block until the run has logged ``steps`` iterations (``tests.runs.wait_for_iteration``), both nodes still up."""
    wait_for_iteration(run_dir, steps, launchers[0], timeout=180)
    assert all(p.poll() is None for p in launchers), [_output(p) for p in launchers]


@pytest.fixture(scope="module")
def two_node_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("two-nodes") / "run"
    for code, out, err in finish(two_nodes(*TRAIN, "--out", str(run_dir))):
        assert code == 0, err[-2000:]
    return run_dir


def test_two_nodes_train_the_two_process_run_into_one_directory(two_node_run, two_process_run):
    s = summary(two_node_run)
    assert s["status"] == "completed"
    assert s["rank_parameter_checksums"][0] == s["rank_parameter_checksums"][1], "the ranks' parameters differ"
    config = json.loads((two_node_run / "config.json").read_text())
    assert config["runtime"]["world_size"] == 2 and config["runtime"]["global_batch_size"] == 64
    # one node or two, the same global batch gives the same run, bit for bit
    assert metric_lines(two_node_run) == metric_lines(two_process_run)
    got, want = final_state(two_node_run)["model"], final_state(two_process_run)["model"]
    assert all(torch.equal(got[k], want[k]) for k in want)
    # both nodes were handed the directory; only global rank 0 wrote to it (one TensorBoard writer, one process's files)
    writers = [p for p in (two_node_run / "tb").glob("events.out.tfevents.*") if not p.name.endswith(".mistakes")]
    assert len(writers) == 1, writers  # the training writer's file (the end-of-run mistakes pass adds its own)
    assert sorted(p.name for p in two_node_run.parent.iterdir()) == ["run"]


def test_sigterm_to_both_launchers_stops_every_rank_and_two_nodes_resume_it_bit_identically(two_node_run, tmp_path):
    run_dir = tmp_path / "run"
    launchers = two_nodes(*TRAIN, "--out", str(run_dir))
    wait_for_steps(run_dir, 17, launchers)
    for p in launchers:
        p.send_signal(signal.SIGTERM)
    finish(launchers, timeout=180)  # torchrun itself reports the signal it got; the run's status is kiln's
    assert summary(run_dir)["status"] == "interrupted"
    state = final_state(run_dir)["trainer"]
    assert 17 <= state["iteration"] < 92 and (state["iteration"] % 10 == 0 or state["iteration"] % state["epoch_length"] == 0)
    for code, out, err in finish(two_nodes("resume", str(run_dir), "--quiet", "--no-report")):
        assert code == 0, err[-2000:]
    assert_same_run(run_dir, two_node_run)


def test_sigterm_to_one_launcher_stops_both_nodes_after_the_same_iteration(tmp_path):
    """torchrun passes the signal to its node's process; the ranks agree on stopping at the next agreement
    point (every 10 iterations), so the other node stops there too, and the checkpoint is the run's. (The
    other node's torchrun agent may then wait in its exit barrier for the agent that was signalled, up to
    torchrun's 5 minutes: its training process has ended by then, and the test does not wait for it.)"""
    run_dir = tmp_path / "run"
    launchers = two_nodes(*TRAIN, "--out", str(run_dir))
    wait_for_steps(run_dir, 17, launchers)
    launchers[1].send_signal(signal.SIGTERM)
    finish(launchers[1:], timeout=120)
    deadline = time.monotonic() + 120
    while summary(run_dir)["status"] == "running" and time.monotonic() < deadline:
        time.sleep(0.2)
    kill_node(launchers[0])
    assert summary(run_dir)["status"] == "interrupted"
    state = final_state(run_dir)["trainer"]
    assert 17 <= state["iteration"] < 92 and (state["iteration"] % 10 == 0 or state["iteration"] % state["epoch_length"] == 0)


def test_a_node_that_dies_stops_the_other_with_one_line_and_the_run_resumes_from_its_checkpoint(two_node_run, tmp_path):
    run_dir = tmp_path / "run"
    launchers = two_nodes(*TRAIN, "--out", str(run_dir))
    wait_for_steps(run_dir, 17, launchers)
    dead, survivor = launchers[1], launchers[0]
    kill_node(dead)  # the node: its launcher and its training process
    started = time.monotonic()
    code, _, err = finish([survivor], timeout=120)[0]
    assert time.monotonic() - started < 60, "the surviving node did not give up in bounded time"
    assert code != 0
    lines = [line for line in err.splitlines() if line.startswith("kiln:")]
    assert len(lines) == 1 and "lost contact with another process of the run" in lines[0], err[-3000:]
    assert f"kiln resume {run_dir}" in lines[0] and "Traceback" not in err.split("kiln: error:")[0]
    last, _ = load_checkpoint(run_dir / "checkpoints" / "last.pt", resumable=True)  # what was saved stays loadable
    assert 0 < last["trainer"]["iteration"] <= 30
    if summary(run_dir)["status"] != "running":  # rank 0 survived and recorded it (else it died mid-run)
        assert summary(run_dir)["status"] == "failed" and "lost contact" in summary(run_dir)["error"]
    for code, out, err in finish(two_nodes("resume", str(run_dir), "--quiet", "--no-report")):
        assert code == 0, err[-2000:]
    assert_same_run(run_dir, two_node_run)
