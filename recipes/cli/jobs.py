"""What ``kiln train`` and ``kiln resume`` run in each process, and how the process ends.

A job spans wings, which is why it lives here at the top and not in ``recipes.run``: ``--max-lr auto``
runs the LR range test (``recipes.tools``) before training; after the run the plots, report.html and
findings are written (``recipes.report``); then the final lines are printed and the exit status chosen.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
import threading
from pathlib import Path

import click
import ignite.distributed as idist

from callbacks.nan_diagnosis import format_diagnosis
from recipes.cli.launch import LAUNCHER_SIGNALS, exit_now_if_distributed, launch, under_torchrun
from recipes.config import Config, ConfigError
from recipes.report import finish_run
from recipes.report.mistakes import measure_mistakes
from recipes.report.plots import plot_lr_find
from recipes.run import Assembly, resume, run_dir_of, train
from recipes.run.lock import RunLock, lend_to_children
from recipes.run.lost_rank import lost_a_peer, lost_peer_reason
from recipes.run.rundir import RunDir, read_summary, run_config
from recipes.tools.export import FORMATS, ExportFailed, export_checkpoint
from recipes.tools.lr_find import choose_max_lr, record_in_run
from recipes.tracking import RunMirror, mirrored, open_mirror, start_mirror
from recipes.words import plural

__all__ = ["train_job", "resume_job", "take_for_resume", "run_job", "final_lines", "report_unless_stopped",
           "world_size", "is_rank_zero", "EXIT_DIVERGED"]

#: Exit status of ``kiln train``/``kiln resume`` when NanGuard stopped the run as diverged (``--on-nan``).
EXIT_DIVERGED = 3


def _not_the_stop_line(record: logging.LogRecord) -> bool:
    """Drop NanGuard's line for a diverged run: :func:`final_lines` prints the whole diagnosis, which
    begins with that line (the rollback and skip lines stay)."""
    return getattr(record, "kiln_event", None) != "diverged"


def _diagnosis_once() -> None:
    logger = logging.getLogger("kiln")
    if _not_the_stop_line not in logger.filters:
        logger.addFilter(_not_the_stop_line)


def train_job(cfg: Config, run_dir: Path, quiet: bool, auto_max_lr: bool, report: bool = True) -> int:
    """Train ``cfg`` into ``run_dir`` (after the LR range test with ``auto_max_lr``), write the report (unless
    not ``report``), mirrored in MLflow when a server is named; returns the exit status."""
    _diagnosis_once()
    found = None
    if auto_max_lr:  # the run trains at the range test's suggestion, from the same initial weights
        cfg, found = choose_max_lr(cfg, quiet=quiet)
    mirror = open_mirror(cfg, run_dir) if idist.get_rank() == 0 else None  # one process sends

    def before_run(run: Assembly) -> None:
        if found is not None:
            record_in_run(run, found)
            if run.writes:
                plot_lr_find(found, RunDir(run.run_dir).lr_find_plot, title=f"{cfg.name}: LR range test")
        start_mirror(mirror)

    with _mirrored(mirror, cfg, run_dir) as handlers:
        run = train(cfg, run_dir, quiet=quiet, before_run=before_run, extra_handlers=handlers)
        stopped_by = report_unless_stopped(run) if report else None
    return _exit_status(run, stopped_by)


def resume_job(source: str, options: dict, report: bool = True, mlflow: str | None = None) -> int:
    """Resume the run at ``source`` with ``options`` (see ``recipes.run.resume``), write the report (unless not
    ``report``), mirrored in MLflow (the same MLflow run) when a server is named; returns the exit status."""
    _diagnosis_once()
    run_dir = run_dir_of(source)
    mirror, cfg = None, None
    if idist.get_rank() == 0:  # one process sends
        try:
            cfg = run_config(run_dir)
        except ConfigError:  # config.json torn (--force continues from the checkpoint's config, and rewrites it)
            cfg = None
        cfg = cfg or Config(name=run_dir.name)  # the mirror's settings: the server may come from mlflow.json
        mirror = open_mirror(cfg, run_dir, uri=mlflow)
    with _mirrored(mirror, cfg, run_dir) as handlers:
        start_mirror(mirror, send=False)  # the records past the checkpoint are cut first
        run = resume(source, **options, extra_handlers=handlers)
        stopped_by = report_unless_stopped(run) if run.ran and report else None  # plots/, report.html, findings
    return _exit_status(run, stopped_by)


def _mirrored(mirror: RunMirror | None, cfg: Config | None, run_dir: Path) -> contextlib.AbstractContextManager:
    """:func:`recipes.tracking.mirrored` with the run's settings: how often, and (``--mlflow-log-model``) the model."""
    if mirror is None or cfg is None:
        return mirrored(None, run_dir)
    t = cfg.tracking
    return mirrored(mirror, run_dir, t.mlflow_every_seconds,
                    artifacts=functools.partial(model_artifacts, run_dir) if t.mlflow_log_model else None)


def model_artifacts(run_dir: Path, tmp: Path) -> dict[str, Path]:
    """``--mlflow-log-model``: the best checkpoint (else last.pt) and its TorchScript export (written in ``tmp``),
    as artifact folder -> file; an export that fails is one line, and the checkpoint still goes."""
    paths = RunDir(run_dir)
    best = (paths.best_checkpoints() or [p for p in [paths.last] if p.is_file()])[-1:]
    if not best:
        return {}
    artifacts: dict[str, Path] = {"checkpoints": best[0]}
    out = tmp / best[0].with_suffix(FORMATS["torchscript"]).name
    try:
        export_checkpoint(best[0], "torchscript", out, dynamic_batch=True)
        artifacts["model"] = out
    except (ExportFailed, ConfigError) as e:
        click.echo(f"kiln: the model was not exported for MLflow: {e}", err=True)
    return artifacts


def take_for_resume(source: str) -> None:
    """Before a resume reads anything: lock the run directory of ``source`` (RUN_DIR or its last.pt) for this
    process (rank 0; one process continues a run), and say in one line if its summary.json is missing or torn
    (the run's status then comes from its records, as for every command; the resumed run writes it anew)."""
    if not is_rank_zero():
        return
    run_dir = run_dir_of(source)
    RunLock.take(run_dir, create=False)
    if not RunDir(run_dir).last.is_file():
        return  # nothing to resume: the refusal is the one line
    try:
        note = read_summary(run_dir)[1]
    except ConfigError:
        return  # not a run directory: the resume says so in its own words
    if note:
        click.echo(f"kiln: {note}", err=True)


class _ReportStopped(BaseException):
    """SIGTERM or SIGINT arrived while the end-of-run report was drawn (a BaseException: ``finish_run``
    turns ordinary exceptions into a warning)."""


def _finish(run: Assembly) -> None:
    """What the best checkpoint gets wrong (one validation pass), then the plots, report.html and findings."""
    if run.writes:
        measure_mistakes(run.run_dir, title=run.config.name)
    finish_run(run.run_dir)


def report_unless_stopped(run: Assembly) -> int | None:
    """Measure what the model gets wrong and draw the run's plots, report.html and findings (``finish_run``),
    unless SIGTERM or SIGINT stops it:
    then the report is skipped with one line saying ``kiln report RUN_DIR`` draws it later. Returns the
    signal that came meanwhile, or None."""
    if threading.current_thread() is not threading.main_thread():
        _finish(run)  # signals reach only the main thread
        return None
    stop: dict = {"drawing": True, "signal": None, "skipped": False}

    def on_signal(signum: int, frame: object) -> None:
        stop["signal"] = stop["signal"] or signum
        if stop["drawing"]:
            stop["drawing"] = False
            raise _ReportStopped

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        _finish(run)
        stop["drawing"] = False
    except _ReportStopped:
        stop["skipped"] = True
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stop["skipped"] and run.writes:
        click.echo(f"kiln: {signal.Signals(stop['signal']).name} while drawing the report: report skipped; "
                   f"draw it later with: kiln report {run.run_dir}")
    return stop["signal"]


def _exit_status(run: Assembly, stopped_by: int | None) -> int:
    """The run's final lines and exit status; a Ctrl-C during the report makes it 130 (SIGTERM keeps the run's)."""
    code = final_lines(run)
    return 130 if stopped_by == signal.SIGINT else code


def world_size(nproc_per_node: int) -> int:
    """The data-parallel processes of this job: spawned here, or torchrun's."""
    return nproc_per_node if nproc_per_node > 1 else int(os.environ.get("WORLD_SIZE", "1")) if under_torchrun() else 1


def is_rank_zero() -> bool:
    """Whether this process is rank 0 (the one that prints and writes)."""
    return int(os.environ.get("RANK", "0")) == 0


def _lost_a_peer(error: BaseException, run_dir: Path) -> None:
    """Under torchrun, another process of the run is gone (killed, or its node went down): say so in one
    line on every surviving rank and exit 1 at once (as every torchrun rank ends: no interpreter teardown
    with gloo's threads)."""
    last = RunDir(run_dir).last
    if last.exists():
        then = (f"its last checkpoint, {last}, is intact. When every node is back, continue with the same "
                f"launch of: kiln resume {run_dir}")
    else:
        then = f"it had no checkpoint yet: when every node is back, start it again (another --out, or remove {run_dir})"
    click.echo(f"kiln: error: rank {os.environ.get('RANK', '?')} lost contact with another process of the run "
               f"({type(error).__name__}: {lost_peer_reason(error)}): a process or its node stopped. The run "
               f"stops; {then}", err=True)
    exit_now_if_distributed(1)


def run_job(job: functools.partial, nproc_per_node: int, backend: str | None, run_dir: Path) -> None:
    """Run ``job`` here, under torchrun, or in spawned processes; exit with the run's status."""
    if nproc_per_node <= 1:
        try:
            code = launch(job, backend=backend)
        except Exception as e:
            if not (under_torchrun() and lost_a_peer(e)):
                raise
            _lost_a_peer(e, run_dir)
        exit_now_if_distributed(code or 0)
        if code:
            sys.exit(code)
        return
    try:
        with lend_to_children():  # the ranks write under this process's lock on the run directory
            launch(job, nproc_per_node=nproc_per_node, backend=backend)
    except Exception as e:  # a rank raised: torch.multiprocessing reports its traceback above
        click.echo(f"kiln: a training process failed: {str(e).strip().splitlines()[-1]}", err=True)
        sys.exit(1)
    summary, note = read_summary(run_dir)  # the ranks wrote it; a lost one is rebuilt from their records
    if note:
        click.echo(f"kiln: {note}", err=True)
    status = summary["status"]
    if status == "diverged":
        sys.exit(EXIT_DIVERGED)
    if status == "interrupted" and signal.SIGINT in LAUNCHER_SIGNALS:
        sys.exit(130)


def final_lines(run: Assembly) -> int:
    """Print the final lines of a run (rank 0 only); return its exit status: 0, 3 diverged, 130 Ctrl-C."""
    summary = run.handlers["summary"]
    s = run.trainer.state
    if run.status == "diverged":
        if run.writes:
            click.echo(f"kiln: {format_diagnosis(s.diverged)}", err=True)
            click.echo(f"run directory: {run.run_dir} (summary.json status \"diverged\"; details in events.jsonl)")
        return EXIT_DIVERGED
    if run.status == "interrupted":
        name = signal.Signals(run.stop_signal).name if run.stop_signal else "a stop"
        if run.writes:
            click.echo(f"stopped by {name} at iteration {s.iteration} (epoch {s.epoch}); checkpoint saved. "
                       f"Continue with: kiln resume {run.run_dir}")
            click.echo(f"run directory: {run.run_dir}")
        return 130 if run.stop_signal == signal.SIGINT else 0
    if not run.writes:
        return 0
    best = summary.best_val_accuracy
    final = summary.final_val_accuracy
    figures = f"best val_accuracy {best:.4f}, final {final:.4f}" if best is not None else "no validation"
    click.echo(f"done in {summary.wall_seconds:.1f}s: {figures} ({run.device}, {run.precision.name})")
    early_stop = run.handlers.get("early_stop")
    if run.stopped_early:
        click.echo(f"stopped early after epoch {early_stop.stopped_epoch} of {s.max_epochs}: no val_accuracy gain "
                   f"above {early_stop.min_delta:g} in {plural(early_stop.patience, 'epoch')}")
    click.echo(f"run directory: {run.run_dir}")
    return 0
