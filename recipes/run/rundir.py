"""The run directory: the one place that names its files and reads them.

A run directory holds what ``kiln train`` writes (docs/resume.md shows it whole); the folder a tool
writes into (``kiln lr-find``, ``kiln schedule``: a run directory or one of their own) is laid out alike::

    config.json  summary.json  metrics.jsonl  steps.jsonl  events.jsonl  lr_find.json  lr_find.png
    mistakes.json  report.html  findings.json  mlflow.json  plots/  tb/  checkpoints/last.pt
    checkpoints/best-*.pt  .lock

Every module of recipes/ gets these paths from :class:`RunDir` and reads them with the readers here
(a test greps the source for the names). The handlers in callbacks/ receive their paths from the run
builder, so a name changes here and nowhere else.

Three readers, one per kind of record:

- :func:`read_jsonl`: the append-only records. Other processes (a report, a test, a second terminal)
  read them while a run appends, and a run killed mid-append leaves a torn last line for good: a line
  that does not parse is not a record yet, and is left out.
- :func:`read_json`: a JSON object kiln rewrites atomically (summary.json, mistakes.json, lr_find.json);
  missing, torn by hand or not an object: None, for the caller to say what it does without it.
- :func:`read_json_strictly`: a record the caller cannot go on without (config.json): missing is None,
  anything else wrong is one line naming the file and what to do.

and :func:`read_summary`, which rebuilds a lost summary.json from the records. config.json is kiln's record
of a run, never an input (the checkpoint holds the config a run continues with): :func:`read_config_json`
and :func:`run_config` read it strictly. :func:`cut_torn_records` repairs the records before a resume
appends to them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from callbacks.checkpoint import Checkpointer
from callbacks.files import append_jsonl, cut_torn_last_line, os_error_line
from recipes.config import Config, ConfigError, config_from_dict
from recipes.words import plural

__all__ = ["CHECKPOINTS", "CHECKPOINT_PLOTS", "CONFIG", "EVAL_CONFUSION", "EVENTS", "FINDINGS", "LOCK", "LR_FIND",
           "LR_FIND_PLOT", "METRICS", "MISTAKES", "MLFLOW", "PLOTS", "RECORDS", "REPORT", "RUN_FILES", "RUN_PLOTS", "RunDir", "SCHEDULE",
           "SCHEDULE_PLOT", "STEPS", "SUMMARY", "TENSORBOARD", "cut_torn_records", "read_config_json", "read_json",
           "read_json_strictly", "read_jsonl", "read_summary", "run_config"]

# Each name once: the paths below, the readers and every module of recipes/ use these.
CONFIG, SUMMARY, METRICS, STEPS, EVENTS = "config.json", "summary.json", "metrics.jsonl", "steps.jsonl", "events.jsonl"
LR_FIND, LR_FIND_PLOT, MISTAKES, REPORT = "lr_find.json", "lr_find.png", "mistakes.json", "report.html"
FINDINGS = "findings.json"  # the report's findings, as data (written with report.html)
MLFLOW = "mlflow.json"  # which MLflow run mirrors this one, on which server (recipes/tracking)
EVAL_CONFUSION = "confusion_matrix.png"  # written by `kiln eval`
SCHEDULE, SCHEDULE_PLOT = "schedule.json", "schedule.png"  # written by `kiln schedule RUN_DIR`
PLOTS, TENSORBOARD, CHECKPOINTS = "plots", "tb", "checkpoints"
#: The lock file a writing process holds (recipes/run/lock.py).
LOCK = ".lock"
#: The append-only records; a crash can leave each with a torn last line.
RECORDS = (EVENTS, METRICS, STEPS)
#: The plots of a run's records (recipes/report/plots.py), in plots/, in the report's order.
RUN_PLOTS = ("lr.png", "loss.png", "accuracy.png", "grad_norm.png", "loss_scale.png")
#: The plots of a checkpoint's validation mistakes (recipes/report/mistakes.py), in plots/.
CHECKPOINT_PLOTS = ("mistakes.png", "confusion.png")
#: What a run writes at the top of its directory: ``kiln train --force`` removes these, and only these, to
#: start over a run that stopped before its first checkpoint (and temporary files: dot-names ending in .tmp).
RUN_FILES = frozenset({CONFIG, SUMMARY, *RECORDS, REPORT, FINDINGS, MLFLOW, LR_FIND, LR_FIND_PLOT, MISTAKES,
                       EVAL_CONFUSION, SCHEDULE, SCHEDULE_PLOT, CHECKPOINTS, TENSORBOARD, PLOTS})


@dataclass(frozen=True)
class RunDir:
    """The paths of one run directory.

        >>> run = RunDir("runs/digits")
        >>> run.summary.as_posix(), run.last.as_posix()
        ('runs/digits/summary.json', 'runs/digits/checkpoints/last.pt')
    """

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    @classmethod
    def of_checkpoint(cls, checkpoint: str | Path) -> RunDir:
        """The run directory a RUN_DIR/checkpoints/*.pt belongs to."""
        return cls(Path(checkpoint).parent.parent)

    config = property(lambda self: self.root / CONFIG, doc="The resolved recipe, the runtime, the versions.")
    summary = property(lambda self: self.root / SUMMARY, doc="How the run stands or ended (RunSummary).")
    metrics = property(lambda self: self.root / METRICS, doc="One line per epoch (MetricsLog).")
    steps = property(lambda self: self.root / STEPS, doc="One line every train.log_every iterations.")
    events = property(lambda self: self.root / EVENTS, doc="What happened: checkpoints, NaNs, resumes.")
    lr_find = property(lambda self: self.root / LR_FIND, doc="The range test behind --max-lr auto.")
    lr_find_plot = property(lambda self: self.root / LR_FIND_PLOT, doc="Its plot.")
    mistakes = property(lambda self: self.root / MISTAKES, doc="The best checkpoint's validation mistakes.")
    report = property(lambda self: self.root / REPORT, doc="The end-of-run report.")
    findings = property(lambda self: self.root / FINDINGS, doc="The report's findings, as data.")
    mlflow = property(lambda self: self.root / MLFLOW, doc="The MLflow run that mirrors this one, per server.")
    eval_confusion = property(lambda self: self.root / EVAL_CONFUSION, doc="`kiln eval`'s confusion matrix.")
    schedule = property(lambda self: self.root / SCHEDULE, doc="`kiln schedule`'s LR and beta1 per step.")
    schedule_plot = property(lambda self: self.root / SCHEDULE_PLOT, doc="Its plot.")
    plots = property(lambda self: self.root / PLOTS, doc="The report's PNG files.")
    tensorboard = property(lambda self: self.root / TENSORBOARD, doc="TensorBoard's event files.")
    checkpoints = property(lambda self: self.root / CHECKPOINTS, doc="last.pt and best-*.pt.")
    last = property(lambda self: self.checkpoints / Checkpointer.LAST_NAME, doc="What `kiln resume` continues from.")
    lock = property(lambda self: self.root / LOCK, doc="The writer's lock file.")

    def best_checkpoints(self) -> list[Path]:
        """The best-*.pt files, oldest first (the last is the newest best)."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(self.checkpoints.glob("best-*.pt"), key=lambda p: p.stat().st_mtime)

    def all_checkpoints(self) -> list[Path]:
        """Every *.pt file in checkpoints/, by name."""
        return sorted(self.checkpoints.glob("*.pt")) if self.checkpoints.is_dir() else []

    def holds_a_run(self, names: set[str] | None = None) -> bool:
        """Whether a run began here (it wrote config.json or summary.json); ``names``: the directory's entries,
        when the caller has listed them already."""
        names = {p.name for p in self.root.iterdir()} if names is None else names
        return bool(names & {CONFIG, SUMMARY})


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a .jsonl record, oldest first; ``[]`` when it does not exist (yet).

    A torn last line (being written now, or cut by a crash) does not parse and is left out, and so is any
    other line that does not hold one JSON object; a last line that parses is whole (no prefix of a JSON
    object is one), newline or not. OS errors other than a missing file (permission, I/O) are raised.

        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "steps.jsonl"
        >>> _ = p.write_text('{"iteration": 1}\\n{"iteration": 2}\\n{"itera')
        >>> read_jsonl(p)
        [{'iteration': 1}, {'iteration': 2}]
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    records = []
    for line in data.splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # JSONDecodeError, UnicodeDecodeError
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def read_json(path: str | Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when it is missing, cannot be read, does not parse or is not an object.

        >>> read_json("no/such/summary.json") is None
        True
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):  # ValueError: JSONDecodeError, UnicodeDecodeError
        return None
    return data if isinstance(data, dict) else None


def read_json_strictly(path: str | Path, hint: str) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when there is no such file.

    Raises:
        ConfigError: one line naming the file: it cannot be read (the OS's reason), is not valid JSON
            (line and column, then ``hint``: what to do about it), or does not hold a JSON object.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not valid JSON (it is not UTF-8 text); {hint}") from None
    except OSError as e:
        raise ConfigError(os_error_line(e, path)) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON (line {e.lineno} column {e.colno}: {e.msg}); {hint}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} does not hold a JSON object; {hint}")
    return data


def read_summary(run_dir: str | Path) -> tuple[dict[str, Any], str | None]:
    """RUN_DIR's summary.json and, when it is missing or does not parse, one rebuilt from the records.

    Every command that reads an existing run directory goes through here, so a lost summary.json means
    the same everywhere. Rebuilt, the status is "completed" when metrics.jsonl holds every planned epoch
    (config.json's ``train.epochs``) and last.pt was saved at the run's last iteration, otherwise
    "interrupted" (a resume continues it); best and final accuracy, epochs and iterations come from
    metrics.jsonl and steps.jsonl. Returns ``(summary, note)``: the note is None for a summary.json read
    as written, else one line for the command to print.

    Raises:
        ConfigError: neither summary.json nor the records (config.json, metrics.jsonl) are there to rebuild
            it from: not a kiln run directory, in one line.
    """
    paths = RunDir(run_dir)
    summary = read_json(paths.summary)
    if summary is not None and isinstance(summary.get("status"), str):
        return summary, None
    config, metrics = read_json(paths.config), read_jsonl(paths.metrics)
    if config is None and not metrics:
        what = "does not parse" if paths.summary.exists() else "is missing"
        raise ConfigError(f"{paths.summary} {what} and there are no records (config.json, metrics.jsonl) to rebuild "
                          f"it from: {paths.root} is not a kiln run directory")
    epochs = sorted({int(m["epoch"]) for m in metrics if isinstance(m.get("epoch"), int)})
    iterations = max([int(r.get("iteration") or 0) for r in (*metrics, *read_jsonl(paths.steps))], default=0)
    accuracies = [m["val_accuracy"] for m in metrics if isinstance(m.get("val_accuracy"), (int, float))]
    planned = ((config or {}).get("train") or {}).get("epochs")
    complete = bool(epochs) and planned is not None and epochs[-1] >= planned and _saved_at(paths.last) >= iterations
    summary = {"status": "completed" if complete else "interrupted",
               "best_val_accuracy": max(accuracies, default=None),
               "final_val_accuracy": accuracies[-1] if accuracies else None,
               "epochs_completed": epochs[-1] if epochs else 0, "iterations": iterations, "rebuilt": True}
    what = "does not parse" if paths.summary.exists() else "is missing"
    return summary, (f"{paths.summary} {what}: rebuilt from the run's records (status {summary['status']}, "
                     f"{plural(summary['epochs_completed'], 'epoch')})")


def _saved_at(last: Path) -> int:
    """The iteration last.pt was saved at; -1 when there is none or it cannot be read."""
    try:
        return int(torch.load(last, map_location="cpu", weights_only=True, mmap=True)["trainer"]["iteration"])
    except Exception:  # missing, torn, not a kiln checkpoint: no saved iteration to count on
        return -1


def read_config_json(run_dir: str | Path, hint: str = "restore the file kiln wrote") -> dict[str, Any] | None:
    """RUN_DIR/config.json as a dict, or None when there is none.

    Raises:
        ConfigError: one line naming the file (:func:`read_json_strictly`; ``hint`` says what to do about a
            file that does not parse).
    """
    return read_json_strictly(RunDir(run_dir).config, hint)


def run_config(run_dir: str | Path, hint: str = "restore the file kiln wrote") -> Config | None:
    """The :class:`Config` recorded in RUN_DIR/config.json, or None when there is none.

    Raises:
        ConfigError: see :func:`read_config_json`; or a config this kiln cannot use (named with the file).
    """
    data = read_config_json(run_dir, hint)
    if data is None:
        return None
    try:
        return config_from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{RunDir(run_dir).config} holds a config this kiln cannot use: {e}") from None


def cut_torn_records(run_dir: str | Path, events_path: Path, iteration: int) -> dict[str, int]:
    """Cut a torn last line off each of RUN_DIR's :data:`RECORDS`, with an events.jsonl line per file cut.

    Called when a run is resumed, before anything is appended. Returns ``{file name: bytes dropped}``
    for the files that had one.
    """
    torn = {name: cut_torn_last_line(Path(run_dir) / name) for name in RECORDS}
    torn = {name: dropped for name, dropped in torn.items() if dropped}
    for name, dropped in torn.items():
        append_jsonl(events_path, {"event": "torn_line_dropped", "file": name, "bytes": dropped, "iteration": iteration})
    return torn
