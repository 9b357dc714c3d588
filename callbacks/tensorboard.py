"""TensorBoard: scalar logging to tensorboardX event files through ignite's TensorboardLogger."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.engine.events import RemovableEventHandle
from ignite.handlers.tensorboard_logger import TensorboardLogger

from callbacks.tensorboard_files import shut_down_on_os_error, write_out
from engine.events import EpochEvents, ensure_epoch_events
from engine.records import epoch_record, step_record

__all__ = ["TensorBoard"]

#: The step record's keys written as ``train/KEY``.
_STEP_KEYS = ("loss", "accuracy", "lr", "grad_norm", "loss_scale", "step_skipped")

# tensorboardX logs "NaN or Inf found in input tensor." for every non-finite scalar: during a divergence
# that is a stream of lines on stderr about what NanGuard already reports (the points are still written)
logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)


class TensorBoard:
    """Write scalars for TensorBoard under ``log_dir``; every point is at x = the trainer's iteration.

    Tags: ``train/loss``, ``train/accuracy`` (of that batch, from the step's outputs), ``train/lr`` (and with
    named param groups ``train/lr_head``, ``train/lr_body``),
    ``train/grad_norm``, ``train/loss_scale`` and ``train/step_skipped`` (fp16), every ``every`` iterations; ``epoch/train_loss``, ``val/loss``,
    ``val/accuracy``, ``epoch/images_per_second``, ``epoch/lr`` (and every other scalar of the epoch
    record, e.g. ``epoch/loss_scale``, ``epoch/skipped_steps``) and the image ``val/confusion_matrix``
    (when the evaluator measures ``confusion_matrix``) after each validation. With
    ``hparams``, :meth:`close` adds an hparams session (in ``log_dir/hparams``) holding the config and
    the final metrics ``hparam/best_val_accuracy``, ``hparam/final_val_accuracy``,
    ``hparam/final_val_loss``, ``hparam/final_train_loss``. :meth:`log_lr_find` writes an LR range
    test into ``log_dir/lr_find``: ``lr_find/loss``, ``lr_find/smoothed_loss``, ``lr_find/lr`` (x = the
    test's iteration) and ``lr_find/suggested_max_lr``. The writer is tensorboardX (ignite picks it when installed).

    Events: ITERATION_COMPLETED(every=N) (flushed every ``flush_seconds``), EpochEvents.VALIDATION_COMPLETED,
    EpochEvents.CHECKPOINT_STARTED and COMPLETED (these flush).
    Reads the step and epoch records. Writes event files only. State: none (the final metrics for
    hparams are the last ones this process logged).

    Args:
        log_dir: where the event files go (``RUN_DIR/tb``).
        every: iterations between training scalars.
        purge_step: when resuming, the first step this process writes (older points from there on are dropped).
        flush_seconds: the longest time training points wait in memory before they are flushed to the
            event file (each flush fsyncs); every validation, every checkpoint (before it is written) and
            the run's end flush too. So a killed run (SIGKILL, power) loses only points after its last
            checkpoint, which a resume writes again; a stopped one (SIGINT, SIGTERM) loses none.
        hparams: ``{"section.key": bool | int | float | str}``, e.g. ``recipes.report.hparams(cfg)``.
        config_text: the resolved config (e.g. its YAML), shown in TensorBoard's Text tab as ``config``
            (written when a run starts from iteration 0).

    Example:
        >>> import tempfile
        >>> tb = TensorBoard(tempfile.mkdtemp(), every=10)
        >>> tb.close()
    """

    def __init__(self, log_dir: str | Path, every: int = 10, purge_step: int | None = None,
                 hparams: dict[str, bool | int | float | str] | None = None, flush_seconds: float = 5.0,
                 config_text: str | None = None) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, not {every}")
        if flush_seconds < 0:
            raise ValueError(f"flush_seconds must be >= 0, not {flush_seconds}")
        self.flush_seconds = flush_seconds
        self._logged_at = -1
        self._flushed_at = time.monotonic()
        # purge_step: a resumed run tells TensorBoard to drop points at or after the step it resumes
        # from, written by the stopped process after its last checkpoint.
        kwargs = {"purge_step": purge_step} if purge_step is not None else {}
        # event files are named by the second: the pid keeps a quick resume from overwriting the last one
        self.logger = TensorboardLogger(log_dir=str(log_dir), filename_suffix=f".{os.getpid()}", **kwargs)
        self.log_dir = Path(log_dir)
        self.every = every
        self.hparams = dict(hparams) if hparams else None
        self.config_text = config_text
        self._final: dict[str, float] = {}
        self._closed = False

    def attach(self, engine: Engine) -> list[RemovableEventHandle]:
        """Log ``engine``'s scalars; returns the handles."""
        ensure_epoch_events(engine)
        return [
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.every), self.log_step),
            engine.add_event_handler(EpochEvents.VALIDATION_COMPLETED, self.log_epoch),
            engine.add_event_handler(EpochEvents.CHECKPOINT_STARTED, self._before_checkpoint),
            engine.add_event_handler(Events.COMPLETED, lambda _: self._flush()),
            engine.add_event_handler(Events.STARTED, self._write_config),
        ]

    def _write_config(self, engine: Engine) -> None:
        if self.config_text and engine.state.iteration == 0:  # markdown: an indented block keeps the layout
            text = "\n".join("    " + line for line in self.config_text.splitlines())
            self.logger.writer.add_text("config", text, 0)

    def _before_checkpoint(self, engine: Engine) -> None:
        """Flush every point up to this iteration's (written first if due: the checkpoint may come first)."""
        if engine.state.iteration % self.every == 0:
            self.log_step(engine)
        self._flush()

    def log_step(self, engine: Engine) -> None:
        """Write the current step's loss, lr, grad norm and loss scale (once per iteration)."""
        if self._logged_at == engine.state.iteration:
            return
        self._logged_at = engine.state.iteration
        record = step_record(engine.state)
        keys = [*_STEP_KEYS, *(key for key in record if key.startswith("lr_"))]  # lr_head, lr_body: per group
        self._add_scalars({f"train/{key}": record[key] for key in keys if record.get(key) is not None},
                          engine.state.iteration)
        # tensorboardX's own flush comes every 2 minutes; each flush fsyncs (hundreds of us, far more on a
        # network disk), so not at every point either: every flush_seconds, and after each validation
        now = time.monotonic()
        if now - self._flushed_at >= self.flush_seconds:
            self._flush()

    def log_epoch(self, engine: Engine) -> None:
        """Write the epoch's figures (train loss, val metrics, throughput, lr), and the validation's
        confusion matrix as an image when the evaluator measured one (``val_confusion_matrix``)."""
        matrix = engine.state.metrics.get("val_confusion_matrix")
        if isinstance(matrix, torch.Tensor) and matrix.dim() == 2:
            self.logger.writer.add_image("val/confusion_matrix", confusion_image(matrix), engine.state.iteration,
                                         dataformats="HWC")
        scalars = {}
        for key, value in epoch_record(engine.state).items():
            if value is None or key in ("epoch", "iteration", "epoch_seconds"):
                continue
            scalars["val/" + key[4:] if key.startswith("val_") else "epoch/" + key] = value
            if key in ("val_accuracy", "val_loss", "train_loss"):
                self._final[f"hparam/final_{key}"] = float(value)
                if key == "val_accuracy":
                    best = self._final.get("hparam/best_val_accuracy", float("-inf"))
                    self._final["hparam/best_val_accuracy"] = max(best, float(value))
        self._add_scalars(scalars, engine.state.iteration)
        self._flush()

    def _add_scalars(self, scalars: dict[str, Any], step: int) -> None:
        """Write ``scalars`` (tag -> number) at ``step`` as one event. tensorboardX's ``add_scalar`` makes an
        event per scalar and queues each to its writer thread (~130 us each on a CPU, the queue's lock taken
        every time); one summary of several values is one event, and TensorBoard reads each value as its tag."""
        from tensorboardX.proto.summary_pb2 import Summary

        summary = Summary(value=[Summary.Value(tag=tag, simple_value=float(value)) for tag, value in scalars.items()])
        if summary.value and not self._closed:  # after close() (or a failed flush) nothing more is written
            self.logger.writer.file_writer.add_summary(summary, step)

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
        """Write the hparams session (if ``hparams`` was given), then flush and close the event files.

        Raises:
            OSError: the event files could not be written (a full or read-only disk), naming ``log_dir``;
                the writers are shut down all the same (see :meth:`_flush`).
        """
        if self._closed:
            return
        self._closed = True
        with shut_down_on_os_error(self.logger.writer, self.log_dir):
            if self.hparams is not None:
                self._write_hparams()
            self.logger.close()

    def _flush(self) -> None:
        """Flush the event files now. tensorboardX writes them from a thread of its own and raises a
        failed write (ENOSPC) here, in the caller's thread; the writer is then shut down (nothing more is
        written, and no traceback comes later from its thread or its exit hook) and the OSError names
        ``log_dir``."""
        try:
            with shut_down_on_os_error(self.logger.writer, self.log_dir):
                for file_writer in list((self.logger.writer.all_writers or {}).values()):
                    write_out(file_writer)
            self._flushed_at = time.monotonic()
        except OSError:
            self._closed = True  # nothing more is written, not even by close()
            raise

    def _write_hparams(self) -> None:
        """The hparams session in ``log_dir/hparams``: what tensorboardX's ``add_hparams`` writes, through a
        writer of our own so that a failed write can shut it down too."""
        from tensorboardX import SummaryWriter
        from tensorboardX.summary import hparams as hparams_summaries

        writer = SummaryWriter(logdir=str(self.log_dir / "hparams"))
        with shut_down_on_os_error(writer, self.log_dir / "hparams"):
            for summary in hparams_summaries(self.hparams, dict(self._final)):
                writer.file_writer.add_summary(summary)
            for key, value in self._final.items():
                writer.add_scalar(key, value)
            writer.close()


def confusion_image(matrix: torch.Tensor, cell: int = 12) -> np.ndarray:
    """A confusion matrix (rows: true class, columns: predicted) as an RGB image, each row normalised to
    its class's share, white (0) to dark blue (1), ``cell`` pixels a class: what TensorBoard's Images tab shows.

    Example:
        >>> confusion_image(torch.tensor([[3, 1], [0, 4]]), cell=2).shape
        (4, 4, 3)
    """
    counts = matrix.detach().double().cpu()
    shares = (counts / counts.sum(1, keepdim=True).clamp(min=1)).numpy()
    white, blue = np.array([255.0, 255.0, 255.0]), np.array([8.0, 48.0, 107.0])
    image = (white + shares[..., None] * (blue - white)).round().astype(np.uint8)
    return image.repeat(cell, axis=0).repeat(cell, axis=1)
