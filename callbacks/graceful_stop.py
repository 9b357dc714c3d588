"""GracefulStop: on SIGINT or SIGTERM, finish the current iteration, then stop the run cleanly."""
from __future__ import annotations

import signal
import threading
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.engine.events import RemovableEventHandle

from engine.events import EpochEvents, ensure_epoch_events
from engine.events import is_epoch_end

__all__ = ["GracefulStop"]


class GracefulStop:
    """Turn SIGINT (Ctrl-C) and SIGTERM (schedulers, pre-emption) into ``engine.terminate()``.

    The iteration in progress finishes; ignite then fires TERMINATE and COMPLETED, where the
    checkpointer writes last.pt and the summary records "interrupted". When the signal comes during
    an epoch's last iteration or its validation, the stop waits for EpochEvents.EPOCH_RECORDED, so a
    stopped run never skips an epoch's validation and records. The signal handler only records the
    signal: ``terminate()`` is called at ITERATION_COMPLETED or EPOCH_RECORDED alone, because ignite also
    acts on it right after ITERATION_STARTED, where a stop would count an iteration whose step never ran
    (a signal between two iterations did that: the run recorded iteration 23, an epoch's end, with last.pt
    at 20 and no validation). A second SIGINT raises ``KeyboardInterrupt`` at once. The previous signal
    handlers come back when the run ends (``restore()``, also called on COMPLETED). Signals can only be
    caught in the main thread; elsewhere this handler does nothing. Under data parallelism the ranks agree
    every ``agree_every`` iterations and at each epoch's end (one all-reduce of a flag; on a GPU each is a
    collective and a sync, too dear for every step), so that all of them stop after the same iteration,
    at most ``agree_every - 1`` iterations after the signal.

    Events: STARTED (installs the handlers), ITERATION_COMPLETED (stops, or the ranks agree),
    EpochEvents.EPOCH_RECORDED (stops deferred to the epoch's records), COMPLETED (restores them). Calls
    ``engine.terminate()``. ``received`` is the signal number that stopped the run, or None. State: none
    (per process).

    Args:
        signals: the signals that stop the run.
        agree_every: with several processes, iterations between the ranks' agreements on a stop.

    Example:
        >>> stop = GracefulStop()
        >>> stop.received is None
        True
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM), agree_every: int = 10) -> None:
        if agree_every < 1:
            raise ValueError(f"agree_every must be >= 1, not {agree_every}")
        self.signals = signals
        self.agree_every = agree_every
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._pending = False

    def attach(self, engine: Engine) -> list[RemovableEventHandle]:
        """Catch the signals while ``engine`` runs; returns the handles."""
        ensure_epoch_events(engine)
        return [
            engine.add_event_handler(Events.STARTED, self._install),
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._after_iteration),
            engine.add_event_handler(EpochEvents.EPOCH_RECORDED, self._on_epoch_recorded),
            engine.add_event_handler(Events.COMPLETED, lambda _: self.restore()),
        ]

    def _after_iteration(self, engine: Engine) -> None:
        s = engine.state
        if idist.get_world_size() == 1:
            stop = self.received is not None
        else:
            stop = self._agree_across_ranks(s)
        if stop and not (self._pending or engine.should_terminate):
            if is_epoch_end(s):  # the epoch's last iteration: stop once the epoch's records are written
                self._pending = True
            else:
                engine.terminate()

    def _agree_across_ranks(self, s: Any) -> bool:
        # Under data parallelism every rank must stop after the same iteration, or the others would
        # wait forever in the next all-reduce: the ranks agree on "any rank got a signal" at iterations
        # they all know (every agree_every, and the epoch's last: a stop then waits for its records).
        if not (s.iteration % self.agree_every == 0 or is_epoch_end(s)):
            return False
        flag = torch.tensor([self.received or 0], device=idist.device())
        agreed = int(idist.all_reduce(flag, op="MAX").item())
        if agreed:
            self.received = self.received or agreed
        return bool(agreed)

    def _on_epoch_recorded(self, engine: Engine) -> None:
        # one process also stops here for a signal that came during the validation; several wait to agree
        if self._pending or (idist.get_world_size() == 1 and self.received is not None):
            engine.terminate()

    def _install(self, engine: Engine) -> None:
        self.received = None
        self._pending = False
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received is None:
            self.received = signum  # acted on after this iteration (or this epoch's records)

    def restore(self) -> None:
        """Put back the signal handlers that were there before the run."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
