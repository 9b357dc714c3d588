"""OneCycle: torch's OneCycleLR stepped once per optimizer step that really happened."""
from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import torch
from ignite.engine import Engine
from ignite.engine.events import RemovableEventHandle
from torch.optim.lr_scheduler import OneCycleLR

from engine.events import StepEvents
from engine.events import is_epoch_end

__all__ = ["OneCycle"]

log = logging.getLogger("kiln")


class OneCycle:
    """The one-cycle LR (and momentum / AdamW beta1) schedule: warm up to ``max_lr``, then anneal.

    Wraps ``torch.optim.lr_scheduler.OneCycleLR`` and calls its ``step()`` on OPTIMIZER_STEP_COMPLETED,
    so the LR and momentum sequences equal torch's for the same arguments. A step a guard skipped
    (``state.step_skipped`` True) does not advance the schedule. After ``total_steps`` optimizer steps
    the schedule holds its final LR instead of raising.

    Under fp16 the scaler's skip flag is a device tensor, and reading it every step would stall the GPU.
    The schedule then advances on every step and counts the flagged steps on the device; every
    ``sync_every`` optimizer steps and at each epoch's end it reads that count once and moves back by
    it. So between two sync points an LR may run ahead of the skipped steps (by at most the steps the
    scaler skipped since the last sync, which happen rarely: at the start while the scale calibrates,
    and once per growth interval); at every sync point the schedule is where it would be had it
    stepped only on real updates. A checkpoint saves the unread count, so a resumed run moves back at
    the same step as the uninterrupted one.

    ``total_steps = epochs * ceil(batches_per_epoch / accumulation_steps)`` (see :meth:`total_steps_for`).

    Events: OPTIMIZER_STEP_COMPLETED.
    Reads ``state.step_skipped``, ``state.optimizer_step``. Mutates ``optimizer.param_groups[*]['lr']``
    and momentum/betas.
    State: the scheduler's state, the unread skip count and ``cycle`` (0 for the first cycle, one more at each
    :meth:`restart`), kept across resume and in NanGuard's snapshots.

    Args:
        optimizer: the optimizer whose LR it sets (its LR is set to ``max_lr / div_factor`` at once). A param
            group with an ``lr_scale`` peaks at ``max_lr`` times it (discriminative LRs, e.g. a fine-tuned body).
        max_lr: the peak LR.
        total_steps: optimizer steps in the whole run.
        pct_start: fraction of the steps spent warming up.
        div_factor: initial LR = max_lr / div_factor.
        final_div_factor: final LR = initial LR / final_div_factor.
        anneal_strategy: "cos" or "linear".
        cycle_momentum: cycle momentum (SGD) or beta1 (Adam/AdamW) inversely to the LR.
        sync_every: read the device skip count every this many optimizer steps (and at epoch ends);
            kiln's recipes pass NanGuard's ``check_every``, so both read at the same steps.

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
        sync_every: int = 50,
    ) -> None:
        if max_lr <= 0:
            raise ValueError(f"max_lr must be > 0, not {max_lr}")
        if sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, not {sync_every}")
        self.optimizer = optimizer
        self.sync_every = sync_every
        self.lr_factor = 1.0  # what scale_lr applied so far: a restarted cycle keeps it
        self.cycle = -1  # restart() makes it 0: the cycles begun before this one
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
        self.total_steps = total_steps
        self.cycle += 1
        shape = dict(self._shape, max_lr=self._shape["max_lr"] * self.lr_factor)
        scales = [group.get("lr_scale", 1.0) for group in self.optimizer.param_groups]
        if any(scale != 1.0 for scale in scales):  # discriminative LRs: a group's peak is max_lr x its lr_scale
            shape["max_lr"] = [shape["max_lr"] * scale for scale in scales]
        self.scheduler = OneCycleLR(self.optimizer, total_steps=total_steps, **shape)
        self._position = 0  # optimizer steps taken, less the skipped ones known on the host
        self._unread: torch.Tensor | None = None  # skips flagged on the device since the last sync
        self._unread_loaded = 0  # the unread count a checkpoint carried, moved back at the next sync
        self._warned_end = False

    @staticmethod
    def total_steps_for(epochs: int, batches_per_epoch: int, accumulation_steps: int = 1) -> int:
        """Optimizer steps in a run of ``epochs`` epochs (accumulation windows end at epoch ends)."""
        return epochs * math.ceil(batches_per_epoch / accumulation_steps)

    def attach(self, engine: Engine) -> list[RemovableEventHandle]:
        """Step the schedule after each optimizer step of ``engine``; returns the handles."""
        return [engine.add_event_handler(StepEvents.OPTIMIZER_STEP_COMPLETED, self)]

    def __call__(self, engine: Engine) -> None:
        state = engine.state
        skipped = state.step_skipped
        if isinstance(skipped, torch.Tensor):  # the scaler's flag: count it on the device, read it later
            self._unread = skipped.long() if self._unread is None else self._unread + skipped
            self._position += 1
        elif not skipped:
            self._position += 1
        if (self._unread is not None or self._unread_loaded) and (
                state.optimizer_step % self.sync_every == 0 or is_epoch_end(state)):
            self._position -= self._take_unread()
        self._move_to(self._position)

    def _take_unread(self) -> int:
        """The skips not yet accounted for (one host read), now accounted for."""
        count = self._unread_loaded + (int(self._unread) if self._unread is not None else 0)
        self._unread, self._unread_loaded = None, 0
        return count

    def _move_to(self, position: int) -> None:
        """Set the LR (and momentum) of schedule step ``position``; past the end, hold the final LR."""
        scheduler = self.scheduler
        target = min(position, self.total_steps - 1)
        if position - (self.total_steps - 1) >= 2 and not self._warned_end:  # the last step is the run's last
            self._warned_end = True
            log.warning("the OneCycle schedule (%d steps) has ended: the LR holds its final value", self.total_steps)
        if target == scheduler.last_epoch:
            return
        scheduler.last_epoch = target - 1  # usually already so: step() advances one and applies the values
        if scheduler._step_count == 1 and not getattr(self.optimizer, "_opt_called", False):
            with warnings.catch_warnings():  # a step the scaler skipped before any real one: nothing lost
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
                scheduler.step()
        else:
            scheduler.step()

    def scale_lr(self, factor: float) -> None:
        """Multiply the rest of the schedule (and the current LR) by ``factor``; the step count stands.

        Scales the initial, peak and final LRs that ``OneCycleLR`` keeps in each param group, so every
        later LR is ``factor`` times what it would have been. ``NanGuard`` calls this after a rollback.
        The scaled values live in the optimizer's param groups, so they are saved and resumed with it.
        """
        if not factor > 0:
            raise ValueError(f"factor must be > 0, not {factor}")
        self.lr_factor *= factor
        for group in self.optimizer.param_groups:
            for key in ("lr", "initial_lr", "max_lr", "min_lr"):
                if key in group:
                    group[key] = group[key] * factor
        self.scheduler.base_lrs = [lr * factor for lr in self.scheduler.base_lrs]
        self.scheduler._last_lr = [lr * factor for lr in self.scheduler.get_last_lr()]

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state and the skips not yet accounted for (weights_only-safe; reads the
        device skip count, if any)."""
        unread = self._unread_loaded + (int(self._unread) if self._unread is not None else 0)
        return {"scheduler": self.scheduler.state_dict(), "total_steps": self.total_steps,
                "position": self._position, "unread_skips": unread,
                "steps_past_end": max(0, self._position - (self.total_steps - 1)), "lr_factor": self.lr_factor,
                "cycle": self.cycle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.scheduler.load_state_dict(state["scheduler"])
        self.total_steps = int(state["total_steps"])
        past_end = int(state.get("steps_past_end", 0))  # checkpoints from before the position was saved
        self._position = int(state.get("position", self.scheduler.last_epoch + past_end))
        self._unread, self._unread_loaded = None, int(state.get("unread_skips", 0))
        self._warned_end = self._position - (self.total_steps - 1) >= 2
        self.lr_factor = float(state.get("lr_factor", 1.0))
        self.cycle = int(state.get("cycle", self.cycle))  # checkpoints from before cycles were counted: as built
