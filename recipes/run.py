"""The run assembly: a config becomes data, model, optimizer, trainer, handlers and a run directory."""
from __future__ import annotations

import datetime as _dt
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from ignite.metrics import Accuracy, Loss

from callbacks import AMP, GradClip, MetricsLog, OneCycle, Progress, RunSummary, TensorBoard, Validation
from callbacks._files import write_json_atomic
from engine import Precision, create_evaluator, create_trainer, resolve_device, resolve_precision
from recipes.config import Config, ConfigError, config_to_dict
from recipes.data import DataError, TensorBatches, digits_tensors, random_crop_flip, split_indices, synthetic_tensors
from recipes.models import build_model, parameter_groups

__all__ = ["Assembly", "build", "train", "make_run_dir", "versions"]


@dataclass
class Assembly:
    """Everything a run is made of; ``handlers`` maps a name to each attached handler, in attach order."""

    config: Config
    run_dir: Path
    device: torch.device
    precision: Precision
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    trainer: Any
    evaluator: Any
    train_data: TensorBatches
    val_data: TensorBatches
    handlers: dict[str, Any] = field(default_factory=dict)


def versions() -> dict[str, str]:
    """The versions a run was made with (written into config.json)."""
    import ignite
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "ignite": ignite.__version__, "kiln": _kiln_version()}


def _kiln_version() -> str:
    try:
        from importlib.metadata import version

        return version("kiln")
    except Exception:  # not installed as a distribution (e.g. run from a checkout)
        return "0+unknown"


def make_run_dir(cfg: Config, out: str | Path | None) -> Path:
    """``out``, or ``runs/<recipe>-<timestamp>``; refuses a directory that already holds files."""
    if out is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = Path("runs") / f"{cfg.name}-{stamp}"
    run_dir = Path(out)
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise ConfigError(f"{run_dir} already exists and is not empty; pick another --out (or `kiln resume {run_dir}`)")
    return run_dir


def _data(cfg: Config, device: torch.device) -> tuple[TensorBatches, TensorBatches, int, int]:
    d = cfg.data
    if d.dataset == "digits":
        x, y = digits_tensors(d.image_size)
        num_classes = 10
    elif d.dataset == "synthetic":
        x, y = synthetic_tensors(d.samples, d.num_classes, d.image_size, cfg.train.seed)
        num_classes = d.num_classes
    else:  # pragma: no cover - DataConfig validates the name
        raise DataError(f"unknown data set {d.dataset!r}")
    train_idx, val_idx = split_indices(len(x), d.val_fraction, cfg.train.seed)
    mean, std = x[train_idx].mean(), x[train_idx].std()
    x = ((x - mean) / std).to(device)
    y = y.to(device)
    augment = None
    if d.augment != "none":
        flip = d.augment == "crop+flip"
        augment = lambda xb, g: random_crop_flip(xb, g, pad=max(1, d.image_size // 8), flip=flip)  # noqa: E731
    train_idx, val_idx = train_idx.to(device), val_idx.to(device)
    train = TensorBatches(x[train_idx], y[train_idx], d.batch_size, shuffle=True, seed=cfg.train.seed, augment=augment)
    val = TensorBatches(x[val_idx], y[val_idx], max(d.batch_size, 256), shuffle=False)
    return train, val, x.shape[1], num_classes


def build(cfg: Config, run_dir: str | Path, *, quiet: bool = False, stream: TextIO | None = None) -> Assembly:
    """Assemble a run of ``cfg`` writing into ``run_dir`` (created), without starting it.

    Handlers are attached in this order, written once here: AMP, GradClip, OneCycle, Validation,
    MetricsLog, TensorBoard, RunSummary, Progress. None depends on that order for correctness: each
    acts on the step or epoch event that guarantees what it needs.
    """
    t = cfg.train
    device = resolve_device(t.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is cuda but no CUDA device is available here; use --device cpu")
    try:
        precision = resolve_precision(t.precision, device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(t.seed)
    train_data, val_data, in_channels, num_classes = _data(cfg, device)
    model = build_model(cfg.model.name, in_channels, num_classes, cfg.data.image_size, cfg.model.channels).to(device)
    optimizer = torch.optim.AdamW(
        parameter_groups(model, cfg.optim.weight_decay, cfg.optim.decay_norm_and_bias),
        lr=cfg.optim.lr, betas=(0.9, cfg.optim.beta2), eps=cfg.optim.eps,
        fused=device.type == "cuda", foreach=None if device.type == "cuda" else True,
    )
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)
    trainer = create_trainer(model, optimizer, loss_fn, device=device, precision=precision,
                             accumulation_steps=t.accumulation_steps, seed=t.seed)
    evaluator = create_evaluator(model, {"accuracy": Accuracy(device=device), "loss": Loss(torch.nn.CrossEntropyLoss(), device=device)},
                                 device=device, precision=precision)
    total_steps = OneCycle.total_steps_for(t.epochs, len(train_data), t.accumulation_steps)
    s = cfg.schedule
    handlers: dict[str, Any] = {
        "amp": AMP(device=device.type, init_scale=t.init_scale, growth_interval=t.growth_interval),
        "grad_clip": GradClip(model.parameters(), max_norm=t.clip_norm or None),
        "schedule": OneCycle(optimizer, max_lr=s.max_lr, total_steps=total_steps, pct_start=s.pct_start,
                             div_factor=s.max_lr / cfg.optim.lr, final_div_factor=s.final_div_factor,
                             anneal_strategy=s.anneal_strategy, cycle_momentum=s.cycle_momentum),
        "validation": Validation(evaluator, val_data),
        "metrics_log": MetricsLog(run_dir, every=t.log_every),
        "tensorboard": TensorBoard(run_dir / "tb", every=t.log_every),
        "summary": RunSummary(run_dir),
        "progress": Progress(quiet=quiet, stream=stream),
    }
    for handler in handlers.values():
        handler.attach(trainer)
    return Assembly(cfg, run_dir, device, precision, model, optimizer, trainer, evaluator, train_data, val_data, handlers)


def write_config(run: Assembly) -> None:
    """config.json: the resolved recipe, plus what it resolved to on this machine and the versions."""
    write_json_atomic(run.run_dir / "config.json", {
        **config_to_dict(run.config),
        "runtime": {"device": str(run.device), "precision": run.precision.name,
                    "batches_per_epoch": len(run.train_data), "train_samples": len(run.train_data.x),
                    "val_samples": len(run.val_data.x), "command": " ".join(sys.argv)},
        "versions": versions(),
    })


def train(cfg: Config, run_dir: str | Path, *, quiet: bool = False, stream: TextIO | None = None) -> Assembly:
    """Build and run ``cfg`` to the end; summary.json records how it ended (also on errors)."""
    run = build(cfg, run_dir, quiet=quiet, stream=stream)
    write_config(run)
    summary: RunSummary = run.handlers["summary"]
    try:
        run.trainer.run(run.train_data, max_epochs=cfg.train.epochs)
    except KeyboardInterrupt:
        summary.write("interrupted")
        raise
    except BaseException as e:
        summary.write("failed", error=f"{type(e).__name__}: {e}")
        raise
    finally:
        run.handlers["tensorboard"].close()
    return run
