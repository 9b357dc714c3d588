"""Progress: a live progress bar (ignite's ProgressBar, tqdm) and one summary line per epoch."""
from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from ignite.engine import Engine, Events
from ignite.engine.events import RemovableEventHandle
from ignite.handlers import ProgressBar
from tqdm import tqdm

from engine.events import EpochEvents, ensure_epoch_events
from engine.records import epoch_record, to_float

__all__ = ["Progress", "format_epoch_line", "lr_text"]


def format_epoch_line(record: dict[str, Any], max_epochs: int | None) -> str:
    """``epoch  3/10  train_loss 0.5123  val_loss 0.3011  val_accuracy 0.9621  lr 8.12e-03  3.2s``."""
    width = len(str(max_epochs or record["epoch"]))
    parts = [f"epoch {record['epoch']:>{width}}/{max_epochs or '?'}"]
    for key in ("train_loss", "val_loss", "val_accuracy"):
        if record.get(key) is not None:
            parts.append(f"{key} {record[key]:.4f}")
    parts.append(f"lr {record['lr']:.2e}")
    if record.get("loss_scale") is not None:
        parts.append(f"loss_scale {record['loss_scale']:g} skipped {record.get('skipped_steps', 0)}")
    parts.append(f"{record['epoch_seconds']:.1f}s")
    if record.get("images_per_second"):
        parts.append(f"{record['images_per_second']:.0f} img/s")
    return "  ".join(parts)


def lr_text(state: Any) -> str:
    """The LR as the bar and the lines show it: ``3.20e-03``, or each named group's (a fine-tune's
    ``head 3.20e-03 body 3.20e-04``) from ``state.group_lrs``."""
    groups = getattr(state, "group_lrs", None)
    if groups:
        return " ".join(f"{name} {lr:.2e}" for name, lr in groups.items())
    return f"{state.lr:.2e}"


def _is_terminal(stream: Any) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


class Progress:
    """Show training as it happens: a bar on a terminal, plain lines elsewhere, and one line per epoch.

    On a terminal (stderr is a tty): ignite's ProgressBar (tqdm) for each epoch, its postfix holding the
    loss, the LR (each group's, when the optimizer's groups are named: a fine-tune's head and body), images/s
    and ``run_eta`` (the whole run's time left; tqdm's own ETA is the epoch's),
    and, with ``evaluator``, a short bar for each validation. Elsewhere (a log file, a batch job,
    ``nohup``) no bar and no ``\\r``: a plain line every ``line_seconds`` inside an epoch
    (``epoch 2/10  iteration 120/469 (26%)  loss 0.5123  lr 3.20e-03  1830 img/s  epoch ETA 00:45  run
    ETA 07:12``), so a long epoch is never silent. After each validation, one line with the epoch's
    figures (:func:`format_epoch_line`), to ``stream``.

    The loss is read from the device at most every ``refresh_seconds`` (bar) or ``line_seconds``
    (lines), never every iteration. ETAs divide the wall time since the run (or resume) started,
    validation included, by the iterations done since.

    Events: STARTED, EPOCH_STARTED, ITERATION_COMPLETED (bar or lines), EpochEvents.VALIDATION_COMPLETED
    (epoch line); the evaluator's ITERATION_COMPLETED (its bar, on a terminal). Reads ``state.loss``,
    ``state.lr``, ``state.group_lrs``, ``state.epoch_samples_timed`` and the epoch record. Writes to the console only.
    State: none.

    Args:
        quiet: print nothing at all.
        refresh_seconds: the shortest time between two reads of the loss for the bar.
        stream: where epoch and progress lines go (default stdout).
        line_seconds: without a terminal, seconds between progress lines inside an epoch (0: none).
        evaluator: the validation engine, to give it a bar on a terminal.

    Example:
        >>> progress = Progress(quiet=True)
    """

    def __init__(self, quiet: bool = False, refresh_seconds: float = 0.5, stream: TextIO | None = None,
                 line_seconds: float = 30.0, evaluator: Engine | None = None) -> None:
        if line_seconds < 0:
            raise ValueError(f"line_seconds must be >= 0, not {line_seconds}")
        self.quiet = quiet
        self.refresh_seconds = refresh_seconds
        self.stream = stream
        self.line_seconds = line_seconds
        self.evaluator = evaluator
        self._postfix: dict[str, Any] = {}
        self._last_read = 0.0
        self._engine: Engine | None = None
        self._started_at = self._epoch_started_at = self._last_line = 0.0
        self._first_iteration = 0

    def attach(self, engine: Engine) -> list[RemovableEventHandle]:
        """Show ``engine``'s progress; returns the handles."""
        if self.quiet:
            return []
        ensure_epoch_events(engine)
        self._engine = engine
        handles = [engine.add_event_handler(Events.STARTED, self._on_started),
                   engine.add_event_handler(Events.EPOCH_STARTED, self._on_epoch_started)]
        if _is_terminal(sys.stderr):  # tqdm would draw nothing, and ignite's handler still costs ~40 us a step
            handles += _attach_bar(engine, ProgressBar(persist=False, disable=None, file=sys.stderr, dynamic_ncols=True),
                                   output_transform=self._bar_values)
            if self.evaluator is not None:
                handles += _attach_bar(self.evaluator, ProgressBar(persist=False, disable=None, file=sys.stderr,
                                                                   dynamic_ncols=True, desc="validation"))
        elif self.line_seconds:
            handles.append(engine.add_event_handler(Events.ITERATION_COMPLETED, self._maybe_line))
        return [*handles, engine.add_event_handler(EpochEvents.VALIDATION_COMPLETED, self.print_epoch)]

    def _on_started(self, engine: Engine) -> None:
        self._started_at = time.monotonic()
        self._first_iteration = engine.state.iteration  # a resumed run's ETA counts from where it resumed

    def _on_epoch_started(self, engine: Engine) -> None:
        self._epoch_started_at = self._last_line = time.monotonic()

    def _read_values(self, now: float) -> dict[str, Any]:
        """The loss (one host read), LR, images/s and ETAs (seconds) now."""
        s = self._engine.state
        loss = to_float(s.loss)
        done = s.iteration - self._first_iteration
        per_iteration = (now - self._started_at) / done if done > 0 else None
        left_in_epoch = s.epoch_length - ((s.iteration - 1) % s.epoch_length + 1) if s.epoch_length else 0
        left_in_run = (s.max_epochs or s.epoch) * (s.epoch_length or 0) - s.iteration
        epoch_seconds = now - self._epoch_started_at
        samples = getattr(s, "epoch_samples_timed", 0)
        return {"loss": loss if loss is not None else float("nan"), "lr": lr_text(s),
                "img/s": samples / epoch_seconds if epoch_seconds > 0 and samples else None,
                "epoch_eta": per_iteration * left_in_epoch if per_iteration is not None else None,
                "run_eta": per_iteration * left_in_run if per_iteration is not None else None}

    def _bar_values(self, output: Any) -> dict[str, Any]:
        now = time.monotonic()
        if now - self._last_read >= self.refresh_seconds or not self._postfix:
            self._last_read = now
            v = self._read_values(now)
            self._postfix = {"loss": v["loss"], "lr": v["lr"]}
            if v["img/s"] is not None:
                self._postfix["img/s"] = f"{v['img/s']:.0f}"
            if v["run_eta"] is not None:
                self._postfix["run_eta"] = tqdm.format_interval(v["run_eta"])
        return self._postfix

    def _maybe_line(self, engine: Engine) -> None:
        now = time.monotonic()
        if now - self._last_line < self.line_seconds:
            return
        self._last_line = now
        s = engine.state
        position = (s.iteration - 1) % s.epoch_length + 1
        if position == s.epoch_length:
            return  # the epoch's own line follows
        v = self._read_values(now)
        parts = [f"epoch {s.epoch}/{s.max_epochs}", f"iteration {position}/{s.epoch_length} "
                 f"({100 * position // s.epoch_length}%)", f"loss {v['loss']:.4f}", f"lr {v['lr']}"]
        if v["img/s"] is not None:
            parts.append(f"{v['img/s']:.0f} img/s")
        if v["run_eta"] is not None:
            parts += [f"epoch ETA {tqdm.format_interval(v['epoch_eta'])}", f"run ETA {tqdm.format_interval(v['run_eta'])}"]
        print("  ".join(parts), file=self.stream or sys.stdout, flush=True)

    def print_epoch(self, engine: Engine) -> None:
        """Print the epoch's summary line."""
        line = format_epoch_line(epoch_record(engine.state), engine.state.max_epochs)
        tqdm.write(line, file=self.stream or sys.stdout)


def _attach_bar(engine: Engine, bar: ProgressBar, **kwargs: Any) -> list[RemovableEventHandle]:
    """``bar.attach(engine, **kwargs)``, returning handles for what it registered (ignite returns none)."""
    before = {event: list(handlers) for event, handlers in engine._event_handlers.items()}
    bar.attach(engine, **kwargs)
    return [RemovableEventHandle(event, entry[0], engine) for event, handlers in engine._event_handlers.items()
            for entry in handlers if entry not in before.get(event, [])]
