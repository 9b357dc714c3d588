"""Checkpointer and AtomicDiskSaver: atomic files, deferred removal, best-k rotation, no NaN ever written."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events

from callbacks import Checkpointer, Validation
from callbacks.atomic_saver import AtomicDiskSaver, NonFiniteCheckpointError
from engine import create_evaluator, create_trainer
from engine.events import EpochEvents


def _trainer(tmp_path, **checkpointer_args):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = create_trainer(model, optimizer, F.cross_entropy)
    checkpointer = Checkpointer(tmp_path / "checkpoints", {"model": model, "optimizer": optimizer, "trainer": trainer},
                                events_path=tmp_path / "events.jsonl", **checkpointer_args)
    checkpointer.attach(trainer)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(5)]
    return trainer, model, checkpointer, data


def test_last_checkpoint_every_n_iterations_and_at_the_end(tmp_path):
    trainer, model, checkpointer, data = _trainer(tmp_path, every_iterations=2, every_minutes=0, keep_best=0)
    saved_at = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: saved_at.append(
        torch.load(checkpointer.last_path, weights_only=True)["trainer"]["iteration"] if checkpointer.last_path.exists() else None))
    trainer.run(data, max_epochs=2)
    # iteration 5 and 10 close an epoch: no mid-epoch save there (the epoch-end save needs Validation's events)
    assert saved_at[:4] == [None, 2, 2, 4]
    final = torch.load(checkpointer.last_path, weights_only=True)
    assert final["trainer"]["iteration"] == 10
    assert all(torch.equal(final["model"][k], v) for k, v in model.state_dict().items())
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [e["iteration"] for e in events if e["event"] == "checkpoint"] == [2, 4, 6, 8, 10]
    assert sorted(p.name for p in checkpointer.dirname.iterdir()) == ["last.pt"]


def test_best_k_keeps_the_top_scores_and_survives_a_restart(tmp_path):
    trainer, model, checkpointer, data = _trainer(tmp_path, every_minutes=0, keep_best=2)
    scores = iter([0.5, 0.9, 0.7, 0.95, 0.6])

    class FakeValidation(Validation):  # a real evaluator run, but with scores chosen by the test
        def __call__(self, engine):
            engine.state.metrics["val_accuracy"] = next(scores)
            engine.fire_event(EpochEvents.VALIDATION_COMPLETED)
            engine.fire_event(EpochEvents.EPOCH_RECORDED)

    FakeValidation(create_evaluator(model, {}), data).attach(trainer)
    trainer.run(data, max_epochs=3)
    names = sorted(p.name for p in checkpointer.dirname.glob("best-*.pt"))
    assert names == ["best-epoch2-val_accuracy=0.9000.pt", "best-epoch3-val_accuracy=0.7000.pt"]

    state = torch.load(checkpointer.last_path, weights_only=True)["checkpointer"]
    trainer2, model2, checkpointer2, _ = _trainer(tmp_path, every_minutes=0, keep_best=2)
    checkpointer2.load_state_dict(state)
    trainer2.load_state_dict(torch.load(checkpointer.last_path, weights_only=True)["trainer"])
    FakeValidation(create_evaluator(model2, {}), data).attach(trainer2)
    trainer2.run(data, max_epochs=5)
    names = sorted(p.name for p in checkpointer.dirname.glob("best-*.pt"))
    assert names == ["best-epoch2-val_accuracy=0.9000.pt", "best-epoch4-val_accuracy=0.9500.pt"]
    # the events name only files written: epoch 5's 0.6 made neither of the two best
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [(e["epoch"], e["file"]) for e in events if e["event"] == "checkpoint" and e["kind"] == "best"] == [
        (1, "best-epoch1-val_accuracy=0.5000.pt"), (2, "best-epoch2-val_accuracy=0.9000.pt"),
        (3, "best-epoch3-val_accuracy=0.7000.pt"), (4, "best-epoch4-val_accuracy=0.9500.pt")]


def test_a_non_finite_state_is_never_written(tmp_path):
    saver = AtomicDiskSaver(tmp_path)
    saver({"model": {"w": torch.ones(3)}}, "last.pt")
    with pytest.raises(NonFiniteCheckpointError, match="model.w"):
        saver({"model": {"w": torch.tensor([1.0, float("nan"), 2.0])}}, "last.pt")
    assert torch.equal(torch.load(tmp_path / "last.pt", weights_only=True)["model"]["w"], torch.ones(3))

    trainer, model, checkpointer, data = _trainer(tmp_path / "run", every_iterations=1, every_minutes=0, keep_best=0)

    @trainer.on(Events.ITERATION_COMPLETED(once=3))
    def poison(engine):
        with torch.no_grad():
            model.weight[0, 0] = float("nan")

    trainer.run(data, max_epochs=1)
    saved = torch.load(checkpointer.last_path, weights_only=True)
    assert saved["trainer"]["iteration"] == 3  # saved before the poison (attached later); 4 and 5 refused
    assert all(torch.isfinite(t).all() for t in saved["model"].values())
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert any(e["event"] == "checkpoint_refused" and "model.weight" in e["reason"] for e in events)


def test_removal_waits_until_the_new_file_is_written(tmp_path):
    saver = AtomicDiskSaver(tmp_path)
    saver({"x": torch.zeros(1)}, "best-1.pt")
    saver.remove("best-1.pt")
    assert (tmp_path / "best-1.pt").exists(), "the old file must outlive the remove() call"
    saver({"x": torch.ones(1)}, "best-2.pt")
    assert not (tmp_path / "best-1.pt").exists() and (tmp_path / "best-2.pt").exists()
    assert not list(tmp_path.glob(".*.tmp"))


WRITER = textwrap.dedent("""
    import sys, torch
    from callbacks.atomic_saver import AtomicDiskSaver
    saver = AtomicDiskSaver(sys.argv[1])
    i = 0
    while True:
        i += 1
        saver({"model": {"w": torch.full((4_000_000,), float(i))}, "count": i}, "last.pt")
        print(i, flush=True)
""")


def test_a_kill_during_a_write_always_leaves_a_loadable_last_checkpoint(tmp_path):
    """SIGKILL a process that writes 16 MB checkpoints back to back, many times, at varied moments."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    repo = Path(__file__).resolve().parents[2]
    last_count = 0
    for attempt in range(5):
        proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "ckpt")], cwd=repo,
                                stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # at least one complete checkpoint exists
        time.sleep(0.032 * attempt)  # land the kill at a different point of the write each time
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        checkpoint = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)
        count = checkpoint["count"]
        assert torch.equal(checkpoint["model"]["w"], torch.full((4_000_000,), float(count)))
        assert count >= 1
        last_count = max(last_count, count)
    assert last_count >= 1
