"""RunSummary: summary.json, the run's outcome and headline figures."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events
from ignite.engine.events import RemovableEventHandle

from callbacks.files import write_json_atomic
from engine.events import EpochEvents, ensure_epoch_events

__all__ = ["RunSummary", "STATUSES"]

#: "killed" is written by the next kiln process to take the run directory (``recipes.run.lock``) when
#: summary.json still said "running" but no process held the directory: its writer died without a word.
STATUSES = ("running", "completed", "interrupted", "diverged", "failed", "killed")


class RunSummary:
    """Keep a run's summary.json (``path``) current: status, best and final val accuracy, epochs, iterations, time.

    It is written (atomically) when the run starts (status "running"), after every validated epoch,
    and when the engine completes: "completed" when every planned iteration ran, else "interrupted".
    Whoever runs the engine calls :meth:`write` with "failed", "diverged" or "interrupted" when the run
    ends another way.

    Events: STARTED, EpochEvents.VALIDATION_COMPLETED, COMPLETED. Reads ``state.metrics["val_accuracy"]``,
    ``state.epoch``, ``state.iteration``. Writes summary.json only.
    State: best accuracy and wall seconds, kept across resume.

    Args:
        path: the file to keep current (written atomically, its folder must exist).

    Example:
        >>> import pathlib, tempfile
        >>> summary = RunSummary(pathlib.Path(tempfile.mkdtemp()) / "outcome.json")
        >>> summary.best_val_accuracy is None
        True
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.best_val_accuracy: float | None = None
        self.final_val_accuracy: float | None = None
        self.wall_seconds_before = 0.0
        self._started: float | None = None
        self._engine: Engine | None = None

    def attach(self, engine: Engine) -> list[RemovableEventHandle]:
        """Track ``engine``'s run; returns the handles."""
        ensure_epoch_events(engine)
        self._engine = engine
        return [
            engine.add_event_handler(Events.STARTED, self._on_started),
            engine.add_event_handler(EpochEvents.VALIDATION_COMPLETED, self._on_validated),
            engine.add_event_handler(Events.COMPLETED, self._on_completed),
        ]

    def _on_started(self, engine: Engine) -> None:
        self._started = time.perf_counter()
        self.write("running")

    def _on_validated(self, engine: Engine) -> None:
        accuracy = engine.state.metrics.get("val_accuracy")
        if accuracy is not None:
            self.final_val_accuracy = float(accuracy)
            if self.best_val_accuracy is None or accuracy > self.best_val_accuracy:
                self.best_val_accuracy = float(accuracy)
        self.write("running")

    def _on_completed(self, engine: Engine) -> None:
        self.wall_seconds_before, self._started = self.wall_seconds, None  # the clock stops with the run
        s = engine.state
        planned = s.max_epochs * s.epoch_length if s.max_epochs and s.epoch_length else s.iteration
        self.write("completed" if s.iteration >= planned else "interrupted")

    @property
    def wall_seconds(self) -> float:
        """Seconds of training so far, over every process that ran this run."""
        running = time.perf_counter() - self._started if self._started is not None else 0.0
        return self.wall_seconds_before + running

    def write(self, status: str, **extra: Any) -> None:
        """Write summary.json now with ``status`` (one of STATUSES) and any ``extra`` fields."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, not {status!r}")
        s = self._engine.state if self._engine is not None else None
        write_json_atomic(
            self.path,
            {
                "status": status,
                "best_val_accuracy": self.best_val_accuracy,
                "final_val_accuracy": self.final_val_accuracy,
                "epochs_completed": (s.iteration // s.epoch_length) if s and s.epoch_length else 0,
                "iterations": s.iteration if s else 0,
                "wall_seconds": round(self.wall_seconds, 3),
                **extra,
            },
        )

    def state_dict(self) -> dict[str, Any]:
        """Best/final accuracy and wall seconds so far."""
        return {
            "best_val_accuracy": self.best_val_accuracy,
            "final_val_accuracy": self.final_val_accuracy,
            "wall_seconds": self.wall_seconds,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.best_val_accuracy = state.get("best_val_accuracy")
        self.final_val_accuracy = state.get("final_val_accuracy")
        self.wall_seconds_before = float(state.get("wall_seconds", 0.0))
