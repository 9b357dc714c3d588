"""OneCycle: the LR and momentum sequences equal torch's OneCycleLR; skipped steps and overruns are safe."""
from __future__ import annotations

import io
import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Engine
from torch.optim.lr_scheduler import OneCycleLR

from callbacks import AMP, OneCycle
from engine import StepEvents, create_trainer

SCHEDULE = dict(max_lr=0.05, pct_start=0.3, div_factor=10.0, final_div_factor=100.0)
OPTIMIZERS = {
    "adamw": (lambda params: torch.optim.AdamW(params, lr=1e-3), lambda group: group["betas"][0]),
    "sgd": (lambda params: torch.optim.SGD(params, lr=1e-3, momentum=0.9), lambda group: group["momentum"]),
}


def _run(make_model, batches, optimizer_name="adamw", epochs=3, total_steps=None, accumulation_steps=1,
         precision="fp32", skip_steps=(), **schedule):
    """Train with OneCycle; returns (lr, momentum) used by every optimizer step, and the handler."""
    model = make_model()
    make_optimizer, momentum_of = OPTIMIZERS[optimizer_name]
    optimizer = make_optimizer(model.parameters())
    if total_steps is None:
        total_steps = OneCycle.total_steps_for(epochs, len(batches), accumulation_steps)
    one_cycle = OneCycle(optimizer, total_steps=total_steps, **{**SCHEDULE, **schedule})
    trainer = create_trainer(model, optimizer, F.cross_entropy, precision=precision,
                             accumulation_steps=accumulation_steps)
    AMP(device="cpu").attach(trainer)
    one_cycle.attach(trainer)
    used = []

    @trainer.on(StepEvents.BEFORE_OPTIMIZER_STEP)
    def record(engine):
        group = optimizer.param_groups[0]
        used.append((group["lr"], momentum_of(group)))
        if engine.state.optimizer_step in skip_steps:
            engine.state.skip_step = True

    trainer.run(batches, max_epochs=epochs)
    return used, one_cycle, trainer


def _native(optimizer_name, total_steps, steps=None, **schedule):
    """torch's OneCycleLR stepped after ``optimizer.step()``: (lr, momentum) used by each step."""
    make_optimizer, momentum_of = OPTIMIZERS[optimizer_name]
    optimizer = make_optimizer([torch.nn.Parameter(torch.zeros(2))])
    scheduler = OneCycleLR(optimizer, total_steps=total_steps, **{**SCHEDULE, **schedule})
    used = []
    for _ in range(total_steps if steps is None else steps):
        group = optimizer.param_groups[0]
        used.append((group["lr"], momentum_of(group)))
        optimizer.step()
        scheduler.step()
    return used


def test_unit_a_call_advances_the_schedule_unless_the_step_was_skipped(make_model):
    optimizer = torch.optim.AdamW(make_model().parameters(), lr=1e-3)
    one_cycle = OneCycle(optimizer, total_steps=12, **SCHEDULE)
    engine = Engine(lambda e, batch: None)
    native = _native("adamw", total_steps=12)
    seen = []
    for skipped in (False, True, False, True, True, False):
        engine.state.step_skipped = skipped
        if not skipped:
            optimizer.step()  # as the trainer does before OPTIMIZER_STEP_COMPLETED
        one_cycle(engine)
        seen.append((optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["betas"][0]))
    assert _flat(seen) == pytest.approx(_flat([native[1], native[1], native[2], native[2], native[2], native[3]]),
                                        rel=1e-12)


@pytest.mark.parametrize("optimizer_name", ["adamw", "sgd"])
@pytest.mark.parametrize("anneal_strategy", ["cos", "linear"])
def test_lr_and_momentum_equal_torchs_one_cycle(make_model, batches, optimizer_name, anneal_strategy):
    used, _, _ = _run(make_model, batches, optimizer_name, anneal_strategy=anneal_strategy)
    expected = _native(optimizer_name, total_steps=12, anneal_strategy=anneal_strategy)
    assert _flat(used) == pytest.approx(_flat(expected), rel=1e-12)
    lrs = [lr for lr, _ in used]
    assert 0.9 * SCHEDULE["max_lr"] < max(lrs) <= SCHEDULE["max_lr"]
    assert lrs[-1] == pytest.approx(SCHEDULE["max_lr"] / SCHEDULE["div_factor"] / SCHEDULE["final_div_factor"])
    momenta = [m for _, m in used]
    assert momenta[0] == pytest.approx(0.95) and 0.85 <= min(momenta) < 0.86  # inverse to the LR


def test_with_accumulation_the_schedule_counts_optimizer_steps(make_model, make_batches):
    batches = make_batches(count=5, batch_size=4)
    used, _, trainer = _run(make_model, batches, epochs=2, accumulation_steps=2)
    assert OneCycle.total_steps_for(2, 5, 2) == 6 == trainer.state.optimizer_step
    assert _flat(used) == pytest.approx(_flat(_native("adamw", total_steps=6)), rel=1e-12)


def test_total_steps_for():
    assert OneCycle.total_steps_for(10, 23) == 230
    assert OneCycle.total_steps_for(3, 10, 4) == 9  # ceil(10 / 4) steps per epoch, windows end at epoch ends
    assert OneCycle.total_steps_for(1, 1, 8) == 1


def test_the_optimizer_starts_at_max_lr_over_div_factor(make_model):
    optimizer = torch.optim.AdamW(make_model().parameters(), lr=0.5)
    OneCycle(optimizer, max_lr=0.2, total_steps=10, div_factor=20.0)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)


def test_restart_runs_a_second_cycle_of_the_same_shape_over_new_steps(make_model, batches):
    used, one_cycle, trainer = _run(make_model, batches, epochs=2)
    assert _flat(used) == pytest.approx(_flat(_native("adamw", total_steps=2 * len(batches))), rel=1e-12)
    one_cycle.restart(3 * len(batches))  # e.g. `kiln resume --epochs N --new-schedule`
    optimizer = one_cycle.optimizer
    assert optimizer.param_groups[0]["lr"] == pytest.approx(SCHEDULE["max_lr"] / SCHEDULE["div_factor"])
    again = []
    engine = Engine(lambda e, batch: None)
    engine.state.step_skipped = False
    for _ in range(3 * len(batches)):
        group = optimizer.param_groups[0]
        again.append((group["lr"], group["betas"][0]))
        optimizer.step()
        one_cycle(engine)
    assert _flat(again) == pytest.approx(_flat(_native("adamw", total_steps=3 * len(batches))), rel=1e-12)
    with pytest.raises(ValueError, match="total_steps"):
        one_cycle.restart(0)


def test_a_run_longer_than_the_schedule_holds_the_final_lr_and_warns(make_model, batches, caplog):
    with caplog.at_level(logging.WARNING, logger="kiln"):
        used, one_cycle, _ = _run(make_model, batches, epochs=3, total_steps=5)  # 12 steps for a 5-step schedule
    assert [lr for lr, _ in used[:5]] == pytest.approx([lr for lr, _ in _native("adamw", 5)], rel=1e-12)
    final = SCHEDULE["max_lr"] / SCHEDULE["div_factor"] / SCHEDULE["final_div_factor"]
    assert [lr for lr, _ in used[4:]] == pytest.approx([final] * 8)
    warned = [r for r in caplog.records if "OneCycle" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING


def test_a_run_exactly_as_long_as_the_schedule_does_not_warn(make_model, batches, caplog):
    with caplog.at_level(logging.WARNING, logger="kiln"):
        _run(make_model, batches, epochs=3, total_steps=12)
    assert not [r for r in caplog.records if "OneCycle" in r.getMessage()]


def _flat(pairs):
    return [number for pair in pairs for number in pair]


def _lr_warnings(caught):
    return [w for w in caught if "lr_scheduler.step()" in str(w.message)]


def test_a_skipped_step_does_not_advance_the_schedule_nor_make_torch_warn(make_model, batches):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        used, _, _ = _run(make_model, batches, epochs=3, skip_steps=(1, 5))
    assert _lr_warnings(caught) == []
    native = _native("adamw", total_steps=12)
    # the skipped steps 1 and 5 used the LR of the step after them: the schedule did not move
    expected = [native[0], native[0], native[1], native[2], native[3], native[3], *native[4:10]]
    assert _flat(used) == pytest.approx(_flat(expected), rel=1e-12)


def test_a_scheduler_stepped_on_a_skipped_first_step_does_warn(make_model, batches):
    # the control for the test above: torch's warning is what the check would catch
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = OneCycleLR(optimizer, total_steps=4, **SCHEDULE)
    trainer = create_trainer(model, optimizer, F.cross_entropy, precision="fp32")
    trainer.add_event_handler(StepEvents.BEFORE_OPTIMIZER_STEP(once=1), lambda e: setattr(e.state, "skip_step", True))
    trainer.add_event_handler(StepEvents.OPTIMIZER_STEP_COMPLETED, lambda e: scheduler.step())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.run(batches, max_epochs=1)
    assert len(_lr_warnings(caught)) == 1


@pytest.mark.parametrize("sync_every, schedule_steps", [(1, [0, 0, 1, 2]), (2, [0, 1, 1, 2])])
def test_an_fp16_inf_step_is_taken_back_at_the_next_sync_and_torch_does_not_warn(make_model, batches, sync_every,
                                                                                 schedule_steps):
    """The scaler's skip flag stays on the device: the schedule runs ahead by the skipped step until the
    next sync point, then moves back; with a sync every step, the sequence is the exact one."""
    poisoned = [(x.clone(), y) for x, y in batches]
    poisoned[0][0][0, 0, 0, 0] = float("inf")  # the very first step overflows
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        used, _, trainer = _run(make_model, poisoned, epochs=1, total_steps=4, precision="fp16", sync_every=sync_every)
    assert _lr_warnings(caught) == []
    native = _native("adamw", total_steps=4)
    assert _flat(used) == pytest.approx(_flat([native[i] for i in schedule_steps]), rel=1e-12)
    assert int(trainer.state.skipped_steps) == 1


def _drive(one_cycle, flags, first_step=1, epoch_length=100):
    """Call ``one_cycle`` as after optimizer steps ``first_step, ...`` whose device skip flags are ``flags``;
    returns the LR set after each."""
    engine = Engine(lambda e, batch: None)
    engine.state.epoch_length = epoch_length
    lrs = []
    for step, flag in enumerate(flags, start=first_step):
        engine.state.iteration = engine.state.optimizer_step = step
        engine.state.step_skipped = torch.tensor(flag)
        one_cycle(engine)
        lrs.append(one_cycle.optimizer.param_groups[0]["lr"])
    return lrs


def test_a_resume_between_syncs_moves_back_at_the_same_step_as_the_uninterrupted_run():
    flags = [True, False, False, False, True, False, False, False, False]

    def fresh():
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
        return OneCycle(optimizer, total_steps=20, sync_every=3, **SCHEDULE)

    whole = _drive(fresh(), flags)
    first = fresh()
    before = _drive(first, flags[:5])  # step 5 skipped, its flag not read yet: the LR ran ahead
    buffer = io.BytesIO()
    torch.save({"schedule": first.state_dict(), "optimizer": first.optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = fresh()
    resumed.optimizer.load_state_dict(saved["optimizer"])
    resumed.load_state_dict(saved["schedule"])
    assert before + _drive(resumed, flags[5:], first_step=6) == whole
    native = _native("adamw", total_steps=20)
    lr_of_step = [lr for lr, _ in native]
    assert whole[4] == pytest.approx(lr_of_step[4])  # after step 5: ahead (steps 1 and 5 skipped; only 1 read)
    assert whole[5] == pytest.approx(lr_of_step[4])  # after step 6, a sync: 6 steps, 2 skipped


def test_state_dict_round_trips_and_continues_the_schedule(make_model, batches):
    _, one_cycle, _ = _run(make_model, batches, epochs=1, total_steps=12)  # 4 of 12 steps done
    buffer = io.BytesIO()
    torch.save({"schedule": one_cycle.state_dict(), "optimizer": one_cycle.optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    # a resume: build everything as at the start, then load the states
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    restored = OneCycle(optimizer, total_steps=99, **SCHEDULE)
    optimizer.load_state_dict(saved["optimizer"])
    restored.load_state_dict(saved["schedule"])
    assert restored.total_steps == 12

    trainer = create_trainer(model, optimizer, F.cross_entropy, precision="fp32")
    restored.attach(trainer)
    used = []
    trainer.add_event_handler(StepEvents.BEFORE_OPTIMIZER_STEP, lambda e: used.append(optimizer.param_groups[0]["lr"]))
    trainer.run(batches, max_epochs=2)
    native = [lr for lr, _ in _native("adamw", total_steps=12)]
    assert used == pytest.approx(native[4:12], rel=1e-12)


@pytest.mark.parametrize("kwargs", [{"max_lr": 0.0}, {"max_lr": -1.0}, {"total_steps": 0}])
def test_bad_arguments_are_refused(make_model, kwargs):
    optimizer = torch.optim.AdamW(make_model().parameters())
    with pytest.raises(ValueError):
        OneCycle(optimizer, **{"max_lr": 0.1, "total_steps": 10, **kwargs})
