"""EarlyStop: end the run when the validation score stops improving (ignite's EarlyStopping, resumable)."""
from __future__ import annotations

import logging
from typing import Any

from ignite.engine import Engine, Events
from ignite.engine.events import RemovableEventHandle
from ignite.handlers import EarlyStopping

from engine.events import EpochEvents, ensure_epoch_events

__all__ = ["EarlyStop"]


class EarlyStop:
    """Stop training after ``patience`` validations in a row without a gain of more than ``min_delta``.

    Wraps ignite's ``EarlyStopping`` (mode "max", absolute threshold ``min_delta``), which calls
    ``trainer.terminate()``; ignite then ends the epoch's events (its records and checkpoint are
    written) and fires COMPLETED. It listens on the trainer's EpochEvents.VALIDATION_COMPLETED, where
    ``state.metrics[score_name]`` is current, instead of ignite's own ``attach`` (on the evaluator,
    with a reset at every STARTED, which would forget the count when a run resumes): here the
    count resets only when a fresh run starts (STARTED at iteration 0). ``stopped_epoch`` is the epoch
    after which it stopped the run (None while it has not): the run assembly reads it to record a
    completed run that stopped early (ignite's own "Stop training" INFO line is silenced).

    Events: STARTED, EpochEvents.VALIDATION_COMPLETED. Reads ``state.metrics[score_name]``,
    ``state.epoch``. Calls ``engine.terminate()``. State: the count of validations without a gain,
    the best score and ``stopped_epoch``, kept across resume.

    Args:
        patience: validations without a gain before it stops the run (>= 1).
        min_delta: the smallest rise of the score that counts as a gain.
        score_name: the trainer metric to watch (higher is better).

    Example:
        >>> stop = EarlyStop(patience=3, min_delta=0.001)
        >>> stop.state_dict()["counter"], stop.stopped_epoch
        (0, None)
    """

    def __init__(self, patience: int, min_delta: float = 0.0, score_name: str = "val_accuracy") -> None:
        if patience < 1:
            raise ValueError(f"patience must be >= 1, not {patience}")
        if min_delta < 0:
            raise ValueError(f"min_delta must be >= 0, not {min_delta}")
        self.patience, self.min_delta, self.score_name = patience, min_delta, score_name
        self.stopped_epoch: int | None = None
        self._stopper: EarlyStopping | None = None  # ignite's needs the trainer: made in attach
        self._state: dict[str, Any] = {"counter": 0, "best_score": None}

    def attach(self, engine: Engine) -> list[RemovableEventHandle]:
        """Watch ``engine``'s validations and stop it; returns the handles."""
        ensure_epoch_events(engine)
        self._stopper = EarlyStopping(self.patience, self._score, engine, threshold=self.min_delta,
                                      threshold_mode="abs", mode="max")
        self._stopper.counter, self._stopper.best_score = self._state["counter"], self._state["best_score"]
        self._stopper.logger.setLevel(logging.WARNING)  # its INFO line goes to stderr; the run reports the stop
        return [engine.add_event_handler(Events.STARTED, self._on_started),
                engine.add_event_handler(EpochEvents.VALIDATION_COMPLETED, self)]

    def _score(self, engine: Engine) -> float:
        return float(engine.state.metrics[self.score_name])

    def _on_started(self, engine: Engine) -> None:
        if engine.state.iteration == 0:  # a fresh run, not a resume
            self._stopper.reset()
            self.stopped_epoch = None

    def __call__(self, engine: Engine) -> None:
        if self.score_name not in engine.state.metrics:
            return
        self._stopper(engine)
        if self._stopper.counter >= self.patience:  # ignite has just called engine.terminate()
            self.stopped_epoch = engine.state.epoch

    def state_dict(self) -> dict[str, Any]:
        """The count without a gain, the best score and ``stopped_epoch`` (weights_only-safe)."""
        if self._stopper is not None:
            counter, best = self._stopper.counter, self._stopper.best_score
        else:
            counter, best = self._state["counter"], self._state["best_score"]
        return {"counter": int(counter), "best_score": None if best is None else float(best),
                "stopped_epoch": self.stopped_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self._state = {"counter": int(state["counter"]), "best_score": state["best_score"]}
        if self._stopper is not None:
            self._stopper.counter, self._stopper.best_score = self._state["counter"], self._state["best_score"]
        self.stopped_epoch = state.get("stopped_epoch")
