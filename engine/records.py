"""The per-epoch and per-step records that kiln's loggers print, write and plot."""
from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["batch_accuracy", "epoch_record", "step_record", "to_float"]


def to_float(value: Any) -> float | None:
    """A Python float from a number or a one-element tensor (a host sync for device tensors)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def epoch_record(state: Any) -> dict[str, Any]:
    """One line of metrics.jsonl: epoch, iteration, every scalar metric, lr, timing and AMP figures."""
    seconds = state.times.get("EPOCH_COMPLETED") or 0.0
    record: dict[str, Any] = {"epoch": state.epoch, "iteration": state.iteration}
    for name, value in state.metrics.items():
        number = to_float(value)
        if number is not None:
            record[name] = number
    record["lr"] = state.lr
    record["epoch_seconds"] = round(seconds, 4)
    samples = getattr(state, "epoch_samples_timed", state.epoch_samples)
    record["images_per_second"] = round(samples / seconds, 1) if seconds > 0 else None
    if getattr(state, "loss_scale", None) is not None:
        record["loss_scale"] = to_float(state.loss_scale)
        record["skipped_steps"] = int(to_float(state.skipped_steps) or 0)
    return record


def batch_accuracy(output: Any) -> float | None:
    """Top-1 accuracy of the training step's batch (``state.output``: y_pred, y), read now; None when the
    targets are not class indices. It costs nothing on other steps: no extra forward pass, no per-step read.

    Example:
        >>> from engine.step import StepOutput
        >>> batch_accuracy(StepOutput(torch.tensor(0.5), torch.tensor([[2.0, 1.0], [0.0, 3.0]]), torch.tensor([0, 0])))
        0.5
    """
    y_pred, y = getattr(output, "y_pred", None), getattr(output, "y", None)
    if not isinstance(y_pred, torch.Tensor) or not isinstance(y, torch.Tensor):
        return None
    if y_pred.dim() != 2 or y.dim() != 1 or y.is_floating_point() or len(y) != len(y_pred) or len(y) == 0:
        return None
    return float((y_pred.argmax(1) == y).float().mean())


def step_record(state: Any) -> dict[str, Any]:
    """One line of steps.jsonl, taken every N iterations: the current loss, the batch's accuracy, lr, grad
    norm, loss scale."""
    record: dict[str, Any] = {
        "iteration": state.iteration,
        "epoch": state.epoch,
        "loss": to_float(state.loss),
        "lr": state.lr,
    }
    accuracy = batch_accuracy(getattr(state, "output", None))
    if accuracy is not None:
        record["accuracy"] = accuracy
    grad_norm = to_float(getattr(state, "grad_norm", None))
    if grad_norm is not None:
        record["grad_norm"] = grad_norm if math.isfinite(grad_norm) else str(grad_norm)
    if getattr(state, "loss_scale", None) is not None:
        record["loss_scale"] = to_float(state.loss_scale)
        record["step_skipped"] = bool(state.step_skipped)  # a device flag under fp16: read here, every N steps
    loss = record["loss"]
    if loss is not None and not math.isfinite(loss):
        record["loss"] = str(loss)
    return record
