"""Running an assembled run: to its end or to a stop, with how it ended recorded in the run directory."""
from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import ignite.distributed as idist
import torch

from callbacks import GracefulStop, RunSummary
from callbacks.files import append_jsonl, os_error_line
from callbacks.nan_diagnosis import summarize_diagnosis
from recipes.config import Config
from recipes.run.build import Assembly, build, write_config
from recipes.run.lost_rank import lost_a_peer, lost_peer_reason
from recipes.words import plural

__all__ = ["execute", "train"]


def execute(run: Assembly) -> Assembly:
    """Run the trainer to its end or to a stop; record how it ended in summary.json and events.jsonl."""
    summary: RunSummary = run.handlers["summary"]
    stop: GracefulStop = run.handlers["graceful_stop"]
    run.ran = True
    for engine in (run.trainer, run.evaluator):
        engine.logger.addFilter(_not_ignite_exception_line)
    try:
        run.trainer.run(run.train_data, max_epochs=run.config.train.epochs)
        _close_tensorboard(run)  # its last flush is the run's last write: a failure there fails the run
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once, last.pt is whatever was saved before
        _close_tensorboard(run, quietly=True)
        run.status, run.stop_signal = "interrupted", signal.SIGINT
        if run.writes:
            summary.write("interrupted")
            append_jsonl(run.events_path, {"event": "interrupted", "signal": "SIGINT (twice)",
                                           "iteration": run.trainer.state.iteration, "epoch": run.trainer.state.epoch})
        return run
    except BaseException as e:
        _close_tensorboard(run, quietly=True)
        run.status = "failed"
        if run.writes:
            _record_failure(summary, e)
        raise
    finally:
        stop.restore()
    s = run.trainer.state
    summary_extra: dict[str, Any] = {}
    event: dict[str, Any] | None = None
    early_stop = run.handlers.get("early_stop")
    if getattr(s, "diverged", None) is not None:  # NanGuard stopped it, with the last good state restored
        run.status = "diverged"
        summary_extra["diagnosis"] = summarize_diagnosis(s.diverged)
    elif run.stopped_early:
        run.status = "completed"  # finished by its own rule, not cut short: `kiln resume` has nothing to do
        reason = (f"val_accuracy did not rise by more than {early_stop.min_delta:g} "
                  f"in {plural(early_stop.patience, 'epoch')}")
        summary_extra.update(stopped_early=True, stopped_epoch=early_stop.stopped_epoch, reason=reason)
        event = {"event": "early_stop", "reason": reason, "best_val_accuracy": summary.best_val_accuracy}
    else:
        run.status = "completed" if s.iteration >= s.max_epochs * s.epoch_length else "interrupted"
        if stop.received is not None:
            run.stop_signal = stop.received
            event = {"event": "interrupted", "signal": signal.Signals(stop.received).name}
    if run.world_size > 1:
        summary_extra["rank_parameter_checksums"] = _parameter_checksums(run.model)
    if run.writes:
        try:
            if summary_extra or run.status != "completed":
                summary.write(run.status, **summary_extra)
            if event is not None:
                append_jsonl(run.events_path, {**event, "iteration": s.iteration, "epoch": s.epoch})
        except OSError as e:  # the run's own records could not be written: it failed after all
            run.status = "failed"
            _record_failure(summary, e)
            raise
    return run


def _failure_reason(error: BaseException) -> str:
    """Why a run failed, in one line: an OS error as its cause and path (``no space left on device:
    RUN/checkpoints/last.pt``), anything else as its type and message."""
    if isinstance(error, OSError):
        return os_error_line(error)
    if idist.get_world_size() > 1 and lost_a_peer(error):
        return f"lost contact with another process of the run: {lost_peer_reason(error)}"
    return f"{type(error).__name__}: {error}"


def _record_failure(summary: RunSummary, error: BaseException) -> None:
    """Write summary.json "failed" with the reason; if even that cannot be written (the disk is full),
    say so in a note on ``error``, which the CLI prints on its one line."""
    try:
        summary.write("failed", error=_failure_reason(error))
    except OSError as e:
        error.add_note(f"summary.json not updated: {(e.strerror or str(e)).lower()}")


def _not_ignite_exception_line(record: logging.LogRecord) -> bool:
    """Drop ignite's log line of an exception it re-raises ("... terminating due to exception: ..."):
    the exception reaches whoever runs the engine, and the CLI reports it once."""
    return "terminating due to exception" not in record.getMessage()


def _close_tensorboard(run: Assembly, quietly: bool = False) -> None:
    """Close the TensorBoard writer; ``quietly``: a run that already failed keeps its own error."""
    tensorboard = run.handlers.get("tensorboard")
    if tensorboard is None:
        return
    try:
        tensorboard.close()
    except OSError:
        if not quietly:
            raise


def _parameter_checksums(model: torch.nn.Module) -> list[float]:
    """One float64 checksum of the parameters per rank (all-gathered): equal when the ranks agree."""
    with torch.no_grad():
        total = sum((p.double() * (i + 1)).sum() for i, p in enumerate(model.parameters()))
    gathered = idist.all_gather(total.reshape(1).to(idist.device()))
    return [float(v) for v in gathered]


def train(cfg: Config, run_dir: str | Path, *, quiet: bool = False, stream: TextIO | None = None,
          extra_handlers: dict[str, Any] | None = None,
          before_run: Callable[[Assembly], None] | None = None) -> Assembly:
    """Build and run ``cfg`` into a new ``run_dir``; summary.json records how it ended (also on errors).

    ``extra_handlers`` (name -> handler) are attached to the trainer after the recipe's own and join
    ``run.handlers`` (e.g. ``kiln sweep``'s ``OptunaPruning``). ``before_run(run)`` is called once
    config.json is written, just before training starts (``--max-lr auto`` records its range test there).
    The plots, report.html and findings are not drawn here: ``recipes.report.finish_run(run.run_dir)``.
    """
    run = build(cfg, run_dir, quiet=quiet, stream=stream, extra_handlers=extra_handlers)
    write_config(run)
    if before_run is not None:
        before_run(run)
    return execute(run)
