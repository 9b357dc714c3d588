"""Validation: runs the evaluator after epochs, copies its metrics as val_*, then fires the epoch events."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from ignite.metrics import Accuracy, Loss

from callbacks import Validation
from engine import EpochEvents, create_evaluator, create_trainer
from tests.conftest import SINGLE_THREAD_ENV


def _setup(make_model, every=1):
    model = make_model()
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy, precision="fp32")
    evaluator = create_evaluator(model, {"accuracy": Accuracy(), "loss": Loss(torch.nn.CrossEntropyLoss())},
                                 precision="fp32")  # compared with an fp32 forward below
    return model, trainer, evaluator


def test_val_metrics_are_the_evaluators_at_the_end_of_each_epoch(make_model, batches, make_batches):
    model, trainer, evaluator = _setup(make_model)
    val_data = make_batches(count=2, seed=9)
    seen = []

    @trainer.on(EpochEvents.VALIDATION_COMPLETED)  # attached before Validation: the order does not matter
    def check(engine):
        x = torch.cat([x for x, _ in val_data])
        y = torch.cat([y for _, y in val_data])
        with torch.no_grad():
            logits = model(x)  # no dropout or batch norm: the same in either mode
        metrics = engine.state.metrics
        assert metrics["val_accuracy"] == pytest.approx((logits.argmax(1) == y).float().mean().item())
        assert metrics["val_loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
        assert "train_loss" in metrics
        seen.append(engine.state.epoch)

    Validation(evaluator, val_data).attach(trainer)
    trainer.run(batches, max_epochs=3)
    assert seen == [1, 2, 3]
    assert model.training  # the evaluator gave the model back in train mode


def test_every_validates_those_epochs_and_the_last(make_model, batches):
    _, trainer, evaluator = _setup(make_model)
    validated, recorded = [], []
    trainer.add_event_handler(EpochEvents.VALIDATION_COMPLETED, lambda e: validated.append(e.state.epoch))
    trainer.add_event_handler(EpochEvents.EPOCH_RECORDED, lambda e: recorded.append(e.state.epoch))
    Validation(evaluator, batches[:1], every=2).attach(trainer)
    trainer.run(batches[:1], max_epochs=5)
    assert validated == [2, 4, 5]
    assert recorded == [1, 2, 3, 4, 5]


def test_epoch_recorded_follows_validation_completed(make_model, batches):
    _, trainer, evaluator = _setup(make_model)
    order = []
    trainer.add_event_handler(EpochEvents.EPOCH_RECORDED, lambda e: order.append("recorded"))
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: order.append("epoch_completed"))
    trainer.add_event_handler(EpochEvents.VALIDATION_COMPLETED, lambda e: order.append("validated"))
    Validation(evaluator, batches[:1]).attach(trainer)
    trainer.run(batches[:1], max_epochs=1)
    assert order.index("validated") < order.index("recorded")


def test_works_on_a_plain_ignite_engine(make_model, batches):
    model = make_model()
    engine = Engine(lambda e, batch: None)
    validated = []
    Validation(create_evaluator(model, {"accuracy": Accuracy()}), batches[:1]).attach(engine)
    engine.add_event_handler(EpochEvents.VALIDATION_COMPLETED, lambda e: validated.append(e.state.metrics["val_accuracy"]))
    engine.run([0, 1], max_epochs=2)
    assert len(validated) == 2 and all(0.0 <= a <= 1.0 for a in validated)


FILTERED_ON_A_PLAIN_ENGINE = """
import torch
from ignite.engine import Engine
from ignite.metrics import Accuracy
from callbacks import Validation
from engine import EpochEvents, create_evaluator

model = torch.nn.Linear(4, 3)
engine = Engine(lambda e, batch: None)
data = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
Validation(create_evaluator(model, {"accuracy": Accuracy()}), data).attach(engine)
seen = []
engine.add_event_handler(EpochEvents.VALIDATION_COMPLETED(every=2), lambda e: seen.append(e.state.epoch))
engine.run([0], max_epochs=4)
print(seen)
"""


def test_every_filters_on_epoch_events_work_in_a_fresh_process():
    # A new interpreter, where no create_trainer ran before: whether a filter works must not depend on
    # what else the process did (ignite keeps event counters in a class-level dict)
    result = subprocess.run([sys.executable, "-c", FILTERED_ON_A_PLAIN_ENGINE], capture_output=True, text=True,
                            timeout=120, env={**os.environ, **SINGLE_THREAD_ENV})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[2, 4]"


def test_every_must_be_positive(make_model):
    _, _, evaluator = _setup(make_model)
    with pytest.raises(ValueError):
        Validation(evaluator, [], every=0)
