"""Stopping a sweep worker with SIGTERM or Ctrl-C at any moment: one line, exit status 128 + the signal, and
nothing lost that the same command cannot take up again.

A trial's run has its own handlers (``callbacks.GracefulStop``: it saves last.pt and stops); outside a run
(opening the study, waiting for other workers, between trials, drawing the page) :class:`StopSignals`
catches the signal. Where waiting is all the worker does, the signal stops it at once; where it is doing
work that should end cleanly (a trial's report, the study's bookkeeping) the signal is noted and the
worker stops at the next point between trials.

``KILN_SWEEP_HOLD=MOMENT`` (tests only) makes the worker print ``kiln: holding at MOMENT`` on stderr and
wait there for a signal: ``before-trials``, ``between-trials``, ``pruned`` (a trial just pruned, before its
report) or ``page``. Tests stop a sweep at those
moments without guessing at timings.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["QuietFailedTrials", "StopSignals", "SweepInterrupted", "quiet_failed_trials"]


class SweepInterrupted(Exception):
    """SIGTERM or Ctrl-C stopped the worker; ``signum`` says which (the exit status is 128 + it)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


class _Stopped(BaseException):
    """Raised by the handler where the worker only waits (a BaseException: no ``except Exception`` swallows it)."""


class StopSignals:
    """SIGTERM and SIGINT handlers for a sweep worker, installed for the ``with`` block (main thread only).

    ``signum`` is the first signal received (or noted from a trial's run), None before one.
    ``interruptible()`` marks a block where the signal stops the worker at once.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._interruptible = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: object) -> None:
        self.note(signum)
        if self._interruptible:
            self._interruptible = False
            raise _Stopped

    def note(self, signum: int | None) -> None:
        """Record ``signum`` (e.g. the one a trial's run stopped on) unless one came before."""
        if self.signum is None and signum is not None:
            self.signum = signum

    @property
    def name(self) -> str:
        """The signal's name, e.g. SIGTERM."""
        return signal.Signals(self.signum).name if self.signum is not None else "a stop"

    @contextlib.contextmanager
    def interruptible(self, message: str) -> Iterator[None]:
        """A block that a signal ends at once: then :class:`SweepInterrupted` with ``NAME: message``."""
        self.check(message)
        self._interruptible = True
        try:
            yield
        except _Stopped:
            raise SweepInterrupted(f"{self.name}: {message}", self.signum) from None
        finally:
            self._interruptible = False

    def hold(self, moment: str) -> None:
        """Tests only: at ``moment``, if ``KILN_SWEEP_HOLD`` names it, say so on stderr and wait for a signal."""
        if os.environ.get("KILN_SWEEP_HOLD") != moment:
            return
        print(f"kiln: holding at {moment}", file=sys.stderr, flush=True)
        deadline = time.monotonic() + 600
        while self.signum is None and time.monotonic() < deadline:
            time.sleep(0.05)

    def check(self, message: str) -> None:
        """Raise :class:`SweepInterrupted` (``NAME: message``) if a signal came."""
        if self.signum is not None:
            raise SweepInterrupted(f"{self.name}: {message}", self.signum)


class QuietFailedTrials(logging.Filter):
    """Drop Optuna's two lines about a trial that failed with one of ``errors`` (its traceback, then its value):
    the worker says why it stopped in one line of its own."""

    def __init__(self, errors: tuple[type[BaseException], ...]) -> None:
        super().__init__()
        self.errors = errors
        self.trials: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether to keep ``record`` ("Trial N failed ...")."""
        trial = record.getMessage().split(" failed", 1)[0]
        if record.exc_info and isinstance(record.exc_info[1], self.errors):
            self.trials.add(trial)
            return False
        return trial not in self.trials


@contextlib.contextmanager
def quiet_failed_trials(*errors: type[BaseException]) -> Iterator[None]:
    """:class:`QuietFailedTrials` on Optuna's trial log for the block."""
    quiet = QuietFailedTrials(errors)
    logger = logging.getLogger("optuna.study._optimize")
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)
