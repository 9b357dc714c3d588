"""EarlyStop: stops after `patience` validations without a gain, honours min_delta, and keeps its count across resume."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events

from callbacks import EarlyStop
from engine import EpochEvents, create_trainer


def _trainer(make_model, scores):
    """A trainer whose epoch e "validates" to scores[e - 1] (the epoch events fire as Validation fires them)."""
    model = make_model()
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), F.cross_entropy)

    @trainer.on(Events.EPOCH_COMPLETED)
    def _validate(engine):
        engine.state.metrics["val_accuracy"] = scores[engine.state.epoch - 1]
        engine.fire_event(EpochEvents.VALIDATION_COMPLETED)
        engine.fire_event(EpochEvents.EPOCH_RECORDED)

    return trainer


def test_stops_after_patience_validations_without_a_gain(make_model, batches):
    trainer = _trainer(make_model, [0.5, 0.6, 0.6, 0.59, 0.7, 0.8])
    stop = EarlyStop(patience=2)
    stop.attach(trainer)
    trainer.run(batches, max_epochs=6)
    assert (trainer.state.epoch, trainer.state.iteration) == (4, 16)  # 0.6 (equal) and 0.59 are no gain
    assert stop.stopped_epoch == 4
    assert stop.state_dict() == {"counter": 2, "best_score": 0.6, "stopped_epoch": 4}


def test_a_gain_below_min_delta_does_not_count(make_model, batches):
    scores = [0.5, 0.505, 0.51, 0.6, 0.6, 0.6]
    strict = _trainer(make_model, scores)
    EarlyStop(patience=2, min_delta=0.02).attach(strict)
    strict.run(batches, max_epochs=6)
    lenient = _trainer(make_model, scores)
    EarlyStop(patience=2).attach(lenient)
    lenient.run(batches, max_epochs=6)
    assert strict.state.epoch == 3
    assert lenient.state.epoch == 6  # every rise counts: it stops only after 0.6, 0.6, 0.6 (at the run's end)


def test_a_resumed_run_keeps_the_count_and_stops_at_the_same_epoch(make_model, batches):
    scores = [0.5, 0.7, 0.6, 0.65, 0.66, 0.9]
    first = _trainer(make_model, scores)
    stop = EarlyStop(patience=3)
    stop.attach(first)
    first.run(batches, max_epochs=3)
    assert stop.state_dict()["counter"] == 1

    resumed = _trainer(make_model, scores)
    again = EarlyStop(patience=3)
    again.attach(resumed)
    resumed.load_state_dict(first.state_dict())
    again.load_state_dict(stop.state_dict())
    resumed.run(batches, max_epochs=6)
    assert resumed.state.epoch == again.stopped_epoch == 5  # 0.6, 0.65, 0.66 after the best 0.7


def test_a_fresh_run_starts_counting_again(make_model, batches):
    trainer = _trainer(make_model, [0.5, 0.4, 0.3, 0.2])
    stop = EarlyStop(patience=2)
    stop.attach(trainer)
    trainer.run(batches, max_epochs=4)
    assert stop.stopped_epoch == 3
    trainer.state.max_epochs = None  # ignite's way to run a stopped engine again from the start
    trainer.run(batches, max_epochs=2)
    assert (trainer.state.epoch, stop.stopped_epoch, stop.state_dict()["counter"]) == (2, None, 1)


def test_epochs_without_validation_are_ignored(make_model, batches):
    model = make_model()
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), F.cross_entropy)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: e.fire_event(EpochEvents.VALIDATION_COMPLETED))
    stop = EarlyStop(patience=1)
    stop.attach(trainer)
    trainer.run(batches, max_epochs=3)
    assert trainer.state.epoch == 3 and stop.state_dict()["best_score"] is None


@pytest.mark.parametrize("kwargs", [{"patience": 0}, {"patience": 2, "min_delta": -0.1}])
def test_refuses_bad_settings(kwargs):
    with pytest.raises(ValueError):
        EarlyStop(**kwargs)
