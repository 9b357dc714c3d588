"""``kiln sweep`` on a real PostgreSQL server (``tests/postgres.py``): the storage several machines share.

The "machines" here are worker processes with an ``--out`` folder each, as on separate machines; they
meet only in the server. Also: a missing driver, a wrong password and a server that does not answer are
one line and exit status 2, in bounded time.
"""
from __future__ import annotations

import importlib.util
import json
import signal
import socket
import time

import optuna
import pytest

from recipes.cli import main
from recipes.tools.sweep import CONNECT_TIMEOUT
from tests.runs import kiln, start

STUDY = "digits-shared"
TINY = ["--set", "data.image_size=16", "--pruner", "none", "--heartbeat", "2"]


def _sweep(url: str, out, trials: int, epochs: int = 1) -> list[str]:
    return ["sweep", "digits", "--trials", str(trials), "--epochs", str(epochs), *TINY, "--storage", url,
            "--study", STUDY, "--out", str(out)]


def _trials(url: str) -> list[optuna.trial.FrozenTrial]:
    return [t for t in optuna.load_study(study_name=STUDY, storage=url).trials if not t.user_attrs.get("surplus")]


@pytest.mark.slow
def test_three_workers_share_a_study_and_one_killed_mid_trial_leaves_it_consistent(postgres_server, tmp_path):
    url = postgres_server.database("three_workers")
    n = 6
    workers = [start(*_sweep(url, tmp_path / f"node{k}", n, epochs=2)) for k in range(3)]
    try:
        deadline = time.time() + 300
        while time.time() < deadline:  # kill the first worker inside a trial: after its first epoch of two
            time.sleep(0.3)
            if list((tmp_path / "node0").glob("trials/*/metrics.jsonl")):
                break
        workers[0].send_signal(signal.SIGKILL)
        workers[0].wait()
        finished = [w.communicate(timeout=600) for w in workers[1:]]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    for w, (stdout, stderr) in zip(workers[1:], finished):
        assert w.returncode == 0, stderr[-2000:]
    trials = _trials(url)  # optuna itself reads the study from the server
    states = [t.state for t in trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == n
    assert optuna.trial.TrialState.RUNNING not in states
    assert optuna.trial.TrialState.FAIL in states  # the killed worker's trial, failed by a survivor's heartbeat check
    run_dirs = [t.user_attrs["run_dir"] for t in trials if "run_dir" in t.user_attrs]
    assert len(run_dirs) == len(set(run_dirs))  # no trial run twice
    assert {d.split("/")[-3] for d in run_dirs} >= {"node1", "node2"}  # both survivors trained some


@pytest.mark.slow
def test_running_the_command_again_continues_the_study_and_best_yaml_trains(postgres_server, tmp_path):
    url = postgres_server.database("continue")
    for trials, expected in ((2, 2), (2, 2), (3, 3)):  # the same command again adds nothing; --trials 3 one more
        done = kiln(*_sweep(url, tmp_path / "sweep", trials), timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        assert len(_trials(url)) == expected
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in _trials(url))
    best = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["best"]
    # only its summary.json is compared: no end-of-run report
    again = kiln("train", tmp_path / "sweep" / "best.yaml", "--quiet", "--no-report", "--out", tmp_path / "again",
                 timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((tmp_path / "again" / "summary.json").read_text())["best_val_accuracy"] == best["best_val_accuracy"]


def _one_line_exit_2(url: str, out, capfd) -> tuple[str, float]:
    started = time.monotonic()
    with pytest.raises(SystemExit) as info:
        main(["sweep", "digits", "--trials", "1", "--storage", url, "--out", str(out)])
    seconds = time.monotonic() - started
    _, err = capfd.readouterr()
    assert info.value.code == 2 and err.count("\n") == 1 and err.startswith("kiln: error: cannot open the study storage")
    assert not out.exists()
    return err, seconds


def test_a_wrong_password_is_one_line_without_the_password(postgres_server, tmp_path, capfd):
    url = postgres_server.url("postgres", password="not-the-password")
    err, _ = _one_line_exit_2(url, tmp_path / "sweep", capfd)
    assert "password authentication failed" in err and "not-the-password" not in err and "***" in err


def test_a_server_that_does_not_answer_is_given_up_on_in_seconds(tmp_path, capfd):
    """A port that accepts connections and never answers (a hung server, a firewall that drops replies)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"postgresql://kiln:secret@127.0.0.1:{silent.getsockname()[1]}/kiln"
        err, seconds = _one_line_exit_2(url, tmp_path / "sweep", capfd)
    assert "timeout" in err.lower() and "secret" not in err
    assert seconds < CONNECT_TIMEOUT + 15, seconds


@pytest.mark.skipif(importlib.util.find_spec("psycopg2") is not None, reason="psycopg2 is installed here")
def test_a_missing_driver_names_the_extra_to_install(tmp_path, capfd):
    err, _ = _one_line_exit_2("postgresql+psycopg2://kiln@127.0.0.1:1/kiln", tmp_path / "sweep", capfd)
    assert "its driver psycopg2 is not installed" in err and "pip install 'kiln[postgres]'" in err
