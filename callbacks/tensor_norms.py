"""NanGuard's test for non-finite tensors: each tensor's fp32 norm in one call, and the names of the bad ones."""
from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["norms", "nonfinite_names", "step_grad_norms"]


def norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Each tensor's 2-norm in fp32, in one foreach call: NaN or Inf when the tensor is non-finite.

    That is kiln's test for a non-finite tensor: NaN/Inf values, or values so large (about 1e19) that
    the norm overflows. It is far cheaper than ``isfinite().all()`` per tensor on the CPU.

    Example:
        >>> norms([torch.tensor([3.0, 4.0]), torch.tensor([1.0, float("inf")])]).tolist()
        [5.0, inf]
    """
    with torch.no_grad():  # of parameters too: a norm kept across steps must not keep their graphs alive
        return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32))


def nonfinite_names(named: list[tuple[str, torch.Tensor]]) -> list[str]:
    """The names of the non-finite tensors of ``named`` (one host read).

    Example:
        >>> nonfinite_names([("a", torch.ones(2)), ("b", torch.tensor([1.0, float("nan")]))])
        ['b']
    """
    if not named:
        return []
    return [n for (n, _), v in zip(named, norms([t for _, t in named]).tolist()) if not math.isfinite(v)]


def step_grad_norms(state: Any, parameters: list[torch.Tensor], key: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each parameter's gradient norm (fp32; 0 without a gradient) and their total, at this step, measured once.

    GradClip and NanGuard both need them at BEFORE_OPTIMIZER_STEP, before clipping. The first of them
    to ask measures and leaves ``state.grad_norms = (state.optimizer_step, key, norms, total)``; the other
    one gets the same tensors when its parameters are the same (``key``: their ids, in order), whatever the
    order they were attached in. Without ``state.optimizer_step`` (not kiln's trainer) nothing is shared.

    Example:
        >>> from types import SimpleNamespace
        >>> p = torch.nn.Parameter(torch.zeros(2)); p.grad = torch.tensor([3.0, 4.0])
        >>> state = SimpleNamespace(optimizer_step=1)
        >>> first = step_grad_norms(state, [p], (id(p),)); _ = p.grad.mul_(0.1)
        >>> step_grad_norms(state, [p], (id(p),))[0] is first[0], first[0].tolist(), first[1].item()
        (True, [5.0], 5.0)
    """
    step = getattr(state, "optimizer_step", None)
    shared = getattr(state, "grad_norms", None)
    if step is not None and shared is not None and shared[0] == step and shared[1] == key:
        return shared[2:]
    values = norms([p.grad if p.grad is not None else torch.zeros((), device=p.device) for p in parameters])
    total = torch.linalg.vector_norm(values)  # clip_grad_norm_'s total norm
    if step is not None:
        state.grad_norms = (step, key, values, total)
    return values, total
