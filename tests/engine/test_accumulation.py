"""Gradient accumulation: k micro-batches of b make the same step as one batch of k*b (no batch norm)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from ignite.engine import Events

from callbacks import GradClip, OneCycle
from engine import StepEvents, create_trainer
from recipes.data import TensorBatches


def _grads_at_each_step(trainer, model):
    grads = []
    trainer.add_event_handler(StepEvents.BEFORE_OPTIMIZER_STEP,
                              lambda e: grads.append([p.grad.clone() for p in model.parameters()]))
    return grads


def test_one_step_over_k_micro_batches_equals_one_step_over_their_union(make_model, make_batches):
    k, b = 4, 8
    micro = make_batches(count=k, batch_size=b, seed=3)
    union = [(torch.cat([x for x, _ in micro]), torch.cat([y for _, y in micro]))]

    accumulated, single = make_model(), make_model()
    trainer_k = create_trainer(accumulated, torch.optim.SGD(accumulated.parameters(), lr=0.5), F.cross_entropy,
                               accumulation_steps=k, precision="fp32")  # fp32: compared to 1e-5 below
    trainer_1 = create_trainer(single, torch.optim.SGD(single.parameters(), lr=0.5), F.cross_entropy, precision="fp32")
    grads_k, grads_1 = _grads_at_each_step(trainer_k, accumulated), _grads_at_each_step(trainer_1, single)
    trainer_k.run(micro, max_epochs=1)
    trainer_1.run(union, max_epochs=1)

    assert trainer_k.state.optimizer_step == trainer_1.state.optimizer_step == 1
    assert len(grads_k) == 1  # the step's optimizer events fired once, at the window's last micro-batch
    for g_k, g_1 in zip(grads_k[0], grads_1[0]):  # the summed micro-batch grads are the big batch's mean grad
        torch.testing.assert_close(g_k, g_1, rtol=1e-5, atol=1e-7)
    for p, q in zip(accumulated.parameters(), single.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    assert not torch.equal(next(accumulated.parameters()), next(make_model().parameters()))


def _recipe_trainer(model, data, accumulation_steps, epochs):
    """AdamW, OneCycle per optimizer step and clipping at 1.0: the recipe's step policy on a model without BN."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    trainer = create_trainer(model, optimizer, torch.nn.CrossEntropyLoss(label_smoothing=0.1), seed=0,
                             accumulation_steps=accumulation_steps, precision="fp32")
    total = OneCycle.total_steps_for(epochs, len(data), accumulation_steps)
    OneCycle(optimizer, max_lr=2e-2, total_steps=total).attach(trainer)
    GradClip(model.parameters(), max_norm=1.0).attach(trainer)
    lrs = []
    trainer.add_event_handler(StepEvents.BEFORE_OPTIMIZER_STEP, lambda e: lrs.append(optimizer.param_groups[0]["lr"]))
    losses = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: losses.append(e.state.metrics["train_loss"]))
    return trainer, lrs, losses


def test_the_full_trainer_over_epochs_matches_batches_k_times_larger(make_model):
    # 40 samples: batches of 8 (5 per epoch, windows 2+2+1) against batches of 16 (16+16+8); the order is a
    # function of (seed, epoch) whatever the batch size, so window i holds exactly big batch i's samples
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 3, 16, 16, generator=g), torch.randint(0, 3, (40,), generator=g)
    small, large = TensorBatches(x, y, 8, seed=1), TensorBatches(x, y, 16, seed=1)
    accumulated, reference = make_model(), make_model()
    trainer_k, lrs_k, losses_k = _recipe_trainer(accumulated, small, 2, epochs=3)
    trainer_1, lrs_1, losses_1 = _recipe_trainer(reference, large, 1, epochs=3)
    steps = []
    trainer_k.add_event_handler(StepEvents.OPTIMIZER_STEP_COMPLETED, lambda e: steps.append(e.state.iteration))
    trainer_k.run(small, max_epochs=3)
    trainer_1.run(large, max_epochs=3)

    assert steps == [2, 4, 5, 7, 9, 10, 12, 14, 15]  # the last window of each epoch is its fifth batch alone
    assert trainer_k.state.optimizer_step == trainer_1.state.optimizer_step == 9
    assert lrs_k == lrs_1  # the schedule counts optimizer steps, not batches
    for a, b in zip(losses_k, losses_1):  # the epoch's train_loss weighs batches by their samples
        assert abs(a - b) < 1e-5
    for p, q in zip(accumulated.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(next(accumulated.parameters()), next(make_model().parameters()))
