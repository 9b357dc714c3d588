"""Small file helpers shared by the writers: atomic JSON, appended JSON lines."""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

__all__ = ["write_atomic", "write_json_atomic", "append_jsonl", "truncate_jsonl"]


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Write a file so that a crash at any instant leaves either the old file or the new one.

    ``write(f)`` fills a temporary file beside ``path``; it is flushed and fsynced, renamed over
    ``path``, and the folder is fsynced so the rename itself survives a power cut.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write ``data`` as strict JSON to ``path`` atomically (see :func:`write_atomic`)."""
    text = json.dumps(_strict(data), indent=2, allow_nan=False) + "\n"
    write_atomic(path, lambda f: f.write(text.encode()))


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON object as a line to ``path``; non-finite floats are written as strings ("nan")."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(_strict(record), allow_nan=False) + "\n")


def _strict(value: Any) -> Any:
    """Strict JSON: a non-finite float becomes the string "nan", "inf" or "-inf" (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def truncate_jsonl(path: str | Path, max_iteration: int) -> int:
    """Drop the lines of ``path`` whose "iteration" is above ``max_iteration``; returns how many were dropped.

    A resumed run replays the iterations after its checkpoint, so their lines would otherwise appear twice.
    """
    path = Path(path)
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("iteration", 0) > max_iteration:
                dropped += 1
                continue
        except (ValueError, AttributeError):
            pass
        kept.append(line)
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(k + "\n" for k in kept))
        os.replace(tmp, path)
    return dropped
