"""TensorBoard: scalar logging to tensorboardX event files through ignite's TensorboardLogger."""
from __future__ import annotations

import os
from pathlib import Path

from ignite.engine import Engine, Events
from ignite.engine.events import RemovableEventHandle
from ignite.handlers.tensorboard_logger import TensorboardLogger

from engine.events import EpochEvents, ensure_epoch_events
from engine.records import epoch_record, step_record

__all__ = ["TensorBoard"]


class TensorBoard:
    """Write scalars for TensorBoard under ``log_dir``; every point is at x = the trainer's iteration.

    Tags: ``train/loss``, ``train/lr``, ``train/grad_norm``, ``train/loss_scale`` and
    ``train/step_skipped`` (fp16), every ``every`` iterations; ``epoch/train_loss``, ``val/loss``,
    ``val/accuracy``, ``epoch/images_per_second``, ``epoch/lr`` (and every other scalar of the epoch
    record, e.g. ``epoch/loss_scale``, ``epoch/skipped_steps``) after each validation. With
    ``hparams``, :meth:`close` adds an hparams session (in ``log_dir/hparams``) holding the config and
    the final metrics ``hparam/best_val_accuracy``, ``hparam/final_val_accuracy``,
    ``hparam/final_val_loss``, ``hparam/final_train_loss``. :meth:`log_lr_find` writes an LR range
    test into ``log_dir/lr_find``: ``lr_find/loss``, ``lr_find/smoothed_loss``, ``lr_find/lr`` (x = the
    test's iteration) and ``lr_find/suggested_max_lr``. The writer is tensorboardX (ignite picks it when installed).

    Events: ITERATION_COMPLETED(every=N), EpochEvents.VALIDATION_COMPLETED, COMPLETED (flush).
    Reads the step and epoch records. Writes event files only. State: none (the final metrics for
    hparams are the last ones this process logged).

    Args:
        log_dir: where the event files go (``RUN_DIR/tb``).
        every: iterations between training scalars.
        purge_step: when resuming, the first step this process writes (older points from there on are dropped).
        hparams: ``{"section.key": bool | int | float | str}``, e.g. ``recipes.report.hparams(cfg)``.

    Example:
        >>> import tempfile
        >>> tb = TensorBoard(tempfile.mkdtemp(), every=10)
        >>> tb.close()
    """

    def __init__(self, log_dir: str | Path, every: int = 10, purge_step: int | None = None,
                 hparams: dict[str, bool | int | float | str] | None = None) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, not {every}")
        # purge_step: a resumed run tells TensorBoard to drop points at or after the step it resumes
        # from, written by the stopped process after its last checkpoint.
        kwargs = {"purge_step": purge_step} if purge_step is not None else {}
        # event files are named by the second: the pid keeps a quick resume from overwriting the last one
        self.logger = TensorboardLogger(log_dir=str(log_dir), filename_suffix=f".{os.getpid()}", **kwargs)
        self.log_dir = Path(log_dir)
        self.every = every
        self.hparams = dict(hparams) if hparams else None
        self._final: dict[str, float] = {}
        self._closed = False

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
        for key in ("loss", "lr", "grad_norm", "loss_scale", "step_skipped"):
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
            if key in ("val_accuracy", "val_loss", "train_loss"):
                self._final[f"hparam/final_{key}"] = float(value)
                if key == "val_accuracy":
                    best = self._final.get("hparam/best_val_accuracy", float("-inf"))
                    self._final["hparam/best_val_accuracy"] = max(best, float(value))
        self.logger.writer.flush()

    def log_lr_find(self, lrs: list[float], losses: list[float], smoothed: list[float], suggestion: float) -> None:
        """Write an LR range test's curve (raw and smoothed loss and the LR per test iteration, and the
        suggestion) as its own TensorBoard run, ``log_dir/lr_find``: its x axis is the test's iteration,
        and a resumed run's purge of the training steps never touches it."""
        from tensorboardX import SummaryWriter

        with SummaryWriter(logdir=str(self.log_dir / "lr_find")) as writer:
            for step, (lr, loss, smooth) in enumerate(zip(lrs, losses, smoothed), start=1):
                writer.add_scalar("lr_find/lr", float(lr), step)
                writer.add_scalar("lr_find/loss", float(loss), step)
                writer.add_scalar("lr_find/smoothed_loss", float(smooth), step)
            writer.add_scalar("lr_find/suggested_max_lr", float(suggestion), 0)

    def close(self) -> None:
        """Write the hparams session (if ``hparams`` was given), then flush and close the event files."""
        if self._closed:
            return
        self._closed = True
        if self.hparams is not None:
            self.logger.writer.add_hparams(self.hparams, dict(self._final), name="hparams")
        self.logger.close()
