"""``create_trainer``: the training step as an ignite process function that fires :class:`StepEvents`."""
from __future__ import annotations

import logging
from typing import Any, Callable, NamedTuple, Sequence

import torch
from ignite.engine import Engine, Events

from engine.amp_protocol import drops_on_device, scale_tensor, step_unless
from engine.data_position import position_data
from engine.events import STEP_EVENT_COUNTERS, EpochEvents, StepEvents, fire_step_event, is_epoch_end
from engine.precision import Precision, resolve_for_model
from engine.records import named_param_groups
from engine.rng import iteration_seed, seed_generators
from engine.train_loss import TrainLossEngine

__all__ = ["create_trainer", "StepOutput", "prepare_batch"]

log = logging.getLogger("kiln")


class StepOutput(NamedTuple):
    """What the training step returns (``engine.state.output``): no host sync is needed to build it."""

    loss: torch.Tensor  #: this batch's loss, detached, fp32, 0-dim
    y_pred: torch.Tensor  #: the model's output, detached
    y: torch.Tensor  #: the targets


def prepare_batch(batch: Sequence[torch.Tensor], device: torch.device, non_blocking: bool = True):
    """Move an ``(x, y)`` batch to ``device`` (a no-op for tensors already there)."""
    x, y = batch[0], batch[1]
    return x.to(device, non_blocking=non_blocking), y.to(device, non_blocking=non_blocking)


def create_trainer(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    device: str | torch.device | None = None,
    precision: str | Precision = "auto",
    accumulation_steps: int = 1,
    seed: int | None = None,
    memory_format: torch.memory_format = torch.contiguous_format,
    prepare: Callable = prepare_batch,
) -> Engine:
    """Build the training engine: one ignite iteration per (micro-)batch, firing :class:`StepEvents`.

    The step owns the order (autocast, loss, scaled backward, unscale, optimizer step, zero_grad);
    handlers attached to the step events own the policy (clipping, schedules, guards, logging).
    Long on purpose: the step's order reads top to bottom in one place.

    ``engine.state`` fields this engine defines (handlers read these, and write only the ones marked):
        precision (Precision): the resolved precision policy.
        scaler (GradScaler | None): the loss scaler the step uses; installed by ``callbacks.AMP``.
        lr (float): LR of param group 0 used by this iteration's optimizer step.
        group_lrs (dict): with named param groups (a fine-tune's head and body), each name's LR, as ``lr``.
        loss (Tensor): this batch's loss, detached fp32 (FORWARD_COMPLETED onwards).
        grad_norm (Tensor | None): pre-clip total grad norm; written by ``callbacks.GradClip``.
        skip_step (bool): a BEFORE_OPTIMIZER_STEP handler may set it to drop this update.
        drop_update (Tensor | None): a BEFORE_OPTIMIZER_STEP handler may set a 0-dim float device flag,
            only when ``state.drops_on_device`` (torch's fused optimizers, no loss scaler): 1.0 drops this
            update on the device, with no host read (``engine.amp_protocol``). Reset to None every step.
        step_skipped (bool | Tensor): whether the last optimizer step was skipped (inf grads or
            skip_step). Under a loss scaler it is a 0-dim bool tensor on the device (the scaler decides
            there; reading it is a host sync), else a Python bool.
        loss_scale (Tensor | None): the scaler's scale after the last step, a 0-dim tensor on the
            device (fp16 only; ``engine.records.to_float`` reads it).
        skipped_steps (int | Tensor): optimizer steps the fp16 scaler skipped so far; written by
            ``callbacks.AMP`` (a device count under fp16; 0 without a scaler).
        optimizer_step (int): optimizer steps attempted so far (skipped ones included); checkpointed.
        accumulating (bool): gradients of an unfinished accumulation window are pending (a checkpoint
            taken now could not resume exactly).
        batch_losses, batch_sizes: this epoch's batch losses (as ``state.loss``) and sample counts since the
            epoch started or the run resumed (no device work per step; guards read them). The engine, a
            :class:`~engine.train_loss.TrainLossEngine`, averages the finite ones into ``metrics["train_loss"]``.
        epoch_samples, epoch_samples_timed: samples of the epoch so far, and those trained by this
            process (for throughput after a mid-epoch resume).
        step_record: the last ``engine.records.step_record`` taken (read once per step for every logger).

    Args:
        model: the network, already on ``device``.
        optimizer: its optimizer.
        loss_fn: ``loss_fn(y_pred, y) -> scalar tensor``.
        device: where batches go; defaults to the model's device.
        precision: ``auto | fp32 | bf16 | fp16`` or a resolved :class:`Precision`.
        accumulation_steps: batches per optimizer step (windows never cross an epoch boundary).
        seed: when given, torch's RNG is re-seeded before every iteration from (seed, iteration), so
            dropout and other model randomness do not depend on where a run was resumed.
        memory_format: e.g. ``torch.channels_last`` for 4-D inputs.
        prepare: ``prepare(batch, device) -> (x, y)``.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> from engine import create_trainer
        >>> model = torch.nn.Linear(4, 2)
        >>> trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy)
        >>> data = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))] * 3
        >>> trainer.run(data, max_epochs=2).optimizer_step
        6
    """
    if accumulation_steps < 1:
        raise ValueError(f"accumulation_steps must be >= 1, not {accumulation_steps}")
    device, precision = resolve_for_model(model, device, precision)

    named_groups = named_param_groups(optimizer)  # a fine-tune's head and body: their LRs go into state.group_lrs

    def train_step(engine: Engine, batch: Any) -> StepOutput:
        state = engine.state
        if not model.training:  # the evaluator put it in eval mode (a per-step train() costs 30-130 us)
            model.train()
        x, y = prepare(batch, device)
        if x.dim() == 4 and memory_format is not torch.contiguous_format:
            x = x.contiguous(memory_format=memory_format)
        if seed is not None:
            seed_generators(iteration_seed(seed, state.iteration), device)
        state.lr = optimizer.param_groups[0]["lr"]  # the LR this iteration's step uses
        if named_groups:
            state.group_lrs = {name: group["lr"] for name, group in named_groups.items()}
        position = (state.iteration - 1) % state.epoch_length
        window_start = position - position % accumulation_steps
        window = min(accumulation_steps, state.epoch_length - window_start)
        closes_window = position - window_start + 1 == window

        with precision.autocast():
            y_pred = model(x)
            loss = loss_fn(y_pred, y)
        state.loss = loss.detach().float()
        state.batch_losses.append(state.loss)  # summed at the epoch's end: no device work per step
        state.batch_sizes.append(x.shape[0])
        state.epoch_samples += x.shape[0]
        state.epoch_samples_timed += x.shape[0]
        fire_step_event(engine, StepEvents.FORWARD_COMPLETED)

        scaler = state.scaler
        to_backward = loss.float() / window if window > 1 else loss
        (scaler.scale(to_backward) if scaler is not None else to_backward).backward()

        state.accumulating = not closes_window
        if closes_window:
            state.optimizer_step += 1
            state.skip_step, state.drop_update = False, None
            fire_step_event(engine, StepEvents.BACKWARD_COMPLETED)
            if scaler is not None:
                scaler.unscale_(optimizer)  # true-scale grads before anyone clips or measures them
            fire_step_event(engine, StepEvents.BEFORE_OPTIMIZER_STEP)
            _optimizer_step(state, optimizer, scaler)
            fire_step_event(engine, StepEvents.OPTIMIZER_STEP_COMPLETED)
            optimizer.zero_grad(set_to_none=True)
        return StepOutput(state.loss, y_pred.detach(), y)

    trainer = TrainLossEngine(train_step, device)
    trainer.register_events(*StepEvents, *EpochEvents, event_to_attr=STEP_EVENT_COUNTERS)
    trainer.state_dict_user_keys.extend(["optimizer_step", "epoch_samples"])
    state = trainer.state
    state.precision = precision
    state.scaler = None
    state.lr = optimizer.param_groups[0]["lr"]
    state.loss = None
    state.grad_norm = None
    state.skip_step = False
    state.drop_update = None
    state.drops_on_device = drops_on_device(optimizer)
    state.step_skipped = False
    state.loss_scale = None
    state.skipped_steps = 0
    state.optimizer_step = 0
    state.accumulating = False
    state.epoch_samples = 0
    state.epoch_samples_timed = 0

    @trainer.on(Events.STARTED)
    def _start(engine: Engine) -> None:
        if not engine.state.epoch_length:
            raise ValueError("kiln's trainer needs data with a length, or run(data, epoch_length=N)")
        if engine.state.iteration == 0:  # a fresh run, not a resume: counters start again
            engine.state.optimizer_step = 0
        if engine.state.precision.needs_scaler and engine.state.scaler is None:
            log.warning("precision fp16 without a loss scaler: small gradients will underflow; attach callbacks.AMP")

    @trainer.on(Events.EPOCH_STARTED)
    def _start_epoch(engine: Engine) -> None:
        s = engine.state
        if is_epoch_end(s):  # a new epoch (iteration 0 included), not one resumed in its middle
            s.epoch_samples = 0
        s.epoch_samples_timed = 0  # samples trained by this process this epoch: throughput
        position_data(s.dataloader, s.epoch, s.iteration % s.epoch_length)

    return trainer


def _optimizer_step(state: Any, optimizer: torch.optim.Optimizer, scaler: Any) -> None:
    """Step (or skip) and record ``step_skipped`` and ``loss_scale`` before OPTIMIZER_STEP_COMPLETED."""
    if scaler is None:
        if not state.skip_step:  # with a drop_update flag of 1.0 the update stays out of the weights
            step_unless(optimizer, state.drop_update) if state.drop_update is not None else optimizer.step()
        state.step_skipped = state.skip_step
        return
    before = scale_tensor(scaler)  # on the device: get_scale() would read it on the host (a sync per step)
    if not state.skip_step:
        scaler.step(optimizer)  # skips the update by itself when the unscaled grads hold inf/NaN
    scaler.update()  # backs the scale off exactly when the unscaled grads held inf/NaN
    state.loss_scale = scale_tensor(scaler)  # a tensor of its own: records keep it by reference
    state.step_skipped = True if state.skip_step else state.loss_scale < before
