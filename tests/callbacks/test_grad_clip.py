"""GradClip: clips true-scale gradients under every precision and records the pre-clip norm."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events

from callbacks import AMP, GradClip
from engine import StepEvents, create_trainer

#: how close a pre-clip norm under autocast must be to the fp32 one (loose: only a loss-scale factor must not slip in)
NORM_TOLERANCE = {"fp32": 1e-5, "bf16": 0.1, "fp16": 0.02}
LR = 1.0  # plain SGD with lr 1: the weight change of a step is minus the gradient it used


def _bare_engine():
    engine = Engine(lambda e, batch: None)
    engine.state.grad_norm = None
    return engine


def test_unit_norm_mode_scales_grads_to_max_norm_and_records_the_norm_before():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])  # total norm 5
    engine = _bare_engine()
    GradClip([a, b], max_norm=1.0)(engine)
    assert isinstance(engine.state.grad_norm, torch.Tensor) and engine.state.grad_norm.dim() == 0
    assert engine.state.grad_norm.item() == pytest.approx(5.0)
    torch.testing.assert_close(a.grad, torch.tensor([0.6, 0.0]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.grad, torch.tensor([0.8]), rtol=1e-5, atol=1e-6)


def test_unit_grads_under_max_norm_are_untouched():
    a = torch.nn.Parameter(torch.zeros(2))
    a.grad = torch.tensor([0.3, 0.4])
    engine = _bare_engine()
    GradClip([a], max_norm=1.0)(engine)
    assert engine.state.grad_norm.item() == pytest.approx(0.5)
    assert torch.equal(a.grad, torch.tensor([0.3, 0.4]))


def test_unit_value_mode_clips_entries():
    a = torch.nn.Parameter(torch.zeros(3))
    a.grad = torch.tensor([2.0, -0.05, -3.0])
    engine = _bare_engine()
    GradClip([a], mode="value", clip_value=0.1)(engine)
    assert torch.equal(a.grad, torch.tensor([0.1, -0.05, -0.1]))
    assert engine.state.grad_norm.item() == pytest.approx(math.sqrt(4 + 0.0025 + 9))


def test_unit_max_norm_none_only_measures():
    a = torch.nn.Parameter(torch.zeros(2))
    a.grad = torch.tensor([30.0, 40.0])
    engine = _bare_engine()
    GradClip([a], max_norm=None)(engine)
    assert engine.state.grad_norm.item() == pytest.approx(50.0)
    assert torch.equal(a.grad, torch.tensor([30.0, 40.0]))


def test_unit_no_gradients_records_none():
    engine = _bare_engine()
    engine.state.grad_norm = torch.tensor(1.0)
    GradClip([torch.nn.Parameter(torch.zeros(2))])(engine)
    assert engine.state.grad_norm is None


def test_unit_a_non_finite_norm_is_recorded_as_is():
    a = torch.nn.Parameter(torch.zeros(2))
    a.grad = torch.tensor([float("inf"), 1.0])
    engine = _bare_engine()
    GradClip([a], max_norm=1.0)(engine)
    assert engine.state.grad_norm.item() == float("inf")


def test_frozen_parameters_are_left_out():
    model = torch.nn.Linear(3, 1)
    model.bias.requires_grad_(False)
    assert GradClip(model.parameters()).parameters == [model.weight]


@pytest.mark.parametrize("kwargs", [
    {"mode": "clip"}, {"max_norm": 0.0}, {"max_norm": -1.0}, {"mode": "value"}, {"mode": "value", "clip_value": 0.0},
])
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(ValueError):
        GradClip([torch.nn.Parameter(torch.zeros(1))], **kwargs)


def _clipped_run(model, batches, precision, clip):
    """Train one epoch with ``clip``; per step: (fp32 reference norm, state.grad_norm, applied gradient)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    trainer = create_trainer(model, optimizer, F.cross_entropy, precision=precision)
    AMP(device="cpu").attach(trainer)
    clip.attach(trainer)
    steps, current = [], {}

    @trainer.on(Events.ITERATION_STARTED)
    def fp32_reference(engine):  # the same weights and batch, in fp32, without the trainer
        reference = copy.deepcopy(model)
        x, y = engine.state.batch
        F.cross_entropy(reference(x), y).backward()
        current["grads"] = [p.grad for p in reference.parameters()]
        current["norm"] = torch.nn.utils.get_total_norm(current["grads"]).item()
        current["weights"] = [p.detach().clone() for p in model.parameters()]

    @trainer.on(StepEvents.OPTIMIZER_STEP_COMPLETED)
    def applied(engine):
        assert not engine.state.step_skipped
        used = [(before - p.detach()) / LR for before, p in zip(current["weights"], model.parameters())]
        steps.append((current["norm"], engine.state.grad_norm, used, current["grads"]))

    trainer.run(batches, max_epochs=1)
    assert len(steps) == len(batches)
    return steps


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_grad_norm_is_the_true_scale_pre_clip_norm_and_the_step_uses_clipped_grads(make_model, batches, precision):
    max_norm = 0.05
    model = make_model()
    steps = _clipped_run(model, batches, precision, GradClip(model.parameters(), max_norm=max_norm))
    for reference_norm, grad_norm, used, _ in steps:
        assert isinstance(grad_norm, torch.Tensor) and grad_norm.dim() == 0
        assert reference_norm > max_norm  # so the clip matters
        # the norm before clipping, in true units: neither clipped nor multiplied by the fp16 loss scale
        assert grad_norm.item() == pytest.approx(reference_norm, rel=NORM_TOLERANCE[precision])
        assert torch.nn.utils.get_total_norm(used).item() <= max_norm * (1 + 1e-3)
        assert torch.nn.utils.get_total_norm(used).item() == pytest.approx(max_norm, rel=1e-3)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_value_mode_clips_entries_under_each_precision(make_model, batches, precision):
    clip_value = 0.002
    model = make_model()
    steps = _clipped_run(model, batches, precision, GradClip(model.parameters(), mode="value", clip_value=clip_value))
    for reference_norm, grad_norm, used, reference_grads in steps:
        largest = max(g.abs().max().item() for g in used)
        assert largest <= clip_value * (1 + 1e-3)
        assert largest == pytest.approx(clip_value, rel=1e-3)
        assert max(g.abs().max().item() for g in reference_grads) > clip_value
        assert grad_norm.item() == pytest.approx(reference_norm, rel=NORM_TOLERANCE[precision])


def test_max_norm_none_only_measures(make_model, batches):
    model = make_model()
    steps = _clipped_run(model, batches, "fp32", GradClip(model.parameters(), max_norm=None))
    for reference_norm, grad_norm, used, reference_grads in steps:
        assert grad_norm.item() == pytest.approx(reference_norm, rel=1e-5)
        for applied, expected in zip(used, reference_grads):
            torch.testing.assert_close(applied, expected, rtol=1e-4, atol=1e-6)
