"""The parts of a run, each made from the config in one place: device and precision, data, model,
optimizer, loss and the one-cycle schedule.

``build`` (a full run), the LR range test and the schedule preview all take their parts from here, so
they train the same model on the same data with the same optimizer.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch

from callbacks import OneCycle
from engine import Precision, resolve_device, resolve_precision
from recipes import data as datasets
from recipes.config import Config, ConfigError
from recipes.data import Data
from recipes.models import build_model, load_weights, parameter_groups
from recipes.pretrained import named_weights, sha256_of

__all__ = ["resolve_runtime", "make_data", "make_model", "make_optimizer", "make_loss", "make_schedule",
           "initial_weights_file", "load_initial_weights", "TrainingParts", "training_parts"]


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
        note = load_weights(model, path)
    except ValueError as e:
        raise ConfigError(f"--weights: {e}") from None
    if name is not None:
        note = note.replace(f"from {path}", f"{name} from {path}", 1)
    return note, {"name": name, "file": str(path), "sha256": sha256_of(path), "head_replaced": "except" in note}


def make_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW over ``model``'s parameters (no decay on biases and norm weights unless asked), fused."""
    return torch.optim.AdamW(
        parameter_groups(model, cfg.optim.weight_decay, cfg.optim.decay_norm_and_bias),
        lr=cfg.optim.lr, betas=(0.9, cfg.optim.beta2), eps=cfg.optim.eps,
        fused=True,  # one kernel per step, on the CPU too (foreach AdamW: 2-7x slower there)
    )


def make_loss(cfg: Config) -> torch.nn.Module:
    """Cross-entropy with the recipe's label smoothing."""
    return torch.nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)


def make_schedule(cfg: Config, optimizer: torch.optim.Optimizer, batches_per_epoch: int) -> OneCycle:
    """The recipe's one-cycle schedule on ``optimizer`` over ``train.epochs`` epochs of ``batches_per_epoch``.

    It starts at ``optim.lr`` (``div_factor = max_lr / lr``), peaks at ``schedule.max_lr`` after
    ``pct_start`` of the optimizer steps and ends at ``lr / final_div_factor``.
    """
    t, s = cfg.train, cfg.schedule
    return OneCycle(optimizer, max_lr=s.max_lr, total_steps=OneCycle.total_steps_for(t.epochs, batches_per_epoch,
                                                                                      t.accumulation_steps),
                    pct_start=s.pct_start, div_factor=cfg.div_factor, final_div_factor=s.final_div_factor,
                    anneal_strategy=s.anneal_strategy, cycle_momentum=s.cycle_momentum,
                    sync_every=cfg.guard.check_every)  # fp16 skips are read where NanGuard reads


class TrainingParts(NamedTuple):
    """What a short trial of the recipe needs (the LR range test): the run's own parts, unassembled."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: torch.nn.Module
    data: Data
    device: torch.device
    precision: Precision


def training_parts(cfg: Config) -> TrainingParts:
    """The model (same seed, so the same initial weights as the run), optimizer, loss, data, device and
    precision that :func:`recipes.run.build` makes for ``cfg``, without handlers or a run directory."""
    device, precision = resolve_runtime(cfg)
    torch.manual_seed(cfg.train.seed)  # the same initial weights as the run that build() assembles
    data = make_data(cfg, device)
    model = make_model(cfg, data.in_channels, data.num_classes).to(device)
    return TrainingParts(model, make_optimizer(cfg, model), make_loss(cfg), data, device, precision)
