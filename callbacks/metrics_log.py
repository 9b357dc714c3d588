"""MetricsLog: metrics.jsonl (one line per epoch) and steps.jsonl (one line every N iterations)."""
from __future__ import annotations

from pathlib import Path

from ignite.engine import Engine, Events
from ignite.engine.events import RemovableEventHandle

from callbacks.files import append_jsonl
from engine.events import EpochEvents, ensure_epoch_events
from engine.records import epoch_record, step_record

__all__ = ["MetricsLog"]


class MetricsLog:
    """Append the run's figures to two JSON-lines files; lines are never rewritten.

    ``metrics_path`` (a run's metrics.jsonl) gets one object per validated epoch (see
    ``engine.records.epoch_record``: epoch, iteration, train_loss, val_loss, val_accuracy, lr, epoch_seconds,
    images_per_second, ...); ``steps_path`` (steps.jsonl) gets the loss, lr, grad norm and loss scale every
    ``every`` iterations. Reading them costs one host sync per line, never one per iteration.

    Events: EpochEvents.VALIDATION_COMPLETED, ITERATION_COMPLETED(every=N). Reads the state fields of
    ``engine.create_trainer``. Writes files only. State: none (the files are the record).

    Args:
        metrics_path: the file of epoch lines (created at the first).
        steps_path: the file of step lines.
        every: iterations between step lines.

    Example:
        >>> import pathlib, tempfile
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> log = MetricsLog(folder / "epochs.jsonl", folder / "iterations.jsonl", every=10)
    """

    def __init__(self, metrics_path: str | Path, steps_path: str | Path, every: int = 10) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, not {every}")
        self.metrics_path = Path(metrics_path)
        self.steps_path = Path(steps_path)
        self.every = every

    def attach(self, engine: Engine) -> list[RemovableEventHandle]:
        """Write lines as ``engine`` trains; returns the handles."""
        ensure_epoch_events(engine)
        return [
            engine.add_event_handler(EpochEvents.VALIDATION_COMPLETED, self.write_epoch),
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.every), self.write_step),
        ]

    def write_epoch(self, engine: Engine) -> None:
        """Append the epoch's record to metrics.jsonl."""
        append_jsonl(self.metrics_path, epoch_record(engine.state))

    def write_step(self, engine: Engine) -> None:
        """Append the current step's figures to steps.jsonl."""
        append_jsonl(self.steps_path, step_record(engine.state))
