"""FineTune: a pretrained body frozen while a new head learns, then everything on a second one-cycle."""
from __future__ import annotations

from typing import Iterable

import torch
from ignite.engine import Engine, Events
from ignite.engine.events import RemovableEventHandle

from callbacks.one_cycle import OneCycle

__all__ = ["FineTune"]


class FineTune:
    """Two phases, as fastai's ``fine_tune`` and Lightning's ``BackboneFinetuning`` run them.

    Phase 1, the first ``freeze_epochs`` epochs: the ``frozen`` parameters (the pretrained body, less its
    norm layers' weights if they are to train) get no gradients (``requires_grad`` False), so only the new
    head learns, on the ``schedule``'s first one-cycle. Phase 2, from the first iteration of epoch
    ``freeze_epochs + 1``: everything trains, and the schedule starts a second one-cycle of ``phase2_steps``
    optimizer steps; param groups with an ``lr_scale`` (the body's, see ``recipes.models.parameter_groups``)
    peak at that fraction of the head's LR.

    The phase follows from the iteration alone, so a resumed run freezes or unfreezes exactly as the
    uninterrupted one did: the checkpoint of the last phase-1 iteration holds the first cycle's state, and
    the second cycle starts at the same iteration after the resume. A rollback in phase 2 to a snapshot
    taken before the unfreeze (NanGuard's last sound state is often the epoch end just before it) brings
    back the first cycle's schedule, spent; the body stays unfrozen, so the second cycle starts again from
    the next iteration, at the LR the rollback lowered. (Without that, phase 2 would train at the first
    cycle's final LR, about max_lr / 1e5.)

    Events: STARTED (sets the phase of the iteration the run starts from), ITERATION_STARTED (the first
    phase-2 iteration unfreezes and restarts the schedule; a later one restarts it again if a rollback
    brought the first cycle back). Reads ``state.iteration``, ``state.epoch_length``, ``schedule.cycle``.
    Writes the parameters' ``requires_grad``; restarts ``schedule``.
    State: none (the phase is a function of the iteration; the schedule keeps its own, and its cycle count).

    Args:
        frozen: the parameters phase 1 does not train.
        schedule: the run's :class:`OneCycle`, built for phase 1's steps.
        freeze_epochs: epochs in phase 1 (>= 1).
        phase2_steps: optimizer steps of the second one-cycle.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> from engine import create_trainer
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        >>> opt = torch.optim.AdamW(model.parameters())
        >>> schedule = OneCycle(opt, max_lr=0.01, total_steps=2)
        >>> trainer = create_trainer(model, opt, F.cross_entropy)
        >>> handles = FineTune(model[0].parameters(), schedule, freeze_epochs=1, phase2_steps=2).attach(trainer)
        >>> handles = schedule.attach(trainer)
        >>> before, seen = model[0].weight.detach().clone(), []
        >>> _ = trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: seen.append(torch.equal(model[0].weight, before)))
        >>> _ = trainer.run([(torch.randn(8, 4), torch.randint(0, 2, (8,)))] * 2, max_epochs=2)
        >>> seen, model[0].weight.requires_grad  # the body unchanged through epoch 1, trained in epoch 2
        ([True, False], True)
    """

    def __init__(self, frozen: Iterable[torch.nn.Parameter], schedule: OneCycle, freeze_epochs: int,
                 phase2_steps: int) -> None:
        if freeze_epochs < 1:
            raise ValueError(f"freeze_epochs must be >= 1, not {freeze_epochs}")
        if phase2_steps < 1:
            raise ValueError(f"phase2_steps must be >= 1, not {phase2_steps}")
        self.frozen = list(frozen)
        if not self.frozen:
            raise ValueError("nothing to freeze: the model is all head")
        self.schedule, self.freeze_epochs, self.phase2_steps = schedule, freeze_epochs, phase2_steps
        self._phase2_cycle: int | None = None  # the schedule's cycle in phase 2, once it has begun

    def attach(self, engine: Engine) -> list[RemovableEventHandle]:
        """Freeze and unfreeze on ``engine``; returns the handles."""
        return [engine.add_event_handler(Events.STARTED, self._on_started),
                engine.add_event_handler(Events.ITERATION_STARTED, self._on_iteration_started)]

    def _boundary(self, engine: Engine) -> int:
        """The last iteration of phase 1."""
        return self.freeze_epochs * engine.state.epoch_length

    def in_phase1(self, engine: Engine) -> bool:
        """Whether the next iteration of ``engine`` trains with the body frozen."""
        return engine.state.iteration < self._boundary(engine)

    def _on_started(self, engine: Engine) -> None:
        phase2 = not self.in_phase1(engine)
        self._set_trainable(phase2)
        self._phase2_cycle = self.schedule.cycle if phase2 else None  # resumed in phase 2: the checkpoint's cycle

    def _on_iteration_started(self, engine: Engine) -> None:
        if engine.state.iteration == self._boundary(engine) + 1:
            self._set_trainable(True)
            self._restart()
        elif self._phase2_cycle is not None and self.schedule.cycle < self._phase2_cycle:
            self._restart()  # a rollback brought back the first cycle's schedule: phase 2's starts again

    def _restart(self) -> None:
        self.schedule.restart(self.phase2_steps)
        self._phase2_cycle = self.schedule.cycle

    def _set_trainable(self, trainable: bool) -> None:
        for p in self.frozen:
            p.requires_grad_(trainable)
