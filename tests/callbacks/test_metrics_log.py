"""MetricsLog: metrics.jsonl (a line per validated epoch) and steps.jsonl (a line every N iterations)."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from ignite.metrics import Accuracy, Loss

from callbacks import AMP, GradClip, MetricsLog, Validation
from engine import EpochEvents, StepEvents, create_evaluator, create_trainer

EPOCH_KEYS = {"epoch", "iteration", "train_loss", "val_loss", "val_accuracy", "lr", "epoch_seconds", "images_per_second"}


def _strict(text):
    """Parse one JSON line as a strict reader would: NaN and Infinity are not JSON."""
    def refuse(token):
        raise ValueError(f"not JSON: {token}")
    return json.loads(text, parse_constant=refuse)


def _lines(path):
    return [_strict(line) for line in path.read_text().splitlines()]


def _trainer(model, batches, run_dir, precision="fp32", every=3):
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy, precision=precision)
    evaluator = create_evaluator(model, {"accuracy": Accuracy(), "loss": Loss(torch.nn.CrossEntropyLoss())})
    AMP(device="cpu").attach(trainer)
    GradClip(model.parameters(), max_norm=1.0).attach(trainer)
    Validation(evaluator, batches[:2]).attach(trainer)
    log = MetricsLog(run_dir / "metrics.jsonl", run_dir / "steps.jsonl", every=every)
    handles = log.attach(trainer)
    return trainer, log, handles


def test_one_metrics_line_per_epoch_with_the_epochs_figures(make_model, batches, tmp_path):
    trainer, log, _ = _trainer(make_model(), batches, tmp_path)
    expected = []

    @trainer.on(EpochEvents.EPOCH_RECORDED)
    def remember(engine):
        m = engine.state.metrics
        expected.append((engine.state.epoch, engine.state.iteration, m["train_loss"], m["val_loss"],
                         m["val_accuracy"], engine.state.lr))

    trainer.run(batches, max_epochs=3)

    lines = _lines(log.metrics_path)
    assert log.metrics_path == tmp_path / "metrics.jsonl"
    assert len(lines) == 3
    for line, (epoch, iteration, train_loss, val_loss, val_accuracy, lr) in zip(lines, expected):
        assert EPOCH_KEYS <= line.keys()
        assert (line["epoch"], line["iteration"]) == (epoch, iteration)
        assert line["train_loss"] == pytest.approx(train_loss)
        assert line["val_loss"] == pytest.approx(val_loss)
        assert line["val_accuracy"] == pytest.approx(val_accuracy) and 0.0 <= line["val_accuracy"] <= 1.0
        assert line["lr"] == lr
        assert line["epoch_seconds"] > 0
        samples = sum(len(y) for _, y in batches)
        assert line["images_per_second"] == pytest.approx(samples / line["epoch_seconds"], rel=0.05)
        assert "loss_scale" not in line  # fp32 has no loss scale


def test_a_step_line_every_n_iterations(make_model, batches, tmp_path):
    trainer, log, _ = _trainer(make_model(), batches, tmp_path, every=3)
    expected = {}

    @trainer.on(Events.ITERATION_COMPLETED)
    def remember(engine):
        expected[engine.state.iteration] = (engine.state.loss.item(), engine.state.lr, engine.state.grad_norm.item())

    trainer.run(batches, max_epochs=3)  # 12 iterations

    lines = _lines(log.steps_path)
    assert [line["iteration"] for line in lines] == [3, 6, 9, 12]
    for line in lines:
        loss, lr, grad_norm = expected[line["iteration"]]
        assert line["loss"] == pytest.approx(loss)
        assert line["lr"] == lr
        assert line["grad_norm"] == pytest.approx(grad_norm)
        assert line["epoch"] == (line["iteration"] - 1) // 4 + 1


def test_fp16_lines_carry_the_loss_scale_and_skips(make_model, batches, tmp_path):
    model = make_model()
    trainer, log, _ = _trainer(model, batches, tmp_path, precision="fp16", every=1)
    trainer.add_event_handler(StepEvents.BACKWARD_COMPLETED(once=2),
                              lambda e: next(model.parameters()).grad.view(-1).__setitem__(0, float("inf")))
    trainer.run(batches, max_epochs=1)

    (epoch_line,) = _lines(log.metrics_path)
    assert epoch_line["loss_scale"] == 32768.0
    assert epoch_line["skipped_steps"] == 1
    steps = _lines(log.steps_path)
    assert [s["step_skipped"] for s in steps] == [False, True, False, False]
    assert [s["loss_scale"] for s in steps] == [65536.0, 32768.0, 32768.0, 32768.0]
    assert steps[1]["grad_norm"] == "inf"  # a non-finite value is written as a string: the line stays JSON


def test_lines_are_appended_never_rewritten(make_model, batches, tmp_path):
    trainer, log, _ = _trainer(make_model(), batches, tmp_path)
    trainer.run(batches, max_epochs=2)
    first = log.metrics_path.read_text()
    trainer.run(batches, max_epochs=2)  # a second run of the same engine
    text = log.metrics_path.read_text()
    assert text.startswith(first)
    assert [line["epoch"] for line in _lines(log.metrics_path)] == [1, 2, 1, 2]


def test_every_line_is_strict_json_when_the_model_diverges(make_model, batches, tmp_path):
    model = make_model()
    trainer, log, _ = _trainer(model, batches, tmp_path, every=1)

    @trainer.on(StepEvents.OPTIMIZER_STEP_COMPLETED(once=3))
    def diverge(engine):
        with torch.no_grad():
            model[-1].weight.fill_(float("nan"))

    trainer.run(batches, max_epochs=1)
    lines = _lines(log.steps_path) + _lines(log.metrics_path)  # raises on a NaN or Infinity token
    assert len(lines) == 5


def test_unit_write_step_on_a_bare_engine(tmp_path):
    engine = Engine(lambda e, b: None)
    engine.state.iteration, engine.state.epoch = 7, 2
    engine.state.loss, engine.state.lr = torch.tensor(float("nan")), 0.01
    engine.state.grad_norm, engine.state.loss_scale, engine.state.step_skipped = torch.tensor(2.5), None, False
    log = MetricsLog(tmp_path / "metrics.jsonl", tmp_path / "steps.jsonl", every=1)
    log.write_step(engine)
    (line,) = _lines(log.steps_path)
    assert line == {"iteration": 7, "epoch": 2, "loss": "nan", "lr": 0.01, "grad_norm": 2.5}
    assert math.isnan(float(line["loss"]))


def test_detached_it_writes_nothing(make_model, batches, tmp_path):
    trainer, log, handles = _trainer(make_model(), batches, tmp_path, every=1)
    for handle in handles:
        handle.remove()
    trainer.run(batches, max_epochs=1)
    assert not log.metrics_path.exists() and not log.steps_path.exists()


def test_every_must_be_positive(tmp_path):
    with pytest.raises(ValueError):
        MetricsLog(tmp_path / "metrics.jsonl", tmp_path / "steps.jsonl", every=0)
