"""The parts of a run, each made from the config in one place: device and precision, data, model,
optimizer, loss and the one-cycle schedule.

``build`` (a full run), the LR range test and the schedule preview all take their parts from here, so
they train the same model on the same data with the same optimizer.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch

from callbacks import FineTune, OneCycle
from engine import Precision, resolve_device, resolve_precision
from recipes import data as datasets
from recipes.config import Config, ConfigError, apply_overrides
from recipes.data import Data
from recipes.models import build_model, head_parameters, load_weights, parameter_groups
from recipes.pretrained import named_weights, sha256_of

__all__ = ["resolve_runtime", "make_data", "make_model", "make_optimizer", "make_loss", "make_schedule",
           "initial_weights_file", "load_initial_weights", "resolve_freeze_epochs", "planned_freeze_epochs",
           "make_fine_tune", "resolve_memory_budget", "frozen_parameters", "what_trains", "TrainingParts", "training_parts"]


def resolve_runtime(cfg: Config) -> tuple[torch.device, Precision]:
    """``train.device`` and ``train.precision`` resolved on this machine.

    Raises:
        ConfigError: CUDA asked for where there is none, or a precision the device cannot run.
    """
    device = resolve_device(cfg.train.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is cuda but no CUDA device is available here; use --device cpu")
    try:
        return device, resolve_precision(cfg.train.precision, device)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def make_data(cfg: Config, device: torch.device) -> Data:
    """The recipe's data set (see :func:`recipes.data.load`)."""
    return datasets.load(cfg, device)


def make_model(cfg: Config, in_channels: int, num_classes: int) -> torch.nn.Module:
    """The recipe's network, built on the CPU with random weights; a model that cannot take this data is a ConfigError."""
    try:
        return build_model(cfg.model.name, in_channels, num_classes, cfg.data.image_size, cfg.model.channels)
    except ValueError as e:
        raise ConfigError(f"model {cfg.model.name}: {e}") from None


def initial_weights_file(cfg: Config) -> tuple[str, str | None]:
    """``model.weights`` as ``(file, weights name or None)``: a local file, or the file of the torchvision weights
    it names, in torch hub's cache (downloaded there if missing). ConfigError, one line: neither a file nor a
    name of the model's weights, or named weights whose file is missing and cannot be downloaded."""
    named = named_weights(cfg.model.name, cfg.model.weights)
    return (str(named.fetch()), named.name) if named is not None else (cfg.model.weights, None)


def load_initial_weights(model: torch.nn.Module, path: str, name: str | None = None) -> tuple[str, dict[str, Any]]:
    """Load a weights file (:func:`initial_weights_file`) into ``model``; returns what was loaded, in words, and
    the record of where the run started from: ``{"name", "file", "sha256", "head_replaced"}``."""
    try:
        note, head_replaced = load_weights(model, path, name)
    except ValueError as e:
        raise ConfigError(f"--weights: {e}") from None
    return note, {"name": name, "file": str(path), "sha256": sha256_of(path), "head_replaced": head_replaced}


def make_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW over ``model``'s parameters (no decay on biases and norm weights unless asked), fused; when
    fine-tuning (``finetune.freeze_epochs`` > 0), the head's groups first and the body's at its LR factor."""
    factor = cfg.finetune.body_lr_factor if cfg.finetune.freeze_epochs > 0 else None
    return torch.optim.AdamW(
        parameter_groups(model, cfg.optim.weight_decay, cfg.optim.decay_norm_and_bias, body_lr_factor=factor),
        lr=cfg.optim.lr, betas=(0.9, cfg.optim.beta2), eps=cfg.optim.eps,
        fused=True,  # one kernel per step, on the CPU too (foreach AdamW: 2-7x slower there)
    )


def make_loss(cfg: Config) -> torch.nn.Module:
    """Cross-entropy with the recipe's label smoothing."""
    return torch.nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)


def make_schedule(cfg: Config, optimizer: torch.optim.Optimizer, batches_per_epoch: int) -> OneCycle:
    """The recipe's one-cycle schedule on ``optimizer`` over ``train.epochs`` epochs of ``batches_per_epoch``
    (when fine-tuning, over the frozen epochs: :func:`make_fine_tune` starts the second cycle).

    It starts at ``optim.lr`` (``div_factor = max_lr / lr``), peaks at ``schedule.max_lr`` after
    ``pct_start`` of the optimizer steps and ends at ``lr / final_div_factor``.
    """
    t, s = cfg.train, cfg.schedule
    epochs = cfg.finetune.freeze_epochs if cfg.finetune.freeze_epochs > 0 else t.epochs
    return OneCycle(optimizer, max_lr=s.max_lr, total_steps=OneCycle.total_steps_for(epochs, batches_per_epoch,
                                                                                      t.accumulation_steps),
                    pct_start=s.pct_start, div_factor=cfg.div_factor, final_div_factor=s.final_div_factor,
                    anneal_strategy=s.anneal_strategy, cycle_momentum=s.cycle_momentum,
                    sync_every=cfg.guard.check_every)  # fp16 skips are read where NanGuard reads


def resolve_memory_budget(cfg: Config) -> Config:
    """``data.memory_budget`` auto made concrete for a new image-folder run, as ``auto:SIZE`` (a quarter of the memory
    available now), so that config.json records it and a resume decodes into memory exactly when the run did."""
    if cfg.data.dataset != "imagefolder" or cfg.data.memory_budget != "auto":
        return cfg
    from recipes.data.folder_in_memory import auto_memory_budget

    return apply_overrides(cfg, {"data.memory_budget": f"auto:{auto_memory_budget() >> 20}MB"})


def resolve_freeze_epochs(cfg: Config, head_replaced: bool) -> Config:
    """``finetune.freeze_epochs`` -1 (auto) made concrete for a new run: 1 when ``--weights`` replaced the classifier
    and the run has a second epoch, else 0; a value that leaves the body no epoch to train is a ConfigError."""
    f, epochs = cfg.finetune.freeze_epochs, cfg.train.epochs
    if f == -1:
        return apply_overrides(cfg, {"finetune.freeze_epochs": 1 if head_replaced and epochs > 1 else 0})
    if f >= epochs:
        raise ConfigError(f"finetune.freeze_epochs ({f}) must be less than train.epochs ({epochs}): "
                          "the pretrained body would never train")
    return cfg


def make_fine_tune(cfg: Config, model: torch.nn.Module, schedule: OneCycle, batches_per_epoch: int) -> FineTune | None:
    """The fine-tune phases (``finetune.freeze_epochs`` > 0): the body frozen (less its norm layers' weights with
    ``train_bn``), then a second one-cycle over the remaining epochs; None when off."""
    f = cfg.finetune
    if f.freeze_epochs <= 0:
        return None
    steps = OneCycle.total_steps_for(cfg.train.epochs - f.freeze_epochs, batches_per_epoch,
                                     cfg.train.accumulation_steps)
    return FineTune(frozen_parameters(cfg, model), schedule, f.freeze_epochs, steps)


def frozen_parameters(cfg: Config, model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """What a fine-tune's first phase does not train: all but the head and (``finetune.train_bn``) norm layers."""
    head = {id(p) for p in head_parameters(model)}
    norms = {id(p) for m in model.modules() if isinstance(m, _NORM_LAYERS) for p in m.parameters(recurse=False)}
    return [p for p in model.parameters() if id(p) not in head and not (cfg.finetune.train_bn and id(p) in norms)]


def planned_freeze_epochs(cfg: Config, data: Data) -> Config:
    """:func:`resolve_freeze_epochs` before a run loads its weights (``kiln schedule``): whether ``--weights`` will
    replace the head, from the named weights' class count or by loading the file into the model."""
    if cfg.finetune.freeze_epochs != -1 or not cfg.model.weights:
        return resolve_freeze_epochs(cfg, False)
    named = named_weights(cfg.model.name, cfg.model.weights)
    if named is not None:
        return resolve_freeze_epochs(cfg, named.num_classes != data.num_classes)
    _, record = load_initial_weights(make_model(cfg, data.in_channels, data.num_classes), cfg.model.weights)
    return resolve_freeze_epochs(cfg, record["head_replaced"])


def what_trains(cfg: Config, model: torch.nn.Module, fine_tune: FineTune | None) -> str:
    """One line on what the run trains: the parameter count, and when fine-tuning how many train in each phase
    and each group's peak LR (as Lightning's model summary and fastai's ``summary`` say).

    Example:
        >>> from recipes import get_recipe
        >>> what_trains(get_recipe("digits"), torch.nn.Linear(10, 2), None)
        'small_cnn: 22 parameters, all training, peak LR 0.01'
    """
    total = sum(p.numel() for p in model.parameters())
    peak = cfg.schedule.max_lr
    if fine_tune is None:
        return f"{cfg.model.name}: {_count(total)} parameters, all training, peak LR {peak:g}"
    frozen = sum(p.numel() for p in fine_tune.frozen)
    f, epochs = cfg.finetune.freeze_epochs, cfg.train.epochs
    first = "epoch 1" if f == 1 else f"epochs 1-{f}"
    then = f"epoch {epochs}" if f + 1 == epochs else f"epochs {f + 1}-{epochs}"
    return (f"{cfg.model.name}: {_count(total)} parameters; {first}: {_count(total - frozen)} train (the head"
            f"{' and norm layers' if cfg.finetune.train_bn else ''}, body frozen), peak LR {peak:g}; {then}: all, "
            f"peak LR head {peak:g}, body {peak * cfg.finetune.body_lr_factor:g}")


def _count(n: int) -> str:
    return f"{n / 1e6:.3g}M" if n >= 1e6 else f"{n / 1e3:.3g}k" if n >= 1e4 else str(n)


#: The normalisation layers whose weights a frozen body still trains with ``finetune.train_bn``.
_NORM_LAYERS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm,
                torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.InstanceNorm1d, torch.nn.InstanceNorm2d,
                torch.nn.InstanceNorm3d)


class TrainingParts(NamedTuple):
    """What a short trial of the recipe needs (the LR range test): the run's own parts, unassembled."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: torch.nn.Module
    data: Data
    device: torch.device
    precision: Precision


def training_parts(cfg: Config) -> TrainingParts:
    """The model (same seed and ``--weights``, so the same initial weights as the run), optimizer, loss, data,
    device and precision that :func:`recipes.run.build` makes for ``cfg``, without handlers or a run directory.
    For a fine-tune the body is frozen, as the run's first phase trains it."""
    device, precision = resolve_runtime(cfg)
    weights = initial_weights_file(cfg) if cfg.model.weights else None
    torch.manual_seed(cfg.train.seed)  # the same initial weights as the run that build() assembles
    data = make_data(cfg, device)
    model = make_model(cfg, data.in_channels, data.num_classes)
    record = load_initial_weights(model, *weights)[1] if weights is not None else None
    cfg = resolve_freeze_epochs(cfg, bool(record and record["head_replaced"]))
    model = model.to(device)
    if cfg.finetune.freeze_epochs > 0:  # a fine-tune's first phase: the range test tries the head's LR alone
        for p in frozen_parameters(cfg, model):
            p.requires_grad_(False)
    return TrainingParts(model, make_optimizer(cfg, model), make_loss(cfg), data, device, precision)
