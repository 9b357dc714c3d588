"""EMA: an exponential moving average of the weights, updated after every optimizer step that happened."""
from __future__ import annotations

import copy
import itertools
from typing import Any

import torch
from ignite.engine import Engine
from ignite.engine.events import RemovableEventHandle

from engine.events import StepEvents

__all__ = ["EMA"]


class EMA:
    """Keep ``ema_model``, a copy of ``model`` whose weights are an exponential moving average of its own.

    After each optimizer step that really happened (OPTIMIZER_STEP_COMPLETED with ``state.step_skipped``
    False: a step the scaler or a guard dropped changes nothing; under fp16 the scaler's flag stays on
    the device and weighs the update by 0, and the update count, which sets the warm-up, counts the
    optimizer steps) every float parameter and buffer
    (BatchNorm statistics too) moves ``ema = d * ema + (1 - d) * weight``; integer buffers are copied.
    The first update copies the weights. With ``warmup`` the decay after ``n`` updates is
    ``d = min(decay, (1 + n) / (10 + n))`` (TF's ``ExponentialMovingAverage(num_updates)``, timm's
    warm-up), so a short run is not dominated by its initial weights. Evaluate and checkpoint
    ``ema_model`` (``create_evaluator(ema.ema_model, ...)``; ``to_save["ema_model"]``).

    A deep copy updated with torch's foreach ``lerp`` (what ``AveragedModel``'s foreach path does; its
    ``update_parameters`` reads its update-count tensor every step, which the count here, a Python int,
    does not), rather than ignite 0.5.5's ``EMAHandler``, which would need working around at every turn: its
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
        self.ema_model: torch.nn.Module = copy.deepcopy(model)
        self.ema_model.requires_grad_(False)
        self._updates = 0

    @property
    def updates(self) -> int:
        """Updates so far (a Python int: reading it never waits for the device)."""
        return self._updates

    def current_decay(self) -> float:
        """The decay the next update uses."""
        n = self._updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def _update(self, keep: torch.Tensor | None) -> None:
        """One update; ``keep``: None, or the device flag that weighs it by 0 (a step the scaler skipped)."""
        floats, others = [], []
        for ema, weight in zip(itertools.chain(self.ema_model.parameters(), self.ema_model.buffers()),
                               itertools.chain(self.model.parameters(), self.model.buffers())):
            (floats if ema.is_floating_point() else others).append((ema, weight.detach()))
        weight = 1.0 if self._updates == 0 else 1.0 - self.current_decay()  # the first update copies
        if floats:
            ema, weights = map(list, zip(*floats))
            if keep is None:
                torch._foreach_lerp_(ema, weights, weight)
            else:
                deltas = torch._foreach_sub(weights, ema)
                torch._foreach_mul_(deltas, keep * weight)
                torch._foreach_add_(ema, deltas)
        for ema, weight_tensor in others:  # integer buffers (BatchNorm's counters) are copied
            ema.copy_(weight_tensor if keep is None else torch.where(keep, weight_tensor, ema))
        self._updates += 1

    def attach(self, engine: Engine) -> list[RemovableEventHandle]:
        """Update after each optimizer step of ``engine``; returns the handles."""
        return [engine.add_event_handler(StepEvents.OPTIMIZER_STEP_COMPLETED, self)]

    def __call__(self, engine: Engine) -> None:
        skipped = engine.state.step_skipped
        if isinstance(skipped, torch.Tensor):  # fp16: decided on the device; reading it would stall the GPU
            self._update(~skipped)
        elif not skipped:
            self._update(None)

    def state_dict(self) -> dict[str, Any]:
        """The update count (the averaged weights are ``ema_model.state_dict()``)."""
        return {"updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self._updates = int(state["updates"])
