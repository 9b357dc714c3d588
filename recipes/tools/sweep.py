"""``kiln sweep``: an Optuna study over a recipe's hyperparameters; every trial is a normal kiln run.

One study (TPE, seeded, maximising the best val_accuracy) lives in an Optuna storage: SQLite in the
sweep directory by default, or any SQLAlchemy URL, so several workers (processes or machines) share
it. Trial ``k`` trains in ``DIR/trials/kkk`` with :func:`recipes.run.train` in this process and an
:class:`callbacks.OptunaPruning` on its trainer. Workers send heartbeats: the RUNNING trial of a worker
that died is marked FAILED by the next worker that looks (after the grace period), and the study goes
on. At the end: a table, ``DIR/sweep.json``, ``DIR/best.yaml`` (a recipe file `kiln train` accepts),
``DIR/plots/*.png`` and ``DIR/sweep.html``.
"""
from __future__ import annotations

import base64
import html
import io
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import optuna
import yaml
from optuna.samplers import BaseSampler, TPESampler
from optuna.trial import TrialState

from callbacks import OptunaPruning
from callbacks.files import append_jsonl, write_atomic, write_json_atomic
from recipes.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_to_dict,
    field_paths,
    with_max_lr,
)
from recipes.recipe_files import is_recipe_file, load_recipe
from recipes.run import make_run_dir, train
from recipes.run.lock import released_after
from recipes.run.rundir import PLOTS, RunDir
from recipes.tools.html_style import STYLESHEET
from recipes.tools.lr_find import choose_max_lr

__all__ = [
    "ParamSpec",
    "SweepInterrupted",
    "SweepResult",
    "TrialSeededTPE",
    "default_space",
    "format_table",
    "open_study",
    "parse_param",
    "run_sweep",
    "trial_config",
    "write_results",
]

#: What counts towards a sweep's ``--trials``: a trial that failed (its worker died) is replaced.
_COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)
_IN_FLIGHT = (TrialState.RUNNING, TrialState.WAITING)


class SweepInterrupted(Exception):
    """A trial was stopped by Ctrl-C or SIGTERM: the trial is marked failed and this worker stops."""


@dataclass(frozen=True)
class ParamSpec:
    """One searched config key: ``kind`` is float (uniform), log (log-uniform), int or choice."""

    key: str  #: section.field
    kind: str
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: optuna.Trial) -> Any:
        """This trial's value of the parameter (Optuna's parameter name is ``key``)."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high))
        return trial.suggest_float(self.key, self.low, self.high, log=self.kind == "log")

    def describe(self) -> str:
        """The spec as ``--param`` takes it."""
        if self.kind == "choice":
            return f"{self.key}=choice:{','.join(str(c) for c in self.choices)}"
        prefix = {"log": "log:", "int": "int:"}.get(self.kind, "")
        return f"{self.key}={prefix}{self.low:g}:{self.high:g}"


def _resolve(cfg: Config, key: str, sample: Any) -> str:
    """The ``section.field`` path of ``key`` (dotted or bare), checked by applying ``sample`` to it."""
    paths = field_paths(cfg)
    matches = [key] if key in paths else [p for p in paths if p.split(".", 1)[1] == key]
    apply_overrides(cfg, {key: sample})  # an unknown or ambiguous key, or a bad value: ConfigError
    return matches[0]


def parse_param(spec: str, cfg: Config) -> ParamSpec:
    """``KEY=log:LOW:HIGH``, ``KEY=LOW:HIGH``, ``KEY=int:LOW:HIGH`` or ``KEY=choice:A,B,C`` as a ParamSpec.

    Raises:
        ConfigError: bad syntax, an unknown key (with a did-you-mean) or a value the key cannot take.
    """
    syntax = "KEY=log:LOW:HIGH, KEY=LOW:HIGH, KEY=int:LOW:HIGH or KEY=choice:A,B,..."
    key, sep, body = spec.partition("=")
    key = key.strip()
    if not sep or not key or not body.strip():
        raise ConfigError(f"--param {spec!r}: expected {syntax}")
    kind, _, rest = body.strip().partition(":")
    if kind not in ("log", "int", "choice"):
        kind, rest = "float", body.strip()
    if kind == "choice":
        raw = [c.strip() for c in rest.split(",") if c.strip()]
        if not raw:
            raise ConfigError(f"--param {spec!r}: choice needs at least one value ({syntax})")
        path = _resolve(cfg, key, raw[0])
        choices = tuple(getattr(_section(apply_overrides(cfg, {path: c}), path), path.split(".")[1]) for c in raw)
        return ParamSpec(path, "choice", choices=tuple(dict.fromkeys(choices)))
    bounds = rest.split(":")
    try:
        low, high = (float(b) for b in bounds) if len(bounds) == 2 else (None, None)
    except ValueError:
        low = high = None
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        raise ConfigError(f"--param {spec!r}: expected {syntax}")
    if not low < high:
        raise ConfigError(f"--param {spec!r}: LOW must be below HIGH")
    if kind == "log" and low <= 0:
        raise ConfigError(f"--param {spec!r}: a log range needs LOW > 0")
    path = _resolve(cfg, key, low)
    apply_overrides(cfg, {path: high})
    field_type = type(getattr(_section(cfg, path), path.split(".")[1]))
    if field_type is int and kind != "int":
        if not (low.is_integer() and high.is_integer()):
            raise ConfigError(f"--param {spec!r}: {path} is an integer; give integer bounds or choice:A,B,...")
        kind = "int" if kind == "float" else kind
    if kind == "int" and not (low.is_integer() and high.is_integer()):
        raise ConfigError(f"--param {spec!r}: int needs integer bounds")
    if field_type is not int and field_type is not float:
        raise ConfigError(f"--param {spec!r}: {path} is not a number; use choice:A,B,...")
    return ParamSpec(path, kind, low, high)


def _section(cfg: Config, path: str) -> Any:
    return getattr(cfg, path.split(".")[0])


def default_space(cfg: Config, *, with_max_lr: bool = True) -> list[ParamSpec]:
    """The search space when no ``--param`` is given, centred on the recipe's own values.

    max_lr: log-uniform over [recipe / 10, recipe * 10]; weight decay: log-uniform over
    [recipe / 100, recipe * 10] (1e-5..1e-1 when the recipe has none); label smoothing: 0..0.3;
    batch size: half, the same or double the recipe's.
    """
    wd = cfg.optim.weight_decay
    b = cfg.data.batch_size
    space = [ParamSpec("schedule.max_lr", "log", cfg.schedule.max_lr / 10, cfg.schedule.max_lr * 10)] if with_max_lr else []
    space += [
        ParamSpec("optim.weight_decay", "log", wd / 100 if wd > 0 else 1e-5, min(wd * 10, 1.0) if wd > 0 else 1e-1),
        ParamSpec("train.label_smoothing", "float", 0.0, 0.3),
        ParamSpec("data.batch_size", "choice", choices=tuple(sorted({max(1, b // 2), b, b * 2}))),
    ]
    return space


def trial_config(cfg: Config, params: dict[str, Any]) -> Config:
    """``cfg`` with a trial's ``{section.field: value}``; a new max_lr keeps the recipe's max_lr / lr ratio
    (where the cycle starts), unless ``optim.lr`` is searched too."""
    overrides = dict(params)
    if "schedule.max_lr" in overrides and "optim.lr" not in overrides:
        cfg = with_max_lr(cfg, float(overrides.pop("schedule.max_lr")))
    return apply_overrides(cfg, overrides)


class TrialSeededTPE(BaseSampler):
    """TPE whose randomness for trial k is seeded by (seed, k), not by how many trials this worker drew.

    Workers started together with the same ``--seed`` would otherwise propose the same parameters; a
    single worker still gets the same trials on every run of the same command.
    """

    def __init__(self, seed: int, n_startup_trials: int) -> None:
        self.seed, self.n_startup_trials = seed, n_startup_trials
        self._inner = self._make(0)

    def _make(self, number: int) -> TPESampler:
        return TPESampler(seed=(self.seed * 1_000_003 + number) % 2**32, n_startup_trials=self.n_startup_trials,
                          constant_liar=True)  # running trials count as bad guesses: workers spread out

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self._inner = self._make(trial.number)
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: Any) -> dict[str, Any]:
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: Any, search_space: dict[str, Any]) -> dict[str, Any]:
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: Any, param_name: str, dist: Any) -> Any:
        return self._inner.sample_independent(study, trial, param_name, dist)

    def after_trial(self, study: optuna.Study, trial: Any, state: TrialState, values: Sequence[float] | None) -> None:
        self._inner.after_trial(study, trial, state, values)


#: Seconds a PostgreSQL storage may take to answer before ``kiln sweep`` gives up on it.
CONNECT_TIMEOUT = 10


def _safe_url(url: str) -> str:
    """``url`` without its password."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy can parse: say it as given
        return url


def _libpq_url_without_timeout(url: str) -> bool:
    """A PostgreSQL URL for psycopg (3, SQLAlchemy 2.1's default) or psycopg2, which take libpq's
    ``connect_timeout``, that does not set one itself."""
    try:
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy can parse: opening it will say so
        return False
    return (parsed.drivername in ("postgresql", "postgresql+psycopg", "postgresql+psycopg2")
            and "connect_timeout" not in parsed.query)


def _storage_error(error: Exception) -> str:
    """Why a storage could not be opened, in one line; a missing database driver names what to install."""
    missing = error if isinstance(error, ModuleNotFoundError) else None
    cause: BaseException | None = error
    seen: set[int] = set()
    while missing is None and cause is not None and id(cause) not in seen:  # Optuna re-raises the driver's
        seen.add(id(cause))  # ImportError as its own
        cause = cause.__cause__ or cause.__context__
        missing = cause if isinstance(cause, ModuleNotFoundError) else None
    if missing is not None and missing.name:
        driver = missing.name.split(".")[0]
        if driver.startswith("psycopg"):
            return (f"its driver {driver} is not installed; install kiln's PostgreSQL extra "
                    "(pip install 'kiln[postgres]', psycopg 3) and use postgresql://... or postgresql+psycopg://...")
        return f"its driver {driver} is not installed (pip install {driver})"
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return reason[:200]


def _creation_race(error: Exception) -> bool:
    """Whether ``error`` is another worker creating the same tables at the same moment."""
    text = str(error).lower()
    return any(k in text for k in ("unique constraint", "already exists", "database is locked", "duplicate"))


def open_study(name: str, storage_url: str, *, seed: int, pruner: str, n_trials: int,
               heartbeat_interval: int = 10, grace_period: int | None = None) -> optuna.Study:
    """Create the study, or load it if it exists, in ``storage_url`` (heartbeats on).

    Raises:
        ConfigError: the storage cannot be opened (one line naming the URL, without its password).
    """
    kwargs: dict[str, Any] = {}
    if storage_url.startswith("sqlite"):  # several workers on one file: wait for the lock, don't fail on it
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    elif _libpq_url_without_timeout(storage_url):  # a server that does not answer: give up in seconds, not minutes
        kwargs["engine_kwargs"] = {"connect_args": {"connect_timeout": CONNECT_TIMEOUT}, "pool_pre_ping": True}
    for attempt in range(4):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(storage_url, heartbeat_interval=heartbeat_interval,
                                                     grace_period=grace_period or 3 * heartbeat_interval, **kwargs)
            break
        except Exception as e:  # a driver that is missing, a host that does not answer, a malformed URL
            if attempt < 3 and _creation_race(e):  # workers started together both create the schema: retry
                time.sleep(0.5 + attempt)
                continue
            raise ConfigError(f"cannot open the study storage {_safe_url(storage_url)}: {_storage_error(e)}") from None
    pruners = {"median": optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1),
               "none": optuna.pruners.NopPruner()}
    if pruner not in pruners:
        raise ConfigError(f"--pruner must be median or none, not {pruner!r}")
    sampler = TrialSeededTPE(seed, n_startup_trials=max(2, min(10, n_trials // 3)))
    return optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruners[pruner],
                               direction="maximize", load_if_exists=True)


def _check_same_sweep(study: optuna.Study, identity: dict[str, Any]) -> None:
    """Record what this study searches; refuse to continue it with a different recipe or space."""
    saved = study.user_attrs.get("kiln")
    if saved is None:
        study.set_user_attr("kiln", identity)
        return
    if saved != identity:
        changed = [k for k in identity if saved.get(k) != identity[k]]
        raise ConfigError(f"study {study.study_name!r} was started with a different {', '.join(changed)}; "
                          "re-run it with the same arguments, or pick another --study or --out")


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


@dataclass
class SweepResult:
    """What a worker leaves: the study, and the files it wrote."""

    study: optuna.Study
    out: Path
    table: str
    best_yaml: Path | None
    plots: list[Path]
    html_path: Path
    json_path: Path


def run_sweep(recipe: str, base: Config, space: list[ParamSpec], *, n_trials: int, out: Path, storage: str | None,
              study_name: str | None, pruner: str = "median", auto_max_lr: bool = False,
              fixed: dict[str, Any] | None = None, heartbeat_interval: int = 10, stream: TextIO | None = None,
              finish: Callable[[Path], Any] | None = None) -> SweepResult:
    """Run trials of the study until ``n_trials`` are complete or pruned (with every worker's), then write
    the results. ``base`` is the recipe with the sweep's fixed overrides (``fixed``, for best.yaml);
    ``finish(run_dir)`` runs after each trial (e.g. ``recipes.report.finish_run``).

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
    _check_same_sweep(study, identity)

    def objective(trial: optuna.Trial) -> float:
        ahead = [t for t in study.get_trials(deepcopy=False, states=_COUNTED + _IN_FLIGHT) if t.number < trial.number]
        if len(ahead) >= n_trials:  # another worker took the last place between our count and our ask
            trial.set_user_attr("surplus", True)
            raise _Surplus
        params = {p.key: p.suggest(trial) for p in space}
        cfg = trial_config(base, params)
        if auto_max_lr:
            cfg = _auto_max_lr(study, base, cfg, out_stream)
        run_dir = make_run_dir(cfg, _trial_dir(out, trial.number))  # locked; refused if it holds files already
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("config", {k: v for k, v in _flat(config_to_dict(cfg)).items()})
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
        shown = ", ".join(f"{_short(k)}={_fmt(v)}" for k, v in params.items())
        if pruning.pruned:
            print(f"trial {trial.number:3d}: {shown}: pruned after epoch {pruning.pruned_epoch} "
                  f"(val_accuracy {_fmt(best)})", file=out_stream, flush=True)
            raise optuna.TrialPruned()
        if run.status == "interrupted":  # Ctrl-C or SIGTERM: this worker stops; the trial is not a result
            raise SweepInterrupted(f"trial {trial.number} was stopped; re-run the same command to continue the sweep")
        print(f"trial {trial.number:3d}: {shown}: best val_accuracy {_fmt(best)} ({epochs} epochs, {run.status})",
              file=out_stream, flush=True)
        return float(best) if best is not None else 0.0

    waiting_for: list[int] = []
    while True:
        _fail_stale(study)
        trials = study.get_trials(deepcopy=False)
        done = sum(t.state in _COUNTED for t in trials)
        in_flight = [t.number for t in trials if t.state in _IN_FLIGHT]
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
    return write_results(study, recipe, base, out, n_trials=n_trials, stream=out_stream)


class _Surplus(Exception):
    """This worker's trial would go beyond --trials (a race with another worker): it is marked failed unrun."""


def _fail_stale(study: optuna.Study) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _flat(d: dict[str, Any]) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, sec in d.items() if isinstance(sec, dict) for k, v in sec.items()}


def _short(key: str) -> str:
    return key.split(".", 1)[1]


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if 1e-2 <= abs(value) < 10 or value == 0 else f"{value:.3g}"
    return str(value)


def _trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """Every trial but surplus ones: ranked completed trials first (best first), then pruned ones, then the rest."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("surplus"):
            continue
        best = t.user_attrs.get("best_val_accuracy")
        if best is None and t.intermediate_values:
            best = max(t.intermediate_values.values())
        rows.append({"number": t.number, "state": t.state.name.lower(), "params": dict(t.params),
                     "best_val_accuracy": best, "epochs_run": t.user_attrs.get("epochs_run"),
                     "pruned": t.state == TrialState.PRUNED, "run_dir": t.user_attrs.get("run_dir"),
                     "value": t.value})
    order = {"complete": 0, "pruned": 1}
    rows.sort(key=lambda r: (order.get(r["state"], 2), -(r["best_val_accuracy"] or 0.0), r["number"]))
    rank = 0
    for r in rows:
        r["rank"] = (rank := rank + 1) if r["state"] in order else None
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """The results table: rank, trial, params, best accuracy, epochs run, pruned or not."""
    keys = list(dict.fromkeys(k for r in rows for k in r["params"]))
    head = ["rank", "trial"] + [_short(k) for k in keys] + ["best_acc", "epochs", "pruned"]
    body = [[str(r["rank"] or "-"), f"{r['number']:03d}"] + [_fmt(r["params"].get(k)) for k in keys]
            + [_fmt(r["best_val_accuracy"]), _fmt(r["epochs_run"]),
               "yes" if r["pruned"] else ("no" if r["state"] == "complete" else r["state"])] for r in rows]
    widths = [max(len(row[i]) for row in [head] + body) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in [head] + body)


def _write_best_yaml(study: optuna.Study, recipe: str, base: Config, path: Path) -> Path | None:
    """A recipe file: ``base: RECIPE`` and every key where the best trial's config differs from RECIPE's."""
    try:
        best = study.best_trial
    except ValueError:  # no completed trial yet
        return None
    if "config" not in best.user_attrs:
        return None
    recipe_cfg = _flat(config_to_dict(load_recipe(recipe)))
    changes = {k: v for k, v in best.user_attrs["config"].items() if recipe_cfg.get(k) != v}
    source = str(Path(recipe).resolve()) if is_recipe_file(recipe) else recipe
    doc = {"base": source, "name": f"{base.name}-sweep-best",
           "description": f"kiln sweep {study.study_name}: trial {best.number}, best val_accuracy {best.value:.4f}",
           **changes}
    text = yaml.safe_dump(doc, sort_keys=False).encode()
    write_atomic(path, lambda f: f.write(text))
    return path


def _plots(study: optuna.Study, out: Path, space_keys: list[str]) -> list[Path]:
    """Optimization history, parameter importances and accuracy vs max_lr / label smoothing, as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    plots_dir = out / PLOTS  # where a run directory keeps its plots
    plots_dir.mkdir(parents=True, exist_ok=True)
    wanted: list[tuple[str, Any]] = [("optimization_history", lambda: ovm.plot_optimization_history(study)),
                                     ("param_importances", lambda: ovm.plot_param_importances(study)),
                                     ("intermediate_values", lambda: ovm.plot_intermediate_values(study)),
                                     ("parallel_coordinate", lambda: ovm.plot_parallel_coordinate(study))]
    for key in ("schedule.max_lr", "train.label_smoothing"):
        if key in space_keys:
            wanted.append((f"accuracy_vs_{_short(key)}", lambda key=key: ovm.plot_slice(study, params=[key])))
    written = []
    completed = sum(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False))
    for name, draw in wanted:
        if completed < (2 if name in ("param_importances", "parallel_coordinate") else 1):
            continue
        if name == "intermediate_values" and not any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optuna's ExperimentalWarning for its matplotlib plots
            try:
                ax = draw()
            except (ValueError, RuntimeError, ZeroDivisionError):  # e.g. importances of a parameter that never varied
                plt.close("all")
                continue
        first = ax.flat[0] if hasattr(ax, "flat") else ax
        if name == "intermediate_values":
            first.set_xlabel("epoch")
            first.set_ylabel("val_accuracy (each trial)")
        elif name not in ("param_importances", "parallel_coordinate"):
            first.set_ylabel("best val_accuracy")
        if name.startswith("accuracy_vs_"):
            first.set_title(f"{study.study_name}: best val_accuracy vs {name[len('accuracy_vs_'):]}")
        fig = first.figure
        fig.set_size_inches(7, 4.5)
        fig.tight_layout()
        path = plots_dir / f"{name}.png"
        try:
            write_atomic(path, lambda f, fig=fig: fig.savefig(f, format="png", dpi=100))
        finally:
            plt.close(fig)
        written.append(path)
    return written


def _html(study: optuna.Study, rows: list[dict[str, Any]], out: Path, plots: list[Path], best_yaml: Path | None) -> str:
    """sweep.html: the trials (each linked to its run's report.html), best.yaml and the plots, styled as
    report.html is."""
    e = html.escape
    keys = list(dict.fromkeys(k for r in rows for k in r["params"]))
    head = "".join(f"<th>{e(h)}</th>" for h in ["rank", "trial", *keys, "best val_accuracy", "epochs", "state", "report"])
    body = []
    for r in rows:
        run_dir = Path(r["run_dir"]) if r.get("run_dir") else None
        report = RunDir(run_dir).report if run_dir is not None else None
        link = (f'<a href="{e(os.path.relpath(report, out))}">report</a>' if report is not None and report.exists()
                else "")
        cells = [r["rank"] or "-", f"{r['number']:03d}", *[_fmt(r["params"].get(k)) for k in keys],
                 _fmt(r["best_val_accuracy"]), _fmt(r["epochs_run"]), "pruned" if r["pruned"] else r["state"]]
        body.append("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in cells) + f"<td>{link}</td></tr>")
    imgs = "\n".join(f'<figure><img src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode("ascii")}" '
                     f'alt="{e(p.stem)}"><figcaption>{e(p.stem.replace("_", " "))}</figcaption></figure>' for p in plots)
    best = f"<pre>{e(best_yaml.read_text())}</pre>" if best_yaml else "<p>no completed trial yet</p>"
    train = f'<code class="cmd">kiln train {e(str(best_yaml))}</code>' if best_yaml else ""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>kiln sweep {e(study.study_name)}</title>"
            f"<style>{STYLESHEET}</style></head><body><main><h1>kiln sweep: {e(study.study_name)}</h1>"
            f"<div class='sub'>{len(rows)} trials, objective: best val_accuracy (maximised)</div>"
            f"<h2>Trials</h2><table><tr>{head}</tr>{''.join(body)}</table>"
            f"<h2>best.yaml</h2>{best}{train}<h2>Plots</h2>{imgs}</main></body></html>")


def write_results(study: optuna.Study, recipe: str, base: Config, out: Path, *, n_trials: int | None = None,
                  stream: TextIO | None = None) -> SweepResult:
    """The table (printed), DIR/sweep.json, DIR/best.yaml, DIR/plots/*.png and DIR/sweep.html."""
    rows = _trial_rows(study)
    table = format_table(rows)
    best_yaml = _write_best_yaml(study, recipe, base, out / "best.yaml")
    space_keys = list(dict.fromkeys(k for r in rows for k in r["params"]))
    plots = _plots(study, out, space_keys)
    html_path = out / "sweep.html"
    page = _html(study, rows, out, plots, best_yaml).encode()
    write_atomic(html_path, lambda f: f.write(page))
    best_row = next((r for r in rows if r["state"] == "complete"), None)
    json_path = out / "sweep.json"
    write_json_atomic(json_path, {
        "study": study.study_name, "recipe": recipe, "direction": "maximize", "objective": "best val_accuracy",
        "n_trials": n_trials, "space": study.user_attrs.get("kiln", {}).get("space"),
        "fixed": study.user_attrs.get("kiln", {}).get("fixed"),
        "best": best_row, "best_yaml": str(best_yaml) if best_yaml else None,
        "trials": rows, "plots": [str(p) for p in plots],
    })
    print(table, file=stream or sys.stdout)
    print(f"written: {html_path} (the trials, linked to their reports, and the plots), {json_path}", file=stream or sys.stdout)
    if best_yaml is not None:
        print(f"best: {best_yaml}; train it with: kiln train {best_yaml}", file=stream or sys.stdout)
    if plots:
        print(f"plots: {out / PLOTS} ({', '.join(p.name for p in plots)})", file=stream or sys.stdout)
    return SweepResult(study, out, table, best_yaml, plots, html_path, json_path)
