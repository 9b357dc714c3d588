"""The handler contract, checked for every public handler class in ``callbacks.__all__``.

Each handler must: construct from the settings below; attach to fresh trainers from
``engine.create_trainer`` without touching any other trainer; detach through the handles ``attach``
returns (after which none of its handlers is registered and it no longer acts); round-trip its
``state_dict`` through ``torch.load(weights_only=True)`` where it has one; survive two consecutive
``run()`` calls. A handler class added to ``callbacks.__all__`` is picked up automatically and
fails until it has an entry in SETTINGS.
"""
from __future__ import annotations

import collections
import inspect
import io
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna
import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from ignite.engine.events import RemovableEventHandle
from ignite.metrics import Accuracy
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import callbacks
from callbacks import Validation
from engine import StepEvents, create_evaluator, create_trainer
from tests.conftest import TinyCNN, random_batches

EPOCHS = 2


@dataclass
class World:
    """A fresh trainer and everything a handler may need; ``notes`` holds what probes observed."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    trainer: Engine
    run_dir: Path
    batches: list
    notes: dict[str, list] = field(default_factory=lambda: collections.defaultdict(list))


def _scalar_tags(log_dir: Path) -> list[str]:
    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    return accumulator.Tags()["scalars"]


@dataclass
class Setting:
    """How to build a handler for a world, and how to tell whether it acted during a run."""

    make: Callable[[World], Any]
    acted: Callable[[Any, World], bool]
    precision: str = "fp32"
    poison: bool = False  # feed a batch with a NaN so that skip counters have something to count
    amp: bool = False  # the world's trainer has callbacks.AMP's loss scaler (fp16)
    finish: Callable[[Any], None] = lambda handler: None  # e.g. flush files before probing them


def _nan_guard(w: World):
    from callbacks.nan_guard import NanGuard

    return NanGuard(w.model, w.optimizer, policy="skip", check_every=1)


def _monitor(w: World):
    return callbacks.LossScaleMonitor(callbacks.DivergenceDetector(w.model, w.optimizer, mode="scaled"))


def _fine_tune(w: World):  # the first conv frozen for an epoch, then a second cycle of 3 steps (the first has 6)
    schedule = callbacks.OneCycle(w.optimizer, max_lr=0.1, total_steps=EPOCHS * len(w.batches))
    return callbacks.FineTune(w.model[0].parameters(), schedule, freeze_epochs=1, phase2_steps=3)


def _policy(w: World):  # its detector, not attached, still reads the batch losses the step keeps
    return callbacks.RollbackPolicy(callbacks.DivergenceDetector(w.model, w.optimizer), check_every=1)


SETTINGS: dict[str, Setting] = {
    "AMP": Setting(
        make=lambda w: callbacks.AMP(device="cpu"),
        acted=lambda h, w: h.skipped_steps > 0,
        precision="fp16", poison=True,
    ),
    "Checkpointer": Setting(
        make=lambda w: callbacks.Checkpointer(
            w.run_dir / "checkpoints", {"model": w.model, "optimizer": w.optimizer, "trainer": w.trainer},
            every_iterations=3, every_minutes=0, keep_best=1),
        acted=lambda h, w: (w.run_dir / "checkpoints" / "last.pt").exists(),
    ),
    "DivergenceDetector": Setting(
        make=lambda w: callbacks.DivergenceDetector(w.model, w.optimizer, mode="immediate"),
        acted=lambda h, w: bool(h.history.since(-1)),
    ),
    "EMA": Setting(
        make=lambda w: callbacks.EMA(w.model, decay=0.9),
        acted=lambda h, w: h.updates > 0,
    ),
    "EarlyStop": Setting(
        make=lambda w: callbacks.EarlyStop(patience=5, score_name="val_accuracy"),
        acted=lambda h, w: h.state_dict()["best_score"] is not None,
    ),
    "FineTune": Setting(
        make=_fine_tune,
        acted=lambda h, w: h.schedule.total_steps == 3,  # it unfroze and restarted the schedule
    ),
    "GracefulStop": Setting(
        make=lambda w: callbacks.GracefulStop(),
        acted=lambda h, w: any(handler != w.notes["sigterm_before"][0] for handler in w.notes["sigterm_during"]),
    ),
    "GradClip": Setting(
        make=lambda w: callbacks.GradClip(w.model.parameters(), max_norm=0.1),
        acted=lambda h, w: w.trainer.state.grad_norm is not None,
    ),
    "LossScaleMonitor": Setting(
        make=_monitor,
        acted=lambda h, w: h.state_dict()["scale_found"],  # it saw the scaler make a step
        precision="fp16", amp=True,
    ),
    "MetricsLog": Setting(
        make=lambda w: callbacks.MetricsLog(w.run_dir / "metrics.jsonl", w.run_dir / "steps.jsonl", every=1),
        acted=lambda h, w: h.metrics_path.exists() or h.steps_path.exists(),
    ),
    "MixUpCutMix": Setting(
        make=lambda w: callbacks.MixUpCutMix(num_classes=3, mixup_alpha=0.4, cutmix_alpha=1.0, seed=0),
        acted=lambda h, w: 2 in w.notes["target_dims"],  # soft targets reached the step
    ),
    "NanGuard": Setting(
        make=_nan_guard,
        acted=lambda h, w: h.nan_skips > 0,
        poison=True,
    ),
    "OneCycle": Setting(
        make=lambda w: callbacks.OneCycle(w.optimizer, max_lr=0.1, total_steps=EPOCHS * len(w.batches)),
        acted=lambda h, w: len(set(w.notes["lr"])) > 1,
    ),
    "OptunaPruning": Setting(  # an in-memory study's trial; its pruner has too few trials to prune
        make=lambda w: callbacks.OptunaPruning(optuna.create_study(direction="maximize").ask()),
        acted=lambda h, w: bool(h.trial.study.trials[h.trial.number].intermediate_values),
    ),
    "Progress": Setting(
        make=lambda w: callbacks.Progress(stream=io.StringIO()),
        acted=lambda h, w: h.stream.getvalue() != "",
    ),
    "RollbackPolicy": Setting(
        make=_policy,
        acted=lambda h, w: h.snapshot is not None,
    ),
    "RunSummary": Setting(
        make=lambda w: callbacks.RunSummary(w.run_dir / "summary.json"),
        acted=lambda h, w: (w.run_dir / "summary.json").exists(),
    ),
    "TensorBoard": Setting(
        make=lambda w: callbacks.TensorBoard(w.run_dir / "tb", every=1),
        acted=lambda h, w: bool(_scalar_tags(w.run_dir / "tb")),
        finish=lambda h: h.logger.writer.flush(),
    ),
    "Validation": Setting(
        make=lambda w: Validation(create_evaluator(w.model, {"accuracy": Accuracy()}), w.batches[:1]),
        acted=lambda h, w: h.evaluator.state.epoch > 0,
    ),
}


def _handler_classes() -> list[str]:
    return sorted(name for name in callbacks.__all__
                  if inspect.isclass(getattr(callbacks, name)) and callable(getattr(getattr(callbacks, name), "attach", None)))


HANDLERS = _handler_classes()
#: The handlers that keep a state to resume (a checkpoint saves it): a ``state_dict`` method of their class.
STATEFUL = [name for name in HANDLERS if callable(getattr(getattr(callbacks, name), "state_dict", None))]


def _setting(name: str) -> Setting:
    if name not in SETTINGS:
        pytest.fail(f"callbacks.{name} has no entry in SETTINGS: add one to tests/callbacks/test_contract.py "
                    f"(how to construct it, and how to tell that it acted) so the handler contract covers it")
    return SETTINGS[name]


def _world(tmp_path: Path, setting: Setting, seed: int = 0) -> World:
    run_dir = tmp_path / f"run{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = TinyCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    trainer = create_trainer(model, optimizer, F.cross_entropy, precision=setting.precision)
    batches = random_batches(count=3, batch_size=4, seed=seed)
    if setting.poison:
        batches[1][0][0, 0, 0, 0] = float("nan")
    world = World(model, optimizer, trainer, run_dir, batches)
    if setting.amp:
        callbacks.AMP(device="cpu").attach(trainer)
    # the world's own validation makes the epoch events fire, for the loggers that listen to them
    Validation(create_evaluator(model, {"accuracy": Accuracy()}), batches[:1]).attach(trainer)
    world.notes["sigterm_before"].append(signal.getsignal(signal.SIGTERM))
    trainer.add_event_handler(Events.ITERATION_STARTED,
                              lambda e: world.notes["sigterm_during"].append(signal.getsignal(signal.SIGTERM)))
    trainer.add_event_handler(StepEvents.BEFORE_OPTIMIZER_STEP,
                              lambda e: world.notes["lr"].append(optimizer.param_groups[0]["lr"]))
    trainer.add_event_handler(Events.ITERATION_STARTED,
                              lambda e: world.notes["target_dims"].append(e.state.batch[1].dim()))
    return world


def _run(world: World, handler: Any, setting: Setting) -> None:
    world.trainer.run(world.batches, max_epochs=EPOCHS)
    setting.finish(handler)


def _registered(engine: Engine) -> collections.Counter:
    """Every (event, handler) registration on ``engine``: ignite keeps no public list of them."""
    return collections.Counter((str(event), id(entry[0])) for event, entries in engine._event_handlers.items()
                               for entry in entries)


def test_every_public_handler_has_settings():
    missing = [name for name in HANDLERS if name not in SETTINGS]
    assert not missing, f"add {', '.join(missing)} to SETTINGS in tests/callbacks/test_contract.py"
    assert HANDLERS, "no handler classes found in callbacks.__all__"


@pytest.mark.parametrize("name", HANDLERS)
def test_attaches_to_two_fresh_trainers_independently(name, tmp_path):
    setting = _setting(name)
    first, second = _world(tmp_path, setting, seed=0), _world(tmp_path, setting, seed=1)
    first_handler, second_handler = setting.make(first), setting.make(second)
    for world, handler in ((first, first_handler), (second, second_handler)):
        handles = handler.attach(world.trainer)
        assert handles and all(isinstance(h, RemovableEventHandle) for h in handles), \
            f"{name}.attach must return the handles it registered"

    _run(first, first_handler, setting)
    assert setting.acted(first_handler, first), f"{name} did not act on its trainer's run"
    assert not setting.acted(second_handler, second), f"{name} acted on a trainer it is not attached to"
    _run(second, second_handler, setting)
    assert setting.acted(second_handler, second)


@pytest.mark.parametrize("name", HANDLERS)
def test_detaches_through_its_handles(name, tmp_path):
    setting = _setting(name)
    world = _world(tmp_path, setting)
    before = _registered(world.trainer)
    handler = setting.make(world)
    handles = handler.attach(world.trainer)
    assert _registered(world.trainer) != before
    for handle in handles:
        handle.remove()

    leftover = _registered(world.trainer) - before
    assert not leftover, f"{name} left handlers registered after its handles were removed: {sorted(leftover)}"
    _run(world, handler, setting)
    assert not setting.acted(handler, world), f"{name} still acts after its handles were removed"


@pytest.mark.parametrize("name", HANDLERS)
def test_survives_two_consecutive_runs(name, tmp_path):
    setting = _setting(name)
    world = _world(tmp_path, setting)
    handler = setting.make(world)
    handler.attach(world.trainer)
    _run(world, handler, setting)
    _run(world, handler, setting)
    state = world.trainer.state
    assert (state.epoch, state.iteration) == (EPOCHS, EPOCHS * len(world.batches))
    assert setting.acted(handler, world)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("name", sorted(set(HANDLERS) - set(STATEFUL)))
def test_a_handler_without_a_state_loads_none(name):
    assert not callable(getattr(getattr(callbacks, name), "load_state_dict", None)), \
        f"{name} loads a state it cannot save"


@pytest.mark.parametrize("name", STATEFUL)
def test_state_dict_round_trips_through_a_weights_only_load(name, tmp_path):
    setting = _setting(name)
    world = _world(tmp_path, setting)
    handler = setting.make(world)
    handler.attach(world.trainer)
    _run(world, handler, setting)
    state = handler.state_dict()

    buffer = io.BytesIO()
    torch.save(state, buffer)  # as a checkpoint does
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)

    fresh_world = _world(tmp_path / "fresh", setting)
    fresh = setting.make(fresh_world)
    fresh.load_state_dict(loaded)
    assert _same(fresh.state_dict(), state), f"{name}.state_dict() changed through load_state_dict"
