"""GradClip: clip true-scale gradients by total norm or by value, and record the pre-clip norm."""
from __future__ import annotations

from typing import Iterable

import torch
from ignite.engine import Engine
from ignite.engine.events import RemovableEventHandle

from callbacks.tensor_norms import step_grad_norms
from engine.events import StepEvents

__all__ = ["GradClip"]

MODES = ("norm", "value")


class GradClip:
    """Gradient clipping on BEFORE_OPTIMIZER_STEP, where gradients are in true units under every precision.

    Writes the total gradient norm *before* clipping to ``state.grad_norm`` as a device tensor (no host
    sync); a non-finite norm is recorded as is (the optimizer step or a guard deals with it). With the
    2-norm, the per-parameter norms are shared with NanGuard (``callbacks.tensor_norms.step_grad_norms``), so
    a step measures its gradients once; the clipping is ``clip_grad_norm_``'s own arithmetic.

    Events: BEFORE_OPTIMIZER_STEP. Writes ``state.grad_norm`` (and ``state.grad_norms``, shared); mutates
    the parameters' ``.grad``.
    State: none.

    Args:
        parameters: the parameters whose gradients it clips.
        max_norm: with mode "norm", the largest total norm allowed; ``None`` only measures.
        mode: "norm" (``clip_grad_norm_``) or "value" (``clip_grad_value_`` at ``clip_value``).
        clip_value: with mode "value", the largest absolute gradient entry.
        norm_type: the p of the p-norm.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1)
        >>> clip = GradClip(model.parameters(), max_norm=1.0)
        >>> len(clip.parameters)
        2
    """

    def __init__(
        self,
        parameters: Iterable[torch.nn.Parameter],
        max_norm: float | None = 1.0,
        mode: str = "norm",
        clip_value: float | None = None,
        norm_type: float = 2.0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        if max_norm is not None and max_norm <= 0:
            raise ValueError(f"max_norm must be > 0 or None, not {max_norm}")
        if mode == "value" and (clip_value is None or clip_value <= 0):
            raise ValueError("mode 'value' needs clip_value > 0")
        self.parameters = [p for p in parameters if p.requires_grad]
        self.max_norm = max_norm
        self.mode = mode
        self.clip_value = clip_value
        self.norm_type = norm_type
        self._key = tuple(id(p) for p in self.parameters)

    def attach(self, engine: Engine) -> list[RemovableEventHandle]:
        """Clip on every optimizer step of ``engine``; returns the handles."""
        return [engine.add_event_handler(StepEvents.BEFORE_OPTIMIZER_STEP, self)]

    def __call__(self, engine: Engine) -> None:
        grads = [p.grad for p in self.parameters if p.grad is not None]
        if not grads:
            engine.state.grad_norm = None
            return
        if self.norm_type != 2.0:
            norm = torch.nn.utils.get_total_norm(grads, self.norm_type, foreach=True)
        else:  # what clip_grad_norm_ computes, from the per-parameter norms the step shares
            norm = step_grad_norms(engine.state, self.parameters, self._key)[1]
        if self.mode == "norm" and self.max_norm is not None:
            with torch.no_grad():  # clip_grad_norm_'s factor min(1, max_norm / (norm + 1e-6)), as a divisor:
                divisor = (norm + 1e-6).clamp_(min=self.max_norm)  # two small ops fewer per step
                if self.max_norm != 1.0:
                    divisor.div_(self.max_norm)
                torch._foreach_div_(grads, divisor)  # a divisor of exactly 1 leaves the gradients as they are
        elif self.mode == "value":
            torch.nn.utils.clip_grad_value_(self.parameters, self.clip_value, foreach=True)
        engine.state.grad_norm = norm  # computed without autograd: nothing to detach
