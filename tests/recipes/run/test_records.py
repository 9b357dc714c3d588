"""A run directory's records through the real CLI: a torn last line is cut when the run resumes, config.json
is kiln's record (a hand edit is refused, a broken one is one line), and every file follows the umask."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from tests import runs
from tests.runs import FAST, TIMING_KEYS, shared_run, start, wait_for_iteration

pytestmark = pytest.mark.slow

RECORDS = ("metrics.jsonl", "steps.jsonl", "events.jsonl")


def kiln(*args: str, umask: int | None = None) -> subprocess.CompletedProcess:
    return runs.kiln(*args, timeout=600, **({} if umask is None else {"umask": umask}))


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("kiln: error:") and result.stderr.count("\n") == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def records(path: Path) -> list[dict]:
    """Every line of a .jsonl file, each of which must be a whole JSON object."""
    text = path.read_text()
    assert text.endswith("\n"), f"{path.name} ends in half a line"
    parsed = [json.loads(line) for line in text.splitlines()]
    assert all(isinstance(r, dict) for r in parsed)
    return parsed


def metric_lines(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records(run_dir / "metrics.jsonl")]


@pytest.fixture
def reference(fast_digits_run) -> Path:
    """The uninterrupted run a stopped-and-resumed one must equal."""
    return fast_digits_run


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> Path:
    """The same run stopped by SIGTERM in its second epoch (copy it before changing it)."""
    def stop(run_dir: Path) -> None:
        proc = start("train", "digits", *FAST, "--out", run_dir)
        wait_for_iteration(run_dir, 30, proc, timeout=300)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and "stopped by SIGTERM" in out, err

    return shared_run(tmp_path_factory, "fast-digits-stopped", stop)


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


def _checkpoint_iteration(run_dir: Path) -> int:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["trainer"]["iteration"]


@pytest.mark.parametrize("name", RECORDS)
def test_a_torn_last_line_is_cut_when_the_run_resumes(tmp_path, reference, stopped, name):
    # A process killed while appending leaves the first part of the line it was writing, after the
    # checkpoint it resumes from: here, half the line the uninterrupted run wrote next.
    run_dir = _copy(stopped, tmp_path)
    stopped_at = _checkpoint_iteration(run_dir)
    following = {
        "metrics.jsonl": [r for r in (reference / name).read_text().splitlines() if json.loads(r)["epoch"] == 2],
        "steps.jsonl": [r for r in (reference / name).read_text().splitlines() if json.loads(r)["iteration"] > stopped_at],
        "events.jsonl": (run_dir / name).read_text().splitlines()[-1:],
    }[name][0].encode()
    torn = following[: len(following) // 2]
    with open(run_dir / name, "ab") as f:
        f.write(torn)

    resumed = kiln("resume", run_dir, "--quiet", "--no-report")
    assert resumed.returncode == 0, resumed.stderr
    events = records(run_dir / "events.jsonl")
    assert [e for e in events if e["event"] == "torn_line_dropped"] == [
        {"event": "torn_line_dropped", "file": name, "bytes": len(torn), "iteration": stopped_at}]
    assert metric_lines(run_dir) == metric_lines(reference)
    steps = [r["iteration"] for r in records(run_dir / "steps.jsonl")]
    assert steps == [r["iteration"] for r in records(reference / "steps.jsonl")]


def test_resume_refuses_a_hand_edited_config_json_and_leaves_the_run_untouched(tmp_path, stopped):
    run_dir = _copy(stopped, tmp_path)
    config_path = run_dir / "config.json"
    original = config_path.read_bytes()
    config = json.loads(original)
    config["train"]["epochs"] = 5
    config["optim"]["weight_decay"] = 0.5
    config_path.write_text(json.dumps(config, indent=2))
    edited = config_path.read_bytes()
    before = {p: p.read_bytes() for p in [*(run_dir / n for n in RECORDS), run_dir / "checkpoints" / "last.pt"]}
    last = run_dir / "checkpoints" / "last.pt"

    for command in (("resume", run_dir), ("train", "digits", *FAST, "--resume", last)):
        assert_one_line_error(kiln(*command), f"{config_path} was edited by hand (optim.weight_decay: 0.01 -> 0.5; "
                              "train.epochs: 2 -> 5); kiln does not read edits: use kiln train digits --resume "
                              f"{last} --set KEY=VALUE --force")
    assert config_path.read_bytes() == edited
    assert {p: p.read_bytes() for p in before} == before

    config_path.write_bytes(original)  # put back, the run continues
    resumed = kiln("resume", run_dir, "--quiet", "--no-report")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


def test_a_config_json_naming_the_precision_auto_resolved_to_is_not_an_edit(tmp_path, stopped):
    # A resume writes the precision `auto` resolved to into config.json; the checkpoint it started
    # from still says auto until the next one is written. That is kiln's own record, not an edit.
    run_dir = _copy(stopped, tmp_path)
    config = json.loads((run_dir / "config.json").read_text())
    resolved = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["kiln"]["precision"]
    assert config["train"]["precision"] == "auto" and resolved in ("fp32", "bf16")
    config["train"]["precision"] = resolved
    (run_dir / "config.json").write_text(json.dumps(config, indent=2))
    resumed = kiln("resume", run_dir, "--quiet", "--no-report")
    assert resumed.returncode == 0, resumed.stderr


@pytest.mark.parametrize("command", ["schedule", "lr-find", "report", "resume", "train --resume", "train --resume --force"])
def test_a_config_json_that_does_not_parse_is_one_line_and_exit_2(tmp_path, stopped, command):
    run_dir = _copy(stopped, tmp_path)
    config_path = run_dir / "config.json"
    text = config_path.read_text()
    config_path.write_text(text[: len(text) // 2])
    last = run_dir / "checkpoints" / "last.pt"
    args = {"train --resume": ("train", "digits", *FAST, "--resume", last),
            "train --resume --force": ("train", "digits", *FAST, "--resume", last, "--force")}.get(command, (command, run_dir))
    result = kiln(*args)
    if command == "train --resume --force":  # the way out: the run continues and kiln writes its record anew
        assert result.returncode == 0, result.stderr
        assert json.loads(config_path.read_text())["train"]["epochs"] == 2
        return
    assert_one_line_error(result, f"{config_path} is not valid JSON (line ")


@pytest.mark.parametrize("umask", [0o022])  # 022 is what caught mkstemp's 0600; 077 would pass either way
def test_every_file_kiln_writes_follows_the_umask(tmp_path, umask):
    small = ["--epochs", "1", "--set", "data.image_size=16"]
    for args in (("train", "digits", *small, "--max-lr", "auto", "--quiet", "--out", tmp_path / "run"),
                 ("schedule", "digits", "--out", tmp_path / "schedule"),
                 ("sweep", "digits", "--trials", "1", *small, "--out", tmp_path / "sweep")):
        done = kiln(*args, umask=umask)
        assert done.returncode == 0, done.stderr
    written = list(tmp_path.rglob("*"))
    for name in ("run/config.json", "run/summary.json", "run/checkpoints/last.pt", "run/lr_find.json",
                 "run/metrics.jsonl", "run/report.html", "schedule/schedule.json", "sweep/sweep.json",
                 "sweep/trials/000/checkpoints/last.pt"):
        assert tmp_path / name in written, name
    assert any(p.match("run/checkpoints/best-*.pt") for p in written)
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in written}
    want = {name: oct((0o777 if (tmp_path / name).is_dir() else 0o666) & ~umask) for name in modes}
    assert {k: v for k, v in modes.items() if v != want[k]} == {}
