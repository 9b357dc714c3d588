"""torch's private loss-scaling protocol, as ``engine/amp_protocol.py`` uses it: if torch changes it, these fail
and name the module to change (NanGuard would otherwise let a bad update into the weights, or read the scale
on the host every step)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events

from engine import StepEvents, create_trainer
from engine.amp_protocol import drops_on_device, scale_tensor, step_unless
from tests.conftest import TinyCNN, random_batches

CHANGED = "torch's loss-scaling protocol changed: engine/amp_protocol.py must follow it"


def _trained_a_step(fused: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused)
    for _ in range(2):  # moments and a step count to keep
        F.cross_entropy(model(torch.randn(8, 4)), torch.randint(0, 3, (8,))).backward()
        optimizer.step()
    F.cross_entropy(model(torch.randn(8, 4)), torch.randint(0, 3, (8,))).backward()
    return model, optimizer


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()] + [
        v.clone() for s in optimizer.state.values() for v in s.values()]


def test_a_fused_optimizer_drops_an_update_flagged_found_inf_and_keeps_everything():
    model, optimizer = _trained_a_step(fused=True)
    assert drops_on_device(optimizer), f"{CHANGED}: fused AdamW no longer says it takes found_inf"
    before = _state(model, optimizer)
    step_unless(optimizer, torch.ones(()))
    after = _state(model, optimizer)
    assert all(torch.equal(a, b) for a, b in zip(before, after)), \
        f"{CHANGED}: a fused AdamW step with found_inf=1 changed the weights, moments or step count"
    assert not hasattr(optimizer, "found_inf") and not hasattr(optimizer, "grad_scale")


def test_a_fused_optimizer_applies_an_update_flagged_sound_as_a_plain_step_would():
    model, optimizer = _trained_a_step(fused=True)
    twin, twin_optimizer = copy.deepcopy((model, optimizer))  # one deepcopy: the copy steps the copied weights
    for p, q in zip(model.parameters(), twin.parameters()):
        q.grad = p.grad.clone()  # a deepcopy leaves the gradients behind
    step_unless(optimizer, torch.zeros(()))
    twin_optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters())), \
        f"{CHANGED}: found_inf=0 no longer means a plain step"


def test_an_optimizer_that_would_apply_the_update_anyway_is_refused():
    model, optimizer = _trained_a_step(fused=False)
    assert not drops_on_device(optimizer)
    with pytest.raises(ValueError, match="only a fused optimizer"):
        step_unless(optimizer, torch.ones(()))


def test_the_scale_is_a_device_tensor_of_its_own():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler.scale(model(torch.ones(1, 2)).sum()).backward()
    scaler.step(optimizer)
    scale = scale_tensor(scaler)
    assert isinstance(scale, torch.Tensor) and scale.dim() == 0, f"{CHANGED}: _get_scale_async() is gone or changed"
    scaler.update(2.0**3)  # changes the scaler's own tensor in place
    assert float(scale) == 2.0**10 and scaler.get_scale() == 2.0**3


def test_the_step_drops_an_update_a_handler_flags_on_the_device():
    """What NanGuard's detector relies on: ``state.drop_update`` keeps a flagged update out of the weights."""
    model = TinyCNN()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    trainer = create_trainer(model, optimizer, F.cross_entropy)
    weights: dict[int, list[torch.Tensor]] = {}
    trainer.on(Events.ITERATION_STARTED)(lambda e: weights.__setitem__(
        e.state.iteration, [p.detach().clone() for p in model.parameters()]))
    trainer.on(StepEvents.BEFORE_OPTIMIZER_STEP)(
        lambda e: setattr(e.state, "drop_update", torch.tensor(float(e.state.iteration == 2))))
    state = trainer.run(random_batches(count=3, batch_size=4), max_epochs=1)
    assert state.drops_on_device and state.drop_update is not None
    assert all(torch.equal(a, b) for a, b in zip(weights[2], weights[3])), "the flagged update reached the weights"
    assert not all(torch.equal(a, b) for a, b in zip(weights[1], weights[2]))
    assert not hasattr(optimizer, "found_inf")
