"""A sweep worker: trials of the study, each a kiln run in ``DIR/trials/NNN``, until ``--trials`` are complete or
pruned across every worker sharing the storage; a worker that died is noticed by its heartbeats."""
from __future__ import annotations

import contextlib
import io
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import optuna
from optuna.trial import TrialState

from callbacks import OptunaPruning
from callbacks.files import append_jsonl
from recipes.config import Config, ConfigError, apply_overrides, flatten_config
from recipes.run import make_run_dir, resume, train
from recipes.run.lock import released_after
from recipes.run.rundir import RunDir
from recipes.tools.lr_find import choose_max_lr
from recipes.tools.sweep.results import SweepResult, format_value, short_key, write_results
from recipes.tools.sweep.space import ParamSpec, trial_config
from recipes.tools.sweep.stop import StopSignals, SweepInterrupted, quiet_failed_trials
from recipes.tools.sweep.storage import check_same_sweep, open_study
from recipes.tracking import MlflowUnavailable, RunMirror, mirrored, open_mirror, start_mirror
from recipes.tracking.sweep import SweepMirror

__all__ = ["COUNTED", "IN_FLIGHT", "SweepInterrupted", "run_sweep"]

#: What counts towards a sweep's ``--trials``: a trial that failed (its worker died) is replaced.
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)
IN_FLIGHT = (TrialState.RUNNING, TrialState.WAITING)


def run_sweep(recipe: str, base: Config, space: list[ParamSpec], *, n_trials: int, out: Path, storage: str | None,
              study_name: str | None, pruner: str = "median", auto_max_lr: bool = False,
              fixed: dict[str, Any] | None = None, heartbeat_interval: int = 10, stream: TextIO | None = None,
              finish: Callable[[Path], Any] | None = None,
              draw: Callable[[SweepResult], Any] | None = None, mlflow: tuple[str, str] | None = None) -> SweepResult:
    """Run trials of the study until ``n_trials`` are complete or pruned (with every worker's), then write
    the results. ``base`` is the recipe with the sweep's fixed overrides (``fixed``, for best.yaml);
    ``finish(run_dir)`` runs after each trial (e.g. ``recipes.report.finish_run``), ``draw(result)`` at the end
    (the page: ``recipes.report.sweep_page.draw_sweep``). ``mlflow``: ``(tracking server, experiment)``: a parent
    MLflow run for the study, each trial's run nested under it (``recipes.tracking``).

    SIGTERM or Ctrl-C stops the worker at any moment with :class:`SweepInterrupted` (see ``stop.py``). A
    trial stopped mid-run keeps its last.pt and is marked failed with its run recorded; the next worker on
    the study (the same command again) gives its parameters to a new trial that resumes that run directory
    exactly, and the stopped one is left out of the table: each trial counts once.

    Raises:
        ConfigError: bad arguments, an unusable storage, or a study started with other arguments.
        SweepInterrupted: SIGTERM or Ctrl-C (its ``signum``); re-run the same command to continue.
    """
    _check_space(space, n_trials, auto_max_lr)
    out_stream = stream or sys.stdout
    identity = {"recipe": recipe, "space": [p.describe() for p in space],
                "fixed": {k: str(v) for k, v in (fixed or {}).items()}, "max_lr_auto": auto_max_lr, "pruner": pruner}
    with StopSignals() as stop, quiet_failed_trials(SweepInterrupted):
        with stop.interruptible("sweep stopped before its first trial; re-run the same command to start it"):
            stop.hold("before-trials")
            if storage is None:  # the default SQLite file lives in the sweep directory
                out.mkdir(parents=True, exist_ok=True)
            storage_url = storage or f"sqlite:///{(out / 'sweep.db').resolve()}"
            study = open_study(study_name or base.name, storage_url, seed=base.train.seed, pruner=pruner,
                               n_trials=n_trials, heartbeat_interval=heartbeat_interval)
            out.mkdir(parents=True, exist_ok=True)  # only now: an unusable storage leaves no empty directory
            check_same_sweep(study, identity)
        parent = None
        if mlflow is not None:
            parent = SweepMirror(study, *mlflow, stream=out_stream)
            parent.start({"recipe": recipe, **{f"space.{p.key}": p.describe() for p in space},
                          **{f"fixed.{k}": str(v) for k, v in (fixed or {}).items()}})
        worker = _Worker(study, recipe, base, space, n_trials, out, auto_max_lr, out_stream, finish, stop, parent)
        worker.run(heartbeat_interval)
        with stop.interruptible(f"the sweep's page was not drawn ({n_trials} trials done); re-run the same "
                                "command to draw it"):
            stop.hold("page")
            result = write_results(study, recipe, base, out, n_trials=n_trials, stream=out_stream, draw=draw)
        if parent is not None:
            counts = {state.name.lower(): sum(t.state == state for t in study.get_trials(deepcopy=False))
                      for state in COUNTED}
            parent.finish({"best_val_accuracy": study.best_value} if counts["complete"] else {},
                          {"kiln.trials_complete": counts["complete"], "kiln.trials_pruned": counts["pruned"]})
        return result


def _check_space(space: list[ParamSpec], n_trials: int, auto_max_lr: bool) -> None:
    if n_trials < 1:
        raise ConfigError(f"--trials must be >= 1, not {n_trials}")
    if not space:
        raise ConfigError("nothing to search: give at least one --param")
    keys = [p.key for p in space]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"--param names a key twice: {', '.join(sorted({k for k in keys if keys.count(k) > 1}))}")
    if auto_max_lr and "schedule.max_lr" in keys:
        raise ConfigError("--max-lr auto chooses max_lr itself; drop --param max_lr, or drop --max-lr auto")


@dataclass
class _Worker:
    """One worker's loop over the study's trials (see :func:`run_sweep`)."""

    study: optuna.Study
    recipe: str
    base: Config
    space: list[ParamSpec]
    n_trials: int
    out: Path
    auto_max_lr: bool
    stream: TextIO
    finish: Callable[[Path], Any] | None
    stop: StopSignals
    parent: SweepMirror | None = None  #: the study's MLflow run: each trial's is nested under it

    def run(self, heartbeat_interval: int) -> None:
        """Trials until ``n_trials`` are complete or pruned; waits while the rest run in other workers."""
        waiting_for: list[int] = []
        while True:
            _fail_stale(self.study)
            trials = self.study.get_trials(deepcopy=False)
            if _requeue_stopped(self.study, trials):
                trials = self.study.get_trials(deepcopy=False)
            done = sum(t.state in COUNTED for t in trials)
            in_flight = [t.number for t in trials if t.state == TrialState.RUNNING]
            queued = sum(t.state == TrialState.WAITING for t in trials)  # stopped trials to resume: run here
            if done >= self.n_trials:
                return
            where = f"{done} of {self.n_trials} trials done; re-run the same command to continue the sweep"
            if not queued and done + len(in_flight) >= self.n_trials:  # the rest runs elsewhere: wait, in case
                if in_flight != waiting_for:  # a worker dies; say why this one sits idle, once per set of trials
                    waiting_for = in_flight
                    print(f"waiting for trial{'s' if len(in_flight) != 1 else ''} {', '.join(map(str, in_flight))} "
                          f"in other workers; a worker that died is noticed when its last heartbeat is "
                          f"{3 * heartbeat_interval} s old, and its trial is then run here", file=self.stream, flush=True)
                with self.stop.interruptible(f"worker stopped while waiting for other workers ({where})"):
                    time.sleep(max(1, heartbeat_interval // 2))
                continue
            with self.stop.interruptible(f"sweep stopped between trials ({where})"):
                if done:
                    self.stop.hold("between-trials")
            self.study.optimize(self._objective, n_trials=1, catch=(_Surplus,), gc_after_trial=True)
            if self.stop.signum is not None:
                done = sum(t.state in COUNTED for t in self.study.get_trials(deepcopy=False))
                self.stop.check(f"sweep stopped after a trial ({done} of {self.n_trials} trials done; re-run the same "
                                + ("command to continue the sweep)" if done < self.n_trials else
                                   "command to write the results and the page)"))

    def _objective(self, trial: optuna.Trial) -> float:
        ahead = [t for t in self.study.get_trials(deepcopy=False, states=COUNTED + IN_FLIGHT) if t.number < trial.number]
        if len(ahead) >= self.n_trials:  # another worker took the last place between our count and our ask
            trial.set_user_attr("surplus", True)
            raise _Surplus
        params = {p.key: p.suggest(trial) for p in self.space}  # a requeued trial's are the stopped one's
        stopped_dir = trial.user_attrs.get("run_dir")  # set only on a trial that resumes a stopped one
        pruning = OptunaPruning(trial)
        if stopped_dir is not None:
            run_dir = Path(stopped_dir)
            with released_after(run_dir):  # resume locks it; its run and report are written, then it is let go
                mirror = self._mirror(self.base, run_dir, trial)
                with self._mirrored(mirror, run_dir, trial, pruning) as handlers:
                    start_mirror(mirror, self.stream, send=False, say_url=False)
                    run = resume(run_dir, quiet=True, stream=io.StringIO(),
                                 extra_handlers={"optuna_pruning": pruning, **handlers})
                    self._after_run(trial, run, pruning)
        else:
            cfg = trial_config(self.base, params)
            if self.auto_max_lr:
                cfg = _auto_max_lr(self.study, self.base, cfg, self.stream)
            run_dir = make_run_dir(cfg, _trial_dir(self.out, trial.number))  # locked; refused if it holds files
            trial.set_user_attr("run_dir", str(run_dir))
            with released_after(run_dir):  # the trial's run and report are written under its lock, then let go
                mirror = self._mirror(cfg, run_dir, trial)
                with self._mirrored(mirror, run_dir, trial, pruning) as handlers:
                    run = train(cfg, run_dir, quiet=True, stream=io.StringIO(), before_run=lambda _: start_mirror(
                        mirror, self.stream, say_url=False), extra_handlers={"optuna_pruning": pruning, **handlers})
                    self._after_run(trial, run, pruning)
        return self._result(trial, run, pruning, params)

    def _mirror(self, cfg: Config, run_dir: Path, trial: optuna.Trial) -> RunMirror | None:
        """The trial's MLflow mirror, nested under the study's run (None without one)."""
        if self.parent is None:
            return None
        return open_mirror(cfg, run_dir, uri=self.parent.uri, experiment=self.parent.experiment,
                           parent_run_id=self.parent.run_id,
                           tags={"kiln.trial": str(trial.number), "kiln.sweep": self.study.study_name},
                           run_name=f"trial {trial.number:03d}", stream=self.stream)

    @contextlib.contextmanager
    def _mirrored(self, mirror: RunMirror | None, run_dir: Path, trial: optuna.Trial,
                  pruning: OptunaPruning) -> Iterator[dict[str, Any]]:
        """The trial's mirror around its run: a pruned trial is tagged so (its status: KILLED, as it stopped)."""
        with mirrored(mirror, run_dir, self.base.tracking.mlflow_every_seconds, stream=self.stream,
                      say_sent=False) as handlers:
            yield handlers
        if mirror is not None and pruning.pruned:
            with contextlib.suppress(MlflowUnavailable):
                mirror.set_tags({"kiln.pruned": "true", "kiln.pruned_epoch": str(pruning.pruned_epoch)})

    def _after_run(self, trial: optuna.Trial, run: Any, pruning: OptunaPruning) -> None:
        """Under the trial's lock: note a signal its run stopped on, record a prune, draw its report."""
        self.stop.note(run.stop_signal)
        if pruning.pruned:
            append_jsonl(run.events_path, {"event": "pruned", "epoch": pruning.pruned_epoch,
                                           "trial": trial.number, "study": self.study.study_name})
            self.stop.hold("pruned")
        stopped = run.status == "interrupted" and not pruning.pruned  # a pruned run ends "interrupted" too
        if self.finish is not None and not stopped:  # a stopped run's report is drawn when it is resumed
            self.finish(run.run_dir)

    def _result(self, trial: optuna.Trial, run: Any, pruning: OptunaPruning, params: dict[str, Any]) -> float:
        """Record the trial's run in its user attrs, say it in one line; its value, or pruned, or stopped."""
        best = run.handlers["summary"].best_val_accuracy
        epochs = int(run.trainer.state.epoch)
        for key, value in (("config", flatten_config(run.config)), ("epochs_run", epochs), ("status", run.status),
                           ("best_val_accuracy", best)):
            trial.set_user_attr(key, value)
        resumed = f" (resumes trial {trial.user_attrs['resumes']})" if "resumes" in trial.user_attrs else ""
        shown = ", ".join(f"{short_key(k)}={format_value(v)}" for k, v in params.items()) + resumed
        if pruning.pruned:
            print(f"trial {trial.number:3d}: {shown}: pruned after epoch {pruning.pruned_epoch} "
                  f"(val_accuracy {format_value(best)})", file=self.stream, flush=True)
            raise optuna.TrialPruned()
        if run.status == "interrupted":  # SIGTERM or Ctrl-C: last.pt is saved; the next worker resumes it
            trial.set_user_attr("interrupted", True)
            s = run.trainer.state
            raise SweepInterrupted(f"{self.stop.name}: trial {trial.number} stopped at iteration {s.iteration} "
                                   f"(epoch {s.epoch}), its checkpoint saved; re-run the same command to resume it "
                                   "and continue the sweep", self.stop.signum or run.stop_signal)
        print(f"trial {trial.number:3d}: {shown}: best val_accuracy {format_value(best)} "
              f"({epochs} epochs, {run.status})", file=self.stream, flush=True)
        return float(best) if best is not None else 0.0


def _requeue_stopped(study: optuna.Study, trials: list[optuna.trial.FrozenTrial]) -> bool:
    """Give each of ``trials`` a signal stopped (failed, recorded ``interrupted``) a new trial with its parameters
    and its run directory (when it holds a last.pt), which resumes it; once per stopped trial. Returns whether
    any was given one (the study's trials are then to be read again)."""
    taken = {t.user_attrs.get("resumes") for t in trials}
    requeued = False
    for t in trials:
        if t.state == TrialState.FAIL and t.user_attrs.get("interrupted") and t.number not in taken:
            run_dir = t.user_attrs.get("run_dir")
            attrs = {"resumes": t.number}
            if run_dir is not None and RunDir(run_dir).last.is_file():
                attrs["run_dir"] = run_dir
            study.enqueue_trial(t.params, user_attrs=attrs, skip_if_exists=False)
            requeued = True
    return requeued


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
