"""A real PostgreSQL server for the tests: ``initdb`` + ``pg_ctl`` into a temporary directory, on a free
loopback port, password authentication over TCP, stopped and removed at the end.

As root, the server runs as the ``postgres`` user (PostgreSQL refuses to run as root), through
``runuser``. The binaries come from Debian's ``postgresql`` package (``/usr/lib/postgresql/N/bin``) or the
PATH. Without them, or without psycopg, :func:`start_or_skip` skips the test with the reason; with
``KILN_REQUIRE_POSTGRES`` set (CI), it fails instead.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import NoReturn

from tests.services import free_port, started_or_skip, unavailable

__all__ = ["PostgresServer", "start_or_skip"]

PASSWORD = "kiln-test-password"


def _bin_dir() -> Path | None:
    """The newest installed PostgreSQL's bin folder (Debian's layout first, then the PATH)."""
    def version(path: str) -> tuple[int, ...]:
        return tuple(int(part) for part in Path(path).parts[4].split(".") if part.isdigit())

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=version)
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("pg_ctl")
    return Path(on_path).parent if on_path else None


class PostgresServer:
    """One PostgreSQL server in a temporary directory; :meth:`database` makes a fresh database and
    returns its URL (``postgresql://postgres:PASSWORD@127.0.0.1:PORT/NAME``, psycopg 3)."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="kiln-postgres-"))
        self.data = self.root / "data"
        self._as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # they refuse root

    def _run(self, *args: str, timeout: float = 120) -> None:
        done = subprocess.run([*self._as_postgres, *args], capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{Path(args[0]).name} failed: {(done.stderr or done.stdout).strip()[-800:]}")

    def start(self, attempts: int = 3) -> PostgresServer:
        """initdb (scram-sha-256 over TCP, trust on the socket) and start, waiting until it accepts
        connections; on another free port if the chosen one was taken meanwhile."""
        pwfile = self.root / "pwfile"
        pwfile.write_text(PASSWORD + "\n")
        if self._as_postgres:
            self.root.chmod(0o755)
            shutil.chown(self.root, "postgres", "postgres")  # LookupError without a postgres user
            shutil.chown(pwfile, "postgres", "postgres")
        self._run(str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", "postgres", f"--pwfile={pwfile}",
                  "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8", "--no-sync")
        for attempt in range(attempts):
            options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
            try:
                self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"),
                          "-w", "-t", "60", "-o", options, "start")
                return self
            except RuntimeError:
                self._stop_server()
                if attempt == attempts - 1:
                    raise
                self.port = free_port()
        return self

    def url(self, database: str, password: str = PASSWORD, user: str = "postgres") -> str:
        """The SQLAlchemy URL of ``database`` on this server."""
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{database}"

    def database(self, name: str) -> str:
        """Create the (empty) database ``name`` and return its URL."""
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", password=PASSWORD,
                             dbname="postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def _stop_server(self) -> None:
        """Stop a postmaster that runs (or may: a start that timed out) in the data directory."""
        if (self.data / "postmaster.pid").exists():
            try:
                self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
            except RuntimeError:
                pass

    def stop(self) -> None:
        """Stop the server (fast shutdown) and remove its directory."""
        try:
            self._stop_server()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def _unavailable(reason: str) -> NoReturn:
    unavailable("PostgreSQL server", "KILN_REQUIRE_POSTGRES", reason)  # CI installs PostgreSQL


def start_or_skip() -> PostgresServer:
    """A started server, or a skip (a failure under KILN_REQUIRE_POSTGRES) saying why there is none."""
    try:
        import psycopg  # noqa: F401 - kiln's postgres extra
    except ImportError:
        _unavailable("psycopg is not installed (pip install -e '.[postgres]')")
    bin_dir = _bin_dir()
    if bin_dir is None:
        _unavailable("no pg_ctl (apt-get install postgresql)")
    return started_or_skip(PostgresServer(bin_dir), "PostgreSQL server", "KILN_REQUIRE_POSTGRES",
                           (RuntimeError, OSError, subprocess.TimeoutExpired, LookupError))
