"""The training step: the state fields it guarantees, skipping, accumulation, train_loss, seeding, restarts."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events

from engine import StepEvents, create_trainer, iteration_seed


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _sgd_trainer(model, lr=0.1, **kwargs):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    kwargs.setdefault("precision", "fp32")
    return create_trainer(model, optimizer, F.cross_entropy, **kwargs), optimizer


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_state_loss_is_this_batchs_detached_fp32_scalar(make_model, batches, precision):
    model = make_model()
    trainer, _ = _sgd_trainer(model, precision=precision)
    checked = []

    @trainer.on(StepEvents.FORWARD_COMPLETED)
    def check(engine):
        loss = engine.state.loss
        assert isinstance(loss, torch.Tensor)
        assert loss.dtype == torch.float32 and loss.dim() == 0
        assert not loss.requires_grad and loss.grad_fn is None
        x, y = engine.state.batch
        with torch.no_grad(), engine.state.precision.autocast():  # weights are unchanged until the step
            expected = F.cross_entropy(model(x), y).float()
        torch.testing.assert_close(loss, expected)
        checked.append(engine.state.iteration)

    state = trainer.run(batches, max_epochs=1)
    assert checked == [1, 2, 3, 4]
    assert state.output.loss is state.loss
    assert not state.output.y_pred.requires_grad
    assert torch.equal(state.output.y, batches[-1][1])


def test_optimizer_step_counts_steps(make_model, batches):
    trainer, _ = _sgd_trainer(make_model())
    state = trainer.run(batches, max_epochs=3)
    assert state.optimizer_step == 3 * len(batches)


def test_accumulation_steps_must_be_positive(make_model):
    with pytest.raises(ValueError, match="accumulation_steps"):
        _sgd_trainer(make_model(), accumulation_steps=0)


def test_skip_step_leaves_weights_unchanged_and_drops_the_gradients(make_model, batches):
    model = make_model()
    trainer, _ = _sgd_trainer(model)
    before, skipped = {}, {}

    @trainer.on(StepEvents.BACKWARD_COMPLETED)
    def remember(engine):
        before[engine.state.optimizer_step] = _params(model)

    @trainer.on(StepEvents.BEFORE_OPTIMIZER_STEP)
    def skip_second(engine):
        assert engine.state.skip_step is False  # reset by the step before every optimizer step
        if engine.state.optimizer_step == 2:
            engine.state.skip_step = True

    @trainer.on(StepEvents.OPTIMIZER_STEP_COMPLETED)
    def check(engine):
        step = engine.state.optimizer_step
        skipped[step] = engine.state.step_skipped
        assert _same(_params(model), before[step]) == (step == 2)

    trainer.run(batches, max_epochs=1)
    assert skipped == {1: False, 2: True, 3: False, 4: False}

    # the skipped batch's gradients were dropped: the run equals one that never saw that batch
    reference = make_model()
    reference_trainer, _ = _sgd_trainer(reference)
    reference_trainer.run([batches[0], batches[2], batches[3]], max_epochs=1)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_train_loss_is_the_sample_weighted_mean_of_the_epochs_batch_losses(make_model, make_batches):
    model = make_model()
    data = make_batches(count=4, batch_size=8, last_size=3)
    trainer, _ = _sgd_trainer(model)
    losses, train_losses = [], []

    @trainer.on(StepEvents.FORWARD_COMPLETED)
    def independent_loss(engine):
        x, y = engine.state.batch
        with torch.no_grad():
            losses.append((F.cross_entropy(model(x), y).item(), len(y)))

    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: train_losses.append(e.state.metrics["train_loss"]))
    trainer.run(data, max_epochs=2)

    for epoch, reported in enumerate(train_losses):
        epoch_losses = losses[epoch * 4 : (epoch + 1) * 4]
        expected = sum(loss * n for loss, n in epoch_losses) / sum(n for _, n in epoch_losses)
        assert reported == pytest.approx(expected, rel=1e-5)
    assert train_losses[0] != pytest.approx(train_losses[1], rel=1e-6)  # each epoch has its own mean


def test_a_second_run_restarts_the_counters(make_model, batches):
    model = make_model()
    trainer, _ = _sgd_trainer(model)
    trainer.run(batches, max_epochs=1)
    losses = []
    trainer.add_event_handler(StepEvents.FORWARD_COMPLETED, lambda e: losses.append((e.state.loss.item(), len(e.state.batch[1]))))

    state = trainer.run(batches, max_epochs=1)

    assert (state.epoch, state.iteration, state.optimizer_step) == (1, len(batches), len(batches))
    assert state.epoch_samples == sum(len(y) for _, y in batches)
    expected = sum(loss * n for loss, n in losses) / sum(n for _, n in losses)
    assert state.metrics["train_loss"] == pytest.approx(expected, rel=1e-5)


def test_iteration_seed_is_a_pure_function_of_seed_and_iteration():
    assert iteration_seed(3, 7) == iteration_seed(3, 7)
    assert len({iteration_seed(3, i) for i in range(1, 100)}) == 99
    assert iteration_seed(3, 7) != iteration_seed(4, 7)


def _dropout_run(make_model, batches, seed, burn):
    model = make_model(dropout=0.5)
    trainer, _ = _sgd_trainer(model, seed=seed)
    torch.rand(burn)  # a different global RNG state before each run
    trainer.run(batches, max_epochs=2)
    return _params(model)


def test_seeded_dropout_does_not_depend_on_the_global_rng(make_model, batches):
    first = _dropout_run(make_model, batches, seed=3, burn=1)
    second = _dropout_run(make_model, batches, seed=3, burn=17)
    assert _same(first, second)


def test_without_a_seed_dropout_follows_the_global_rng(make_model, batches):
    # the control for the test above: dropout really does change the weights
    first = _dropout_run(make_model, batches, seed=None, burn=1)
    second = _dropout_run(make_model, batches, seed=None, burn=17)
    assert not _same(first, second)


def test_state_lr_is_the_lr_the_optimizer_step_uses(make_model, batches):
    model = make_model()
    trainer, optimizer = _sgd_trainer(model, lr=0.1)
    used, reported = [], []

    @trainer.on(StepEvents.BEFORE_OPTIMIZER_STEP)
    def lr_used(engine):
        used.append(optimizer.param_groups[0]["lr"])

    @trainer.on(StepEvents.OPTIMIZER_STEP_COMPLETED)
    def halve(engine):  # a schedule: the next step uses half the LR
        for group in optimizer.param_groups:
            group["lr"] *= 0.5

    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: reported.append(e.state.lr))
    trainer.run(batches, max_epochs=1)

    assert used == [0.1, 0.05, 0.025, 0.0125]
    assert reported == used


@pytest.mark.parametrize("k", [2, 4])
def test_accumulating_k_micro_batches_equals_one_batch_k_times_larger(make_model, make_batches, k):
    micro = make_batches(count=2 * k, batch_size=4, seed=7)
    large = [(torch.cat([x for x, _ in micro[i : i + k]]), torch.cat([y for _, y in micro[i : i + k]]))
             for i in range(0, len(micro), k)]

    accumulated = make_model()
    trainer, _ = _sgd_trainer(accumulated, lr=0.5, accumulation_steps=k)
    assert trainer.run(micro, max_epochs=2).optimizer_step == 4

    reference = make_model()
    reference_trainer, _ = _sgd_trainer(reference, lr=0.5)
    reference_trainer.run(large, max_epochs=2)

    assert not _same(_params(accumulated), _params(make_model()))  # it trained
    for p, q in zip(accumulated.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_fp16_without_a_loss_scaler_warns(make_model, batches, caplog):
    trainer, _ = _sgd_trainer(make_model(), precision="fp16")
    with caplog.at_level(logging.WARNING, logger="kiln"):
        trainer.run(batches[:1], max_epochs=1)
    assert any("loss scaler" in r.getMessage() for r in caplog.records)


def test_trainer_positions_tensor_batches_at_each_epoch(make_model, tensor_batches):
    trainer, _ = _sgd_trainer(make_model())
    seen = []
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: seen.append(e.state.batch[1].clone()))
    reference = copy.deepcopy(tensor_batches)
    trainer.run(tensor_batches, max_epochs=2)
    for epoch in (1, 2):
        reference.set_position(epoch, 0)
        expected = torch.cat([y for _, y in reference])
        assert torch.equal(torch.cat(seen[(epoch - 1) * 4 : epoch * 4]), expected)
    assert not torch.equal(torch.cat(seen[:4]), torch.cat(seen[4:]))  # each epoch has its own order


def _resumable(make_model, accumulation_steps):
    model = make_model(dropout=0.3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    trainer = create_trainer(model, optimizer, F.cross_entropy, precision="fp32", seed=11,
                             accumulation_steps=accumulation_steps)
    return model, optimizer, trainer


def test_resuming_at_an_optimizer_step_boundary_is_exact(make_model, tensor_batches):
    data = tensor_batches  # 4 batches per epoch; with k=3 windows are batches [1-3] and [4]
    model, _, trainer = _resumable(make_model, 3)
    trainer.run(data, max_epochs=3)

    # a first process stops mid-epoch 2 after iteration 7, which closes a window
    model_a, optimizer_a, trainer_a = _resumable(make_model, 3)
    trainer_a.add_event_handler(Events.ITERATION_COMPLETED(once=7), lambda e: e.terminate())
    trainer_a.run(copy.deepcopy(data), max_epochs=3)
    assert trainer_a.state.iteration == 7
    saved = copy.deepcopy((trainer_a.state_dict(), model_a.state_dict(), optimizer_a.state_dict()))

    # a second process loads the states and finishes the run
    model_b, optimizer_b, trainer_b = _resumable(make_model, 3)
    model_b.load_state_dict(saved[1])
    optimizer_b.load_state_dict(saved[2])
    trainer_b.load_state_dict(saved[0])
    torch.rand(5)  # the global RNG state of a new process differs
    state = trainer_b.run(copy.deepcopy(data), max_epochs=3)

    assert state.optimizer_step == trainer.state.optimizer_step
    assert _same(_params(model_b), _params(model))
    assert state.metrics["train_loss"] == pytest.approx(trainer.state.metrics["train_loss"], rel=1e-6)


def test_memory_format_channels_last_trains(make_model, batches):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    trainer = create_trainer(model, optimizer, F.cross_entropy, precision="fp32", memory_format=torch.channels_last)
    model[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    trainer.run(batches, max_epochs=1)
    assert seen == [True] * len(batches)



def _stream(batches):
    """Batches from a generator: data without a length, like an IterableDataset."""
    return (batch for batch in batches)


def test_data_without_a_length_trains_with_an_explicit_epoch_length(make_model, batches):
    trainer, _ = _sgd_trainer(make_model(), accumulation_steps=2)
    state = trainer.run(_stream(batches * 2), max_epochs=2, epoch_length=4)
    assert (state.iteration, state.optimizer_step) == (8, 4)


def test_data_without_a_length_and_no_epoch_length_is_a_clear_error(make_model, batches):
    # ignite accepts such data (it learns the epoch length when the data runs out); kiln's step needs
    # the epoch length up front for its accumulation windows, so it must say so instead of failing
    # on ``None`` arithmetic
    trainer, _ = _sgd_trainer(make_model())
    with pytest.raises(ValueError, match="epoch_length"):
        trainer.run(_stream(batches), max_epochs=1)
