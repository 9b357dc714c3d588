"""OptunaPruning: reports each validation to the trial and stops the run, cleanly, when the trial is pruned."""
from __future__ import annotations

import optuna
import pytest
import torch.nn.functional as F
from ignite.engine import Engine
from ignite.metrics import Accuracy

from callbacks import OptunaPruning, Validation
from engine import create_evaluator, create_trainer
from engine.events import EpochEvents, ensure_epoch_events
from tests.conftest import TinyCNN, random_batches

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _trial(prune_below: float) -> optuna.Trial:
    """A trial whose pruner prunes any score below ``prune_below``."""
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=prune_below))
    return study.ask()


def _bare_engine(score: float, epoch: int = 1) -> Engine:
    engine = Engine(lambda e, b: None)
    ensure_epoch_events(engine)
    engine.state.metrics["val_accuracy"] = score
    engine.state.epoch = epoch
    engine.state.max_epochs = 5
    return engine


def test_reports_the_score_at_the_epoch_and_lets_a_good_trial_go_on():
    trial = _trial(prune_below=0.5)
    pruning = OptunaPruning(trial)
    engine = _bare_engine(0.8, epoch=2)
    pruning(engine)
    assert trial.study.trials[0].intermediate_values == {2: 0.8}
    assert not pruning.pruned and not engine.should_terminate


def test_a_pruned_trial_terminates_the_trainer_and_is_remembered():
    pruning = OptunaPruning(_trial(prune_below=0.9))
    engine = _bare_engine(0.3, epoch=1)
    pruning(engine)
    assert pruning.pruned and pruning.pruned_epoch == 1
    assert engine.should_terminate


def test_bad_arguments_are_refused():
    with pytest.raises(TypeError):
        OptunaPruning("not a trial")
    with pytest.raises(ValueError):
        OptunaPruning(_trial(0.0), score_name="")


def test_pruning_ends_a_real_run_after_the_epoch_it_happened_in():
    model = TinyCNN()
    batches = random_batches(count=3, batch_size=4)
    trainer = create_trainer(model, __import__("torch").optim.SGD(model.parameters(), lr=0.01), F.cross_entropy)
    Validation(create_evaluator(model, {"accuracy": Accuracy()}), batches[:1]).attach(trainer)
    trial = _trial(prune_below=1.1)  # nothing reaches it: pruned at the first report
    pruning = OptunaPruning(trial)
    pruning.attach(trainer)
    recorded = []
    trainer.add_event_handler(EpochEvents.EPOCH_RECORDED, lambda e: recorded.append(e.state.epoch))
    trainer.run(batches, max_epochs=3)
    assert pruning.pruned and pruning.pruned_epoch == 1
    assert trainer.state.epoch == 1 and recorded == [1]  # the pruned epoch's records still happen
    assert list(trial.study.trials[0].intermediate_values) == [1]


def test_the_last_epoch_is_reported_but_not_pruned():
    trial = _trial(prune_below=0.9)
    pruning = OptunaPruning(trial)
    engine = _bare_engine(0.3, epoch=5)  # of 5
    pruning(engine)
    assert trial.study.trials[0].intermediate_values == {5: 0.3}
    assert not pruning.pruned and not engine.should_terminate
