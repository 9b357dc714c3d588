"""torch's loss-scaling protocol, the parts kiln's step uses that torch does not make public, in one place.

- A fused optimizer (``torch.optim.AdamW(fused=True)``, kiln's default) takes GradScaler's verdict as
  ``optimizer.found_inf``: a 0-dim float tensor, 1.0 to drop the update on the device (weights, moments and
  the step count stay as they were), 0.0 to apply it. Whether an optimizer honours it is its private
  ``_step_supports_amp_scaling``. The step uses this to drop a bad update without a host read
  (``state.drop_update``); other optimizers apply the update.
- ``GradScaler.get_scale()`` reads the scale on the host (a sync per step on a GPU); ``_get_scale_async()``
  returns the device tensor.

``tests/engine/test_amp_protocol.py`` fails loudly, naming this module, if torch changes either.
"""
from __future__ import annotations

import torch

__all__ = ["drops_on_device", "step_unless", "scale_tensor"]


def drops_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` honours ``found_inf`` (torch's fused optimizers do).

    Example:
        >>> params = [torch.nn.Parameter(torch.zeros(2))]
        >>> drops_on_device(torch.optim.AdamW(params, fused=True)), drops_on_device(torch.optim.AdamW(params))
        (True, False)
    """
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def step_unless(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """``optimizer.step()``, dropped on the device where ``found_inf`` is 1.0, as ``GradScaler.step`` calls a
    fused optimizer (``grad_scale`` None: the gradients are already in true scale). Only for an optimizer
    that :func:`drops_on_device` (ValueError otherwise); the attributes are gone again when it returns."""
    if not drops_on_device(optimizer):
        raise ValueError(f"{type(optimizer).__name__} would apply the update whatever found_inf says: "
                         "only a fused optimizer can drop it on the device")
    optimizer.grad_scale = None
    optimizer.found_inf = found_inf
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale, optimizer.found_inf


def scale_tensor(scaler: torch.amp.GradScaler) -> torch.Tensor:
    """The scaler's current scale as a 0-dim device tensor, without a host read, and a copy of its own
    (``update()`` changes the scaler's tensor in place)."""
    return scaler._get_scale_async().clone()
