"""NanGuard's memory of the last optimizer steps: what each one saw, kept on the device until a check reads it.

A step is recorded by reference (the tensors the step made anyway), so recording costs no device work
and never waits for the device; the values are read only when a check or a diagnosis asks.
"""
from __future__ import annotations

import collections
import math
from typing import Any, NamedTuple

import torch

__all__ = ["StepHistory", "Step"]


class Step(NamedTuple):
    """One optimizer step as NanGuard saw it at BACKWARD_COMPLETED."""

    iteration: int
    lr: float
    loss_scale: Any  #: float, a 0-dim device tensor (fp16 under AMP) or None
    loss: torch.Tensor  #: the batch's loss (0-dim)
    inputs: torch.Tensor  #: the sum of the input batch (0-dim): NaN/Inf when an input is
    grads: torch.Tensor  #: each parameter's gradient norm (true scale)
    total: torch.Tensor  #: their total norm (0-dim)
    params: torch.Tensor | None  #: each parameter's norm, when NanGuard cannot keep a bad update out


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, torch.Tensor) else value


class StepHistory:
    """The last ``size`` optimizer steps.

    Example:
        >>> h = StepHistory(3)
        >>> zero = torch.zeros(())
        >>> for it in (1, 2, 3, 4):
        ...     h.record(Step(it, 0.1 * it, None, zero, zero, torch.ones(1), torch.tensor(float(it)), None))
        >>> h.at(3), h.grad_norms(upto=3, last=5)
        ((0.30000000000000004, None), [{'iteration': 2, 'grad_norm': 2.0}, {'iteration': 3, 'grad_norm': 3.0}])
    """

    def __init__(self, size: int) -> None:
        self._steps: collections.deque[Step] = collections.deque(maxlen=size)

    def record(self, step: Step) -> None:
        """Remember one step (its tensors by reference: nothing is copied or read)."""
        self._steps.append(step)

    def since(self, iteration: int) -> list[Step]:
        """The recorded steps after ``iteration``, oldest first."""
        return [step for step in self._steps if step.iteration > iteration]

    def get(self, iteration: int) -> Step | None:
        """The latest recorded step at or before ``iteration`` (None: none recorded)."""
        return next((step for step in reversed(self._steps) if step.iteration <= iteration), None)

    def at(self, iteration: int) -> tuple[float, float | None] | None:
        """``(lr, loss_scale)`` of the latest recorded step at or before ``iteration`` (None: none recorded)."""
        step = self.get(iteration)
        return (step.lr, _number(step.loss_scale)) if step else None

    def grad_norms(self, upto: int, last: int) -> list[dict[str, Any]]:
        """The ``last`` recorded total grad norms at or before iteration ``upto`` (one host read); NaN/Inf as strings."""
        steps = [step for step in self._steps if step.iteration <= upto][-last:]
        if not steps:
            return []
        values = torch.stack([step.total.float() for step in steps]).tolist()
        return [{"iteration": step.iteration, "grad_norm": v if math.isfinite(v) else str(v)}
                for step, v in zip(steps, values)]
