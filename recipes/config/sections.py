"""The recipe configuration's sections: one frozen dataclass each, every field with its type, default and
meaning (the ``#:`` comment beside or above it, which ``kiln show --explain`` and ``kiln train --help`` print),
checked in ``__post_init__``; and the names a config may take (data sets, models)."""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from callbacks.nan_diagnosis import POLICIES
from engine.precision_names import PRECISIONS

__all__ = ["Config", "CheckpointConfig", "DataConfig", "GuardConfig", "ModelConfig", "OptimConfig", "ScheduleConfig",
           "TrainConfig", "FinetuneConfig", "TrackingConfig", "ConfigError", "DataError", "DATASETS", "FILE_DATASETS", "KILN_MODELS", "SECTIONS",
           "parse_size"]


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


def parse_size(text: str) -> int | None:
    """A memory size in bytes from ``512MB``, ``4GB``, ``1.5G``, ``300M``, ``0`` (a bare number: megabytes, binary
    units either way); None when ``text`` is not one.

    Example:
        >>> parse_size("512MB"), parse_size("1.5G"), parse_size("0"), parse_size("lots")
        (536870912, 1610612736, 0, None)
    """
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", str(text), flags=re.IGNORECASE)
    if match is None:
        return None
    unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[(match.group(2) or "M").upper()]
    return int(float(match.group(1)) * unit)


def torchvision_models() -> list[str]:
    """The names of torchvision's classification models (``resnet18``, ``convnext_tiny``, ...)."""
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def _check_model_name(name: str) -> None:
    """kiln's own models, a torchvision classification model, or ``timm:NAME`` with the timm extra; else a
    ConfigError with a did-you-mean."""
    if name in KILN_MODELS or name in _COMMON_TORCHVISION_MODELS:
        return
    from recipes.timm_models import check_timm_name, is_timm  # imports neither torch nor timm until a timm name

    if is_timm(name):
        try:
            check_timm_name(name)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return
    known = torchvision_models()
    if name in known:
        return
    close = difflib.get_close_matches(name, list(KILN_MODELS) + known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(f"unknown model {name!r}; {hint}(kiln's: {', '.join(KILN_MODELS)}; or any torchvision "
                      "classification model: resnet18, mobilenet_v3_small, efficientnet_b0, convnext_tiny, ...; "
                      "or timm's, as timm:NAME)")


@dataclass(frozen=True)
class DataConfig:
    """Which data, how it is split and batched."""

    dataset: str = "digits"  #: digits | synthetic | cifar10 | imagefolder | fashion-mnist | mnist
    batch_size: int = 64  #: images per optimizer step per micro-batch (per process)
    val_fraction: float = 0.2  #: share of the training data held out for validation (seeded); 0: the data set's own test split
    image_size: int = 32  #: images are resized to image_size x image_size
    augment: str = "none"  #: none | crop | crop+flip (batched, seeded by position)
    #: random erasing: the chance that a training image gets a random rectangle set to the mean (0.5 is usual; 0: off)
    erase: float = 0.0
    samples: int = 1024  #: synthetic only: how many images
    num_classes: int = 10  #: synthetic: how many classes to make; the others record their data's count here
    #: where a data set on disk lives (cifar10: the folder holding cifar-10-batches-py/; imagefolder: train/ and val/
    #: class folders, or class folders alone)
    data_dir: str = ""
    #: DataLoader worker processes (0: in-memory batches sliced by index; N: a DataLoader with N workers, the same
    #: batches)
    num_workers: int = 0
    #: fetch the data set into data_dir with torchvision's downloader if it is missing (cifar10; needs a network)
    download: bool = False
    skip_bad_images: bool = False  #: imagefolder: skip unreadable image files (one warning line) instead of refusing
    channels: int = 3  #: imagefolder: 3 reads every image as RGB, 1 as grayscale
    #: imagefolder: a folder whose decoded images fit this much memory (e.g. 512MB, 4GB; 0: never) is decoded once
    #: and trained from memory with batched augmentation; a larger one is read by a DataLoader. auto: a quarter
    #: of the memory available when the run starts (a new run records it as auto:SIZE, so a resume takes the same path)
    memory_budget: str = "auto"

    def __post_init__(self) -> None:
        _check(self.dataset in DATASETS, f"data.dataset must be one of {', '.join(DATASETS)}, not {self.dataset!r}")
        _check(self.batch_size >= 1, f"data.batch_size must be >= 1, not {self.batch_size}")
        _check(0.0 <= self.val_fraction < 1.0, f"data.val_fraction must be in [0, 1), not {self.val_fraction}")
        _check(self.image_size >= 8, f"data.image_size must be >= 8, not {self.image_size}")
        _check(self.augment in ("none", "crop", "crop+flip"), f"data.augment must be none, crop or crop+flip, not {self.augment!r}")
        _check(0.0 <= self.erase <= 1.0, f"data.erase must be a probability in [0, 1], not {self.erase}")
        _check(self.samples >= 2, f"data.samples must be >= 2, not {self.samples}")
        _check(self.num_workers >= 0, f"data.num_workers must be >= 0, not {self.num_workers}")
        _check(self.num_classes >= 2, f"data.num_classes must be >= 2, not {self.num_classes}")
        _check(self.channels in (1, 3), f"data.channels must be 1 (grayscale) or 3 (RGB), not {self.channels}")
        _check(self.memory_budget == "auto" or parse_size(self.memory_budget.removeprefix("auto:")) is not None,
               f"data.memory_budget must be auto or a size such as 512MB or 4GB (0: never), not {self.memory_budget!r}")
        _check(not self.data_dir or self.dataset in FILE_DATASETS,
               f"the {self.dataset} data set does not read files (kiln makes it in memory); --data-dir "
               f"(data.data_dir) is for {', '.join(FILE_DATASETS[:-1])} and {FILE_DATASETS[-1]}")


@dataclass(frozen=True)
class ModelConfig:
    """The network."""

    #: the network: small_cnn | resnet9 | resnet18_32 | a torchvision classification model (resnet18,
    #: mobilenet_v3_small, efficientnet_b0, convnext_tiny, ...) | timm:NAME, any timm model (the timm extra)
    name: str = "small_cnn"
    channels: tuple[int, ...] = (32, 64, 128)  #: small_cnn: output channels of each conv block
    #: initial weights: a local file (a state dict or a kiln checkpoint, loaded with weights_only), or a name of
    #: the torchvision model's pretrained weights (DEFAULT, IMAGENET1K_V1, ...) from torch hub's cache, or a timm
    #: model's pretrained tag (DEFAULT, a1_in1k, ...) from the Hugging Face cache (downloaded there if missing); an
    #: image folder's inputs are then made as the weights were trained
    weights: str = ""

    def __post_init__(self) -> None:
        _check_model_name(self.name)
        _check(len(self.channels) >= 1 and all(c >= 1 for c in self.channels), f"model.channels must be positive, not {self.channels}")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with decoupled weight decay."""

    lr: float = 1e-3  #: the LR the one-cycle starts from (= max_lr / div_factor)
    weight_decay: float = 1e-2  #: AdamW's decoupled weight decay
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

    #: peak LR of the one-cycle schedule (`kiln train --max-lr auto`: run the LR range test first and train at its
    #: suggestion, recorded in config.json and events.jsonl)
    max_lr: float = 1e-2
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
    device: str = "auto"  #: where to train: auto | cpu | cuda | cuda:N
    #: autocast precision: auto | fp32 | bf16 | fp16 (auto: bf16 on a GPU that has it, else fp16 with loss scaling;
    #: on the CPU bf16 where it has AMX, else fp32)
    precision: str = "auto"
    label_smoothing: float = 0.1  #: cross-entropy label smoothing, in [0, 1)
    clip_norm: float = 1.0  #: clip the total grad norm to this (0 = measure only)
    accumulation_steps: int = 1  #: batches per optimizer step (gradient accumulation)
    ema_decay: float = 0.0  #: EMA of the weights, e.g. 0.999 (0 = off); validation, best-* and `kiln eval` use the EMA weights
    mixup_alpha: float = 0.0  #: MixUp's Beta(alpha, alpha) on training batches, e.g. 0.2 (0 = off)
    cutmix_alpha: float = 0.0  #: CutMix's Beta(alpha, alpha), e.g. 1.0 (0 = off); with mixup too, each batch gets one of them
    #: stop after this many validations without a val_accuracy gain of early_stop_min_delta (0 = off)
    early_stop_patience: int = 0
    early_stop_min_delta: float = 0.0  #: the smallest val_accuracy rise that counts as a gain
    channels_last: bool = True  #: NHWC memory format in training and evaluation: faster convolutions and pooling, on CPUs too
    #: compile the training forward with torch.compile (backend: compile_backend; falls back to eager, with a
    #: warning, if it fails)
    compile: bool = False
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

    #: what to do on NaN/Inf, an exploding loss or an fp16 loss-scale collapse: skip (drop the update), rollback
    #: (restore the last good weights and lower the LR) or stop (exit status 3)
    on_nan: str = "rollback"
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
class FinetuneConfig:
    """Fine-tuning pretrained weights: the body frozen while the new head learns, then everything, the body slower."""

    #: epochs with the pretrained body frozen (only the head, and with train_bn the norm layers, train on a
    #: one-cycle of their own) before everything trains on a second one-cycle; 0: off; -1: 1 when --weights
    #: replaced the classifier (other classes than the weights'), else 0
    freeze_epochs: int = -1
    #: once unfrozen, the body's peak LR is the head's peak times this (0.3: best of 0.1, 0.3 and 1 in
    #: benchmarks/transfer.py, and ahead of training everything from the first step)
    body_lr_factor: float = 0.3
    train_bn: bool = True  #: the frozen body's norm layers (BatchNorm, LayerNorm, ...) still train their weights

    def __post_init__(self) -> None:
        _check(self.freeze_epochs >= -1, f"finetune.freeze_epochs must be >= 0 (or -1: auto), not {self.freeze_epochs}")
        _check(0 < self.body_lr_factor <= 1, f"finetune.body_lr_factor must be in (0, 1], not {self.body_lr_factor}")


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
class TrackingConfig:
    """Where the run is mirrored besides its run directory: an MLflow tracking server (the ``kiln[mlflow]`` extra)."""

    #: an MLflow tracking server to mirror the run to, e.g. http://127.0.0.1:5000 (empty: the environment's
    #: KILN_MLFLOW_URI, else none)
    mlflow_uri: str = ""
    mlflow_experiment: str = ""  #: the MLflow experiment (empty: the recipe's name)
    mlflow_required: bool = False  #: refuse to start when the MLflow server cannot be reached (else train without it)
    mlflow_log_model: bool = False  #: also send the best checkpoint and a TorchScript export of it at the end
    mlflow_every_seconds: float = 5.0  #: the least time between two sends to MLflow while the run trains

    def __post_init__(self) -> None:
        _check(self.mlflow_every_seconds >= 0,
               f"tracking.mlflow_every_seconds must be >= 0, not {self.mlflow_every_seconds}")


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
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        _check(self.optim.lr <= self.schedule.max_lr,
               f"optim.lr ({self.optim.lr:g}, where the cycle starts) must not exceed schedule.max_lr ({self.schedule.max_lr:g})")

    @property
    def div_factor(self) -> float:
        """One-cycle's ``max_lr / lr``: how far below its peak the cycle starts (the one place it is derived)."""
        return self.schedule.max_lr / self.optim.lr


SECTIONS = ("data", "model", "optim", "schedule", "train", "guard", "finetune", "checkpoint", "tracking")
