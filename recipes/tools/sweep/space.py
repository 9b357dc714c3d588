"""What a sweep searches: the ``--param KEY=SPEC`` grammar, the default space around a recipe, a trial's config,
and the sampler that makes trial k's proposal a function of (seed, k) whichever worker draws it."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.samplers import BaseSampler, TPESampler
from optuna.trial import TrialState

from recipes.config import Config, ConfigError, apply_overrides, resolve_key, with_max_lr

__all__ = ["ParamSpec", "TrialSeededTPE", "default_space", "parse_param", "trial_config"]


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
    """The ``section.field`` path of ``key`` (dotted, bare or renamed), checked by applying ``sample`` to it."""
    path = ".".join(resolve_key(cfg, key))  # an unknown or ambiguous key: ConfigError
    apply_overrides(cfg, {path: sample})  # a bad value: ConfigError
    return path


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
