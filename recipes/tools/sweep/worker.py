"""A sweep worker: trials of the study, each a kiln run in ``DIR/trials/NNN``, until ``--trials`` are complete or
pruned across every worker sharing the storage; a worker that died is noticed by its heartbeats."""
from __future__ import annotations

import io
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import optuna
from optuna.trial import TrialState

from callbacks import OptunaPruning
from callbacks.files import append_jsonl
from recipes.config import Config, ConfigError, apply_overrides
from recipes.run import make_run_dir, train
from recipes.run.checkpoints import flatten_config
from recipes.run.lock import released_after
from recipes.tools.lr_find import choose_max_lr
from recipes.tools.sweep.results import SweepResult, format_value, short_key, write_results
from recipes.tools.sweep.space import ParamSpec, trial_config
from recipes.tools.sweep.storage import check_same_sweep, open_study

__all__ = ["COUNTED", "IN_FLIGHT", "SweepInterrupted", "run_sweep"]

#: What counts towards a sweep's ``--trials``: a trial that failed (its worker died) is replaced.
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)
IN_FLIGHT = (TrialState.RUNNING, TrialState.WAITING)


class SweepInterrupted(Exception):
    """A trial was stopped by Ctrl-C or SIGTERM: the trial is marked failed and this worker stops."""


def run_sweep(recipe: str, base: Config, space: list[ParamSpec], *, n_trials: int, out: Path, storage: str | None,
              study_name: str | None, pruner: str = "median", auto_max_lr: bool = False,
              fixed: dict[str, Any] | None = None, heartbeat_interval: int = 10, stream: TextIO | None = None,
              finish: Callable[[Path], Any] | None = None,
              draw: Callable[[SweepResult], Any] | None = None) -> SweepResult:
    """Run trials of the study until ``n_trials`` are complete or pruned (with every worker's), then write
    the results. ``base`` is the recipe with the sweep's fixed overrides (``fixed``, for best.yaml);
    ``finish(run_dir)`` runs after each trial (e.g. ``recipes.report.finish_run``), ``draw(result)`` at the end
    (the page: ``recipes.report.sweep_page.draw_sweep``).

    Raises:
        ConfigError: bad arguments, an unusable storage, or a study started with other arguments.
        SweepInterrupted: Ctrl-C or SIGTERM stopped a trial (marked failed; re-run to continue).
    """
    out_stream = stream or sys.stdout
    if n_trials < 1:
        raise ConfigError(f"--trials must be >= 1, not {n_trials}")
    if not space:
        raise ConfigError("nothing to search: give at least one --param")
    keys = [p.key for p in space]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"--param names a key twice: {', '.join(sorted({k for k in keys if keys.count(k) > 1}))}")
    if auto_max_lr and "schedule.max_lr" in keys:
        raise ConfigError("--max-lr auto chooses max_lr itself; drop --param max_lr, or drop --max-lr auto")
    if storage is None:  # the default SQLite file lives in the sweep directory
        out.mkdir(parents=True, exist_ok=True)
    storage_url = storage or f"sqlite:///{(out / 'sweep.db').resolve()}"
    study = open_study(study_name or base.name, storage_url, seed=base.train.seed, pruner=pruner, n_trials=n_trials,
                       heartbeat_interval=heartbeat_interval)
    out.mkdir(parents=True, exist_ok=True)  # only now: an unusable storage leaves no empty directory
    identity = {"recipe": recipe, "space": [p.describe() for p in space], "fixed": {k: str(v) for k, v in (fixed or {}).items()},
                "max_lr_auto": auto_max_lr, "pruner": pruner}
    check_same_sweep(study, identity)

    def objective(trial: optuna.Trial) -> float:
        ahead = [t for t in study.get_trials(deepcopy=False, states=COUNTED + IN_FLIGHT) if t.number < trial.number]
        if len(ahead) >= n_trials:  # another worker took the last place between our count and our ask
            trial.set_user_attr("surplus", True)
            raise _Surplus
        params = {p.key: p.suggest(trial) for p in space}
        cfg = trial_config(base, params)
        if auto_max_lr:
            cfg = _auto_max_lr(study, base, cfg, out_stream)
        run_dir = make_run_dir(cfg, _trial_dir(out, trial.number))  # locked; refused if it holds files already
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("config", flatten_config(cfg))
        pruning = OptunaPruning(trial)
        with released_after(run_dir):  # the trial's run and report are written under its lock, then it is let go
            run = train(cfg, run_dir, quiet=True, stream=io.StringIO(), extra_handlers={"optuna_pruning": pruning})
            if pruning.pruned:
                append_jsonl(run.events_path, {"event": "pruned", "epoch": pruning.pruned_epoch,
                                               "trial": trial.number, "study": study.study_name})
            if finish is not None:
                finish(run.run_dir)
        summary = run.handlers["summary"]
        best = summary.best_val_accuracy
        epochs = int(run.trainer.state.epoch)
        trial.set_user_attr("epochs_run", epochs)
        trial.set_user_attr("status", run.status)
        trial.set_user_attr("best_val_accuracy", best)
        shown = ", ".join(f"{short_key(k)}={format_value(v)}" for k, v in params.items())
        if pruning.pruned:
            print(f"trial {trial.number:3d}: {shown}: pruned after epoch {pruning.pruned_epoch} "
                  f"(val_accuracy {format_value(best)})", file=out_stream, flush=True)
            raise optuna.TrialPruned()
        if run.status == "interrupted":  # Ctrl-C or SIGTERM: this worker stops; the trial is not a result
            raise SweepInterrupted(f"trial {trial.number} was stopped; re-run the same command to continue the sweep")
        print(f"trial {trial.number:3d}: {shown}: best val_accuracy {format_value(best)} "
              f"({epochs} epochs, {run.status})", file=out_stream, flush=True)
        return float(best) if best is not None else 0.0

    waiting_for: list[int] = []
    while True:
        _fail_stale(study)
        trials = study.get_trials(deepcopy=False)
        done = sum(t.state in COUNTED for t in trials)
        in_flight = [t.number for t in trials if t.state in IN_FLIGHT]
        if done >= n_trials:
            break
        if done + len(in_flight) >= n_trials:  # the rest is running elsewhere: wait, in case a worker dies
            if in_flight != waiting_for:  # say why this worker sits idle, once per set of trials it waits for
                waiting_for = in_flight
                print(f"waiting for trial{'s' if len(in_flight) != 1 else ''} {', '.join(map(str, in_flight))} in "
                      f"other workers; a worker that died is noticed when its last heartbeat is "
                      f"{3 * heartbeat_interval} s old, and its trial is then run here", file=out_stream, flush=True)
            time.sleep(max(1, heartbeat_interval // 2))
            continue
        study.optimize(objective, n_trials=1, catch=(_Surplus,), gc_after_trial=True)
    return write_results(study, recipe, base, out, n_trials=n_trials, stream=out_stream, draw=draw)


class _Surplus(Exception):
    """This worker's trial would go beyond --trials (a race with another worker): it is marked failed unrun."""


def _fail_stale(study: optuna.Study) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _auto_max_lr(study: optuna.Study, base: Config, cfg: Config, stream: TextIO) -> Config:
    """``cfg`` at the LR range test's suggestion for its batch size: run once per batch size per study, on
    ``base`` at that batch size (not on whichever trial asked first), and kept in the study's user
    attrs, so every worker reuses it."""
    attr = f"auto_max_lr:batch_size={cfg.data.batch_size}"
    found = study.user_attrs.get(attr)
    if found is None:
        chosen, _ = choose_max_lr(apply_overrides(base, {"data.batch_size": cfg.data.batch_size}), quiet=True,
                                  stream=stream)
        found = study.user_attrs.get(attr)  # another worker may have finished first: use the study's figure
        if found is None:
            found = {"schedule.max_lr": chosen.schedule.max_lr, "optim.lr": chosen.optim.lr}
            study.set_user_attr(attr, found)
    return apply_overrides(cfg, found)


def _trial_dir(out: Path, number: int) -> Path:
    return out / "trials" / f"{number:03d}"
