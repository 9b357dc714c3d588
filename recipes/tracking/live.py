"""LiveMirror: the run's records go to MLflow while it trains, from a thread, so training never waits for the server."""
from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

from ignite.engine import Engine, Events
from ignite.engine.events import RemovableEventHandle

from engine.events import EpochEvents, ensure_epoch_events
from recipes.tracking.mirror import MlflowUnavailable, RunMirror

__all__ = ["LiveMirror"]


class LiveMirror:
    """Sync ``mirror`` (:class:`RunMirror`) after an epoch's records and, within long epochs, every
    ``every_seconds``, in a background thread; never more often than every ``every_seconds`` (0: after every
    epoch, and not within one).

    A sync that fails (the server is down) prints one line, and training goes on; later syncs send what is
    missing, and say so in one line when the server is back. The final sync, after the report, is the
    caller's (``mirror.sync(final=True)``): :meth:`close` only stops the thread.

    Events: STARTED (a first sync: a resumed run is RUNNING again), EpochEvents.EPOCH_RECORDED,
    ITERATION_COMPLETED (when ``every_seconds`` > 0), COMPLETED. Reads ``state.iteration`` only; the
    records themselves come from the run directory. Writes nothing on the trainer; the console lines go to
    ``stream``. State: none (a resumed run's mirror reads the server again).

    Example::

        live = LiveMirror(RunMirror(run_dir, "http://127.0.0.1:5000"), every_seconds=5)
        live.attach(trainer)
        trainer.run(data, max_epochs=10)
        live.close()
    """

    def __init__(self, mirror: RunMirror, every_seconds: float = 5.0, stream: TextIO | None = None) -> None:
        self.mirror, self.every_seconds, self.stream = mirror, every_seconds, stream
        self._wanted = threading.Event()
        self._closing = False
        self._last = float("-inf")
        self._thread: threading.Thread | None = None

    def attach(self, engine: Engine) -> list[RemovableEventHandle]:
        """Start the thread and listen to ``engine``; returns the handles."""
        ensure_epoch_events(engine)
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="kiln-mlflow", daemon=True)
            self._thread.start()
        handles = [engine.add_event_handler(Events.STARTED, lambda _: self._wanted.set()),  # a resume's status
                   engine.add_event_handler(EpochEvents.EPOCH_RECORDED, self._maybe),
                   engine.add_event_handler(Events.COMPLETED, lambda _: self.close())]
        if self.every_seconds > 0:
            handles.append(engine.add_event_handler(Events.ITERATION_COMPLETED, self._maybe))
        return handles

    def _maybe(self, engine: Engine) -> None:
        if time.monotonic() - self._last >= self.every_seconds:
            self._last = time.monotonic()
            self._wanted.set()

    def _loop(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            if self._closing:
                return
            was_down = self.mirror.down
            try:
                sent = self.mirror.sync()
            except MlflowUnavailable as e:
                if not was_down:
                    self._say(f"{e}; training goes on, and what is not sent is sent when it is back or at the end")
            except Exception as e:  # noqa: BLE001 - a mirror never stops the run (a record being rewritten, ...)
                self._say(f"MLflow mirror: {type(e).__name__}: {e}; retried at the next sync")
            else:
                if was_down:
                    self._say(f"MLflow server at {self.mirror.uri} is back: sent {sent} values it lacked")

    def _say(self, line: str) -> None:
        print(f"kiln: {line}", file=self.stream or sys.stderr, flush=True)

    def close(self) -> None:
        """Stop the thread, letting a sync under way finish (the final sync is the caller's)."""
        if self._thread is None:
            return
        self._closing = True
        self._wanted.set()
        self._thread.join()
        self._thread = None
