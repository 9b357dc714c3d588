"""The evaluator: eval and inference mode while it runs, the model's mode restored, metrics over all samples."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ignite.metrics import Accuracy, Loss

from engine import create_evaluator


@pytest.mark.parametrize("was_training", [True, False])
def test_evaluation_runs_in_eval_and_inference_mode_then_restores_the_mode(make_model, batches, was_training):
    model = make_model(batch_norm=True)
    model.train(was_training)
    seen = []
    model.register_forward_hook(
        lambda m, args, out: seen.append((m.training, torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
    )
    running_mean = model[1].running_mean.clone()

    create_evaluator(model, {"accuracy": Accuracy()}).run(batches)

    assert seen == [(False, True, False)] * len(batches)
    assert model.training is was_training
    assert all(m.training is was_training for m in model.modules())
    assert torch.equal(model[1].running_mean, running_mean)  # batch norm statistics are not updated


def test_metrics_are_computed_over_every_sample(make_batches):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 3))
    data = make_batches(count=3, batch_size=8, last_size=5)
    evaluator = create_evaluator(model, {"accuracy": Accuracy(), "loss": Loss(torch.nn.CrossEntropyLoss())},
                                 precision="fp32")  # compared with an fp32 forward below

    metrics = evaluator.run(data).metrics

    x = torch.cat([x for x, _ in data])
    y = torch.cat([y for _, y in data])
    with torch.no_grad():
        logits = model(x)
    assert metrics["accuracy"] == pytest.approx((logits.argmax(1) == y).float().mean().item())
    assert metrics["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)


def test_a_perfect_and_a_wrong_classifier():
    x = torch.eye(3).repeat(4, 1)  # one-hot inputs
    y = torch.arange(3).repeat(4)
    data = [(x[:6], y[:6]), (x[6:], y[6:])]
    identity = torch.nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        identity.weight.copy_(torch.eye(3))
    assert create_evaluator(identity, {"accuracy": Accuracy()}).run(data).metrics["accuracy"] == 1.0
    with torch.no_grad():
        identity.weight.copy_(torch.eye(3).roll(1, dims=0))  # predicts the next class
    assert create_evaluator(identity, {"accuracy": Accuracy()}).run(data).metrics["accuracy"] == 0.0


def test_bf16_evaluation_returns_fp32_predictions(make_model, batches):
    model = make_model()
    evaluator = create_evaluator(model, {}, precision="bf16")
    y_pred, y = evaluator.run(batches[:1]).output
    assert y_pred.dtype == torch.float32
    assert torch.equal(y, batches[0][1])
    with torch.no_grad():
        torch.testing.assert_close(y_pred, model(batches[0][0]), rtol=0.05, atol=0.05)
