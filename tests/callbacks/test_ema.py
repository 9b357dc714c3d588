"""EMA: the average follows the optimizer steps that happened, warms up, averages BN statistics and resumes exactly."""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from ignite.metrics import Loss

from callbacks import EMA
from engine import StepEvents, create_evaluator, create_trainer


def _trainer(model, accumulation_steps=1, seed=0):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return create_trainer(model, optimizer, F.cross_entropy, accumulation_steps=accumulation_steps, seed=seed), optimizer


def _weights(model):
    return [p.detach().clone() for p in model.parameters()]


def test_the_average_is_the_decayed_sum_of_the_weights_after_each_step(make_model, batches):
    model = make_model()
    trainer, _ = _trainer(model)
    ema = EMA(model, decay=0.8, warmup=False)
    ema.attach(trainer)
    after_each_step = []
    trainer.add_event_handler(StepEvents.OPTIMIZER_STEP_COMPLETED, lambda e: after_each_step.append(_weights(model)))
    trainer.run(batches, max_epochs=2)

    expected = after_each_step[0]  # the first update copies the weights
    for weights in after_each_step[1:]:
        expected = [0.8 * e + 0.2 * w for e, w in zip(expected, weights)]
    assert ema.updates == len(after_each_step) == 8
    for got, want in zip(ema.ema_model.parameters(), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.equal(next(ema.ema_model.parameters()), next(model.parameters()))


def test_updates_once_per_optimizer_step_and_not_on_a_skipped_one(make_model, batches):
    model = make_model()
    trainer, _ = _trainer(model, accumulation_steps=2)  # 4 batches: 2 optimizer steps per epoch
    ema = EMA(model, decay=0.9)
    ema.attach(trainer)

    def skip_the_third_step(engine):
        engine.state.skip_step = engine.state.optimizer_step == 3

    trainer.add_event_handler(StepEvents.BEFORE_OPTIMIZER_STEP, skip_the_third_step)
    trainer.run(batches, max_epochs=2)
    assert trainer.state.optimizer_step == 4
    assert ema.updates == 3  # a step the guard or the scaler dropped changes neither the weights nor the average


def test_fp16_a_step_the_scaler_skipped_leaves_the_average_as_it_was(make_model, batches):
    """Under fp16 the scaler's skip flag stays on the device: the update is weighed by 0, not read and skipped."""
    from callbacks import AMP

    model = make_model()
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy, precision="fp16")
    AMP(device="cpu").attach(trainer)
    ema = EMA(model, decay=0.8, warmup=False)
    ema.attach(trainer)
    poisoned = [(x.clone(), y) for x, y in batches]
    poisoned[2][0][0, 0, 0, 0] = float("inf")  # the third step overflows: the scaler skips it
    averages, flags = [], []

    @trainer.on(StepEvents.OPTIMIZER_STEP_COMPLETED)
    def record(engine):  # attached after the EMA: sees the average after its update
        flags.append(engine.state.step_skipped)
        averages.append([p.detach().clone() for p in ema.ema_model.parameters()])

    trainer.run(poisoned, max_epochs=1)
    assert all(isinstance(f, torch.Tensor) for f in flags) and [bool(f) for f in flags] == [False, False, True, False]
    assert all(torch.equal(a, b) for a, b in zip(averages[1], averages[2]))  # the skipped step changed nothing
    assert not all(torch.equal(a, b) for a, b in zip(averages[2], averages[3]))
    assert all(torch.isfinite(p).all() for p in ema.ema_model.parameters())


def test_warm_up_ramps_the_decay_from_a_tenth(make_model):
    ema = EMA(make_model(), decay=0.999)
    decays = []
    for n in (0, 1, 10, 100, 10_000):
        ema.load_state_dict({"updates": n})
        decays.append(round(ema.current_decay(), 4))
    assert decays == [0.1, 0.1818, 0.55, 0.9182, 0.999]
    assert EMA(make_model(), decay=0.999, warmup=False).current_decay() == 0.999


def test_batch_norm_statistics_are_averaged_and_counters_copied(make_model, batches):
    model = make_model(batch_norm=True)
    trainer, _ = _trainer(model)
    ema = EMA(model, decay=0.5, warmup=False)
    ema.attach(trainer)
    means = []
    trainer.add_event_handler(StepEvents.OPTIMIZER_STEP_COMPLETED, lambda e: means.append(model[1].running_mean.clone()))
    trainer.run(batches, max_epochs=1)
    expected = means[0]
    for m in means[1:]:
        expected = 0.5 * expected + 0.5 * m
    torch.testing.assert_close(ema.ema_model[1].running_mean, expected)
    assert ema.ema_model[1].num_batches_tracked.item() == model[1].num_batches_tracked.item() == 4
    assert ema.ema_model[1].running_mean.data_ptr() != model[1].running_mean.data_ptr()  # no aliasing


def test_an_evaluator_on_the_ema_model_measures_the_averaged_weights(make_model, batches):
    model = make_model()
    trainer, _ = _trainer(model)
    ema = EMA(model, decay=0.9)
    ema.attach(trainer)
    trainer.run(batches, max_epochs=2)
    on_ema = create_evaluator(ema.ema_model, {"loss": Loss(F.cross_entropy)}).run(batches).metrics["loss"]
    on_model = create_evaluator(model, {"loss": Loss(F.cross_entropy)}).run(batches).metrics["loss"]
    copy = make_model(seed=5)
    copy.load_state_dict(ema.ema_model.state_dict())  # the same keys as the model's: checkpoints load either way
    on_copy = create_evaluator(copy, {"loss": Loss(F.cross_entropy)}).run(batches).metrics["loss"]
    assert on_ema == pytest.approx(on_copy, rel=1e-6)
    assert on_ema != pytest.approx(on_model, rel=1e-3)


def test_resume_from_saved_state_gives_the_same_average(make_model, batches):
    def run(epochs, state=None):
        model = make_model()
        trainer, optimizer = _trainer(model, seed=3)
        ema = EMA(model, decay=0.9)
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            trainer.load_state_dict(state["trainer"])
            ema.ema_model.load_state_dict(state["ema_model"])
            ema.load_state_dict(state["ema"])
        ema.attach(trainer)
        trainer.run(batches, max_epochs=epochs)
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "trainer": trainer.state_dict(),
                    "ema_model": ema.ema_model.state_dict(), "ema": ema.state_dict()}, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=True)

    straight = run(3)
    resumed = run(3, state=run(1))
    assert resumed["ema"] == straight["ema"] == {"updates": 12, "decay": 0.9}
    for name, tensor in straight["ema_model"].items():
        assert torch.equal(resumed["ema_model"][name], tensor), name


def test_refuses_a_decay_outside_0_1(make_model):
    for decay in (0.0, 1.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="decay"):
            EMA(make_model(), decay=decay)
