"""A real MLflow tracking server for the tests: ``mlflow server`` on a free loopback port, SQLite as its backend
store and ``--artifacts-destination`` in a temporary folder; stopped (or killed, and started again on the same
port and store, for the outage tests) and removed at the end.

Without the full ``mlflow`` package (``pip install -e '.[mlflow,mlflow-server]'``), :func:`start_or_skip` skips the
test with the reason; with ``KILN_REQUIRE_MLFLOW`` set (CI), it fails instead.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from tests.services import free_port, started_or_skip, unavailable

__all__ = ["HTTP_ENV", "MlflowServer", "start_or_skip"]

#: MLflow's HTTP timeout and retries for every process of the tests: an outage costs seconds, not minutes.
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "3", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0"}


class MlflowServer:
    """One ``mlflow server`` (one worker, no job runner) on ``uri``; :meth:`kill` and :meth:`start` again keep its
    port, database and artifacts."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="kiln-mlflow-"))
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> MlflowServer:
        """Start the server and wait until ``/health`` answers."""
        log = open(self.root / "server.log", "a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, stdout=log, stderr=log,
            start_new_session=True)  # its own process group: uvicorn's worker goes with it
        log.close()
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = (self.root / "server.log").read_text()[-800:]
                self.kill()
                raise RuntimeError(f"mlflow server did not start: {tail}")
            time.sleep(0.1)
        return self

    def healthy(self) -> bool:
        """Whether the server answers ``/health`` now."""
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as reply:
                return reply.status == 200
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL the server and its worker (an outage: nothing is shut down cleanly)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        self.process = None

    def stop(self) -> None:
        """Kill the server and remove its folder."""
        try:
            self.kill()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def start_or_skip() -> MlflowServer:
    """A started server, or a skip (a failure under KILN_REQUIRE_MLFLOW) saying why there is none."""
    try:
        import mlflow.server  # noqa: F401 - the full package: mlflow-skinny has no server
    except ImportError:
        unavailable("MLflow server", "KILN_REQUIRE_MLFLOW",
                    "the mlflow package is not installed (pip install -e '.[mlflow,mlflow-server]')")
    return started_or_skip(MlflowServer(), "MLflow server", "KILN_REQUIRE_MLFLOW", (RuntimeError, OSError))
