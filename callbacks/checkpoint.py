"""Checkpointer: last.pt (everything a run needs to continue) and the best-k by val accuracy, written atomically."""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events
from ignite.engine.events import RemovableEventHandle
from ignite.handlers import Checkpoint

from callbacks.atomic_saver import AtomicDiskSaver, NonFiniteCheckpointError
from callbacks.files import append_jsonl
from engine.events import EpochEvents, ensure_epoch_events
from engine.events import is_epoch_end

__all__ = ["Checkpointer"]

log = logging.getLogger("kiln")


class Checkpointer:
    """Write ``checkpoints/last.pt`` and ``checkpoints/best-*.pt`` through ignite's ``Checkpoint``.

    last.pt holds ``to_save`` (every object's ``state_dict()``: model, optimizer, schedule, scaler,
    trainer counters, RNG states, the config, ...) plus this handler's own state under
    "checkpointer", and is written at the end of each epoch (on
    EpochEvents.EPOCH_RECORDED, after the epoch's records), every ``every_iterations`` iterations
    and every ``every_minutes`` minutes (on ITERATION_COMPLETED, never on an epoch's last iteration),
    and when the run ends or is stopped (COMPLETED; unless it stopped between an epoch's last
    iteration and that epoch's records, where the older last.pt is kept so a resume replays it; a run
    NanGuard stopped as diverged always writes it, with the sound state NanGuard restored). The best
    ``keep_best`` checkpoints by ``state.metrics[score_name]`` hold ``best_to_save`` and are rotated
    after each validation. Every write is atomic (:class:`AtomicDiskSaver`); a state with NaN/Inf is
    never written; a failed write (a full disk) raises the OSError naming the file, and the previous
    file stays as it was.

    Events: ITERATION_COMPLETED, EpochEvents.EPOCH_RECORDED, COMPLETED; fires EpochEvents.CHECKPOINT_STARTED
    before each write (buffering loggers flush there). Reads ``state.iteration``,
    ``state.epoch_length``, ``state.metrics``, ``state.diverged`` (NanGuard's). Writes files, and a
    "checkpoint" line per save to ``events_path``. State: which best files exist (``state_dict``), kept across resume.

    Args:
        dirname: the checkpoint folder (``RUN_DIR/checkpoints``).
        to_save: name -> object with ``state_dict()`` for last.pt.
        best_to_save: name -> object for best-*.pt (default: ``to_save``).
        every_iterations: also save every N iterations (0: off).
        every_minutes: also save when this many minutes passed since the last save (0: off).
        keep_best: how many best checkpoints to keep (0: none).
        score_name: the metric that ranks them (higher is better).
        events_path: events.jsonl to append a line to per save (None: no lines).

    Example:
        >>> import tempfile, torch
        >>> model = torch.nn.Linear(2, 2)
        >>> checkpointer = Checkpointer(tempfile.mkdtemp(), {"model": model}, every_iterations=100)
    """

    #: The file the run continues from, in ``dirname`` (recipes.run.rundir.RunDir.last names it by this).
    LAST_NAME = "last.pt"

    def __init__(self, dirname: str | Path, to_save: Mapping[str, Any], *, best_to_save: Mapping[str, Any] | None = None,
                 every_iterations: int = 0, every_minutes: float = 5.0, keep_best: int = 1,
                 score_name: str = "val_accuracy", events_path: str | Path | None = None) -> None:
        if every_iterations < 0 or every_minutes < 0 or keep_best < 0:
            raise ValueError("every_iterations, every_minutes and keep_best must be >= 0")
        self.dirname = Path(dirname)
        self.every_iterations = every_iterations
        self.every_seconds = every_minutes * 60.0
        self.events_path = Path(events_path) if events_path else None
        self.score_name = score_name
        self.last = Checkpoint({**to_save, "checkpointer": self}, AtomicDiskSaver(self.dirname),
                               filename_pattern=self.LAST_NAME, n_saved=1,
                               greater_or_equal=True, global_step_transform=lambda e, _: e.state.iteration)
        self.best = None
        if keep_best:
            self.best = Checkpoint(
                dict(best_to_save or to_save), AtomicDiskSaver(self.dirname), filename_prefix="best",
                score_function=self._score, score_name=score_name, n_saved=keep_best,
                global_step_transform=lambda e, _: e.state.epoch,
                filename_pattern="{filename_prefix}-epoch{global_step}-{score_name}={score}.{ext}",
            )
        self._last_save = time.monotonic()
        self._recorded_iteration = -1

    @property
    def last_path(self) -> Path:
        """Where last.pt is."""
        return self.dirname / self.LAST_NAME

    def _score(self, engine: Engine) -> float:
        return float(engine.state.metrics.get(self.score_name, float("-inf")))

    def attach(self, engine: Engine) -> list[RemovableEventHandle]:
        """Save ``engine``'s run as it goes; returns the handles."""
        ensure_epoch_events(engine)
        return [
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._on_iteration),
            engine.add_event_handler(EpochEvents.EPOCH_RECORDED, self._on_epoch),
            engine.add_event_handler(Events.COMPLETED, self._on_completed),
        ]

    def _on_completed(self, engine: Engine) -> None:
        s = engine.state
        stopped_early = bool(s.max_epochs and s.epoch_length) and s.iteration < s.max_epochs * s.epoch_length
        diverged = getattr(s, "diverged", None) is not None  # NanGuard restored the last sound state: keep that
        if stopped_early and is_epoch_end(s) and self._recorded_iteration != s.iteration and not diverged:
            # stopped after an epoch's last iteration but before its validation and records: keep the
            # older last.pt, so a resume replays that iteration and writes the epoch's records
            return
        self.save_last(engine)

    def _on_iteration(self, engine: Engine) -> None:
        s = engine.state
        if is_epoch_end(s):
            return  # the epoch-end save follows, after the epoch's records
        if getattr(s, "accumulating", False):
            return  # accumulated gradients are not saved: wait for the optimizer step
        due = self.every_iterations and s.iteration % self.every_iterations == 0
        if due or (self.every_seconds and time.monotonic() - self._last_save >= self.every_seconds):
            self.save_last(engine)

    def _on_epoch(self, engine: Engine) -> None:
        self._recorded_iteration = engine.state.iteration
        self.save_last(engine)
        if self.best is not None and self.score_name in engine.state.metrics:
            self._save(self.best, engine, "best")

    def save_last(self, engine: Engine) -> None:
        """Write last.pt now (refused, with a logged event, if the state holds NaN/Inf)."""
        self._save(self.last, engine, "last")
        self._last_save = time.monotonic()

    def _save(self, checkpoint: Checkpoint, engine: Engine, kind: str) -> None:
        if engine.has_registered_events(EpochEvents.CHECKPOINT_STARTED):  # buffered records reach the disk first
            engine.fire_event(EpochEvents.CHECKPOINT_STARTED)
        kept = {item.filename for item in checkpoint._saved}
        try:
            checkpoint(engine)
        except NonFiniteCheckpointError as e:
            log.warning("%s", e)
            self._event(engine, {"event": "checkpoint_refused", "kind": kind, "reason": str(e)})
            return
        written = [item.filename for item in checkpoint._saved if item.filename not in kept]
        if kind == "best" and not written:
            return  # the score did not make the kept best ones: nothing was written
        self._event(engine, {"event": "checkpoint", "kind": kind, "file": written[0] if written else checkpoint.last_checkpoint})

    def _event(self, engine: Engine, record: dict[str, Any]) -> None:
        if self.events_path is not None:
            append_jsonl(self.events_path, {**record, "iteration": engine.state.iteration, "epoch": engine.state.epoch})

    def state_dict(self) -> dict[str, Any]:
        """Which best checkpoints exist, so rotation continues after a resume."""
        return {"best": self.best.state_dict() if self.best is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if self.best is not None and state.get("best"):
            self.best.load_state_dict(state["best"])
