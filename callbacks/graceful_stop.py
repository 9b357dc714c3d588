"""GracefulStop: on SIGINT or SIGTERM, finish the current iteration, then stop the run cleanly."""
from __future__ import annotations

import signal
import threading
from typing import Any

from ignite.engine import Engine, Events
from ignite.engine.events import RemovableEventHandle

__all__ = ["GracefulStop"]


class GracefulStop:
    """Turn SIGINT (Ctrl-C) and SIGTERM (schedulers, pre-emption) into ``engine.terminate()``.

    The iteration in progress finishes; ignite then fires TERMINATE and COMPLETED, where the
    checkpointer writes last.pt and the summary records "interrupted". A second SIGINT raises
    ``KeyboardInterrupt`` at once. The previous signal handlers come back when the run ends
    (``restore()``, also called on COMPLETED). Signals can only be caught in the main thread;
    elsewhere this handler does nothing.

    Events: STARTED (installs the handlers), COMPLETED (restores them). Calls ``engine.terminate()``.
    ``received`` is the signal number that stopped the run, or None. State: none (per process).

    Example:
        >>> stop = GracefulStop()
        >>> stop.received is None
        True
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> None:
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._engine: Engine | None = None

    def attach(self, engine: Engine) -> list[RemovableEventHandle]:
        """Catch the signals while ``engine`` runs; returns the handles."""
        return [
            engine.add_event_handler(Events.STARTED, self._install),
            engine.add_event_handler(Events.COMPLETED, lambda _: self.restore()),
        ]

    def _install(self, engine: Engine) -> None:
        self._engine = engine
        self.received = None
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received is None:
            self.received = signum
            if self._engine is not None:
                self._engine.terminate()

    def restore(self) -> None:
        """Put back the signal handlers that were there before the run."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
