"""Progress: a live progress bar (ignite's ProgressBar, tqdm) and one summary line per epoch."""
from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from ignite.engine import Engine
from ignite.engine.events import RemovableEventHandle
from ignite.handlers import ProgressBar
from tqdm import tqdm

from engine.events import EpochEvents, ensure_epoch_events
from engine.records import epoch_record, to_float

__all__ = ["Progress", "format_epoch_line"]


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


def _is_terminal(stream: Any) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


class Progress:
    """Show training as it happens: a tqdm bar with loss and LR, and an epoch line after validation.

    The bar's loss is read from the device at most every ``refresh_seconds`` (not every iteration),
    so the bar costs no host sync per step. The bar is attached only when stderr is a terminal (elsewhere
    tqdm draws nothing, and the bar's handler would still run every step); the epoch lines are always
    printed (to ``stream``) unless ``quiet``.

    Events: ITERATION_COMPLETED (bar), EpochEvents.VALIDATION_COMPLETED (epoch line).
    Reads ``state.loss``, ``state.lr`` and the epoch record. Writes to the console only. State: none.

    Args:
        quiet: print nothing at all.
        refresh_seconds: the shortest time between two reads of the loss for the bar.
        stream: where epoch lines go (default stdout).

    Example:
        >>> progress = Progress(quiet=True)
    """

    def __init__(self, quiet: bool = False, refresh_seconds: float = 0.5, stream: TextIO | None = None) -> None:
        self.quiet = quiet
        self.refresh_seconds = refresh_seconds
        self.stream = stream
        self._postfix: dict[str, float] = {}
        self._last_read = 0.0

    def attach(self, engine: Engine) -> list[RemovableEventHandle]:
        """Show ``engine``'s progress; returns the handles."""
        if self.quiet:
            return []
        ensure_epoch_events(engine)
        handles = []
        if _is_terminal(sys.stderr):  # tqdm would draw nothing, and ignite's handler still costs ~40 us a step
            bar = ProgressBar(persist=False, disable=None, file=sys.stderr, dynamic_ncols=True)
            before = {event: list(handlers) for event, handlers in engine._event_handlers.items()}
            bar.attach(engine, output_transform=self._bar_values)
            # ProgressBar.attach returns no handles: make them for what it registered, so detaching works
            handles = [RemovableEventHandle(event, entry[0], engine) for event, handlers in engine._event_handlers.items()
                       for entry in handlers if entry not in before.get(event, [])]
        return [*handles, engine.add_event_handler(EpochEvents.VALIDATION_COMPLETED, self.print_epoch)]

    def _bar_values(self, output: Any) -> dict[str, float]:
        now = time.monotonic()
        if now - self._last_read >= self.refresh_seconds or not self._postfix:
            self._last_read = now
            loss = to_float(getattr(output, "loss", output))
            self._postfix = {"loss": loss if loss is not None else float("nan")}
        return self._postfix

    def print_epoch(self, engine: Engine) -> None:
        """Print the epoch's summary line."""
        line = format_epoch_line(epoch_record(engine.state), engine.state.max_epochs)
        tqdm.write(line, file=self.stream or sys.stdout)
