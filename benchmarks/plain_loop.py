"""The tutorial-style training loop that kiln is measured against, as a function and as a script.

It trains what ``kiln train digits`` trains (the same data, split, normalisation, model, initial
weights and hyperparameters) the way the PyTorch tutorials write it: a DataLoader over a
TensorDataset for training and for validation, ``zero_grad``, an autocast forward pass, the loss,
a GradScaler-scaled backward, unscale and ``clip_grad_norm_``, ``scaler.step``, ``scaler.update``,
``OneCycleLR.step()`` per batch, ``loss.item()`` every step, and a validation pass every epoch.
AdamW and clipping run with torch's defaults (no foreach/fused choice), as a tutorial leaves them.

It imports only torch, scikit-learn (the digits) and kiln's ``recipes/models.py``,
``recipes/data/digits.py`` and ``recipes/data/batches.py`` loaded as plain files, so the model and
the split are kiln's own while the process pays for no import of kiln, ignite or click: its
whole-run wall time is the tutorial's.

Run as a script it prints one line per epoch and, with ``--result FILE``, writes its figures as
JSON. Usage::

    python benchmarks/plain_loop.py [--model small_cnn|resnet18_32] [--epochs 10] [--device cpu]
                                    [--precision fp32] [--channels-last] [--compile] [--result FILE]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from types import ModuleType

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import IterationClock  # noqa: E402

__all__ = ["DIGITS", "load_kiln_module", "digits_split", "train", "main"]

ROOT = Path(__file__).resolve().parents[1]

#: The digits recipe's hyperparameters, written out as a tutorial would (bench.py checks they
#: still equal ``recipes.digits.CONFIG``).
DIGITS = {
    "batch_size": 64, "val_batch_size": 256, "val_fraction": 0.2, "image_size": 32, "channels": (32, 64, 128),
    "lr": 1e-3, "max_lr": 1e-2, "pct_start": 0.25, "final_div_factor": 1e4, "weight_decay": 1e-2,
    "beta2": 0.999, "eps": 1e-8, "label_smoothing": 0.1, "clip_norm": 1.0, "epochs": 10, "seed": 0,
}

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def load_kiln_module(name: str) -> ModuleType:
    """``recipes/<name>.py`` executed as a standalone module (without running ``recipes/__init__``)."""
    spec = importlib.util.spec_from_file_location(f"kiln_recipes_{name.replace('/', '_')}", ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def digits_split(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """kiln's digits data: ``x_train, y_train, x_val, y_val``, normalised by the training set's mean and std."""
    x, y = load_kiln_module("data/digits").digits_tensors(DIGITS["image_size"])
    train_idx, val_idx = load_kiln_module("data/batches").split_indices(len(x), DIGITS["val_fraction"], seed)
    mean, std = x[train_idx].mean(), x[train_idx].std()
    x = (x - mean) / std
    return x[train_idx], y[train_idx], x[val_idx], y[val_idx]


def make_model(name: str, in_channels: int, num_classes: int) -> nn.Module:
    """The benchmark's model ``name`` (small_cnn or resnet18_32), built by kiln's own model code."""
    models = load_kiln_module("models")
    if name == "small_cnn":
        return models.small_cnn(in_channels, num_classes, DIGITS["channels"], DIGITS["image_size"])
    return models.resnet18_32(num_classes, in_channels)


def train(model_name: str = "small_cnn", epochs: int = DIGITS["epochs"], device: str = "cpu", precision: str = "fp32",
          channels_last: bool = False, compile: bool = False, seed: int = DIGITS["seed"], warmup: int = 5,
          log=print) -> dict:
    """Train like a tutorial; returns the figures (accuracy, per-iteration median, train seconds)."""
    dev = torch.device(device)
    x_train, y_train, x_val, y_val = digits_split(seed)
    torch.manual_seed(seed)  # kiln seeds here too, so the initial weights are the same
    model = make_model(model_name, x_train.shape[1], 10).to(dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        model = torch.compile(model)

    pin = dev.type == "cuda"
    train_loader = DataLoader(TensorDataset(x_train, y_train), batch_size=DIGITS["batch_size"], shuffle=True,
                              pin_memory=pin, generator=torch.Generator().manual_seed(seed))
    val_loader = DataLoader(TensorDataset(x_val, y_val), batch_size=DIGITS["val_batch_size"], pin_memory=pin)

    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": DIGITS["weight_decay"]},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=DIGITS["lr"], betas=(0.9, DIGITS["beta2"]), eps=DIGITS["eps"])
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=DIGITS["max_lr"], total_steps=epochs * len(train_loader), pct_start=DIGITS["pct_start"],
        div_factor=DIGITS["max_lr"] / DIGITS["lr"], final_div_factor=DIGITS["final_div_factor"])
    criterion = nn.CrossEntropyLoss(label_smoothing=DIGITS["label_smoothing"])
    use_amp = precision in ("bf16", "fp16")
    scaler = torch.amp.GradScaler(dev.type, enabled=precision == "fp16")
    clock = IterationClock(dev, warmup=warmup)

    accuracy = float("nan")
    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        model.train()
        running_loss, batches = 0.0, 0
        clock.start_epoch()
        for x, y in train_loader:
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, dtype=_DTYPES[precision], enabled=use_amp):
                loss = criterion(model(x), y)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), DIGITS["clip_norm"])
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            running_loss += loss.item()
            batches += 1
            clock.tick()

        model.eval()
        val_loss, correct, total = 0.0, 0, 0
        with torch.no_grad():
            for x, y in val_loader:
                x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(dev.type, dtype=_DTYPES[precision], enabled=use_amp):
                    out = model(x)
                val_loss += nn.functional.cross_entropy(out.float(), y, reduction="sum").item()
                correct += (out.argmax(1) == y).sum().item()
                total += y.numel()
        accuracy = correct / total
        log(f"epoch {epoch}/{epochs}  train_loss {running_loss / batches:.4f}  val_loss {val_loss / total:.4f}  "
            f"val_accuracy {accuracy:.4f}  lr {scheduler.get_last_lr()[0]:.2e}  {time.perf_counter() - started:.1f}s")
    return {"final_accuracy": round(accuracy, 4), **clock.summary()}


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: train, print epoch lines, optionally write the figures to ``--result``."""
    parser = argparse.ArgumentParser(description="The tutorial-style training loop kiln is compared with.")
    parser.add_argument("--model", default="small_cnn", choices=["small_cnn", "resnet18_32"])
    parser.add_argument("--epochs", type=int, default=DIGITS["epochs"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=sorted(_DTYPES))
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--warmup", type=int, default=5, help="iterations left out of the per-iteration figures")
    parser.add_argument("--result", type=Path, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    figures = train(args.model, args.epochs, args.device, args.precision, args.channels_last, args.compile,
                    warmup=args.warmup)
    if args.result is not None:
        args.result.write_text(json.dumps(figures))


if __name__ == "__main__":
    main()
