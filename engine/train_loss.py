"""The epoch's train loss, from the batch losses the step records: exact across a resume and across
data-parallel ranks, with no device work per step.

The step appends each batch's loss (a 0-dim fp32 device tensor) and size to ``state.batch_losses`` and
``state.batch_sizes``. :class:`TrainLossEngine`, the engine ``create_trainer`` builds, sums them at the
epoch's end into ``state.metrics["train_loss"]`` (over every rank), and carries the epoch's partial sums
in its checkpoints, so a run resumed mid-epoch reports the same train_loss as the uninterrupted one.
"""
from __future__ import annotations

from typing import Any, Callable

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

__all__ = ["TrainLossEngine", "epoch_loss_totals"]


class TrainLossEngine(Engine):
    """An ignite Engine that keeps the epoch's train loss (``state.metrics["train_loss"]`` at EPOCH_COMPLETED).

    Events: EPOCH_STARTED (resets the sums at a new epoch, not at one resumed in its middle), EPOCH_COMPLETED.
    Reads: ``state.batch_losses``, ``state.batch_sizes`` (the process function appends to them).
    Writes: ``state.metrics["train_loss"]``; ``state.epoch_loss_sum`` and ``state.epoch_loss_count`` (what a
    checkpoint taken mid-epoch carried over: device tensors, zero at an epoch's start).

    Each rank sums its own batches' losses; ``state_dict`` (called on every rank at the same iteration by a
    checkpoint) saves the sum over the ranks, and ``load_state_dict`` gives it to rank 0 alone. The float64
    sum of float32 losses is exact, so it does not depend on the order of the terms (ranks, a resume).

    Args:
        process_function: the training step.
        device: where the sums live.
    """

    def __init__(self, process_function: Callable, device: torch.device) -> None:
        super().__init__(process_function)
        self.device = device
        self.state_dict_user_keys.extend(["epoch_loss_sum", "epoch_loss_count"])
        self._reset_sums()
        self.add_event_handler(Events.EPOCH_STARTED, TrainLossEngine._start_epoch)
        self.add_event_handler(Events.EPOCH_COMPLETED, TrainLossEngine._train_loss)

    def _reset_sums(self) -> None:
        self.state.epoch_loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.state.epoch_loss_count = torch.zeros((), dtype=torch.long, device=self.device)
        self.state.batch_losses, self.state.batch_sizes = [], []

    def _start_epoch(self) -> None:
        s = self.state
        if s.epoch_length and s.iteration % s.epoch_length == 0:  # a new epoch (iteration 0 included)
            self._reset_sums()
        s.batch_losses, s.batch_sizes = [], []  # on a resume, the checkpoint's sums hold the earlier ones

    def _train_loss(self) -> None:
        total, count = epoch_loss_totals(self.state)
        if idist.get_world_size() > 1:  # the loss over every rank's samples, the same figure on each rank
            total, count = idist.all_reduce(total.clone()), idist.all_reduce(count.clone())
        self.state.metrics["train_loss"] = (total / count.clamp(min=1)).item()

    def state_dict(self) -> Any:
        """ignite's state dict, with the epoch's loss sums so far over every rank."""
        state = super().state_dict()
        state["epoch_loss_sum"], state["epoch_loss_count"] = epoch_loss_totals(self.state)
        if idist.get_world_size() > 1:
            for key in ("epoch_loss_sum", "epoch_loss_count"):
                state[key] = idist.all_reduce(state[key].clone())
        return state

    def load_state_dict(self, state_dict: Any) -> None:
        """ignite's load, with the saved loss sums on this engine's device (rank 0's alone: it holds every rank's)."""
        super().load_state_dict(state_dict)
        self.state.epoch_loss_sum = self.state.epoch_loss_sum.to(self.device, torch.float64)
        self.state.epoch_loss_count = self.state.epoch_loss_count.to(self.device)
        self.state.batch_losses, self.state.batch_sizes = [], []
        if idist.get_world_size() > 1 and idist.get_rank() != 0:
            self.state.epoch_loss_sum = torch.zeros_like(self.state.epoch_loss_sum)
            self.state.epoch_loss_count = torch.zeros_like(self.state.epoch_loss_count)


def epoch_loss_totals(state: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The epoch's sample-weighted sum of finite batch losses (float64) and their sample count, on the device.

    Adds ``state.batch_losses`` (weighted by ``state.batch_sizes``) to what a resumed checkpoint carried
    over (``state.epoch_loss_sum``/``epoch_loss_count``); reads nothing on the host.
    """
    total, count = state.epoch_loss_sum, state.epoch_loss_count
    if not state.batch_losses:
        return total.clone(), count.clone()
    losses = torch.stack(state.batch_losses).double()
    sizes = torch.tensor(state.batch_sizes, dtype=torch.float64).to(losses.device, non_blocking=True)
    finite = torch.isfinite(losses)
    return (total + torch.where(finite, losses * sizes, 0.0).sum(),
            count + torch.where(finite, sizes, 0.0).sum().long())
