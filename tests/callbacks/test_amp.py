"""AMP: a real GradScaler for fp16 (on the CPU here): inf steps skipped, scale halved, counted; no-op otherwise."""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from ignite.engine import Engine

from callbacks import AMP
from engine import StepEvents, create_trainer


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _fp16_trainer(model, amp=None, precision="fp16", device="cpu"):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = create_trainer(model, optimizer, F.cross_entropy, precision=precision, device=device)
    amp = amp if amp is not None else AMP(device=torch.device(device).type)
    handles = amp.attach(trainer)
    return trainer, amp, handles


def _track_steps(trainer, model):
    """Per optimizer step: (weights before, weights after, step_skipped, loss_scale)."""
    steps = {}
    trainer.add_event_handler(StepEvents.BACKWARD_COMPLETED,
                              lambda e: steps.__setitem__(e.state.optimizer_step, [_params(model)]))
    trainer.add_event_handler(StepEvents.OPTIMIZER_STEP_COMPLETED,
                              lambda e: steps[e.state.optimizer_step].extend(
                                  [_params(model), e.state.step_skipped, e.state.loss_scale]))
    return steps


def _check_second_step_skipped(steps, amp, state):
    for step, (before, after, skipped, scale) in steps.items():
        unchanged = all(torch.equal(a, b) for a, b in zip(before, after))
        assert unchanged is (step == 2), step
        assert isinstance(skipped, torch.Tensor) and isinstance(scale, torch.Tensor)  # kept on the device
        assert bool(skipped) is (step == 2), step
        assert float(scale) == (65536.0 if step == 1 else 32768.0), step  # halved by the inf step, then kept
    assert int(amp.skipped_steps) == 1
    assert int(state.skipped_steps) == 1


def _check_an_inf_gradient_at_step_two_is_skipped(model, batches, device):
    """Write inf into a gradient of the second optimizer step: that step is skipped, the scale halves."""
    trainer, amp, _ = _fp16_trainer(model, device=device)
    steps = _track_steps(trainer, model)

    @trainer.on(StepEvents.BACKWARD_COMPLETED)
    def poison(engine):
        if engine.state.optimizer_step == 2:
            next(model.parameters()).grad.view(-1)[0] = float("inf")

    state = trainer.run(batches, max_epochs=1)
    _check_second_step_skipped(steps, amp, state)


def test_unit_it_counts_the_steps_the_trainer_reports_skipped():
    engine = Engine(lambda e, batch: None)
    amp = AMP(device="cpu")
    for skipped in (False, True, True, False):
        engine.state.step_skipped = skipped
        amp(engine)
    assert amp.skipped_steps == 2 and engine.state.skipped_steps == 2


def test_unit_attach_installs_the_scaler_only_for_fp16(make_model):
    model = make_model()
    for precision, installed in (("fp16", True), ("bf16", False), ("fp32", False)):
        trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy, precision=precision)
        amp = AMP(device="cpu", init_scale=512.0)
        handles = amp.attach(trainer)
        assert (trainer.state.scaler is amp.scaler) is installed
        assert bool(handles) is installed
        assert (float(trainer.state.loss_scale) if installed else trainer.state.loss_scale) == (512.0 if installed else None)


def test_an_inf_gradient_skips_the_step_and_halves_the_scale(make_model, batches):
    model = make_model()
    _check_an_inf_gradient_at_step_two_is_skipped(model, batches, device="cpu")


def test_an_inf_input_skips_the_step(make_model, batches):
    model = make_model()
    trainer, amp, _ = _fp16_trainer(model)
    steps = _track_steps(trainer, model)
    poisoned = [(x.clone(), y) for x, y in batches]
    poisoned[1][0][0, 0, 0, 0] = float("inf")

    state = trainer.run(poisoned, max_epochs=1)
    _check_second_step_skipped(steps, amp, state)


def test_grads_are_scaled_after_backward_and_true_scale_before_the_step(make_model, batches):
    model = make_model()
    trainer, _, _ = _fp16_trainer(model)
    norms = {}

    def norm():
        return torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()

    trainer.add_event_handler(StepEvents.BACKWARD_COMPLETED, lambda e: norms.__setitem__("raw", norm()))
    trainer.add_event_handler(StepEvents.BEFORE_OPTIMIZER_STEP, lambda e: norms.__setitem__("true", norm()))
    trainer.run(batches[:1], max_epochs=1)
    assert norms["raw"] / norms["true"] == pytest.approx(65536.0, rel=1e-3)


def test_the_scale_grows_after_growth_interval_clean_steps(make_model, batches):
    model = make_model()
    trainer, _, _ = _fp16_trainer(model, AMP(device="cpu", init_scale=1024.0, growth_interval=2))
    scales = []
    trainer.add_event_handler(StepEvents.OPTIMIZER_STEP_COMPLETED, lambda e: scales.append(float(e.state.loss_scale)))
    trainer.run(batches, max_epochs=1)
    assert scales == [1024.0, 2048.0, 2048.0, 4096.0]


def test_fp16_with_amp_trains(make_model, batches):
    model = make_model()
    trainer, amp, _ = _fp16_trainer(model)
    first = trainer.run(batches, max_epochs=1).metrics["train_loss"]
    trainer.state.max_epochs = None
    last = trainer.run(batches, max_epochs=6).metrics["train_loss"]
    assert last < first
    assert amp.skipped_steps == 0


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_amp_is_a_no_op_without_fp16(make_model, batches, precision):
    model = make_model()
    trainer, amp, handles = _fp16_trainer(model, precision=precision)
    assert handles == []
    trainer.run(batches, max_epochs=1)
    assert trainer.state.scaler is None and trainer.state.loss_scale is None

    reference = make_model()
    reference_trainer = create_trainer(reference, torch.optim.SGD(reference.parameters(), lr=0.1), F.cross_entropy,
                                       precision=precision)
    reference_trainer.run(batches, max_epochs=1)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))


def test_state_dict_round_trips_through_a_weights_only_load(make_model, batches):
    model = make_model()
    trainer, amp, _ = _fp16_trainer(model, AMP(device="cpu", growth_interval=3))

    @trainer.on(StepEvents.BACKWARD_COMPLETED(once=1))
    def poison(engine):
        next(model.parameters()).grad.view(-1)[0] = float("nan")

    trainer.run(batches, max_epochs=1)  # one skip (scale halves), then three clean steps (it doubles back)
    buffer = io.BytesIO()
    torch.save(amp.state_dict(), buffer)
    buffer.seek(0)

    restored = AMP(device="cpu")
    restored.load_state_dict(torch.load(buffer, weights_only=True))

    assert restored.skipped_steps == amp.skipped_steps == 1
    assert restored.scaler.get_scale() == amp.scaler.get_scale() == 65536.0
    assert restored.scaler.state_dict() == amp.scaler.state_dict()


def test_a_loaded_scale_is_the_one_training_uses(make_model, batches):
    source = AMP(device="cpu", init_scale=256.0)
    restored = AMP(device="cpu")
    restored.load_state_dict(source.state_dict())
    model = make_model()
    trainer, _, _ = _fp16_trainer(model, restored)
    scales = []
    trainer.add_event_handler(StepEvents.OPTIMIZER_STEP_COMPLETED, lambda e: scales.append(float(e.state.loss_scale)))
    trainer.run(batches[:1], max_epochs=1)
    assert scales == [256.0]


@pytest.mark.parametrize("kwargs", [{"init_scale": 0}, {"init_scale": -1.0}, {"growth_interval": 0}])
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(ValueError):
        AMP(device="cpu", **kwargs)


@pytest.mark.gpu
def test_fp16_on_cuda_skips_an_inf_step(make_model, batches):
    model = make_model().cuda()
    _check_an_inf_gradient_at_step_two_is_skipped(model, batches, device="cuda")
