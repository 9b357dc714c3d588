"""The file helpers every writer uses: whole-line appends, a torn last line cut back, modes from the umask."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from callbacks.files import (
    append_jsonl,
    cut_torn_last_line,
    truncate_jsonl,
    write_atomic,
    write_json_atomic,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_appenders_in_several_processes_never_tear_each_others_lines(tmp_path):
    # Lines far longer than a stdio buffer: written in pieces, two processes' pieces would interleave.
    path = tmp_path / "events.jsonl"
    script = ("import sys; from callbacks.files import append_jsonl\n"
              "for i in range(50): append_jsonl(sys.argv[1], {'writer': sys.argv[2], 'i': i, 'pad': 'x' * 100_000})")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(path), str(w)], cwd=REPO) for w in range(4)]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    lines = path.read_bytes().split(b"\n")
    assert lines.pop() == b""
    records = [json.loads(line) for line in lines]
    assert sorted((r["writer"], r["i"]) for r in records) == [(str(w), i) for w in range(4) for i in range(50)]


@pytest.mark.parametrize("tail, dropped", [
    (b'{"epoch": 3, "val_acc', 21),  # killed mid-append: no newline
    (b'{"epoch": 3}', 12),  # the newline itself was not written: the line is not complete
    (b'{"epoch": 3, "val_\x00\x00\x00\n', 22),  # a block of zeros after a power cut
])
def test_a_torn_last_line_is_cut_back_to_the_last_complete_line(tmp_path, tail, dropped):
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, {"epoch": 1})
    append_jsonl(path, {"epoch": 2})
    whole = path.read_bytes()
    with open(path, "ab") as f:
        f.write(tail)
    assert cut_torn_last_line(path) == dropped
    assert path.read_bytes() == whole
    append_jsonl(path, {"epoch": 3})
    assert [json.loads(line)["epoch"] for line in path.read_text().splitlines()] == [1, 2, 3]


def test_complete_records_are_left_untouched(tmp_path):
    path = tmp_path / "steps.jsonl"
    assert cut_torn_last_line(path) == 0  # no file: nothing to do, nothing created
    assert not path.exists()
    for i in range(3):
        append_jsonl(path, {"iteration": i, "loss": float("nan")})
    before = path.read_bytes()
    assert cut_torn_last_line(path) == 0
    assert path.read_bytes() == before


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o027])
def test_every_file_the_helpers_write_follows_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_atomic(tmp_path / "last.pt", lambda f: f.write(b"weights"))
        write_json_atomic(tmp_path / "summary.json", {"status": "running"})
        append_jsonl(tmp_path / "metrics.jsonl", {"iteration": 1})
        append_jsonl(tmp_path / "metrics.jsonl", {"iteration": 2})
        truncate_jsonl(tmp_path / "metrics.jsonl", 1)
    finally:
        os.umask(old)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys(["last.pt", "summary.json", "metrics.jsonl"], oct(0o666 & ~umask))
