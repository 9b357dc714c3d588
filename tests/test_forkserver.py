"""The tests' fork server (tests/forkserver.py) runs a kiln command as a fresh ``python -m recipes.cli`` would:
the same run, bit for bit, the same output and the same recorded command, in a process of its own."""
from __future__ import annotations

import json
import os
import signal

import pytest

from tests.forkserver import ForkedKiln
from tests.runs import FAST, assert_same_run, start, wait_for_iteration

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.environ.get("KILN_TESTS_SPAWN") == "1",
                                                  reason="KILN_TESTS_SPAWN=1 starts every command from scratch")]


def _train(out, *extra: str):
    proc = start("train", "digits", *FAST, *extra, "--out", str(out))
    stdout, stderr = proc.communicate(timeout=300)
    return proc, stdout.replace(str(out), "RUN"), stderr


def test_a_forked_command_runs_as_a_fresh_process_would(tmp_path, monkeypatch):
    forked, forked_out, forked_err = _train(tmp_path / "forked")
    monkeypatch.setenv("KILN_TESTS_SPAWN", "1")
    fresh, fresh_out, fresh_err = _train(tmp_path / "fresh")
    assert isinstance(forked, ForkedKiln) and not isinstance(fresh, ForkedKiln)
    assert forked.returncode == fresh.returncode == 0, forked_err
    assert_same_run(tmp_path / "forked", tmp_path / "fresh")  # weights, optimizer, schedule, metrics
    timeless = [line for line in forked_out.splitlines() if not line.startswith("done in")]
    assert timeless == [line for line in fresh_out.splitlines() if not line.startswith("done in")]
    assert forked_err == fresh_err
    commands = [json.loads((tmp_path / run / "config.json").read_text())["runtime"]["command"] for run in
                ("forked", "fresh")]
    assert commands[0].replace(str(tmp_path / "forked"), str(tmp_path / "fresh")) == commands[1]
    assert commands[1].split()[0].endswith(os.path.join("recipes", "cli", "__main__.py"))


def test_a_forked_command_is_a_process_of_its_own(tmp_path):
    proc = start("train", "digits", "--epochs", "30", "--set", "train.log_every=1", "--quiet", "--out", tmp_path)
    assert isinstance(proc, ForkedKiln) and proc.pid not in (os.getpid(), os.getppid())
    wait_for_iteration(tmp_path, 3, proc)
    assert proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    with pytest.raises(ProcessLookupError):
        os.kill(proc.pid, 0)
