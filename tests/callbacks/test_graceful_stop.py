"""GracefulStop: a signal stops the run after a whole iteration, or after the epoch's records when it comes during an
epoch's last iteration or its validation, wherever in the loop it lands (delivered here from the handlers, at a
known point of ignite's loop, instead of by timing)."""
from __future__ import annotations

import os
import signal

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events
from ignite.metrics import Accuracy

from callbacks import GracefulStop, Validation
from engine import EpochEvents, StepEvents, create_evaluator, create_trainer


def _run(make_model, batches, event, at_iteration: int):
    """Train 2 epochs of ``batches``, SIGTERM this process at ``event`` of iteration ``at_iteration``; what ran."""
    model = make_model()
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy, precision="fp32")
    seen = {"steps": [], "validated": [], "recorded": []}
    trainer.add_event_handler(StepEvents.FORWARD_COMPLETED, lambda e: seen["steps"].append(e.state.iteration))
    Validation(create_evaluator(model, {"accuracy": Accuracy()}, precision="fp32"), batches[:1]).attach(trainer)
    trainer.add_event_handler(EpochEvents.VALIDATION_COMPLETED, lambda e: seen["validated"].append(e.state.epoch))
    trainer.add_event_handler(EpochEvents.EPOCH_RECORDED, lambda e: seen["recorded"].append(e.state.epoch))
    stop = GracefulStop()
    stop.attach(trainer)

    @trainer.on(event)
    def send(engine):
        if engine.state.iteration == at_iteration and stop.received is None:
            os.kill(os.getpid(), signal.SIGTERM)  # Python runs the handler before the next bytecode here

    previous = signal.getsignal(signal.SIGTERM)
    trainer.run(batches, max_epochs=2)
    assert signal.getsignal(signal.SIGTERM) is previous, "the handler was not put back"
    assert stop.received == signal.SIGTERM
    return trainer.state, seen


# 4 batches an epoch: iteration 4 is epoch 1's last, 5 the first of epoch 2
@pytest.mark.parametrize("event, at, stops_after", [
    (Events.ITERATION_STARTED, 2, 2),            # mid-epoch, before the step: that step still runs
    (StepEvents.FORWARD_COMPLETED, 2, 2),        # mid-step
    (Events.ITERATION_STARTED, 4, 4),            # the epoch's last iteration, before its step: not counted unrun
    (Events.GET_BATCH_COMPLETED, 3, 4),          # between iterations 3 and 4: ignite counts 4 next
    (Events.ITERATION_COMPLETED, 4, 4),          # after the epoch's last step, before its validation
    (EpochEvents.VALIDATION_COMPLETED, 4, 4),    # during the epoch's records
])
def test_the_stop_comes_after_a_whole_iteration_and_an_epochs_records(make_model, batches, event, at, stops_after):
    state, seen = _run(make_model, batches, event, at)
    assert state.iteration == stops_after
    assert seen["steps"] == list(range(1, stops_after + 1)), "an iteration was counted whose step never ran"
    if stops_after % len(batches) == 0:  # an epoch's end: its validation and records came first
        assert seen["validated"] == seen["recorded"] == [stops_after // len(batches)]
    else:
        assert seen["recorded"] == [e for e in (1,) if e * len(batches) <= stops_after]
