"""Recipe configuration: one frozen dataclass with typed sections, overridable by ``section.key=value``.

Also the tables every wing shares without importing the CLI: :data:`OPTION_KEYS` (which ``kiln train``
flag sets which key) and :data:`LEGACY_KEYS` (keys renamed since older run directories were written).
"""
from __future__ import annotations

import dataclasses
import sys
import difflib
import math
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from callbacks.nan_diagnosis import POLICIES
from engine.precision_names import PRECISIONS

__all__ = [
    "Config", "CheckpointConfig", "DataConfig", "GuardConfig", "ModelConfig", "OptimConfig", "ScheduleConfig",
    "TrainConfig", "ConfigError", "DataError", "apply_overrides", "config_to_dict", "config_from_dict", "field_paths",
    "hparams", "resolve_key", "with_max_lr", "with_class_count", "OPTION_KEYS", "LEGACY_KEYS", "KILN_MODELS", "SECTIONS",
]


class ConfigError(ValueError):
    """A recipe, override or value that kiln cannot use; the message is one line for the user."""


class DataError(ValueError):
    """A data set that is missing or unreadable; the message says where kiln looked and what to do. Raised by
    ``recipes.data`` (which exports it); here, without torch, so the command line catches it cheaply."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


#: The data sets a recipe can train on.
DATASETS = ("digits", "synthetic", "cifar10", "imagefolder", "fashion-mnist", "mnist")

#: The data sets read from files under ``data.data_dir``; the others are made in memory.
FILE_DATASETS = ("cifar10", "imagefolder", "fashion-mnist", "mnist")


#: The models kiln defines itself (``recipes.models``); any torchvision classification model works too.
KILN_MODELS = ("small_cnn", "resnet9", "resnet18_32")

#: torchvision models present in every torchvision kiln supports (>= 0.19): accepted without importing
#: torchvision.models, which takes seconds (every `kiln` command builds the registry's configs).
_COMMON_TORCHVISION_MODELS = frozenset(
    [f"resnet{n}" for n in (18, 34, 50, 101, 152)] + ["mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large"]
    + [f"efficientnet_b{i}" for i in range(8)] + [f"convnext_{s}" for s in ("tiny", "small", "base", "large")])


def torchvision_models() -> list[str]:
    """The names of torchvision's classification models (``resnet18``, ``convnext_tiny``, ...)."""
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def _check_model_name(name: str) -> None:
    """kiln's own models, or a torchvision classification model; else a ConfigError with a did-you-mean."""
    if name in KILN_MODELS or name in _COMMON_TORCHVISION_MODELS:
        return
    known = torchvision_models()
    if name in known:
        return
    close = difflib.get_close_matches(name, list(KILN_MODELS) + known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(f"unknown model {name!r}; {hint}(kiln's: {', '.join(KILN_MODELS)}; or any torchvision "
                      "classification model: resnet18, mobilenet_v3_small, efficientnet_b0, convnext_tiny, ...)")


@dataclass(frozen=True)
class DataConfig:
    """Which data, how it is split and batched."""

    dataset: str = "digits"  #: digits | synthetic | cifar10 | imagefolder | fashion-mnist | mnist
    batch_size: int = 64  #: images per optimizer step per micro-batch (per process)
    val_fraction: float = 0.2  #: share of the training data held out for validation (seeded); 0: the data set's own test split
    image_size: int = 32  #: images are resized to image_size x image_size
    augment: str = "none"  #: none | crop | crop+flip (batched, seeded by position)
    samples: int = 1024  #: synthetic only: how many images
    num_classes: int = 10  #: synthetic: how many classes to make; the others record their data's count here
    data_dir: str = ""  #: where a data set on disk lives
    num_workers: int = 0  #: 0: in-memory batches sliced by index; N: a DataLoader with N workers (same batches)
    download: bool = False  #: cifar10: fetch the data set into data_dir with torchvision's downloader if it is missing
    skip_bad_images: bool = False  #: imagefolder: skip unreadable image files (one warning line) instead of refusing

    def __post_init__(self) -> None:
        _check(self.dataset in DATASETS, f"data.dataset must be one of {', '.join(DATASETS)}, not {self.dataset!r}")
        _check(self.batch_size >= 1, f"data.batch_size must be >= 1, not {self.batch_size}")
        _check(0.0 <= self.val_fraction < 1.0, f"data.val_fraction must be in [0, 1), not {self.val_fraction}")
        _check(self.image_size >= 8, f"data.image_size must be >= 8, not {self.image_size}")
        _check(self.augment in ("none", "crop", "crop+flip"), f"data.augment must be none, crop or crop+flip, not {self.augment!r}")
        _check(self.samples >= 2, f"data.samples must be >= 2, not {self.samples}")
        _check(self.num_workers >= 0, f"data.num_workers must be >= 0, not {self.num_workers}")
        _check(self.num_classes >= 2, f"data.num_classes must be >= 2, not {self.num_classes}")
        _check(not self.data_dir or self.dataset in FILE_DATASETS,
               f"the {self.dataset} data set does not read files (kiln makes it in memory); --data-dir "
               f"(data.data_dir) is for {', '.join(FILE_DATASETS[:-1])} and {FILE_DATASETS[-1]}")


@dataclass(frozen=True)
class ModelConfig:
    """The network."""

    name: str = "small_cnn"  #: small_cnn | resnet9 | resnet18_32 | any torchvision classification model (resnet18, ...)
    channels: tuple[int, ...] = (32, 64, 128)  #: small_cnn: output channels of each conv block
    weights: str = ""  #: a local file of initial weights (a state dict); nothing is downloaded

    def __post_init__(self) -> None:
        _check_model_name(self.name)
        _check(len(self.channels) >= 1 and all(c >= 1 for c in self.channels), f"model.channels must be positive, not {self.channels}")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with decoupled weight decay."""

    lr: float = 1e-3  #: the LR the one-cycle starts from (= max_lr / div_factor)
    weight_decay: float = 1e-2  #: decoupled weight decay
    decay_norm_and_bias: bool = False  #: also decay norm weights and biases (usually not wanted)
    beta2: float = 0.999  #: AdamW beta2 (beta1 is cycled by the schedule)
    eps: float = 1e-8  #: AdamW epsilon

    def __post_init__(self) -> None:
        _check(self.lr > 0, f"optim.lr must be > 0, not {self.lr}")
        _check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, not {self.weight_decay}")
        _check(0 < self.beta2 < 1, f"optim.beta2 must be in (0, 1), not {self.beta2}")
        _check(self.eps > 0, f"optim.eps must be > 0, not {self.eps}")


@dataclass(frozen=True)
class ScheduleConfig:
    """The one-cycle schedule, stepped once per optimizer step."""

    max_lr: float = 1e-2  #: peak LR
    pct_start: float = 0.25  #: share of the steps spent warming up
    final_div_factor: float = 1e4  #: final LR = lr / final_div_factor
    anneal_strategy: str = "cos"  #: cos | linear
    cycle_momentum: bool = True  #: cycle AdamW beta1 between 0.85 and 0.95

    def __post_init__(self) -> None:
        _check(self.max_lr > 0, f"schedule.max_lr must be > 0, not {self.max_lr}")
        _check(0 < self.pct_start < 1, f"schedule.pct_start must be in (0, 1), not {self.pct_start}")
        _check(self.final_div_factor >= 1, f"schedule.final_div_factor must be >= 1, not {self.final_div_factor}")
        _check(self.anneal_strategy in ("cos", "linear"), f"schedule.anneal_strategy must be cos or linear, not {self.anneal_strategy!r}")


@dataclass(frozen=True)
class TrainConfig:
    """The loop: length, precision, regularisation, clipping, logging."""

    epochs: int = 10  #: passes over the training data
    seed: int = 0  #: seeds the split, the init, the batch order and every iteration's randomness
    device: str = "auto"  #: auto | cpu | cuda | cuda:N
    precision: str = "auto"  #: auto | fp32 | bf16 | fp16 (auto: bf16 on a CPU with AMX, else fp32; bf16/fp16 on CUDA)
    label_smoothing: float = 0.1  #: cross-entropy label smoothing
    clip_norm: float = 1.0  #: clip the total grad norm to this (0 = measure only)
    accumulation_steps: int = 1  #: batches per optimizer step
    ema_decay: float = 0.0  #: EMA of the weights, e.g. 0.999 (0 = off); validation, best-* and `kiln eval` use the EMA weights
    mixup_alpha: float = 0.0  #: MixUp's Beta(alpha, alpha) on training batches, e.g. 0.2 (0 = off)
    cutmix_alpha: float = 0.0  #: CutMix's Beta(alpha, alpha), e.g. 1.0 (0 = off); with mixup too, each batch gets one of them
    early_stop_patience: int = 0  #: stop after this many validations without a val_accuracy gain (0 = off)
    early_stop_min_delta: float = 0.0  #: the smallest val_accuracy rise that counts as a gain
    channels_last: bool = True  #: NHWC memory format in training and evaluation: faster convolutions and pooling, on CPUs too
    compile: bool = False  #: torch.compile the training forward (falls back to eager, with a warning, if it fails)
    compile_backend: str = "inductor"  #: the torch.compile backend (inductor, aot_eager, ...)
    init_scale: float = 65536.0  #: fp16: the first loss scale
    growth_interval: int = 2000  #: fp16: clean steps before the loss scale doubles
    log_every: int = 10  #: iterations between step lines (steps.jsonl, TensorBoard)
    progress_seconds: float = 30.0  #: without a terminal (a log file, a batch job): a progress line this often inside an epoch (0 = none)
    sync_bn: bool = False  #: data parallel: synchronise BatchNorm statistics across processes

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, f"train.epochs must be >= 1, not {self.epochs}")
        _check(self.precision in PRECISIONS, f"train.precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        _check(0 <= self.label_smoothing < 1, f"train.label_smoothing must be in [0, 1), not {self.label_smoothing}")
        _check(self.clip_norm >= 0, f"train.clip_norm must be >= 0, not {self.clip_norm}")
        _check(self.accumulation_steps >= 1, f"train.accumulation_steps must be >= 1, not {self.accumulation_steps}")
        _check(0 <= self.ema_decay < 1, f"train.ema_decay must be in [0, 1) (0 = off), not {self.ema_decay}")
        _check(self.mixup_alpha >= 0, f"train.mixup_alpha must be >= 0 (0 = off), not {self.mixup_alpha}")
        _check(self.cutmix_alpha >= 0, f"train.cutmix_alpha must be >= 0 (0 = off), not {self.cutmix_alpha}")
        _check(self.early_stop_patience >= 0, f"train.early_stop_patience must be >= 0 (0 = off), not {self.early_stop_patience}")
        _check(self.early_stop_min_delta >= 0, f"train.early_stop_min_delta must be >= 0, not {self.early_stop_min_delta}")
        _check(self.compile_backend.strip() != "", "train.compile_backend must not be empty")
        _check(self.init_scale > 0, f"train.init_scale must be > 0, not {self.init_scale}")
        _check(self.growth_interval >= 1, f"train.growth_interval must be >= 1, not {self.growth_interval}")
        _check(self.log_every >= 1, f"train.log_every must be >= 1, not {self.log_every}")
        _check(self.progress_seconds >= 0, f"train.progress_seconds must be >= 0, not {self.progress_seconds}")
        _check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
               f"train.device must be auto, cpu, cuda or cuda:N, not {self.device!r}")


@dataclass(frozen=True)
class GuardConfig:
    """NanGuard: what counts as divergence (NaN/Inf, an exploding loss, an fp16 scale collapse) and what is done."""

    on_nan: str = "rollback"  #: skip | rollback | stop: what NanGuard does when the run diverges
    check_every: int = 20  #: optimizer steps between weight checks and in-memory snapshots
    max_skips: int = 3  #: on_nan skip: skips within 100 steps before it rolls back instead
    lr_factor: float = 0.5  #: each rollback multiplies the rest of the LR schedule by this
    max_rollbacks: int = 3  #: rollbacks before the run stops as diverged
    collapse_skips: int = 10  #: fp16: skipped steps in a row that count as a loss-scale collapse
    min_loss_scale: float = 1.0  #: fp16: a loss scale below this counts as a collapse
    max_loss_ratio: float = 100.0  #: a loss above this multiple of the run's first loss counts as diverged (0 = off)

    def __post_init__(self) -> None:
        _check(self.on_nan in POLICIES, f"guard.on_nan must be one of {', '.join(POLICIES)}, not {self.on_nan!r}")
        _check(self.check_every >= 1, f"guard.check_every must be >= 1, not {self.check_every}")
        _check(self.max_skips >= 1, f"guard.max_skips must be >= 1, not {self.max_skips}")
        _check(0 < self.lr_factor <= 1, f"guard.lr_factor must be in (0, 1], not {self.lr_factor}")
        _check(self.max_rollbacks >= 0, f"guard.max_rollbacks must be >= 0, not {self.max_rollbacks}")
        _check(self.collapse_skips >= 1, f"guard.collapse_skips must be >= 1, not {self.collapse_skips}")
        _check(self.min_loss_scale >= 0, f"guard.min_loss_scale must be >= 0, not {self.min_loss_scale}")
        _check(self.max_loss_ratio == 0 or self.max_loss_ratio > 1,
               f"guard.max_loss_ratio must be 0 (off) or > 1, not {self.max_loss_ratio}")


@dataclass(frozen=True)
class CheckpointConfig:
    """When RUN_DIR/checkpoints/last.pt and best-*.pt are written."""

    every_iterations: int = 0  #: also save last.pt every N iterations (0 = off)
    every_minutes: float = 5.0  #: also save last.pt when this much wall time passed (0 = off)
    keep_best: int = 1  #: how many best-by-val_accuracy checkpoints to keep (0 = none)

    def __post_init__(self) -> None:
        _check(self.every_iterations >= 0, f"checkpoint.every_iterations must be >= 0, not {self.every_iterations}")
        _check(self.every_minutes >= 0, f"checkpoint.every_minutes must be >= 0, not {self.every_minutes}")
        _check(self.keep_best >= 0, f"checkpoint.keep_best must be >= 0, not {self.keep_best}")


@dataclass(frozen=True)
class Config:
    """A whole recipe: every hyperparameter of a run."""

    name: str
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        _check(self.optim.lr <= self.schedule.max_lr,
               f"optim.lr ({self.optim.lr:g}, where the cycle starts) must not exceed schedule.max_lr ({self.schedule.max_lr:g})")

    @property
    def div_factor(self) -> float:
        """One-cycle's ``max_lr / lr``: how far below its peak the cycle starts (the one place it is derived)."""
        return self.schedule.max_lr / self.optim.lr


SECTIONS = ("data", "model", "optim", "schedule", "train", "guard", "checkpoint")

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


def resolve_key(cfg: Config, key: str) -> tuple[str, str]:
    """``(section, field)`` of ``key``, dotted, bare or renamed (LEGACY_KEYS); else ConfigError, with a did-you-mean."""
    key = LEGACY_KEYS.get(key, key)
    paths = field_paths(cfg)
    if key in paths:
        section, name = key.split(".", 1)
        return section, name
    matches = [p for p in paths if p.split(".", 1)[1] == key]
    if len(matches) == 1:
        return tuple(matches[0].split(".", 1))  # type: ignore[return-value]
    close = difflib.get_close_matches(key, paths + [p.split(".", 1)[1] for p in paths], n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"unknown config key {key!r}{hint} (see `kiln show {cfg.name}` for the keys)")


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


def hparams(cfg: Config) -> dict[str, bool | int | float | str]:
    """The config flattened to ``{"section.key": value}`` for TensorBoard's hparams (lists become text)."""
    flat: dict[str, bool | int | float | str] = {}
    for section, values in config_to_dict(cfg).items():
        if isinstance(values, dict):
            for key, value in values.items():
                flat[f"{section}.{key}"] = (value if isinstance(value, (bool, int, float, str))
                                            else ",".join(str(v) for v in value))
    return flat


def config_docs() -> dict[str, str]:
    """Each config key's meaning, ``{"train.epochs": "passes over the training data", ...}``: the ``#:``
    comment beside its field in this module (one place for the docs, also what ``kiln show --explain`` prints).

    Example:
        >>> config_docs()["train.epochs"]
        'passes over the training data'
    """
    import ast
    import inspect

    source = inspect.getsource(sys.modules[__name__])
    lines = source.splitlines()
    docs_by_class: dict[str, dict[str, str]] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    _, sep, doc = lines[item.lineno - 1].partition("#:")
                    if sep:
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
