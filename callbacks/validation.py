"""Validation: run the evaluator after each epoch and put its metrics into the trainer's state."""
from __future__ import annotations

from typing import Iterable

from ignite.engine import Engine, Events
from ignite.engine.events import RemovableEventHandle

from engine.events import EpochEvents, ensure_epoch_events

__all__ = ["Validation"]


class Validation:
    """Run ``evaluator`` on ``data`` at the end of every ``every``-th epoch, then fire the epoch events.

    Each evaluator metric ``m`` is copied to ``trainer.state.metrics["val_" + m]``, so an epoch logger
    attached to ``EpochEvents.VALIDATION_COMPLETED`` sees the train and val figures together, whatever
    the order in which the handlers were attached.

    Events: EPOCH_COMPLETED (runs the evaluator); fires EpochEvents.VALIDATION_COMPLETED (validated
    epochs) and then EpochEvents.EPOCH_RECORDED (every epoch).
    Writes ``trainer.state.metrics["val_*"]``. State: none.

    Args:
        evaluator: an engine from ``engine.create_evaluator``.
        data: the validation batches.
        every: validate every this many epochs (the last epoch is always validated).

    Example:
        >>> import torch
        >>> from ignite.metrics import Accuracy
        >>> from engine import create_evaluator
        >>> model = torch.nn.Linear(4, 3)
        >>> data = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
        >>> validation = Validation(create_evaluator(model, {"accuracy": Accuracy()}), data)
    """

    def __init__(self, evaluator: Engine, data: Iterable, every: int = 1) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, not {every}")
        self.evaluator = evaluator
        self.data = data
        self.every = every

    def attach(self, engine: Engine) -> list[RemovableEventHandle]:
        """Validate after ``engine``'s epochs; returns the handles."""
        ensure_epoch_events(engine)
        return [engine.add_event_handler(Events.EPOCH_COMPLETED, self)]

    def __call__(self, engine: Engine) -> None:
        last = engine.state.max_epochs is not None and engine.state.epoch >= engine.state.max_epochs
        if engine.state.epoch % self.every == 0 or last:
            metrics = self.evaluator.run(self.data).metrics
            for name, value in metrics.items():
                engine.state.metrics[f"val_{name}"] = value
            engine.fire_event(EpochEvents.VALIDATION_COMPLETED)
        engine.fire_event(EpochEvents.EPOCH_RECORDED)
