"""EMA: an exponential moving average of the weights, updated after every optimizer step that happened."""
from __future__ import annotations

from typing import Any

import torch
from ignite.engine import Engine
from ignite.engine.events import RemovableEventHandle
from torch.optim.swa_utils import AveragedModel

from engine.events import StepEvents

__all__ = ["EMA"]


class EMA:
    """Keep ``ema_model``, a copy of ``model`` whose weights are an exponential moving average of its own.

    After each optimizer step that really happened (OPTIMIZER_STEP_COMPLETED with ``state.step_skipped``
    False: a step the scaler or a guard dropped changes nothing) every float parameter and buffer
    (BatchNorm statistics too) moves ``ema = d * ema + (1 - d) * weight``; integer buffers are copied.
    The first update copies the weights. With ``warmup`` the decay after ``n`` updates is
    ``d = min(decay, (1 + n) / (10 + n))`` (TF's ``ExponentialMovingAverage(num_updates)``, timm's
    warm-up), so a short run is not dominated by its initial weights. Evaluate and checkpoint
    ``ema_model`` (``create_evaluator(ema.ema_model, ...)``; ``to_save["ema_model"]``).

    Built on torch's ``AveragedModel`` (the copy, the per-device foreach update and the update count)
    rather than ignite 0.5.5's ``EMAHandler``, which would need working around at every turn: its
    ``momentum`` is the weight of the online model (the opposite of a decay), it updates on
    ITERATION_COMPLETED including scaler-skipped steps, ``attach`` returns no handles, its warm-up
    counter is in no state dict (a resumed run would warm up again) and always writes
    ``state.ema_momentum``, and ``handle_buffers="copy"`` aliases the model's buffers.

    Events: OPTIMIZER_STEP_COMPLETED. Reads ``state.step_skipped``. Mutates ``ema_model`` only.
    State: the update count (``state_dict``), kept across resume; the averaged weights are
    ``ema_model``'s own state dict, saved beside it.

    Args:
        model: the network being trained (not a compiled wrapper: its parameters are read).
        decay: the weight of the average at each update, in (0, 1), e.g. 0.999.
        warmup: ramp the decay up from 0.1 over the first updates (see above).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> ema = EMA(model, decay=0.99)
        >>> torch.equal(ema.ema_model.weight, model.weight), ema.updates
        (True, 0)
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.999, warmup: bool = True) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), not {decay}")
        self.model = model
        self.decay = decay
        self.warmup = warmup
        self._averaged = AveragedModel(model, multi_avg_fn=self._average, use_buffers=True)
        self.ema_model: torch.nn.Module = self._averaged.module
        self.ema_model.requires_grad_(False)

    @property
    def updates(self) -> int:
        """Updates so far (on the CPU: reading it never waits for the GPU)."""
        return int(self._averaged.n_averaged)

    def current_decay(self) -> float:
        """The decay the next update uses."""
        n = self.updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def _average(self, ema: list[torch.Tensor], weights: list[torch.Tensor], _: Any) -> None:
        if ema[0].is_floating_point():  # AveragedModel groups the tensors by device and dtype
            torch._foreach_lerp_(ema, weights, 1.0 - self.current_decay())
        else:
            torch._foreach_copy_(ema, weights)

    def attach(self, engine: Engine) -> list[RemovableEventHandle]:
        """Update after each optimizer step of ``engine``; returns the handles."""
        return [engine.add_event_handler(StepEvents.OPTIMIZER_STEP_COMPLETED, self)]

    def __call__(self, engine: Engine) -> None:
        if engine.state.step_skipped:
            return
        self._averaged.update_parameters(self.model)

    def state_dict(self) -> dict[str, Any]:
        """The update count (the averaged weights are ``ema_model.state_dict()``)."""
        return {"updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self._averaged.n_averaged.fill_(int(state["updates"]))
