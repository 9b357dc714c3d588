"""Running an assembled run: to its end or to a stop, with how it ended recorded in the run directory."""
from __future__ import annotations

import signal
from pathlib import Path
from typing import Any, Callable, TextIO

import ignite.distributed as idist
import torch

from callbacks import GracefulStop, RunSummary
from callbacks._files import append_jsonl
from callbacks.nan_diagnosis import summarize_diagnosis
from recipes.config import Config
from recipes.run.build import Assembly, build, write_config

__all__ = ["execute", "train"]


def execute(run: Assembly) -> Assembly:
    """Run the trainer to its end or to a stop; record how it ended in summary.json and events.jsonl."""
    summary: RunSummary = run.handlers["summary"]
    stop: GracefulStop = run.handlers["graceful_stop"]
    run.ran = True
    try:
        run.trainer.run(run.train_data, max_epochs=run.config.train.epochs)
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once, last.pt is whatever was saved before
        run.status, run.stop_signal = "interrupted", signal.SIGINT
        if run.writes:
            summary.write("interrupted")
            append_jsonl(run.events_path, {"event": "interrupted", "signal": "SIGINT (twice)",
                                           "iteration": run.trainer.state.iteration, "epoch": run.trainer.state.epoch})
        return run
    except BaseException as e:
        run.status = "failed"
        if run.writes:
            summary.write("failed", error=f"{type(e).__name__}: {e}")
        raise
    finally:
        stop.restore()
        if "tensorboard" in run.handlers:
            run.handlers["tensorboard"].close()
    s = run.trainer.state
    summary_extra: dict[str, Any] = {}
    event: dict[str, Any] | None = None
    early_stop = run.handlers.get("early_stop")
    if getattr(s, "diverged", None) is not None:  # NanGuard stopped it, with the last good state restored
        run.status = "diverged"
        summary_extra["diagnosis"] = summarize_diagnosis(s.diverged)
    elif run.stopped_early:
        run.status = "completed"  # finished by its own rule, not cut short: `kiln resume` has nothing to do
        reason = (f"val_accuracy did not rise by more than {early_stop.min_delta:g} in {early_stop.patience} "
                  f"epoch{'s' if early_stop.patience > 1 else ''}")
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
        if summary_extra or run.status != "completed":
            summary.write(run.status, **summary_extra)
        if event is not None:
            append_jsonl(run.events_path, {**event, "iteration": s.iteration, "epoch": s.epoch})
    return run


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
    run = build(cfg, run_dir, quiet=quiet, stream=stream)
    for name, handler in (extra_handlers or {}).items():
        handler.attach(run.trainer)
        run.handlers[name] = handler
    write_config(run)
    if before_run is not None:
        before_run(run)
    return execute(run)
