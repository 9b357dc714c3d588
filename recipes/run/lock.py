"""One writer per run directory: an exclusive ``flock`` on RUN_DIR/.lock, held for the life of the process."""
from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

from callbacks.files import os_error_line, write_json_atomic
from recipes.config import ConfigError
from recipes.run.rundir import LOCK, RunDir, read_json

__all__ = ["RunLock", "discarded_on_failure", "lend_to_children", "released_after"]

#: Set while a process that holds run-directory locks spawns its data-parallel ranks: its PID.
_LENT_BY = "KILN_RUN_LOCKS_LENT_BY"


class RunLock:
    """The lock that makes one kiln process the only writer of a run directory.

    :meth:`take` creates the directory if asked, opens RUN_DIR/.lock, takes ``fcntl.flock(LOCK_EX |
    LOCK_NB)`` on it and writes this process's PID into it. The lock is held until :meth:`release` or
    until the process ends: the kernel drops it when the process dies, so a SIGKILL never leaves a stale
    lock (the file stays behind; only a held lock counts). Taking it again in the same process returns
    the same lock (``kiln train`` takes it, then its run and its report take it again). Another process
    gets a one-line :class:`ConfigError` naming the PID that holds it. Under data parallelism rank 0
    takes it; ranks spawned by a process that holds it use its lock (see :func:`lend_to_children`).

    The first time a process takes a directory whose summary.json says "running", the process that
    wrote it is gone without saying how it ended: the status becomes "killed".

    Example:
        >>> import tempfile
        >>> run_dir = Path(tempfile.mkdtemp()) / "run"
        >>> lock = RunLock.take(run_dir)
        >>> RunLock.take(run_dir) is lock, (run_dir / ".lock").read_text().strip() == str(os.getpid())
        (True, True)
        >>> lock.release()
    """

    _held: ClassVar[dict[str, RunLock]] = {}

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = RunDir(self.run_dir).lock
        self.inherited = False  #: held by the process that spawned this rank, on its behalf
        self.previous_pid: int | None = None  #: the PID the lock file named when this process took it
        self._fd: int | None = None
        self._created_dirs: list[Path] = []  # made by take(), innermost first
        self._created_file = False

    @classmethod
    def take(cls, run_dir: str | Path, *, create: bool = True, busy_hint: str = "wait for it to end") -> RunLock:
        """This process's lock on ``run_dir``, taken now if it does not hold it yet.

        Args:
            run_dir: the run directory.
            create: make the directory (and its parents) if missing. Without it only a directory that
                already holds a run (a lock file, config.json, summary.json or metrics) is locked; otherwise
                nothing is, and the caller's own checks say what is wrong ("no run directory at ...").
            busy_hint: the advice after "in use by another kiln process (PID N)".

        Raises:
            ConfigError: another process holds it, or the directory or its lock file cannot be
                created or written (the path and the cause: read-only file system, permission denied...).
        """
        run_dir = Path(run_dir)
        held = cls._held.get(_key(run_dir))
        if held is not None:
            if held._still_held():
                return held
            held.release()  # the directory was deleted and made again: that lock guards nothing
        lock = cls(run_dir)
        if not create and not _holds_a_run(run_dir):
            return lock  # nothing to lock: the caller's own check names what is missing
        lock._acquire(create, busy_hint)
        cls._held[_key(run_dir)] = lock
        if lock._fd is not None:
            lock._previous_writer_gone()
        return lock

    @classmethod
    def of(cls, run_dir: str | Path) -> RunLock | None:
        """This process's lock on ``run_dir`` if it holds one (taking nothing)."""
        return cls._held.get(_key(Path(run_dir)))

    @property
    def held(self) -> bool:
        """Whether this process holds the lock (itself, or through the process that spawned it)."""
        return self._fd is not None or self.inherited

    def release(self) -> None:
        """Let other processes take the directory (the file stays; an unheld lock file means nothing)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None
        if RunLock._held.get(_key(self.run_dir)) is self:
            del RunLock._held[_key(self.run_dir)]

    def discard(self) -> None:
        """Release, and remove what :meth:`take` created (the lock file, the directory, its new parents)
        when nothing else was written there: a run that failed before it began leaves nothing behind."""
        if self._fd is None:
            return
        try:
            unused = [p.name for p in self.run_dir.iterdir()] == [LOCK]
        except OSError:
            unused = False
        if unused and self._created_file:
            self.path.unlink(missing_ok=True)
        self.release()
        if unused and self._created_file:
            for directory in self._created_dirs:
                try:
                    directory.rmdir()
                except OSError:
                    break  # not empty (another run is in it now) or already gone

    def _acquire(self, create: bool, busy_hint: str) -> None:
        for _ in range(10):  # retried only if the lock file is removed (discard) between open and flock
            if create:
                self._make_dirs()
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = _read_pid(self.path)
                if holder is not None and os.environ.get(_LENT_BY) == str(holder) == str(os.getppid()):
                    self.inherited = True  # a rank spawned by the process that holds it
                    return
                who = f" (PID {holder})" if holder is not None else ""
                raise ConfigError(f"{self.run_dir} is in use by another kiln process{who}; {busy_hint}") from None
            if _same_file(fd, self.path):
                self._fd = fd
                self.previous_pid = _parse_pid(os.pread(fd, 32, 0))
                self._write_pid()
                return
            os.close(fd)
        raise ConfigError(f"could not lock {self.path}: it keeps being removed by another process")

    def _make_dirs(self) -> None:
        missing = []
        for directory in (self.run_dir, *self.run_dir.parents):
            if os.path.lexists(directory):  # (False for a name too long: mkdir then says so)
                break
            missing.append(directory)
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise ConfigError(f"{self.run_dir} is a file, not a directory; pick another --out") from None
        except OSError as e:
            raise ConfigError(f"cannot create the run directory: {os_error_line(e, self.run_dir)}") from None
        self._created_dirs = self._created_dirs or missing

    def _open(self) -> int:
        flags = os.O_RDWR | os.O_CLOEXEC
        try:
            try:
                fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o666)
                self._created_file = True
                return fd
            except FileExistsError:
                return os.open(self.path, flags)
        except OSError as e:
            raise ConfigError(f"cannot write the run directory: {os_error_line(e, self.run_dir)}") from None

    def _write_pid(self) -> None:
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as e:
            self.release()
            raise ConfigError(f"cannot write the run directory: {os_error_line(e, self.run_dir)}") from None

    def _still_held(self) -> bool:
        """Whether the lock file this process holds is still the one at the path (the directory was not
        deleted and made again since)."""
        if self.inherited:
            return True
        return self._fd is not None and _same_file(self._fd, self.path)

    def _previous_writer_gone(self) -> None:
        """summary.json "running" under a lock that was free: its writer died without a word (SIGKILL,
        a crash, a power cut). Say so, once, now that this process owns the directory."""
        path = RunDir(self.run_dir).summary
        summary = read_json(path)
        if summary is None or summary.get("status") != "running":
            return
        who = f" (PID {self.previous_pid})" if self.previous_pid is not None else ""
        summary.update(status="killed", reason=f"the process running it{who} ended without recording how: "
                                               "killed, or the machine stopped")
        try:
            write_json_atomic(path, summary)
        except OSError as e:
            raise ConfigError(f"cannot mark the run killed: {os_error_line(e, path)}") from None


@contextmanager
def discarded_on_failure(run_dir: str | Path) -> Iterator[None]:
    """If the block raises (SystemExit included), :meth:`RunLock.discard` this process's lock on ``run_dir``:
    a run that failed before writing anything leaves no lock file and no directory behind."""
    try:
        yield
    except BaseException:
        held = RunLock.of(run_dir)
        if held is not None:
            held.discard()
        raise


@contextmanager
def released_after(run_dir: str | Path) -> Iterator[None]:
    """Release this process's lock on ``run_dir`` when the block ends (discard it if the block fails): for a
    process that writes many run directories one after the other, such as a sweep's trials."""
    with discarded_on_failure(run_dir):
        yield
    held = RunLock.of(run_dir)
    if held is not None:
        held.release()


@contextmanager
def lend_to_children() -> Iterator[None]:
    """While it lasts, processes this one spawns (data-parallel ranks) use the run-directory locks it
    holds instead of failing to take them."""
    previous = os.environ.get(_LENT_BY)
    os.environ[_LENT_BY] = str(os.getpid())
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(_LENT_BY, None)
        else:
            os.environ[_LENT_BY] = previous


def _holds_a_run(run_dir: Path) -> bool:
    run = RunDir(run_dir)
    return run_dir.is_dir() and any(p.exists() for p in (run.lock, run.config, run.summary, run.metrics, run.steps))


def _key(run_dir: Path) -> str:
    return os.path.realpath(run_dir)


def _same_file(fd: int, path: Path) -> bool:
    try:
        opened, on_disk = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (opened.st_dev, opened.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _read_pid(path: Path) -> int | None:
    """The PID the holder wrote; it writes it just after taking the lock, so an empty file is retried briefly."""
    for _ in range(50):
        try:
            text = path.read_text().strip()
        except OSError:
            return None
        if text.isdigit():
            return int(text)
        time.sleep(0.01)
    return None


def _parse_pid(data: bytes) -> int | None:
    text = data.decode(errors="replace").strip()
    return int(text) if text.isdigit() else None
