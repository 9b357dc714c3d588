"""NanGuard's memory of the last optimizer steps: iteration, LR and loss scale, and the true-scale grad norm.

The LR and scale are plain numbers the trainer already has on the host; the norms stay on the device
in a ring, so recording a step never waits for the device. They are read only when a diagnosis asks.
"""
from __future__ import annotations

import collections
import math
from typing import Any

import torch

__all__ = ["StepHistory"]


class StepHistory:
    """The last ``size`` optimizer steps.

    Example:
        >>> h = StepHistory(3, torch.device("cpu"))
        >>> for it in (1, 2, 3, 4):
        ...     h.record(it, lr=0.1 * it, loss_scale=None, grad_norm=torch.tensor(float(it)))
        >>> h.at(3), h.grad_norms(upto=3, last=5)
        ((0.30000000000000004, None), [{'iteration': 2, 'grad_norm': 2.0}, {'iteration': 3, 'grad_norm': 3.0}])
    """

    def __init__(self, size: int, device: torch.device) -> None:
        self._norms = torch.full((size,), math.nan, device=device)  # a ring, indexed by the step count
        self._steps: collections.deque[tuple[int, float, float | None]] = collections.deque(maxlen=size)
        self._count = 0

    def record(self, iteration: int, lr: float, loss_scale: float | None, grad_norm: torch.Tensor) -> None:
        """Remember one step; ``grad_norm`` (0-dim, on the device) is copied there, not read."""
        self._norms[self._count % len(self._norms)].copy_(grad_norm)
        self._steps.append((iteration, lr, loss_scale))
        self._count += 1

    def last_loss_scale(self, default: float | None = None) -> float | None:
        """The loss scale the latest recorded step used (``default`` before any step)."""
        return self._steps[-1][2] if self._steps else default

    def at(self, iteration: int) -> tuple[float, float | None] | None:
        """``(lr, loss_scale)`` of the latest recorded step at or before ``iteration`` (None: none recorded)."""
        step = next((step for step in reversed(self._steps) if step[0] <= iteration), None)
        return (step[1], step[2]) if step else None

    def grad_norms(self, upto: int, last: int) -> list[dict[str, Any]]:
        """The ``last`` recorded grad norms at or before iteration ``upto`` (one host read); NaN/Inf as strings."""
        size = len(self._norms)
        values = self._norms.tolist()
        entries = [(step[0], values[(self._count - len(self._steps) + i) % size]) for i, step in enumerate(self._steps)]
        entries = [(it, v) for it, v in entries if it <= upto][-last:]
        return [{"iteration": it, "grad_norm": v if math.isfinite(v) else str(v)} for it, v in entries]
