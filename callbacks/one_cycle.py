"""OneCycle: torch's OneCycleLR stepped once per optimizer step that really happened."""
from __future__ import annotations

import logging
import math
from typing import Any

import torch
from ignite.engine import Engine
from ignite.engine.events import RemovableEventHandle
from torch.optim.lr_scheduler import OneCycleLR

from engine.events import StepEvents

__all__ = ["OneCycle"]

log = logging.getLogger("kiln")


class OneCycle:
    """The one-cycle LR (and momentum / AdamW beta1) schedule: warm up to ``max_lr``, then anneal.

    Wraps ``torch.optim.lr_scheduler.OneCycleLR`` and calls its ``step()`` on OPTIMIZER_STEP_COMPLETED,
    so the LR and momentum sequences equal torch's for the same arguments. A step the scaler or a
    guard skipped (``state.step_skipped``) does not advance the schedule, so torch never warns that
    ``lr_scheduler.step()`` ran before ``optimizer.step()``. After ``total_steps`` optimizer steps the
    schedule holds its final LR instead of raising.

    ``total_steps = epochs * ceil(batches_per_epoch / accumulation_steps)`` (see :meth:`total_steps_for`).

    Events: OPTIMIZER_STEP_COMPLETED.
    Reads ``state.step_skipped``. Mutates ``optimizer.param_groups[*]['lr']`` and momentum/betas.
    State: the scheduler's state, kept across resume.

    Args:
        optimizer: the optimizer whose LR it sets (its LR is set to ``max_lr / div_factor`` at once).
        max_lr: the peak LR.
        total_steps: optimizer steps in the whole run.
        pct_start: fraction of the steps spent warming up.
        div_factor: initial LR = max_lr / div_factor.
        final_div_factor: final LR = initial LR / final_div_factor.
        anneal_strategy: "cos" or "linear".
        cycle_momentum: cycle momentum (SGD) or beta1 (Adam/AdamW) inversely to the LR.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 2)
        >>> opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        >>> schedule = OneCycle(opt, max_lr=1e-2, total_steps=100, div_factor=10)
        >>> round(opt.param_groups[0]["lr"], 6)
        0.001
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        max_lr: float,
        total_steps: int,
        pct_start: float = 0.25,
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
        anneal_strategy: str = "cos",
        cycle_momentum: bool = True,
    ) -> None:
        if max_lr <= 0:
            raise ValueError(f"max_lr must be > 0, not {max_lr}")
        self.optimizer = optimizer
        self._shape = dict(max_lr=max_lr, pct_start=pct_start, div_factor=div_factor,
                           final_div_factor=final_div_factor, anneal_strategy=anneal_strategy,
                           cycle_momentum=cycle_momentum)
        self.restart(total_steps)

    def restart(self, total_steps: int) -> None:
        """Start a new cycle of ``total_steps`` optimizer steps with the same shape (max_lr, pct_start, ...).

        The optimizer's LR goes back to ``max_lr / div_factor`` at once; ``kiln resume --epochs N
        --new-schedule`` runs a second one-cycle over the added epochs this way.
        """
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, not {total_steps}")
        self._steps_past_end = 0
        self.total_steps = total_steps
        self.scheduler = OneCycleLR(self.optimizer, total_steps=total_steps, **self._shape)

    @staticmethod
    def total_steps_for(epochs: int, batches_per_epoch: int, accumulation_steps: int = 1) -> int:
        """Optimizer steps in a run of ``epochs`` epochs (accumulation windows end at epoch ends)."""
        return epochs * math.ceil(batches_per_epoch / accumulation_steps)

    def attach(self, engine: Engine) -> list[RemovableEventHandle]:
        """Step the schedule after each optimizer step of ``engine``; returns the handles."""
        return [engine.add_event_handler(StepEvents.OPTIMIZER_STEP_COMPLETED, self)]

    def __call__(self, engine: Engine) -> None:
        if engine.state.step_skipped:
            return
        if self.scheduler.last_epoch + 1 < self.total_steps:
            self.scheduler.step()
            return
        self._steps_past_end += 1
        if self._steps_past_end == 2:  # the first is the run's last step; a second means it is too long
            log.warning("the OneCycle schedule (%d steps) has ended: the LR holds its final value", self.total_steps)

    def scale_lr(self, factor: float) -> None:
        """Multiply the rest of the schedule (and the current LR) by ``factor``; the step count stands.

        Scales the initial, peak and final LRs that ``OneCycleLR`` keeps in each param group, so every
        later LR is ``factor`` times what it would have been. ``NanGuard`` calls this after a rollback.
        The scaled values live in the optimizer's param groups, so they are saved and resumed with it.
        """
        if not factor > 0:
            raise ValueError(f"factor must be > 0, not {factor}")
        for group in self.optimizer.param_groups:
            for key in ("lr", "initial_lr", "max_lr", "min_lr"):
                if key in group:
                    group[key] = group[key] * factor
        self.scheduler.base_lrs = [lr * factor for lr in self.scheduler.base_lrs]
        self.scheduler._last_lr = [lr * factor for lr in self.scheduler.get_last_lr()]

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state (weights_only-safe)."""
        return {"scheduler": self.scheduler.state_dict(), "total_steps": self.total_steps,
                "steps_past_end": self._steps_past_end}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.scheduler.load_state_dict(state["scheduler"])
        self.total_steps = int(state["total_steps"])
        self._steps_past_end = int(state.get("steps_past_end", 0))
