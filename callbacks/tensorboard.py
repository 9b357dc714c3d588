"""TensorBoard: scalar logging to tensorboardX event files through ignite's TensorboardLogger."""
from __future__ import annotations

from pathlib import Path
from ignite.engine import Engine, Events
from ignite.engine.events import RemovableEventHandle
from ignite.handlers.tensorboard_logger import TensorboardLogger

from engine.events import EpochEvents, ensure_epoch_events
from engine.records import epoch_record, step_record

__all__ = ["TensorBoard"]


class TensorBoard:
    """Write scalars for TensorBoard under ``log_dir``; every point is at x = the trainer's iteration.

    Tags: ``train/loss``, ``train/lr``, ``train/grad_norm``, ``train/loss_scale`` (fp16), every
    ``every`` iterations; ``epoch/train_loss``, ``val/loss``, ``val/accuracy``,
    ``epoch/images_per_second``, ``epoch/lr`` after each validation. The writer is tensorboardX
    (ignite picks it when installed).

    Events: ITERATION_COMPLETED(every=N), EpochEvents.VALIDATION_COMPLETED, COMPLETED (flush).
    Reads the step and epoch records. Writes event files only. State: none.

    Args:
        log_dir: where the event files go (``RUN_DIR/tb``).
        every: iterations between training scalars.
        purge_step: when resuming, the first step this process writes (older points from there on are dropped).

    Example:
        >>> import tempfile
        >>> tb = TensorBoard(tempfile.mkdtemp(), every=10)
        >>> tb.close()
    """

    def __init__(self, log_dir: str | Path, every: int = 10, purge_step: int | None = None) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, not {every}")
        # purge_step: a resumed run tells TensorBoard to drop points at or after the step it resumes
        # from, written by the stopped process after its last checkpoint.
        kwargs = {"purge_step": purge_step} if purge_step is not None else {}
        self.logger = TensorboardLogger(log_dir=str(log_dir), **kwargs)
        self.every = every

    def attach(self, engine: Engine) -> list[RemovableEventHandle]:
        """Log ``engine``'s scalars; returns the handles."""
        ensure_epoch_events(engine)
        return [
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.every), self.log_step),
            engine.add_event_handler(EpochEvents.VALIDATION_COMPLETED, self.log_epoch),
            engine.add_event_handler(Events.COMPLETED, lambda _: self.logger.writer.flush()),
        ]

    def log_step(self, engine: Engine) -> None:
        """Write the current step's loss, lr, grad norm and loss scale."""
        record = step_record(engine.state)
        for key in ("loss", "lr", "grad_norm", "loss_scale"):
            if record.get(key) is not None:
                self.logger.writer.add_scalar(f"train/{key}", float(record[key]), engine.state.iteration)
        # to the OS now, not in 2 minutes: a killed run must keep every point up to its checkpoint
        self.logger.writer.flush()

    def log_epoch(self, engine: Engine) -> None:
        """Write the epoch's figures (train loss, val metrics, throughput, lr)."""
        for key, value in epoch_record(engine.state).items():
            if value is None or key in ("epoch", "iteration", "epoch_seconds"):
                continue
            tag = "val/" + key[4:] if key.startswith("val_") else "epoch/" + key
            self.logger.writer.add_scalar(tag, float(value), engine.state.iteration)
        self.logger.writer.flush()

    def close(self) -> None:
        """Flush and close the event files."""
        self.logger.close()
