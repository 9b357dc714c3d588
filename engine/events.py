"""The custom events kiln fires inside a training step, and the ``engine.state`` fields they guarantee."""
import weakref
from typing import Any

from ignite.engine import Engine, EventEnum

__all__ = ["StepEvents", "EpochEvents", "STEP_EVENT_COUNTERS", "ensure_epoch_events", "fire_step_event", "is_epoch_end"]


class StepEvents(EventEnum):
    """Events fired by kiln's training step, between ignite's ITERATION_STARTED and ITERATION_COMPLETED.

    One ignite iteration processes one (micro-)batch. With ``accumulation_steps = k`` the optimizer
    steps on every k-th batch of an epoch and on the epoch's last batch; the three optimizer events
    fire only on those iterations::

        ITERATION_STARTED                     (a handler may still set the LR here)
          state.lr = lr of param group 0 for this step
          with autocast(precision):
              loss = loss_fn(model(x), y)
          FORWARD_COMPLETED                   state.loss: this batch's loss, detached fp32 tensor
          (scaler.scale(loss) if fp16 else loss / window).backward()
          -- only when the accumulation window closes: --
          BACKWARD_COMPLETED                  raw grads exist; under fp16 still multiplied by the loss scale.
                                              AMP unscales here.
          BEFORE_OPTIMIZER_STEP               grads are true-scale: clip, measure, check here.
                                              A handler may set state.skip_step = True to drop the update,
                                              or state.drop_update (a device flag: no host read) when
                                              state.drops_on_device (engine.amp_protocol).
          scaler.step(optimizer) / optimizer.step()   (skipped on inf grads, skip_step or drop_update)
          OPTIMIZER_STEP_COMPLETED            state.step_skipped, state.loss_scale, state.optimizer_step
                                              are current: schedulers, EMA, scale monitors go here.
          optimizer.zero_grad(set_to_none=True)
        ITERATION_COMPLETED                   logging, metrics

    ``every=``/``once=`` filters work on these events: FORWARD_COMPLETED counts ``state.iteration``, the
    others count ``state.optimizer_step`` (optimizer steps attempted, skipped ones included).
    """

    FORWARD_COMPLETED = "forward_completed"
    BACKWARD_COMPLETED = "backward_completed"
    BEFORE_OPTIMIZER_STEP = "before_optimizer_step"
    OPTIMIZER_STEP_COMPLETED = "optimizer_step_completed"


class EpochEvents(EventEnum):
    """Events fired on the trainer at the end of an epoch, from within its EPOCH_COMPLETED, and before
    each checkpoint.

    ``callbacks.Validation`` fires the first two, in this order::

        EPOCH_COMPLETED                  state.metrics["train_loss"] is set (by the trainer itself)
          run the evaluator              (validated epochs only)
          VALIDATION_COMPLETED           state.metrics["val_*"] are set: epoch loggers write here
          EPOCH_RECORDED                 every record of the epoch is written: epoch-end checkpoints
                                         go here, so a checkpoint never predates its epoch's records

    ``callbacks.Checkpointer`` fires CHECKPOINT_STARTED just before it writes a checkpoint (mid-epoch
    ones too): a logger that buffers its records flushes them here, so that a run killed after the
    checkpoint still has every record up to it on disk.

    Listening to these instead of EPOCH_COMPLETED keeps loggers and checkpoints independent of the
    order in which they and the validation were attached.
    """

    VALIDATION_COMPLETED = "validation_completed"
    EPOCH_RECORDED = "epoch_recorded"
    CHECKPOINT_STARTED = "checkpoint_started"


#: Which ``engine.state`` counter each step event's ``every=``/``once=`` filter reads.
STEP_EVENT_COUNTERS = {
    StepEvents.FORWARD_COMPLETED: "iteration",
    StepEvents.BACKWARD_COMPLETED: "optimizer_step",
    StepEvents.BEFORE_OPTIMIZER_STEP: "optimizer_step",
    StepEvents.OPTIMIZER_STEP_COMPLETED: "optimizer_step",
    EpochEvents.VALIDATION_COMPLETED: "epoch",
    EpochEvents.EPOCH_RECORDED: "epoch",
    EpochEvents.CHECKPOINT_STARTED: "iteration",
}


def ensure_epoch_events(engine: Engine) -> None:
    """Register :class:`EpochEvents` on ``engine`` unless it has them (``create_trainer`` registers them)."""
    missing = [e for e in EpochEvents if not engine.has_registered_events(e)]
    if missing:  # with their counters, so every=/once= filters work on them
        engine.register_events(*missing, event_to_attr={e: STEP_EVENT_COUNTERS[e] for e in missing})


def is_epoch_end(state: Any) -> bool:
    """Whether ``state.iteration`` is the last iteration of an epoch (False before the length is known).

    Example:
        >>> from types import SimpleNamespace
        >>> last, before = SimpleNamespace(iteration=46, epoch_length=23), SimpleNamespace(iteration=45, epoch_length=23)
        >>> is_epoch_end(last), is_epoch_end(before)
        (True, False)
    """
    return bool(state.epoch_length) and state.iteration % state.epoch_length == 0


def fire_step_event(engine: Engine, event: Any) -> None:
    """Fire one of kiln's step events, only if a handler listens: ignite's own dispatch loop, minus its costs.

    ``Engine.fire_event`` first checks that the event is registered by comparing it with every allowed
    event, one Python ``__eq__`` each (about 10 us a call, four calls a step), and ``_fire_event`` formats
    a debug-log line whether or not debug logging is on (about 5 us). kiln's step events are registered
    by ``create_trainer`` itself, so the step calls the handlers as ``_fire_event`` does (the engine, held
    by a weak reference, first), and sets ``last_event_name`` as it does.
    """
    handlers = engine._event_handlers.get(event)
    if not handlers:
        return
    engine.last_event_name = event
    for func, args, kwargs in handlers:
        if args and isinstance(args[0], weakref.ref):
            func(engine, *args[1:], **kwargs)
        else:  # a handler registered without the engine (ignite's metrics)
            func(*args, **kwargs)
