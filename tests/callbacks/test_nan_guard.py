"""NanGuard: fault injection on real tiny models, one fault at a time, under each policy.

Faults: a NaN/Inf in one input batch, a NaN in one parameter's gradient, a NaN written into a
parameter, an fp32 max_lr so high that training diverges, and an fp16 loss-scale collapse. For each,
the test checks what a user relies on: the weights after a skipped or rolled-back step equal the
weights before it (or the snapshot's), every snapshot is finite, the run finishes (skip, rollback)
or stops with ``state.diverged`` (stop), and the diagnosis names the right iteration and parameter.
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events

from callbacks import AMP, DivergenceDetector, GradClip, NanGuard, OneCycle, RollbackPolicy
from callbacks.snapshot import Snapshot
from engine import create_trainer
from engine.records import epoch_record
from tests.conftest import TinyCNN, random_batches

BATCHES = 6


@dataclass
class Run:
    """A tiny trainer with NanGuard, and what the test recorded while it ran."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    trainer: Engine
    schedule: OneCycle
    guard: NanGuard
    amp: AMP
    batches: list
    events_path: Path
    epochs: int
    weights_at_start: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # iteration -> weights
    lrs: dict[int, tuple[float, int]] = field(default_factory=dict)  # iteration -> (its lr, schedule step)

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        if not self.events_path.exists():
            return []
        records = [json.loads(line, parse_constant=_refuse) for line in self.events_path.read_text().splitlines()]
        return [r for r in records if kind is None or r["event"] == kind]

    def weights(self) -> dict[str, torch.Tensor]:
        return _copy(self.model)


def _refuse(constant: str) -> None:
    raise AssertionError(f"events.jsonl holds a bare {constant}: not valid JSON")


def _copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _params_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], model: torch.nn.Module) -> bool:
    return all(torch.equal(a[name], b[name]) for name, _ in model.named_parameters())


def _all_finite(tree: Any) -> bool:
    if isinstance(tree, torch.Tensor):
        return not tree.is_floating_point() or bool(torch.isfinite(tree).all())
    if isinstance(tree, dict):
        return all(_all_finite(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return all(_all_finite(v) for v in tree)
    return True


def make_run(tmp_path: Path, policy: str, *, precision: str = "fp32", batch_norm: bool = True, max_lr: float = 0.05,
             weight_decay: float = 0.0, epochs: int = 2, clip_first: bool = True, batches: int = BATCHES,
             init_scale: float = 2.0**16, **guard_options: Any) -> Run:
    """Build the trainer; attach AMP, GradClip, OneCycle and NanGuard (GradClip before or after NanGuard)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = TinyCNN(batch_norm=batch_norm)
    optimizer = torch.optim.AdamW(model.parameters(), lr=max_lr / 25, weight_decay=weight_decay)
    trainer = create_trainer(model, optimizer, F.cross_entropy, precision=precision, seed=0)
    data = random_batches(count=batches, batch_size=8, seed=3)
    schedule = OneCycle(optimizer, max_lr=max_lr, total_steps=epochs * len(data))
    amp = AMP(device="cpu", init_scale=init_scale)
    to_snapshot = {"model": model, "optimizer": optimizer, "schedule": schedule}
    if precision == "fp16":
        to_snapshot["scaler"] = amp.scaler
    options = {"check_every": 2, **guard_options}
    events_path = tmp_path / "events.jsonl"
    guard = NanGuard(model, optimizer, to_snapshot=to_snapshot, schedule=schedule,
                     scaler=amp.scaler if precision == "fp16" else None, policy=policy, events_path=events_path,
                     **options)
    clip = GradClip(model.parameters(), max_norm=1.0)
    order = [amp, clip, schedule, guard] if clip_first else [guard, schedule, clip, amp]
    for handler in order:
        handler.attach(trainer)
    run = Run(model, optimizer, trainer, schedule, guard, amp, data, events_path, epochs)

    @trainer.on(Events.ITERATION_STARTED)
    def _record(engine: Engine) -> None:
        run.weights_at_start[engine.state.iteration] = run.weights()

    @trainer.on(Events.ITERATION_STARTED)
    def _record_lr(engine: Engine) -> None:
        run.lrs[engine.state.iteration] = (optimizer.param_groups[0]["lr"], schedule.scheduler.last_epoch)
    return run


def start(run: Run) -> Any:
    return run.trainer.run(run.batches, max_epochs=run.epochs)


# ---- faults -------------------------------------------------------------------------------------
def poison_input(run: Run, iteration: int, value: float = float("nan")) -> None:
    """Replace the batch of ``iteration`` by a copy with one NaN/Inf pixel."""

    @run.trainer.on(Events.ITERATION_STARTED(once=iteration))
    def _poison(engine: Engine) -> None:
        x, y = engine.state.batch
        x = x.clone()
        x[0, 0, 0, 0] = value
        engine.state.batch = (x, y)


def poison_gradient(run: Run, name: str, iterations: range, value: float = float("nan")) -> None:
    """Make ``name``'s gradient NaN/Inf during backward at ``iterations`` (as an unstable op would)."""
    parameter = dict(run.model.named_parameters())[name]

    def hook(grad: torch.Tensor) -> torch.Tensor:
        if run.trainer.state.iteration in iterations:
            grad = grad.clone()
            grad.view(-1)[0] = value
        return grad

    parameter.register_hook(hook)


def poison_parameter(run: Run, name: str, iteration: int) -> None:
    """Write a NaN into ``name`` before the forward pass of ``iteration``."""

    @run.trainer.on(Events.ITERATION_STARTED(once=iteration))
    def _poison(engine: Engine) -> None:
        with torch.no_grad():
            dict(run.model.named_parameters())[name].view(-1)[0] = float("nan")


def watch_snapshots(run: Run) -> list[bool]:
    """After every iteration: is every tensor NanGuard would restore finite?"""
    seen: list[bool] = []
    run.trainer.add_event_handler(Events.ITERATION_COMPLETED,
                                  lambda e: seen.append(_all_finite(run.guard.policy.snapshot.state)))
    return seen


# ---- input batch --------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_skip_drops_the_update_of_a_batch_with_nan_or_inf(tmp_path, value):
    run = make_run(tmp_path, "skip")
    poison_input(run, 4, value)
    snapshots_finite = watch_snapshots(run)
    state = start(run)

    assert state.iteration == 2 * BATCHES  # the run finishes
    assert _params_equal(run.weights_at_start[5], run.weights_at_start[4], run.model)
    assert run.lrs[5][1] == run.lrs[4][1] and run.lrs[6][1] == run.lrs[5][1] + 1  # the schedule waited one step
    assert _all_finite(run.weights()) and all(snapshots_finite)
    assert run.guard.nan_skips == 1 and run.guard.rollbacks == 0
    assert math.isfinite(state.metrics["train_loss"])  # the dropped batch is left out of the train loss
    [event] = run.events()
    assert (event["event"], event["iteration"], event["epoch"], event["cause"]) == ("nan_skip", 4, 1, "input")
    assert event["first_nonfinite"] == "input batch" and "input batch at iteration 4" in event["hint"]


def test_skip_puts_back_batchnorm_statistics_a_nan_batch_went_through(tmp_path):
    run = make_run(tmp_path, "skip", batch_norm=True)
    poison_input(run, 3)
    start(run)
    assert torch.isfinite(run.model[1].running_mean).all() and torch.isfinite(run.model[1].running_var).all()
    assert run.events("nan_skip")[0]["restored_buffers"] == ["1.running_mean", "1.running_var"]


def test_rollback_restores_the_snapshot_and_halves_the_lr(tmp_path):
    run = make_run(tmp_path, "rollback")
    poison_input(run, 5)
    state = start(run)

    assert state.iteration == 2 * BATCHES
    [event] = run.events("rollback")
    assert event["iteration"] == 5 and event["restored_iteration"] == 4  # snapshots every 2 optimizer steps
    # no host read per step: the bad step is found at the next read (end of 6), and its update undone
    assert event["detected_at"] == 6
    assert _params_equal(run.weights_at_start[7], run.weights_at_start[5], run.model)  # state at the end of 4
    assert run.guard.lr_scale == 0.5 and event["peak_lr_after"] == pytest.approx(0.025)
    assert run.optimizer.param_groups[0]["max_lr"] == pytest.approx(0.025)


def test_stop_restores_the_last_good_state_and_sets_diverged(tmp_path):
    run = make_run(tmp_path, "stop")
    poison_input(run, 5)
    state = start(run)

    assert state.iteration == 6  # the flags are read every 2 steps: the stop comes at the next read
    diag = state.diverged
    assert (diag["iteration"], diag["cause"], diag["action"], diag["restored_iteration"]) == (5, "input", "stop", 4)
    assert _params_equal(run.weights(), run.weights_at_start[5], run.model)  # the state after iteration 4
    assert [e["event"] for e in run.events()] == ["diverged"]


# ---- one parameter's gradient -------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["skip", "rollback", "stop"])
@pytest.mark.parametrize("clip_first", [True, False], ids=["clip-first", "guard-first"])
def test_a_nan_gradient_is_traced_to_its_parameter(tmp_path, policy, clip_first):
    run = make_run(tmp_path, policy, clip_first=clip_first)
    poison_gradient(run, "3.weight", range(7, 8))
    state = start(run)

    [event] = run.events()
    assert event["iteration"] == 7 and event["cause"] == "gradient"
    assert event["parameter"] == "3.weight" and event["nonfinite_gradients"] == ["3.weight"]
    assert "only the gradient of 3.weight" in event["hint"]
    if policy == "skip":
        assert _params_equal(run.weights_at_start[8], run.weights_at_start[7], run.model)
    elif policy == "rollback":  # found at the next read (end of 8), back to the state after 6
        assert event["restored_iteration"] == 6 and event["detected_at"] == 8
        assert _params_equal(run.weights_at_start[9], run.weights_at_start[7], run.model)
    else:
        assert state.diverged["iteration"] == 7 and state.iteration == 8
        assert _params_equal(run.weights(), run.weights_at_start[7], run.model)
    assert policy == "stop" or state.iteration == 2 * BATCHES
    assert _all_finite(run.weights())


# ---- a parameter ----------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["skip", "rollback", "stop"])
def test_a_nan_parameter_is_rolled_back_and_named(tmp_path, policy):
    run = make_run(tmp_path, policy)
    poison_parameter(run, "0.weight", 4)
    snapshots_finite = watch_snapshots(run)
    state = start(run)

    [event] = run.events()
    assert (event["iteration"], event["cause"], event["parameter"]) == (4, "parameter", "0.weight")
    assert event["restored_iteration"] == 2
    assert event["action"] == ("stop" if policy == "stop" else "rollback")  # skipping cannot repair weights
    restored = run.weights_at_start[3]  # the weights after iteration 2
    if policy == "stop":
        assert state.diverged is not None and _params_equal(run.weights(), restored, run.model)
    else:
        assert state.iteration == 2 * BATCHES
        assert _params_equal(run.weights_at_start[5], restored, run.model)
    assert _all_finite(run.weights()) and all(snapshots_finite)


def test_a_parameter_gone_bad_between_steps_is_found_by_the_periodic_check(tmp_path):
    run = make_run(tmp_path, "rollback")

    @run.trainer.on(Events.ITERATION_COMPLETED(once=3))
    def _poison(engine: Engine) -> None:  # after the step: the weights, not the loss, carry it to the check
        with torch.no_grad():
            run.model[3].bias[0] = float("inf")

    state = start(run)
    [event] = run.events()
    assert event["parameter"] == "3.bias" and event["cause"] == "parameter"
    assert state.iteration == 2 * BATCHES and _all_finite(run.weights())


# ---- an exploding (finite) loss --------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["skip", "rollback", "stop"])
def test_an_exploding_loss_is_divergence_too(tmp_path, policy):
    run = make_run(tmp_path, policy, batch_norm=False)

    @run.trainer.on(Events.ITERATION_COMPLETED(once=5))
    def _blow_up(engine: Engine) -> None:  # finite, but the logits are now enormous
        with torch.no_grad():
            run.model[-1].weight.mul_(1e6)

    start(run)
    [event] = run.events()
    assert event["cause"] == "loss_explosion" and event["detected_at"] == 6 and event["finite_at"] == 4
    assert event["max_loss"] > 100 * event["first_loss"] and "x its first value" in event["hint"]
    assert event["event"] == ("diverged" if policy == "stop" else "rollback")  # skipping cannot undo it
    assert _params_equal(run.weights() if policy == "stop" else run.weights_at_start[7], run.weights_at_start[5],
                         run.model)


def test_the_loss_ratio_check_can_be_turned_off(tmp_path):
    run = make_run(tmp_path, "rollback", batch_norm=False, max_loss_ratio=None)
    run.trainer.on(Events.ITERATION_COMPLETED(once=5))(lambda e: run.model[-1].weight.data.mul_(1e6))
    start(run)
    assert run.events() == []


# ---- max_lr far too high (fp32) -----------------------------------------------------------------
def test_rollback_recovers_from_a_diverging_max_lr_at_a_lower_lr(tmp_path):
    run = make_run(tmp_path, "rollback", batch_norm=False, max_lr=1e5, weight_decay=0.1, lr_factor=1e-4, epochs=3)
    state = start(run)

    assert state.iteration == 3 * BATCHES and state.diverged is None
    assert run.guard.rollbacks >= 1 and run.guard.lr_scale == pytest.approx(1e-4 ** run.guard.rollbacks)
    assert run.optimizer.param_groups[0]["max_lr"] == pytest.approx(1e5 * run.guard.lr_scale)
    assert _all_finite(run.weights()) and math.isfinite(state.metrics["train_loss"])


def test_stop_on_a_diverging_max_lr_names_the_lr(tmp_path):
    run = make_run(tmp_path, "stop", batch_norm=False, max_lr=1e5, weight_decay=0.1, epochs=3)
    state = start(run)

    diag = state.diverged
    assert diag is not None and state.iteration < 3 * BATCHES
    assert "max_lr 1e+05 is high for this model" in diag["hint"] and "kiln lr-find" in diag["hint"]
    assert diag["lr"] > 1e3 and len(diag["grad_norm_history"]) >= 2
    assert _all_finite(run.weights())


def test_rollback_stops_after_max_rollbacks(tmp_path):
    run = make_run(tmp_path, "rollback", batch_norm=False, max_lr=1e5, weight_decay=0.1, max_rollbacks=2, epochs=3)
    state = start(run)

    assert [e["event"] for e in run.events()] == ["rollback", "rollback", "diverged"]
    assert run.guard.lr_scale == 0.25 and "2 rollbacks already" in state.diverged["why"]
    assert _all_finite(run.weights())


def test_skip_escalates_to_rollback_after_max_skips_in_the_window(tmp_path):
    run = make_run(tmp_path, "skip", max_skips=2)
    for iteration in (3, 4, 5):
        poison_input(run, iteration)
    start(run)
    assert [(e["event"], e["iteration"]) for e in run.events()] == [("nan_skip", 3), ("nan_skip", 4), ("rollback", 5)]
    assert "2 skips within 100 steps" in run.events("rollback")[0]["why"]


# ---- fp16: loss-scale collapse ------------------------------------------------------------------
def test_fp16_single_skipped_steps_are_only_counted(tmp_path):
    run = make_run(tmp_path, "rollback", precision="fp16", epochs=1)
    poison_gradient(run, "3.weight", range(3, 4), float("inf"))
    state = start(run)
    assert run.amp.skipped_steps == 1 and run.events() == []
    assert state.metrics["scale_collapses"] == 0 and state.metrics["rollbacks"] == 0


@pytest.mark.parametrize("policy", ["skip", "rollback", "stop"])
def test_fp16_scale_collapse_triggers_the_policy(tmp_path, policy):
    run = make_run(tmp_path, policy, precision="fp16", epochs=2, max_consecutive_skips=3)
    poison_gradient(run, "3.weight", range(3, 6), float("inf"))  # skipped at 3, 4, 5: a collapse, read at 6
    state = start(run)

    collapse, action = run.events()
    assert (collapse["event"], collapse["iteration"], collapse["consecutive_skipped_steps"]) == ("scale_collapse", 6, 3)
    assert action["iteration"] == 3 and action["cause"] == "loss_scale"  # the collapse began at 3
    assert action["first_nonfinite"] == "gradient of 3.weight" and action["loss_scale"] == 2.0**16
    assert action["restored_iteration"] == 2
    restored = run.weights_at_start[3]
    if policy == "stop":
        assert action["event"] == "diverged" and state.diverged is not None and state.iteration == 6
        assert _params_equal(run.weights(), restored, run.model)
    else:
        assert action["event"] == "rollback" and state.iteration == 2 * BATCHES
        assert _params_equal(run.weights_at_start[7], restored, run.model)
        assert run.guard.scale_collapses == 1 and run.guard.lr_scale == 0.5
    assert run.amp.scaler.get_scale() >= 2.0**13 and _all_finite(run.weights())


def test_fp16_skips_that_bring_a_huge_init_scale_down_are_not_a_collapse(tmp_path):
    run = make_run(tmp_path, "stop", precision="fp16", epochs=1, max_consecutive_skips=3, init_scale=2.0**40)
    state = start(run)  # 2^40 overflows fp16 gradients: the scaler skips until the scale fits
    assert run.amp.skipped_steps > 3 and state.diverged is None and run.events() == []


def test_fp16_a_scale_below_the_floor_is_a_collapse(tmp_path):
    run = make_run(tmp_path, "rollback", precision="fp16", epochs=1, min_loss_scale=2.0**15)
    poison_gradient(run, "3.weight", range(3, 5), float("inf"))  # 2^16 -> 2^15 -> 2^14 < floor
    start(run)
    collapse, rollback = run.events()
    assert collapse["loss_scale"] == 2.0**14 and collapse["consecutive_skipped_steps"] == 2
    assert rollback["event"] == "rollback"


# ---- LR scaling, snapshots, state -----------------------------------------------------------------
def test_one_cycle_scale_lr_scales_the_rest_of_the_schedule():
    def lrs(scale_at: int | None, factor: float = 0.5) -> list[float]:
        model = torch.nn.Linear(2, 2)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        schedule = OneCycle(opt, max_lr=0.1, total_steps=40)
        out = []
        for step in range(40):
            if step == scale_at:
                schedule.scale_lr(factor)
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            schedule.scheduler.step() if step < 39 else None
        return out

    plain, scaled = lrs(None), lrs(15)
    assert scaled[:15] == plain[:15]
    assert scaled[15:] == pytest.approx([0.5 * lr for lr in plain[15:]], rel=1e-12)


def test_a_second_rollback_compounds_the_lr_factor(tmp_path):
    run = make_run(tmp_path, "rollback", epochs=3)
    poison_input(run, 3)
    poison_input(run, 9)
    start(run)
    first, second = run.events("rollback")
    assert (first["lr_scale"], second["lr_scale"]) == (0.5, 0.25)
    # after the second rollback (found at the end of 10): the original schedule at the restored step, times 0.25
    lr, step = run.lrs[11]
    plain = OneCycle(torch.optim.AdamW(torch.nn.Linear(1, 1).parameters(), lr=0.002), max_lr=0.05, total_steps=18)
    for _ in range(step):
        plain.optimizer.step()
        plain.scheduler.step()
    assert lr == pytest.approx(0.25 * plain.optimizer.param_groups[0]["lr"], rel=1e-9)


@pytest.mark.parametrize("policy", ["rollback", "stop"])
def test_the_values_kept_on_the_device_between_reads_hold_no_autograd_graph(tmp_path, policy):
    """Kept across steps, a graph would chain every step's to the next: memory grew 1.4 GB in a digits run."""
    run = make_run(tmp_path, policy, epochs=1)
    start(run)
    kept = [t for step in run.guard.detector.history.since(-1) for t in step[3:] if isinstance(t, torch.Tensor)]
    kept += run.trainer.state.batch_losses
    assert kept and not any(t.requires_grad for t in kept)


def test_the_snapshot_is_a_deep_copy(tmp_path):
    run = make_run(tmp_path, "rollback", epochs=1)
    start(run)
    kept = {k: v.clone() for k, v in run.guard.policy.snapshot.state["model"].items()}
    with torch.no_grad():
        for p in run.model.parameters():
            p.add_(1.0)
    assert all(torch.equal(kept[k], v) for k, v in run.guard.policy.snapshot.state["model"].items())


def test_a_restore_leaves_the_snapshot_as_it_was_taken():
    """Optimizer.load_state_dict keeps the tensors it is given: training on must not write into the snapshot."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    objects = {"model": model, "optimizer": optimizer}

    def train_a_step() -> None:
        model(torch.randn(4, 3)).sum().backward()
        optimizer.step()

    train_a_step()
    snapshot = Snapshot.take(objects, iteration=1, lr_scale=1.0)
    kept = _copy(model), [v.clone() for v in optimizer.state[model.weight].values()]
    for _ in range(2):  # restore, train on in place, restore again
        snapshot.restore(objects)
        assert _params_equal(_copy(model), kept[0], model)
        assert all(torch.equal(a, b) for a, b in zip(optimizer.state[model.weight].values(), kept[1]))
        train_a_step()


def test_counters_and_lr_factor_survive_a_weights_only_round_trip(tmp_path):
    run = make_run(tmp_path, "skip", max_skips=1)
    poison_input(run, 3)
    poison_input(run, 4)
    start(run)
    buffer = io.BytesIO()
    torch.save(run.guard.state_dict(), buffer)
    buffer.seek(0)
    fresh = make_run(tmp_path / "fresh", "skip").guard
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert (fresh.nan_skips, fresh.rollbacks, fresh.lr_scale) == (1, 1, 0.5)
    assert fresh.first_loss == pytest.approx(run.guard.first_loss) and fresh.first_loss > 0


def test_metrics_carry_the_counters_into_the_epoch_record(tmp_path):
    run = make_run(tmp_path, "skip")
    poison_input(run, 2)
    state = start(run)
    record = epoch_record(state)
    assert record["nan_skips"] == 1 and record["rollbacks"] == 0


def test_accumulation_drops_the_whole_window(tmp_path):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = TinyCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    trainer = create_trainer(model, optimizer, F.cross_entropy, accumulation_steps=2)
    guard = NanGuard(model, optimizer, policy="skip")
    guard.attach(trainer)
    batches = random_batches(count=4, batch_size=8, seed=3)
    batches[0][0][0, 0, 0, 0] = float("nan")  # the first micro-batch of the first window
    before = _copy(model)
    seen = []
    trainer.on(Events.ITERATION_COMPLETED(once=2))(lambda e: seen.append(_copy(model)))
    state = trainer.run(batches, max_epochs=1)
    assert guard.nan_skips == 1 and _params_equal(seen[0], before, model)
    assert math.isfinite(state.metrics["train_loss"])


@pytest.mark.parametrize("kwargs, error", [
    ({"policy": "ignore"}, ValueError), ({"check_every": 0}, ValueError), ({"lr_factor": 0.0}, ValueError),
    ({"lr_factor": 1.5}, ValueError), ({"max_rollbacks": -1}, ValueError), ({"max_skips": 0}, ValueError),
    ({"schedule": object()}, TypeError), ({"to_snapshot": {"thing": object()}}, TypeError),
    ({"scaler": object()}, TypeError),
])
def test_bad_settings_are_refused(kwargs, error):
    model = torch.nn.Linear(2, 2)
    with pytest.raises(error):
        NanGuard(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_the_snapshot_must_include_the_model():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="include the model"):
        NanGuard(model, optimizer, to_snapshot={"optimizer": optimizer})


@pytest.mark.parametrize("precision, scaler", [("fp16", None), ("fp32", "amp"), ("fp16", "another")])
def test_a_scaler_other_than_the_trainers_is_refused_at_start(precision, scaler):
    """Under fp16 the guard must watch the scaler's skips: guessing from a mismatch would misread them."""
    model = TinyCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    trainer = create_trainer(model, optimizer, F.cross_entropy, precision=precision)
    amp = AMP(device="cpu")
    amp.attach(trainer)
    given = {"amp": amp.scaler, "another": AMP(device="cpu").scaler, None: None}[scaler]
    NanGuard(model, optimizer, scaler=given).attach(trainer)
    with pytest.raises(ValueError, match="the one the trainer steps with"):
        trainer.run(random_batches(count=2, batch_size=4, seed=3), max_epochs=1)


def test_the_parts_compose_without_nan_guard_and_refuse_a_policy_attached_before_its_detector(tmp_path):
    """A researcher may compose the parts: a detector and a stop policy, no fp16 monitor. The policy acts on
    what the detector found in this step, so it must come after it: the wrong order fails loudly."""
    def parts(order: str) -> tuple[Engine, RollbackPolicy]:
        model = TinyCNN()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        trainer = create_trainer(model, optimizer, F.cross_entropy)
        detector = DivergenceDetector(model, optimizer, mode="immediate")
        policy = RollbackPolicy(detector, policy="skip", events_path=tmp_path / f"{order}.jsonl")
        for handler in ((detector, policy) if order == "right" else (policy, detector)):
            handler.attach(trainer)
        return trainer, policy

    batches = random_batches(count=4, batch_size=8, seed=3)
    batches[2][0][0, 0, 0, 0] = float("nan")
    trainer, policy = parts("right")
    trainer.run(batches, max_epochs=1)
    assert policy.nan_skips == 1 and json.loads((tmp_path / "right.jsonl").read_text())["iteration"] == 3
    trainer, policy = parts("wrong")
    with pytest.raises(RuntimeError, match="attach the DivergenceDetector before the policy"):
        trainer.run(batches, max_epochs=1)
