"""The config's keys: which ``kiln train`` flag sets which key, keys renamed since older runs, resolving and
applying ``section.key=value`` overrides, and the config as flat keys, as JSON and back."""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import fields
from typing import Any, Mapping

from recipes.config import sections
from recipes.config.sections import FILE_DATASETS, SECTIONS, Config, ConfigError

__all__ = ["OPTION_KEYS", "LEGACY_KEYS", "apply_overrides", "config_docs", "config_from_dict", "config_to_dict",
           "closest", "did_you_mean", "field_paths", "flatten_config", "hparams", "json_safe", "resolve_key", "with_class_count",
           "with_max_lr"]


#: ``kiln train`` option -> config key. The CLI builds its flags from it and the findings turn keys back
#: into flags with it; None as an option's value means "not given", so the recipe's value stands.
OPTION_KEYS = {
    "epochs": "train.epochs", "batch_size": "data.batch_size", "lr": "optim.lr", "max_lr": "schedule.max_lr",
    "weight_decay": "optim.weight_decay", "label_smoothing": "train.label_smoothing", "clip_norm": "train.clip_norm",
    "precision": "train.precision", "device": "train.device", "seed": "train.seed", "on_nan": "guard.on_nan",
    "data_dir": "data.data_dir", "download": "data.download", "model": "model.name", "weights": "model.weights",
    "image_size": "data.image_size", "val_fraction": "data.val_fraction", "num_workers": "data.num_workers",
    "ema": "train.ema_decay", "mixup": "train.mixup_alpha", "cutmix": "train.cutmix_alpha",
    "early_stop": "train.early_stop_patience", "accumulation_steps": "train.accumulation_steps",
    "channels_last": "train.channels_last", "compile": "train.compile",
    "mlflow": "tracking.mlflow_uri", "mlflow_experiment": "tracking.mlflow_experiment",
    "mlflow_required": "tracking.mlflow_required", "mlflow_log_model": "tracking.mlflow_log_model",
}

#: Keys renamed since run directories, checkpoints and recipe files were written with them: old key -> new.
#: They are accepted wherever a key is (config.json, checkpoints, recipe files, ``--set``).
LEGACY_KEYS = {
    "train.on_nan": "guard.on_nan", "train.nan_check_every": "guard.check_every",
    "train.nan_max_skips": "guard.max_skips", "train.nan_lr_factor": "guard.lr_factor",
    "train.nan_max_rollbacks": "guard.max_rollbacks", "train.nan_collapse_skips": "guard.collapse_skips",
    "train.nan_min_loss_scale": "guard.min_loss_scale", "train.nan_max_loss_ratio": "guard.max_loss_ratio",
}


def field_paths(cfg: Config) -> list[str]:
    """Every overridable key, as ``section.field``."""
    return [f"{s}.{f.name}" for s in SECTIONS for f in fields(getattr(cfg, s))]


def resolve_key(cfg: Config, key: str, *, bare: bool = True) -> tuple[str, str]:
    """``(section, field)`` of ``key``: dotted, renamed (LEGACY_KEYS) or, with ``bare``, a field name alone
    when one section has it; else ConfigError, with a did-you-mean.

    Every reader of a key goes through here: ``--set``, recipe files, sweeps' ``--param``, old config.json.

    Example:
        >>> from recipes import get_recipe
        >>> resolve_key(get_recipe("digits"), "max_lr"), resolve_key(get_recipe("digits"), "train.on_nan")
        (('schedule', 'max_lr'), ('guard', 'on_nan'))
    """
    key = LEGACY_KEYS.get(key, key)
    paths = field_paths(cfg)
    if key in paths:
        section, name = key.split(".", 1)
        return section, name
    matches = [p for p in paths if p.split(".", 1)[1] == key] if bare else []
    if len(matches) == 1:
        return tuple(matches[0].split(".", 1))  # type: ignore[return-value]
    hint = did_you_mean(key, paths + [p.split(".", 1)[1] for p in paths])
    raise ConfigError(f"unknown config key {key!r}{hint} (see `kiln show {cfg.name}` for the keys)")


def closest(word: str, candidates: list[str]) -> str | None:
    """The candidate closest to a misspelt ``word`` (None when none is close): the one did-you-mean of kiln's keys.

    Example:
        >>> closest("epohcs", ["train.epochs", "epochs"]), closest("zzz", ["epochs"])
        ('epochs', None)
    """
    close = difflib.get_close_matches(word, candidates, n=1)
    return close[0] if close else None


def did_you_mean(word: str, candidates: list[str]) -> str:
    """``"; did you mean 'X'?"`` with the :func:`closest` candidate, or "" when none is close."""
    close = closest(word, candidates)
    return f"; did you mean {close!r}?" if close else ""


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Turn a string (from --set or YAML) or a YAML value into the field's type."""
    hint = annotation if not isinstance(annotation, str) else eval(annotation, vars(typing), {})  # noqa: S307
    origin = typing.get_origin(hint)
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if hint is int:
            number = float(value) if isinstance(value, (str, float)) else value
            if isinstance(number, float) and not number.is_integer():
                raise ValueError
            return int(number)
        if hint is float:
            number = float(value)
            if not math.isfinite(number):
                raise ConfigError(f"bad value for {key}: {value!r} is not a finite number")
            return number
        if hint is str:
            return str(value)
        if origin is tuple:
            items = value if isinstance(value, (list, tuple)) else [v for v in str(value).strip("()[] ").split(",") if v.strip()]
            return tuple(int(v) for v in items)
    except (TypeError, ValueError):
        pass
    else:
        return value
    kinds = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    kind = kinds.get(hint, "a comma-separated list of integers")
    raise ConfigError(f"bad value for {key}: {value!r} is not {kind}")


def apply_overrides(cfg: Config, overrides: Mapping[str, Any]) -> Config:
    """A new config with ``{"section.key" or "key": value}`` applied; values are coerced to field types.

    Raises:
        ConfigError: an unknown key (with a did-you-mean), a value of the wrong type, or a value the
            section's validation refuses.
    """
    changes: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        if key in ("name", "description"):
            changes.setdefault("", {})[key] = str(value)
            continue
        section, name = resolve_key(cfg, key)
        annotation = {f.name: f.type for f in fields(getattr(cfg, section))}[name]
        changes.setdefault(section, {})[name] = _coerce(value, annotation, f"{section}.{name}")
    try:
        top = dict(changes.pop("", {}))
        for section, values in changes.items():
            top[section] = dataclasses.replace(getattr(cfg, section), **values)
        return dataclasses.replace(cfg, **top)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None


def with_max_lr(cfg: Config, max_lr: float) -> Config:
    """``cfg`` peaking at ``max_lr``; ``optim.lr`` (where the cycle starts) keeps the recipe's :attr:`Config.div_factor`.

    Example:
        >>> from recipes.config import OptimConfig, ScheduleConfig
        >>> cfg = with_max_lr(Config(name="x", optim=OptimConfig(lr=1e-3), schedule=ScheduleConfig(max_lr=1e-2)), 0.05)
        >>> cfg.schedule.max_lr, round(cfg.optim.lr, 6)
        (0.05, 0.005)
    """
    return apply_overrides(cfg, {"schedule.max_lr": max_lr, "optim.lr": max_lr / cfg.div_factor})


def with_class_count(cfg: Config, num_classes: int) -> Config:
    """``cfg`` with ``data.num_classes`` set to the number of classes its data set turned out to have.

    The synthetic data set makes ``data.num_classes`` classes; every other data set has its own, and
    the saved config records that number rather than the unused default. Resuming ignores the field for
    those data sets (see ``recipes.run.checkpoints.run_changing_differences``).
    """
    if cfg.data.num_classes == num_classes:
        return cfg
    return apply_overrides(cfg, {"data.num_classes": num_classes})


def flatten_config(cfg: Config) -> dict[str, Any]:
    """Every key of ``cfg`` as ``{"section.key": value}`` (JSON values; ``name`` and ``description`` as they are),
    the one flat form of a config: for comparing two configs key by key, a sweep's trial record, TensorBoard's
    hparams.

    Example:
        >>> flat = flatten_config(Config(name="x"))
        >>> flat["name"], flat["train.epochs"], flat["model.channels"]
        ('x', 10, [32, 64, 128])
    """
    return _flatten(config_to_dict(cfg))


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def hparams(cfg: Config) -> dict[str, bool | int | float | str]:
    """The section keys of :func:`flatten_config` that describe the run, for TensorBoard's hparams and MLflow's
    params (lists become text); the ``tracking`` section says where the run is mirrored, not what it is, and
    may change on a resume, so it is left out."""
    return {key: value if isinstance(value, (bool, int, float, str)) else ",".join(str(v) for v in value)
            for key, value in flatten_config(cfg).items() if "." in key and not key.startswith("tracking.")}


def config_docs() -> dict[str, str]:
    """Each config key's meaning, ``{"train.epochs": "passes over the training data", ...}``: the ``#:``
    comment beside its field in ``sections.py``, or the ``#:`` lines just above it (one place for the docs: what
    ``kiln show --explain`` prints, and the help of the key's ``kiln train`` flag).

    Example:
        >>> config_docs()["train.epochs"]
        'passes over the training data'
    """
    import ast
    import inspect

    source = inspect.getsource(sections)
    lines = source.splitlines()
    docs_by_class: dict[str, dict[str, str]] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    _, sep, doc = lines[item.lineno - 1].partition("#:")
                    above = item.lineno - 2  # or the ``#:`` lines just above the field, when the doc is long
                    while not sep and lines[above].strip().startswith("#:"):
                        above -= 1
                    if not sep and above < item.lineno - 2:
                        doc = " ".join(line.strip()[2:].strip() for line in lines[above + 1:item.lineno - 1])
                    if sep or doc:
                        docs_by_class.setdefault(node.name, {})[item.target.id] = doc.strip()
    docs = {name: doc for name, doc in docs_by_class.get("Config", {}).items()}
    for section in dataclasses.fields(Config):
        factory = section.default_factory
        if factory is not dataclasses.MISSING and isinstance(factory, type):
            for key, doc in docs_by_class.get(factory.__name__, {}).items():
                docs[f"{section.name}.{key}"] = doc
    return docs


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain JSON-able data (tuples become lists)."""
    return json_safe(dataclasses.asdict(cfg))


def json_safe(value: Any) -> Any:
    """Tuples to lists, recursively."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """Rebuild a :class:`Config` from :func:`config_to_dict`'s output (extra top-level keys ignored)."""
    base = Config(name=str(data.get("name", "custom")), description=str(data.get("description", "")))
    flat = {f"{s}.{k}": v for s in SECTIONS for k, v in (data.get(s) or {}).items()}
    if flat.get("data.dataset", base.data.dataset) not in FILE_DATASETS:
        flat.pop("data.data_dir", None)  # older kiln recorded a --data-dir that an in-memory data set never read
    return apply_overrides(base, flat)
