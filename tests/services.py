"""What the tests' real servers (tests/postgres.py, tests/mlflow_server.py) share: a server that cannot be had is a
skip with the reason, or, where CI installs it (its ``KILN_REQUIRE_...`` variable set), a failure."""
from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from typing import Any, Callable, NoReturn

import pytest

__all__ = ["free_port", "serve", "started_or_skip", "unavailable"]


def free_port() -> int:
    """A loopback port free now (a server that finds it taken meanwhile picks another)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unavailable(what: str, require_env: str, reason: str) -> NoReturn:
    """Skip the test for want of ``what``; fail it instead when ``require_env`` is set (CI installs it)."""
    message = f"no {what} for the tests: {reason}"
    if os.environ.get(require_env):
        pytest.fail(message)
    pytest.skip(message)


def started_or_skip(server: Any, what: str, require_env: str, errors: tuple[type[BaseException], ...]) -> Any:
    """``server.start()``; when it raises one of ``errors``, ``server.stop()`` and :func:`unavailable`."""
    try:
        return server.start()
    except errors as e:
        server.stop()
        unavailable(what, require_env, str(e))


def serve(start: Callable[[], Any]) -> Iterator[Any]:
    """A fixture's body: the started server for the tests, stopped after them."""
    server = start()
    yield server
    server.stop()
