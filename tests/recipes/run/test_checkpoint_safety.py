"""Loading checkpoints safely: pickled code never runs; corrupt, foreign and missing inputs get one line, exit 2."""
from __future__ import annotations

import ctypes
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from recipes.config import ConfigError
from recipes.run.checkpoints import load_checkpoint
from tests.runs import kiln


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("kiln: error:") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


class MakesAFile:
    """Unpickling this would create a marker file: what a hostile checkpoint does."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("run") / "digits"
    done = kiln("train", "digits", "--epochs", "1", "--set", "data.image_size=16", "--quiet", "--no-report",
                "--out", str(run_dir))
    assert done.returncode == 0, done.stderr
    return run_dir


def test_a_pickled_object_is_refused_and_never_runs(tmp_path, finished_run):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"kiln": {"format": 1, "config": {}}, "model": MakesAFile(str(marker))}, evil)
    with pytest.raises(ConfigError, match="pickled"):
        load_checkpoint(evil)
    assert_one_line_error(kiln("eval", str(evil)), "pickled")
    run_dir = tmp_path / "run"
    subprocess.run(["cp", "-r", str(finished_run), str(run_dir)], check=True)
    (run_dir / "checkpoints" / "last.pt").write_bytes(evil.read_bytes())
    assert_one_line_error(kiln("resume", str(run_dir)), "pickled")
    assert not marker.exists()


def test_truncated_corrupt_and_foreign_files_are_refused(tmp_path, finished_run):
    last = finished_run / "checkpoints" / "last.pt"
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(last.read_bytes()[: len(last.read_bytes()) // 2])
    assert_one_line_error(kiln("eval", str(truncated)), "truncated or corrupt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(random.Random(2).randbytes(4096))  # torch's unpickler raises IndexError on these bytes
    assert_one_line_error(kiln("eval", str(garbage)), "not a checkpoint")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weight": torch.ones(2)}, foreign)
    assert_one_line_error(kiln("eval", str(foreign)), "not a kiln checkpoint")
    assert_one_line_error(kiln("eval", str(tmp_path / "missing.pt")), "no checkpoint at")
    best = next((finished_run / "checkpoints").glob("best-*.pt"))
    assert_one_line_error(kiln("train", "digits", "--resume", str(best)), "weights only")


def test_any_garbage_is_refused_with_a_config_error(tmp_path):
    """Random bytes make torch's weights-only unpickler fail in many ways (IndexError, KeyError, ...)."""
    for seed in range(300):
        garbage = tmp_path / f"garbage-{seed}.pt"
        garbage.write_bytes(random.Random(seed).randbytes(4096))
        with pytest.raises(ConfigError, match=str(garbage)):
            load_checkpoint(garbage)


def test_resume_needs_a_run_directory_with_a_checkpoint(tmp_path):
    assert_one_line_error(kiln("resume", str(tmp_path / "nowhere")), "no run directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(kiln("resume", str(empty)), "not a kiln run directory")
    no_checkpoint = tmp_path / "no_checkpoint"
    no_checkpoint.mkdir()
    (no_checkpoint / "config.json").write_text("{}")
    assert_one_line_error(kiln("resume", str(no_checkpoint)), "no checkpoints/last.pt")


def test_eval_prints_loss_and_accuracy_of_last_and_best(finished_run):
    import json

    summary = json.loads((finished_run / "summary.json").read_text())
    for checkpoint in [finished_run / "checkpoints" / "last.pt", *(finished_run / "checkpoints").glob("best-*.pt")]:
        result = kiln("eval", str(checkpoint))
        assert result.returncode == 0, result.stderr
        figures = result.stdout.splitlines()[-1].split()
        assert figures[0] == "loss" and figures[2] == "accuracy"
        assert float(figures[3]) == pytest.approx(summary["final_val_accuracy"], abs=5e-5)


def _cannot_bypass_file_modes() -> None:
    """preexec_fn: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the capability bounding set, so that the
    kiln started next, though root, is refused a file as any other user would be. (Running it as user 65534
    does not work where the interpreter lives under a 0700 /root.)"""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_a_checkpoint_that_cannot_be_read_says_permission_denied_not_corrupt(tmp_path, finished_run):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    last = run_dir / "checkpoints" / "last.pt"
    preexec = None
    if os.geteuid() == 0:  # a teammate's 0600 checkpoint
        os.chown(last, 65534, 65534)
        preexec = _cannot_bypass_file_modes
    os.chmod(last, 0o600 if preexec else 0o000)
    try:
        result = kiln("resume", str(run_dir), preexec_fn=preexec)
    except subprocess.SubprocessError as e:
        pytest.skip(f"cannot drop the capabilities that let root read any file: {e}")
    assert_one_line_error(result, f"permission denied: {last}")
    assert "corrupt" not in result.stderr
