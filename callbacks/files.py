"""Small file helpers shared by the writers: atomic JSON, appended JSON lines, a torn last line cut back.

Every file they make gets the mode a plain ``open`` would give it: 0666 less the process's umask.
"""
from __future__ import annotations

import functools
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["append_jsonl", "cut_torn_last_line", "file_mode", "names_its_path", "os_error_line", "truncate_jsonl",
           "write_atomic", "write_json_atomic"]


def os_error_line(error: OSError, path: str | Path | None = None) -> str:
    """An OS error as one line that names its cause and the path: ``permission denied: RUN/config.json``
    (``path`` defaults to the error's own filename; without either, the cause alone)."""
    cause = error.strerror or str(error) or type(error).__name__
    path = error.filename if path is None else path
    where = f": {os.fsdecode(path) if isinstance(path, bytes) else path}" if path is not None else ""
    return f"{cause[:1].lower()}{cause[1:]}{where}"


def names_its_path(writer: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a writer whose first argument is the path it writes: an OSError it raises that names no
    file (a failed ``write``: ENOSPC) or only its temporary file beside the path names the path instead,
    so the one line the CLI prints says which file could not be written."""
    @functools.wraps(writer)
    def write(path: str | Path, *args: Any, **kwargs: Any) -> Any:
        try:
            return writer(path, *args, **kwargs)
        except OSError as e:
            if e.filename is None or Path(str(e.filename)).name.startswith(f".{Path(path).name}."):
                e.filename = str(path)
            raise
    return write


def _umask_at_import() -> int:
    mask = os.umask(0)  # the only portable way to read it; done once, at import, before any thread writes
    os.umask(mask)
    return mask


_IMPORT_UMASK = _umask_at_import()


def file_mode() -> int:
    """The mode a new file should get: ``0o666`` less the current umask.

    The umask is read from ``/proc/self/status`` (Linux; no race with other threads, and it follows a
    later ``os.umask``); elsewhere it is the umask kiln was imported under.
    """
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o666 & ~_IMPORT_UMASK


@names_its_path
def write_atomic(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Write a file so that a crash at any instant leaves either the old file or the new one.

    ``write(f)`` fills a temporary file beside ``path``; it is flushed and fsynced, given the mode the
    umask asks for (:func:`file_mode`; mkstemp makes it 0600), renamed over ``path``, and the folder is
    fsynced so the rename itself survives a power cut.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fchmod(f.fileno(), file_mode())
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


@names_its_path
def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON object as a line to ``path``; non-finite floats are written as strings ("nan").

    The line goes out in one ``write`` on an ``O_APPEND`` descriptor (looping only on a short write),
    so a crash leaves at most one torn last line, which :func:`cut_torn_last_line` removes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(_strict(record), allow_nan=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # the umask applies, as with open()
    try:
        while data:
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)


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
    for line in path.read_text(errors="surrogateescape").splitlines():  # keep any odd bytes as they are
        try:
            if json.loads(line).get("iteration", 0) > max_iteration:
                dropped += 1
                continue
        except (ValueError, AttributeError):
            pass
        kept.append(line)
    if dropped:
        text = "".join(k + "\n" for k in kept)
        write_atomic(path, lambda f: f.write(text.encode(errors="surrogateescape")))
    return dropped


def cut_torn_last_line(path: str | Path) -> int:
    """Cut ``path`` back to its last complete line; returns how many bytes were dropped (0: none).

    A complete line ends with a newline and holds one JSON object. A process killed during an append
    leaves a last line without its newline (or one that does not parse): the next append would be
    glued onto it, so a resumed run cuts it first.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0
    keep = len(data)
    if not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
    elif not _is_json_object(data[data.rfind(b"\n", 0, len(data) - 1) + 1:]):
        keep = data.rfind(b"\n", 0, len(data) - 1) + 1
    if keep == len(data):
        return 0
    with open(path, "r+b") as f:
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return len(data) - keep


def _is_json_object(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        return False
