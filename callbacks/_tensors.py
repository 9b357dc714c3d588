"""NanGuard's test for non-finite tensors: each tensor's fp32 norm in one call, and the names of the bad ones."""
from __future__ import annotations

import math

import torch

__all__ = ["norms", "nonfinite_names"]


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
