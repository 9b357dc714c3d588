"""A warm process that forks ``python -m recipes.cli ARGS`` processes for the tests, without their imports.

A kiln process spends ~2.4 s (on a 2-core machine) importing torch, ignite, torch._dynamo and the wings
before it reads its first argument; a 2-epoch digits run takes ~1 s after that. The suite starts ~250 of
them, so imports were the suite's largest cost. This module keeps one server per pytest process (per
pytest-xdist worker) that has imported all of that once, and forks it for each command a test runs.

A forked command is still a real process of its own, as the tests need: its own pid (signals, kill -9, the
run-directory lock), its own stdin/stdout/stderr (the test's pipes, passed over a Unix socket), its working
directory, environment and argv, and its exit status, which :class:`ForkedKiln` (a ``subprocess.Popen``)
reports as Popen does. It runs the same ``recipes/cli/__main__.py`` as ``python -m recipes.cli``, through
``runpy``, so ``sys.argv`` (which config.json records) is the same too. Only the imports are shared, done
once as :func:`recipes.cli.entry.main` does them (the collector off, then frozen).

What it cannot reproduce, :func:`forkable` sends to a fresh process instead: an environment other than the
suite's (the threads and allocator settings are read at import; ``RUN_TIME_ENV`` aside), ``preexec_fn`` and
other Popen options, and ``--nproc-per-node`` (its ranks are spawned fresh anyway). ``KILN_TESTS_SPAWN=1`` sends every
command to a fresh process, to compare or to rule this module out.

Run as ``python -m tests.forkserver LISTENER_FD CONTROL_FD`` by :class:`ForkServer`, never by hand.
"""
from __future__ import annotations

import gc
import json
import os
import selectors
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["ForkServer", "ForkedKiln", "forkable"]

#: What a kiln command imports before and while it trains, evaluates, reports or draws.
PRELOAD = ("recipes.cli.commands", "recipes.cli.jobs", "torch._dynamo", "tensorboardX", "PIL.Image",
           "matplotlib.figure", "matplotlib.ticker", "matplotlib.image", "matplotlib.backends.backend_agg")
#: Popen options a forked command honours; any other sends the command to a fresh process.
FORKABLE_OPTIONS = frozenset({"cwd", "stdin", "stdout", "stderr", "text", "umask"})
_MESSAGE = 1 << 20


#: Environment variables kiln reads only when a command runs (never at import): a forked command may differ
#: from the suite's environment in these.
RUN_TIME_ENV = frozenset({"KILN_SWEEP_HOLD", "KILN_MLFLOW_URI", "MLFLOW_HTTP_REQUEST_TIMEOUT",
                          "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"})


def forkable(args: list[str], env: dict | None, suite_env: dict, options: dict) -> bool:
    """Whether the command ``kiln ARGS`` run with ``env`` and Popen ``options`` can be forked from the server."""
    differs = set() if env is None else {k for k in env.keys() | suite_env.keys() if env.get(k) != suite_env.get(k)}
    return (os.environ.get("KILN_TESTS_SPAWN", "") != "1" and differs <= RUN_TIME_ENV
            and set(options) <= FORKABLE_OPTIONS and "--nproc-per-node" not in args)


class ForkServer:
    """The client side: starts the server on first use, with ``env``, and asks it for processes."""

    def __init__(self, env: dict, cwd: Path) -> None:
        self.env, self.cwd = env, cwd
        self.address = f"\0kiln-tests-forkserver-{os.getpid()}"
        self.process: subprocess.Popen | None = None
        self.log = Path(tempfile.gettempdir()) / f"kiln-tests-forkserver-{os.getpid()}.log"

    def _start(self) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        listener.bind(self.address)
        listener.listen(64)
        control_read, self._control = os.pipe()  # the server ends when this process does (EOF)
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.forkserver", str(listener.fileno()), str(control_read)],
                cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                pass_fds=(listener.fileno(), control_read))
        listener.close()  # the server holds the only copy: if it dies, a connect is refused instead of hanging
        os.close(control_read)

    def connect(self, args: list[str], cwd: str | Path, env: dict, umask: int,
                fds: tuple[int, int, int]) -> tuple[socket.socket, int]:
        """Ask for a process running ``kiln ARGS`` with these stdin/stdout/stderr (and ``umask`` unless it is
        -1): its channel and its pid."""
        if self.process is None:
            self._start()
        channel = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            channel.connect(self.address)
            request = json.dumps({"args": args, "cwd": os.path.abspath(cwd), "env": env, "umask": umask}).encode()
            socket.send_fds(channel, [request], list(fds))
            reply = channel.recv(_MESSAGE).decode()
        except OSError as e:
            channel.close()
            raise ConnectionError(f"the tests' fork server is gone ({e}); its log: {self.log}") from e
        if not reply.startswith("pid "):
            channel.close()
            raise ConnectionError(f"the tests' fork server did not start the command: {reply or 'no reply'}; "
                                  f"its log: {self.log}")
        return channel, int(reply[4:])


class ForkedKiln(subprocess.Popen):
    """``subprocess.Popen`` of ``python -m recipes.cli ARGS``, forked by a :class:`ForkServer`: the same
    attributes and methods (``pid``, pipes, ``poll``, ``wait``, ``communicate``, ``send_signal``), with the
    exit status coming from the server, the process's parent, instead of ``waitpid``."""

    def __init__(self, server: ForkServer, args: list[str], **options) -> None:
        self._server = server
        self._channel: socket.socket | None = None
        super().__init__(args, **options)

    def _execute_child(self, args, executable, preexec_fn, close_fds, pass_fds, cwd, env, startupinfo,
                       creationflags, shell, p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite,
                       restore_signals, gid, gids, uid, umask, *unused):
        fds = (p2cread if p2cread != -1 else 0, c2pwrite if c2pwrite != -1 else 1, errwrite if errwrite != -1 else 2)
        self._channel, self.pid = self._server.connect(list(args[3:]), cwd or os.getcwd(),
                                                       dict(os.environ) if env is None else env, umask, fds)
        self._child_created = True
        self._close_pipe_fds(p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite)

    def _status(self, block: bool) -> int | None:
        """The process's wait status once it has ended, else None (``block``: wait for it)."""
        try:
            message = self._channel.recv(_MESSAGE, 0 if block else socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        if not message.startswith(b"status "):
            raise ConnectionError(f"the tests' fork server is gone; its log: {self._server.log}")
        self._channel.close()
        return int(message[7:])

    def _try_wait(self, wait_flags):
        status = self._status(block=not wait_flags & os.WNOHANG)
        return (0, 0) if status is None else (self.pid, status)

    def _internal_poll(self, _deadstate=None, **unused):
        if self.returncode is None and self._waitpid_lock.acquire(False):
            try:
                if self.returncode is None:
                    status = self._status(block=False)
                    if status is not None:
                        self._handle_exitstatus(status)
            except OSError:
                if _deadstate is not None:
                    self.returncode = _deadstate
            finally:
                self._waitpid_lock.release()
        return self.returncode


def _serve(listener: socket.socket, control: int) -> dict | None:
    """Fork a process per request until the pytest process ends (then None). Returns the request in the
    forked process, with everything of the server's closed there."""
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "request")
    selector.register(control, selectors.EVENT_READ, "control")
    running: dict[int, tuple[int, socket.socket]] = {}  # pidfd -> (pid, channel)
    while True:
        for key, _ in selector.select():
            if key.data == "control" and not os.read(control, 1):
                return None
            if key.data == "request":
                channel, _ = listener.accept()
                message, fds, _, _ = socket.recv_fds(channel, _MESSAGE, 3)
                pid = os.fork()
                if pid == 0:
                    selector.close()
                    listener.close()
                    os.close(control)
                    for pidfd, (_, other) in running.items():
                        os.close(pidfd)
                        other.close()
                    channel.close()
                    return {**json.loads(message), "fds": fds}
                for fd in fds:
                    os.close(fd)
                channel.send(f"pid {pid}".encode())
                pidfd = os.pidfd_open(pid)
                running[pidfd] = (pid, channel)
                selector.register(pidfd, selectors.EVENT_READ, "ended")
            if key.data == "ended":
                pid, channel = running.pop(key.fd)
                selector.unregister(key.fd)
                os.close(key.fd)
                _, status = os.waitpid(pid, 0)
                try:
                    channel.send(f"status {status}".encode())
                except OSError:
                    pass  # the test let go of the process without waiting for it
                channel.close()


def _run(request: dict) -> None:
    """In the forked process: become ``python -m recipes.cli ARGS`` as the request describes, and run it."""
    import runpy

    for target, fd in enumerate(request["fds"]):
        os.dup2(fd, target)
    for fd in set(request["fds"]):
        os.close(fd)
    os.chdir(request["cwd"])
    if request["umask"] != -1:
        os.umask(request["umask"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.path[0] = request["cwd"]  # as ``python -m`` sets it
    sys.argv[1:] = request["args"]
    runpy.run_module("recipes.cli", run_name="__main__", alter_sys=True)


def _main(listener_fd: int, control: int) -> None:
    import importlib

    gc.disable()  # as recipes.cli.entry.main imports
    for name in PRELOAD:
        importlib.import_module(name)
    gc.freeze()
    gc.enable()
    with socket.socket(fileno=listener_fd) as listener:
        request = _serve(listener, control)
    if request is not None:
        _run(request)


if __name__ == "__main__":
    _main(int(sys.argv[1]), int(sys.argv[2]))
