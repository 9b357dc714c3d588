"""Recipe configuration: one frozen dataclass with typed sections, overridable by ``section.key=value``."""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from engine.precision import PRECISIONS

__all__ = [
    "Config", "CheckpointConfig", "DataConfig", "ModelConfig", "OptimConfig", "ScheduleConfig", "TrainConfig",
    "ConfigError", "apply_overrides", "config_to_dict", "config_from_dict", "field_paths",
]


class ConfigError(ValueError):
    """A recipe, override or value that kiln cannot use; the message is one line for the user."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class DataConfig:
    """Which data, how it is split and batched."""

    dataset: str = "digits"  #: digits | synthetic
    batch_size: int = 64  #: images per optimizer step per micro-batch (per process)
    val_fraction: float = 0.2  #: share of the data held out for validation (seeded split)
    image_size: int = 32  #: images are resized to image_size x image_size
    augment: str = "none"  #: none | crop | crop+flip (batched, seeded by position)
    samples: int = 1024  #: synthetic only: how many images
    num_classes: int = 10  #: synthetic only: how many classes
    data_dir: str = ""  #: where a data set on disk lives
    num_workers: int = 0  #: 0: in-memory batches sliced by index; N: a DataLoader with N workers (same batches)

    def __post_init__(self) -> None:
        _check(self.dataset in ("digits", "synthetic"), f"data.dataset must be digits or synthetic, not {self.dataset!r}")
        _check(self.batch_size >= 1, f"data.batch_size must be >= 1, not {self.batch_size}")
        _check(0.0 < self.val_fraction < 1.0, f"data.val_fraction must be in (0, 1), not {self.val_fraction}")
        _check(self.image_size >= 8, f"data.image_size must be >= 8, not {self.image_size}")
        _check(self.augment in ("none", "crop", "crop+flip"), f"data.augment must be none, crop or crop+flip, not {self.augment!r}")
        _check(self.samples >= 2, f"data.samples must be >= 2, not {self.samples}")
        _check(self.num_workers >= 0, f"data.num_workers must be >= 0, not {self.num_workers}")
        _check(self.num_classes >= 2, f"data.num_classes must be >= 2, not {self.num_classes}")


@dataclass(frozen=True)
class ModelConfig:
    """The network."""

    name: str = "small_cnn"  #: small_cnn
    channels: tuple[int, ...] = (32, 64, 128)  #: small_cnn: output channels of each conv block

    def __post_init__(self) -> None:
        _check(self.name in ("small_cnn",), f"model.name must be small_cnn, not {self.name!r}")
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
    precision: str = "auto"  #: auto | fp32 | bf16 | fp16 (auto: fp32 on CPU, bf16/fp16 on CUDA)
    label_smoothing: float = 0.1  #: cross-entropy label smoothing
    clip_norm: float = 1.0  #: clip the total grad norm to this (0 = measure only)
    accumulation_steps: int = 1  #: batches per optimizer step
    init_scale: float = 65536.0  #: fp16: the first loss scale
    growth_interval: int = 2000  #: fp16: clean steps before the loss scale doubles
    log_every: int = 10  #: iterations between step lines (steps.jsonl, TensorBoard)

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, f"train.epochs must be >= 1, not {self.epochs}")
        _check(self.precision in PRECISIONS, f"train.precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        _check(0 <= self.label_smoothing < 1, f"train.label_smoothing must be in [0, 1), not {self.label_smoothing}")
        _check(self.clip_norm >= 0, f"train.clip_norm must be >= 0, not {self.clip_norm}")
        _check(self.accumulation_steps >= 1, f"train.accumulation_steps must be >= 1, not {self.accumulation_steps}")
        _check(self.init_scale > 0, f"train.init_scale must be > 0, not {self.init_scale}")
        _check(self.growth_interval >= 1, f"train.growth_interval must be >= 1, not {self.growth_interval}")
        _check(self.log_every >= 1, f"train.log_every must be >= 1, not {self.log_every}")
        _check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
               f"train.device must be auto, cpu, cuda or cuda:N, not {self.device!r}")


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
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        _check(self.optim.lr <= self.schedule.max_lr,
               f"optim.lr ({self.optim.lr:g}, where the cycle starts) must not exceed schedule.max_lr ({self.schedule.max_lr:g})")


SECTIONS = ("data", "model", "optim", "schedule", "train", "checkpoint")


def field_paths(cfg: Config) -> list[str]:
    """Every overridable key, as ``section.field``."""
    return [f"{s}.{f.name}" for s in SECTIONS for f in fields(getattr(cfg, s))]


def _resolve_key(cfg: Config, key: str) -> tuple[str, str]:
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
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if hint is float:
            return float(value)
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
        section, name = _resolve_key(cfg, key)
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
    return apply_overrides(base, flat)
