"""RunSummary: summary.json, kept current from start to end, with best and final val accuracy."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events
from ignite.metrics import Accuracy

from callbacks import RunSummary, Validation
from engine import EpochEvents, create_evaluator, create_trainer

SUMMARY_KEYS = {"status", "best_val_accuracy", "final_val_accuracy", "epochs_completed", "iterations", "wall_seconds"}


def _read(path):
    return json.loads(path.read_text())


def _trainer(make_model, batches, run_dir):
    model = make_model()
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.5), F.cross_entropy, precision="fp32")
    Validation(create_evaluator(model, {"accuracy": Accuracy()}), batches[:2]).attach(trainer)
    summary = RunSummary(run_dir / "summary.json")
    summary.attach(trainer)
    accuracies = []
    trainer.add_event_handler(EpochEvents.VALIDATION_COMPLETED,
                              lambda e: accuracies.append(e.state.metrics["val_accuracy"]))
    return trainer, summary, accuracies


def test_a_completed_run(make_model, batches, tmp_path):
    trainer, summary, accuracies = _trainer(make_model, batches, tmp_path)
    trainer.run(batches, max_epochs=4)

    data = _read(tmp_path / "summary.json")
    assert SUMMARY_KEYS <= data.keys()
    assert data["status"] == "completed"
    assert data["best_val_accuracy"] == pytest.approx(max(accuracies))
    assert data["final_val_accuracy"] == pytest.approx(accuracies[-1])
    assert (data["epochs_completed"], data["iterations"]) == (4, 16)
    assert data["wall_seconds"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # no temporary files left behind


def test_it_is_written_at_the_start_and_after_each_epoch(make_model, batches, tmp_path):
    trainer, _, _ = _trainer(make_model, batches, tmp_path)
    seen = []
    trainer.add_event_handler(Events.ITERATION_STARTED(once=1), lambda e: seen.append(_read(tmp_path / "summary.json")))
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: seen.append(_read(tmp_path / "summary.json")))
    trainer.run(batches, max_epochs=2)
    statuses = [(s["status"], s["epochs_completed"], s["best_val_accuracy"] is None) for s in seen]
    assert statuses == [("running", 0, True), ("running", 0, True), ("running", 1, False)]


def test_a_run_stopped_early_is_interrupted(make_model, batches, tmp_path):
    trainer, _, _ = _trainer(make_model, batches, tmp_path)
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=6), lambda e: e.terminate())
    trainer.run(batches, max_epochs=3)
    data = _read(tmp_path / "summary.json")
    assert (data["status"], data["iterations"], data["epochs_completed"]) == ("interrupted", 6, 1)


def test_write_takes_a_known_status_and_extra_fields(tmp_path):
    summary = RunSummary(tmp_path / "summary.json")
    summary.write("failed", error="RuntimeError: boom")
    data = _read(tmp_path / "summary.json")
    assert (data["status"], data["error"], data["iterations"]) == ("failed", "RuntimeError: boom", 0)
    with pytest.raises(ValueError):
        summary.write("exploded")


def test_state_dict_round_trips_and_wall_time_adds_up(make_model, batches, tmp_path):
    trainer, summary, accuracies = _trainer(make_model, batches, tmp_path / "a")
    trainer.run(batches, max_epochs=2)
    state = json.loads(json.dumps(summary.state_dict()))  # plain data

    restored = RunSummary(tmp_path / "b" / "summary.json")
    restored.load_state_dict(state)
    assert restored.best_val_accuracy == pytest.approx(max(accuracies))
    assert restored.final_val_accuracy == pytest.approx(accuracies[-1])
    assert restored.wall_seconds == pytest.approx(state["wall_seconds"])
    restored.write("interrupted")
    assert _read(tmp_path / "b" / "summary.json")["wall_seconds"] == pytest.approx(state["wall_seconds"], abs=1e-3)
