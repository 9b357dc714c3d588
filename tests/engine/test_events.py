"""The step events: where they fire, in which order, how often, and that ``every=`` filters work on them."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events

from engine import StepEvents, create_trainer

ORDERED_EVENTS = [
    Events.ITERATION_STARTED,
    StepEvents.FORWARD_COMPLETED,
    StepEvents.BACKWARD_COMPLETED,
    StepEvents.BEFORE_OPTIMIZER_STEP,
    StepEvents.OPTIMIZER_STEP_COMPLETED,
    Events.ITERATION_COMPLETED,
]
OPTIMIZER_EVENTS = [StepEvents.BACKWARD_COMPLETED, StepEvents.BEFORE_OPTIMIZER_STEP, StepEvents.OPTIMIZER_STEP_COMPLETED]


def _trainer(model, accumulation_steps=1):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    return create_trainer(model, optimizer, F.cross_entropy, precision="fp32", accumulation_steps=accumulation_steps)


def _record(trainer, events):
    fired = []
    for event in events:
        trainer.add_event_handler(event, lambda e, name=event.name: fired.append((name, e.state.iteration)))
    return fired


def test_events_fire_in_documented_order_once_per_iteration(make_model, batches):
    trainer = _trainer(make_model())
    fired = _record(trainer, ORDERED_EVENTS)
    trainer.run(batches, max_epochs=2)

    names = [name for name, _ in fired]
    one_iteration = [e.name for e in ORDERED_EVENTS]
    assert names == one_iteration * (2 * len(batches))
    # every event of an iteration sees that iteration's number
    for i in range(0, len(fired), len(ORDERED_EVENTS)):
        assert len({it for _, it in fired[i : i + len(ORDERED_EVENTS)]}) == 1


def test_order_does_not_depend_on_attach_order(make_model, batches):
    trainer = _trainer(make_model())
    fired = _record(trainer, list(reversed(ORDERED_EVENTS)))
    trainer.run(batches[:1], max_epochs=1)
    assert [name for name, _ in fired] == [e.name for e in ORDERED_EVENTS]


@pytest.mark.parametrize("epoch_length, k", [(5, 2), (4, 2), (5, 3), (3, 5), (4, 1)])
def test_accumulation_fires_optimizer_events_once_per_window(make_model, make_batches, epoch_length, k):
    trainer = _trainer(make_model(), accumulation_steps=k)
    fired = _record(trainer, [StepEvents.FORWARD_COMPLETED, *OPTIMIZER_EVENTS, Events.EPOCH_COMPLETED])
    epochs = 2
    state = trainer.run(make_batches(count=epoch_length, batch_size=4), max_epochs=epochs)

    def count(event):
        return sum(name == event.name for name, _ in fired)

    steps_per_epoch = math.ceil(epoch_length / k)
    assert count(StepEvents.FORWARD_COMPLETED) == epochs * epoch_length
    for event in OPTIMIZER_EVENTS:
        assert count(event) == epochs * steps_per_epoch
    assert state.optimizer_step == epochs * steps_per_epoch

    # windows close every k-th batch of an epoch and at the epoch's last batch, never across epochs
    step_iterations = [it for name, it in fired if name == StepEvents.OPTIMIZER_STEP_COMPLETED.name]
    expected = [
        (epoch - 1) * epoch_length + min(start + k, epoch_length)
        for epoch in range(1, epochs + 1)
        for start in range(0, epoch_length, k)
    ]
    assert step_iterations == expected


def test_every_filter_counts_optimizer_steps(make_model, make_batches):
    trainer = _trainer(make_model(), accumulation_steps=2)
    every_second_step, forward_every_third = [], []
    trainer.add_event_handler(StepEvents.OPTIMIZER_STEP_COMPLETED(every=2),
                              lambda e: every_second_step.append(e.state.optimizer_step))
    trainer.add_event_handler(StepEvents.FORWARD_COMPLETED(every=3),
                              lambda e: forward_every_third.append(e.state.iteration))
    once = []
    trainer.add_event_handler(StepEvents.BEFORE_OPTIMIZER_STEP(once=3), lambda e: once.append(e.state.iteration))

    trainer.run(make_batches(count=6, batch_size=4), max_epochs=2)  # 12 iterations, 6 optimizer steps

    assert every_second_step == [2, 4, 6]
    assert forward_every_third == [3, 6, 9, 12]
    assert once == [6]  # the third optimizer step closes the window ending at iteration 6


def test_optimizer_step_counter_is_current_at_each_optimizer_event(make_model, batches):
    trainer = _trainer(make_model())
    seen = {event.name: [] for event in OPTIMIZER_EVENTS}
    for event in OPTIMIZER_EVENTS:
        trainer.add_event_handler(event, lambda e, n=event.name: seen[n].append(e.state.optimizer_step))
    trainer.run(batches, max_epochs=1)
    for steps in seen.values():
        assert steps == [1, 2, 3, 4]
