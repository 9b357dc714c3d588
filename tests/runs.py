"""Helpers for the tests that run kiln as real processes: start a run, wait on its own records, compare two runs,
and build a reference run once per test session however many pytest-xdist workers ask for it.

Every reader here reads records another process may be writing, through the run directory's own lenient
reader (a torn last line, caught mid-append, is not there yet), and waits on those records, never on sleeps.
:func:`kiln` and :func:`start` fork each command from the worker's warm process (tests/forkserver.py), which
saves every command ~2.4 s of imports; a command that process cannot reproduce starts from scratch.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from recipes.run.rundir import read_jsonl
from tests.conftest import SINGLE_THREAD_ENV
from tests.forkserver import ForkedKiln, ForkServer, forkable

__all__ = ["ENV", "FAST", "KILN", "KILN_SCRIPT", "REPO", "TIMING_KEYS", "assert_same_run", "final_state", "flatten",
           "kiln", "last_iteration", "metric_lines", "shared_run", "start", "wait_for", "wait_for_iteration"]

KILN = [sys.executable, "-m", "recipes.cli"]
#: The installed ``kiln`` console script (the entry point a user types), for the tests that run it as such;
#: ``KILN`` runs the same ``recipes.cli.entry.main`` through ``python -m``.
KILN_SCRIPT = str(Path(sys.executable).with_name("kiln"))
REPO = Path(__file__).resolve().parent.parent
#: One intra-op thread in every kiln process a test starts (see tests/conftest.py): the suite runs on all cores
#: at once, and the same setting in a reference run and in the run compared with it keeps them comparable.
ENV = {**os.environ, **SINGLE_THREAD_ENV}
#: Small and quick, but the real digits recipe: 2 epochs of 23 iterations at 16x16, a record every iteration; no
#: end-of-run report (a third of such a process: the tests of the report draw it).
FAST = ["--epochs", "2", "--set", "data.image_size=16", "--set", "train.log_every=1",
        "--set", "checkpoint.every_iterations=4", "--quiet", "--no-report"]
TIMING_KEYS = {"epoch_seconds", "images_per_second"}


_SERVER = ForkServer(ENV, REPO)


def _popen(args: tuple[str | Path, ...], env: dict | None, **popen) -> subprocess.Popen:
    """``python -m recipes.cli ARGS``: forked from the tests' fork server where that is the same (see
    tests/forkserver.py), else a fresh process."""
    argv = [*KILN, *map(str, args)]
    if forkable(argv, env, ENV, popen):
        return ForkedKiln(_SERVER, argv, env=ENV if env is None else env, **popen)
    return subprocess.Popen(argv, env=ENV if env is None else env, **popen)


def kiln(*args: str | Path, timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    """``kiln ARGS`` as its own process (one thread), output captured, as ``subprocess.run`` would; ``popen``
    goes to ``subprocess.Popen``."""
    with _popen(args, popen.pop("env", None), cwd=popen.pop("cwd", REPO), stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True, **popen) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def start(*args: str | Path, **popen) -> subprocess.Popen:
    """``kiln ARGS`` started in the background (one thread), its output piped."""
    return _popen(args, popen.pop("env", None), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                  **popen)


def last_iteration(run_dir: Path) -> int:
    """The iteration of steps.jsonl's last whole record (0 before the first)."""
    records = read_jsonl(run_dir / "steps.jsonl")
    return records[-1]["iteration"] if records else 0


def wait_for(condition: Callable[[], bool], *procs: subprocess.Popen, what: str, timeout: float = 180) -> None:
    """Block until ``condition()`` holds; fail at once if a process in ``procs`` ends first, or after ``timeout``
    seconds (a bound for a broken run, not a pace: a busy machine only makes the wait longer)."""
    deadline = time.monotonic() + timeout
    while not condition():
        for proc in procs:
            if proc.poll() is not None:
                raise AssertionError(f"the process ended before {what}: {proc.communicate()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} in {timeout} s")
        time.sleep(0.005)


def wait_for_iteration(run_dir: Path, iteration: int, *procs: subprocess.Popen, timeout: float = 180) -> None:
    """Block until the run's steps.jsonl records ``iteration`` (log_every=1 runs record every one)."""
    wait_for(lambda: last_iteration(run_dir) >= iteration, *procs, what=f"iteration {iteration}", timeout=timeout)


def final_state(run_dir: Path) -> dict:
    """checkpoints/last.pt, loaded."""
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)


def metric_lines(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock fields, which differ between any two runs."""
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_jsonl(run_dir / "metrics.jsonl")]


def flatten(tree, prefix: str = "") -> dict:
    """A nested state dict as ``{"a.0.b": leaf}``."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return {prefix.rstrip("."): tree}
    out = {}
    for k, v in items:
        out.update(flatten(v, f"{prefix}{k}."))
    return out


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """The two runs ended bit-identical: weights, optimizer, loss scaler, schedule, iteration and metrics."""
    got, want = final_state(run_dir), final_state(reference)
    for key in ("model", "optimizer", "amp", "schedule"):
        flat_got, flat_want = flatten(got[key]), flatten(want[key])
        assert flat_got.keys() == flat_want.keys(), key
        for name in flat_want:
            a, b = flat_got[name], flat_want[name]
            assert (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b), f"{key}.{name} differs"
    assert got["trainer"]["iteration"] == want["trainer"]["iteration"]
    assert metric_lines(run_dir) == metric_lines(reference)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["best_val_accuracy"] == json.loads((reference / "summary.json").read_text())["best_val_accuracy"]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def shared_run(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], None]) -> Path:
    """The folder ``make(folder)`` fills (``.../NAME/run``, alone in its parent), made once per test session and
    shared by every pytest-xdist worker: the first to ask makes it under a lock, the others wait and reuse it.
    Treat it as read-only: copy it before changing it. After a ``make`` that failed, the next asker starts anew."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's folder, which holds each worker's own
    shared = base / "shared"
    shared.mkdir(exist_ok=True)
    folder = shared / name / "run"  # alone in its parent, as a run made with --out DIR/run is
    with _locked(shared / f"{name}.lock"):
        if not (shared / f"{name}.done").exists():
            shutil.rmtree(folder.parent, ignore_errors=True)
            folder.parent.mkdir()
            make(folder)
            (shared / f"{name}.done").touch()
    return folder
