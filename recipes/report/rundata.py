"""Reading a run directory: config.json, metrics.jsonl, steps.jsonl, events.jsonl, summary.json, lr_find.json.

A torn last line (a crash mid-append) and any other line that does not parse are skipped, so a report
can be drawn for any run, finished, stopped or crashed. A config.json that does not parse is an error:
kiln wrote it whole (atomically), so it was edited.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from callbacks.files import os_error_line
from recipes.config import ConfigError, config_from_dict
from recipes.run.rundir import RunDir, read_config_json, read_json, read_jsonl, read_summary
from recipes.tools.schedule import schedule_series

__all__ = ["RunData", "load_run", "to_number"]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """:func:`recipes.run.rundir.read_jsonl`, its OS errors as one line.

    Raises:
        ConfigError: the file exists but cannot be read (the OS's reason and the path).
    """
    try:
        return read_jsonl(path)
    except OSError as e:
        raise ConfigError(os_error_line(e, path)) from None


def to_number(value: Any) -> float:
    """A float from a logged number; the strings "nan"/"inf" that loggers write for non-finite values too."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


@dataclass
class RunData:
    """The records of one run directory, read once."""

    run_dir: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    steps: list[dict[str, Any]]
    events: list[dict[str, Any]]
    summary: dict[str, Any] | None
    lr_find: dict[str, Any] | None  #: the range test tied to this run (lr_find.json or the lr_find event)
    checkpoints: list[Path] = field(default_factory=list)
    mistakes: dict[str, Any] | None = None  #: mistakes.json: what the best checkpoint gets wrong, the flip probe
    summary_note: str | None = None  #: set when summary.json was lost and rebuilt from the records (one line)

    @property
    def recipe(self) -> str:
        """The recipe's name."""
        return str(self.config.get("name") or "RECIPE")

    @property
    def log_every(self) -> int:
        """Iterations between steps.jsonl lines."""
        return int(self.config.get("train", {}).get("log_every") or 10)

    @property
    def batches_per_epoch(self) -> int | None:
        """Training batches per epoch, as the run recorded it."""
        value = self.config.get("runtime", {}).get("batches_per_epoch")
        return int(value) if value else None

    @property
    def precision(self) -> str | None:
        """The precision the run resolved to (fp32, bf16, fp16)."""
        return self.config.get("runtime", {}).get("precision") or self.config.get("train", {}).get("precision")

    @property
    def skipped_steps(self) -> int | None:
        """Optimizer steps the fp16 scaler skipped, over the whole run (None when not fp16)."""
        counts = [m["skipped_steps"] for m in self.metrics if m.get("skipped_steps") is not None]
        if counts:
            return int(max(counts))
        if any(s.get("loss_scale") is not None for s in self.steps):
            return sum(1 for e in self.events if e.get("event") == "step_skipped") or None
        return None

    def planned_schedule(self) -> dict[str, list] | None:
        """The run's one-cycle LR at every optimizer step, keyed by iteration (None if unknown)."""
        try:
            cfg = config_from_dict(self.config)
            series = schedule_series(cfg, self.batches_per_epoch) if self.batches_per_epoch else None
        except (ConfigError, ValueError, TypeError, KeyError):
            return None
        if series is None:
            return None
        return {"iteration": series.iterations(), "lr": series.lr}


def load_run(run_dir: str | Path) -> RunData:
    """Read a run directory's records.

    Raises:
        ConfigError: the directory is missing, holds neither metrics.jsonl nor steps.jsonl, has a
            config.json that is not valid JSON, or a record that cannot be read.
    """
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise ConfigError(f"no run directory at {run_dir}")
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a directory; pass a run directory (the --out of kiln train)")
    paths = RunDir(run_dir)
    metrics = _read_jsonl(paths.metrics)
    steps = _read_jsonl(paths.steps)
    if not metrics and not steps:
        raise ConfigError(f"{run_dir} holds no metrics (metrics.jsonl, steps.jsonl): not a kiln run directory, "
                          "or the run stopped before it logged anything")
    config = read_config_json(run_dir) or {}
    events = _read_jsonl(paths.events)
    lr_find = read_json(paths.lr_find)
    if lr_find is None:
        lr_find = config.get("lr_find") or next((e for e in reversed(events) if e.get("event") == "lr_find"), None)
    summary, note = read_summary(run_dir)
    return RunData(run_dir, config, metrics, steps, events, summary, lr_find, paths.all_checkpoints(),
                   read_json(paths.mistakes), note)
