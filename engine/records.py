"""The per-epoch and per-step records that kiln's loggers print, write and plot."""
from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["batch_accuracy", "epoch_record", "named_param_groups", "step_record", "to_float"]


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


def _batch_correct(output: Any) -> torch.Tensor | None:
    """The share of the training batch's predictions that are right (``state.output``: y_pred, y), as a
    0-dim device tensor (not read); None when the targets are not class indices."""
    y_pred, y = getattr(output, "y_pred", None), getattr(output, "y", None)
    if not isinstance(y_pred, torch.Tensor) or not isinstance(y, torch.Tensor):
        return None
    if y_pred.dim() != 2 or y.dim() != 1 or y.is_floating_point() or len(y) != len(y_pred) or len(y) == 0:
        return None
    with torch.no_grad():
        return (y_pred.argmax(1) == y).float().mean()


def batch_accuracy(output: Any) -> float | None:
    """Top-1 accuracy of the training step's batch (``state.output``: y_pred, y), read now; None when the
    targets are not class indices. It costs nothing on other steps: no extra forward pass, no per-step read.

    Example:
        >>> from engine.step import StepOutput
        >>> batch_accuracy(StepOutput(torch.tensor(0.5), torch.tensor([[2.0, 1.0], [0.0, 3.0]]), torch.tensor([0, 0])))
        0.5
    """
    correct = _batch_correct(output)
    return None if correct is None else float(correct)


def _read(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with every one-element tensor read as a Python number, the tensors in one host read."""
    tensors = {k: v for k, v in values.items() if isinstance(v, torch.Tensor) and v.numel() == 1}
    if tensors:
        devices = {t.device for t in tensors.values()}
        if len(devices) == 1:  # one transfer (one sync on a GPU) for all of them
            read = torch.stack([t.detach().reshape(()).double() for t in tensors.values()]).tolist()
        else:
            read = [t.item() for t in tensors.values()]
        values = {**values, **dict(zip(tensors, read))}
    return {k: to_float(v) if not isinstance(v, (bool, type(None))) else v for k, v in values.items()}


def named_param_groups(optimizer: torch.optim.Optimizer) -> dict[str, dict[str, Any]]:
    """The first param group of each ``name`` the optimizer's groups have (a fine-tune's head and body), in order.

    Example:
        >>> w, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(1))
        >>> opt = torch.optim.SGD([{"params": [w], "name": "head"}, {"params": [b], "name": "body"}], lr=0.1)
        >>> list(named_param_groups(opt))
        ['head', 'body']
    """
    named: dict[str, dict[str, Any]] = {}
    for group in optimizer.param_groups:
        if "name" in group:
            named.setdefault(group["name"], group)
    return named


def step_record(state: Any) -> dict[str, Any]:
    """One line of steps.jsonl, taken every N iterations: the current loss, the batch's accuracy, lr, grad
    norm, loss scale. Its device values are read in one transfer, and once per step: the record is kept
    as ``state.step_record`` (iteration, the step's output, record), so every logger of a step gets the
    same one (the output object identifies the step, whatever a handler does to the iteration count; it is
    kept until the next logging step)."""
    output = getattr(state, "output", None)
    kept = getattr(state, "step_record", None)
    if kept is not None and kept[0] == state.iteration and kept[1] is output:
        return dict(kept[2])
    scaled = getattr(state, "loss_scale", None) is not None
    values = _read({
        "loss": state.loss,
        "accuracy": _batch_correct(output),
        "grad_norm": getattr(state, "grad_norm", None),
        "loss_scale": state.loss_scale if scaled else None,
        "step_skipped": state.step_skipped if scaled else None,  # a device flag under fp16: read here, every N steps
    })
    record: dict[str, Any] = {"iteration": state.iteration, "epoch": state.epoch, "loss": values["loss"], "lr": state.lr}
    for name, lr in (getattr(state, "group_lrs", None) or {}).items():  # a fine-tune's head and body
        record[f"lr_{name}"] = lr
    if values["accuracy"] is not None:
        record["accuracy"] = values["accuracy"]
    grad_norm = values["grad_norm"]
    if grad_norm is not None:
        record["grad_norm"] = grad_norm if math.isfinite(grad_norm) else str(grad_norm)
    if scaled:
        record["loss_scale"] = values["loss_scale"]
        record["step_skipped"] = bool(values["step_skipped"])
    loss = record["loss"]
    if loss is not None and not math.isfinite(loss):
        record["loss"] = str(loss)
    state.step_record = (state.iteration, output, record)
    return dict(record)
