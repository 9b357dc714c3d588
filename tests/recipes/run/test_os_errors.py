"""OS errors while kiln writes: a full or read-only disk, or a name too long, is one line naming the cause and
the path, never a traceback. A run that fails that way exits 1 and says why in summary.json (or, when even
that cannot be written, in its line), and the last.pt written before still loads. The file systems are real:
small tmpfs mounts (the tests run as root; elsewhere they are skipped with the reason)."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests import runs
from tests.conftest import tmpfs
from tests.runs import start

#: digits at 16 px (23 iterations an epoch), a checkpoint every 5 iterations: last.pt is about 1.2 MB; no
#: end-of-run report (the runs here fail before it, or only lend their last.pt)
DIGITS = ("--set", "data.image_size=16", "--quiet", "--set", "checkpoint.every_iterations=5",
          "--set", "checkpoint.every_minutes=0", "--no-report")
FULL = "no space left on device"


def kiln(*args: str) -> subprocess.CompletedProcess:
    return runs.kiln(*args, timeout=600)  # the bound this module always gave (tests.runs defaults to 300 s)


@pytest.fixture
def small_disk(tmp_path: Path) -> Path:
    """A 3 MB file system."""
    with tmpfs(tmp_path / "disk", "3m") as disk:
        yield disk


@pytest.fixture
def read_only_disk(tmp_path: Path) -> Path:
    """A read-only file system (EROFS: root ignores permission bits, not this)."""
    with tmpfs(tmp_path / "ro", "1m") as disk:
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True, capture_output=True)
        yield disk


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("trained") / "digits"
    done = kiln("train", "digits", "--epochs", "1", *DIGITS, "--out", str(run_dir))
    assert done.returncode == 0, done.stderr
    return run_dir / "checkpoints" / "last.pt"


def fill(disk: Path, leave: int = 0) -> None:
    """Fill ``disk`` with one file until ``leave`` bytes are free (0: until the write fails)."""
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        todo = free - leave if leave else None
        while todo is None or todo > 0:
            chunk = 65536 if todo is None else min(65536, todo)
            try:
                os.write(fd, b"\0" * chunk)
            except OSError:
                break
            todo = None if todo is None else todo - chunk
    finally:
        os.close(fd)


def one_line(result: subprocess.CompletedProcess) -> str:
    """The stderr of a command that failed with an OS error: one line, no traceback."""
    assert "Traceback" not in result.stderr and "Exception" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("kiln: error: "), result.stderr
    return lines[0]


def leftovers(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.rglob(".*.tmp"))


@pytest.mark.slow
def test_a_checkpoint_that_does_not_fit_is_one_line_and_summary_json_says_why(small_disk):
    fill(small_disk, leave=900_000)  # room for everything but the first checkpoint
    run_dir = small_disk / "run"
    result = kiln("train", "digits", "--epochs", "1", *DIGITS, "--out", str(run_dir))
    assert result.returncode == 1
    assert one_line(result) == f"kiln: error: {FULL}: {run_dir}/checkpoints/last.pt"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == f"{FULL}: {run_dir}/checkpoints/last.pt"
    assert not leftovers(run_dir), "a temporary file was left behind"


@pytest.mark.slow
def test_a_disk_that_fills_mid_run_fails_in_one_line_and_the_last_checkpoint_still_loads(small_disk, tmp_path):
    run_dir = small_disk / "run"
    process = start("train", "digits", "--epochs", "3", *DIGITS, "--out", str(run_dir))
    last = run_dir / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 300
    while not last.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    fill(small_disk)  # another process fills the disk
    stdout, stderr = process.communicate(timeout=300)
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    assert result.returncode == 1, stderr
    line = one_line(result)
    assert line.startswith(f"kiln: error: {FULL}: {run_dir}/"), line
    summary = json.loads((run_dir / "summary.json").read_text())
    if "; summary.json not updated: no space left on device" not in line:
        assert summary["status"] == "failed" and summary["error"] == line.removeprefix("kiln: error: ")
    assert not leftovers(run_dir), "a temporary file was left behind"
    evaluated = kiln("eval", str(last), "--out", str(tmp_path / "eval"))  # the disk is still full
    assert evaluated.returncode == 0, evaluated.stderr
    assert "accuracy" in evaluated.stdout.splitlines()[-1]


@pytest.mark.slow
@pytest.mark.parametrize("command", [
    ("eval", "CHECKPOINT"), ("lr-find", "digits", "--num-iter", "5"), ("schedule", "digits"),
    ("sweep", "digits", "--trials", "1", "--epochs", "1"),
])
def test_an_out_folder_on_a_read_only_disk_is_refused_before_the_work(read_only_disk, checkpoint, command):
    out = read_only_disk / "out"
    args = [str(checkpoint) if a == "CHECKPOINT" else a for a in command]
    result = kiln(*args, "--out", str(out))
    assert result.returncode == 2
    assert one_line(result) == f"kiln: error: cannot write --out {out}: read-only file system"
    assert result.stdout == ""  # refused before any work


def test_an_out_name_too_long_is_refused_before_the_work(tmp_path, checkpoint):
    out = tmp_path / ("x" * 300)
    result = kiln("eval", str(checkpoint), "--out", str(out))
    assert result.returncode == 2
    assert one_line(result) == f"kiln: error: cannot write --out {out}: file name too long"


@pytest.mark.slow
@pytest.mark.parametrize("command", [("eval", "CHECKPOINT"), ("schedule", "digits")])
def test_on_a_full_disk_the_result_is_printed_then_one_line(small_disk, checkpoint, command):
    """The work is done and shown; the file that cannot be written is named; exit status 1."""
    fill(small_disk)
    out = small_disk / "out"
    result = kiln(*[str(checkpoint) if a == "CHECKPOINT" else a for a in command], "--out", str(out))
    assert result.returncode == 1
    assert one_line(result).startswith(f"kiln: error: {FULL}: {out}/")
    assert result.stdout.strip(), "the result was not printed"


def test_eval_of_a_checkpoint_in_a_read_only_folder_prints_its_figures(tmp_path, checkpoint):
    """The default place for confusion_matrix.png is the checkpoint's folder: if it is read-only (a
    teammate's run), the figures are printed anyway, with one line saying the picture was not written."""
    with tmpfs(tmp_path / "shared", "4m") as shared:
        (shared / "last.pt").write_bytes(checkpoint.read_bytes())
        subprocess.run(["mount", "-o", "remount,ro", str(shared)], check=True, capture_output=True)
        result = kiln("eval", str(shared / "last.pt"))
    assert result.returncode == 0, result.stderr
    assert "accuracy" in result.stdout.splitlines()[-1]
    assert result.stderr == (f"kiln: not writing confusion_matrix.png: read-only file system: {shared} "
                             "(pick a folder with --out)\n")
