"""Progress: one readable line per validated epoch (and a bar on terminals); quiet prints nothing."""
from __future__ import annotations

import io

import torch
import torch.nn.functional as F
from ignite.metrics import Accuracy, Loss

from callbacks import AMP, Progress, Validation
from callbacks.progress import format_epoch_line
from engine import EpochEvents, create_evaluator, create_trainer
from engine.records import epoch_record


def test_format_epoch_line_shows_the_records_figures():
    record = {"epoch": 3, "iteration": 30, "train_loss": 0.51234, "val_loss": 0.30111, "val_accuracy": 0.96213,
              "lr": 0.008123, "epoch_seconds": 3.21, "images_per_second": 1234.4}
    line = format_epoch_line(record, max_epochs=10)
    assert line.startswith("epoch  3/10")
    for part in ("train_loss 0.5123", "val_loss 0.3011", "val_accuracy 0.9621", "lr 8.12e-03", "3.2s", "1234 img/s"):
        assert part in line
    assert "loss_scale" not in line


def test_format_epoch_line_with_a_loss_scale_and_missing_figures():
    record = {"epoch": 1, "iteration": 5, "lr": 0.1, "epoch_seconds": 0.0, "images_per_second": None,
              "loss_scale": 32768.0, "skipped_steps": 2}
    line = format_epoch_line(record, max_epochs=None)
    assert line.startswith("epoch 1/?")
    assert "loss_scale 32768 skipped 2" in line
    assert "val_accuracy" not in line and "img/s" not in line


def _trainer(model, batches, precision="fp32"):
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy, precision=precision)
    AMP(device="cpu").attach(trainer)
    evaluator = create_evaluator(model, {"accuracy": Accuracy(), "loss": Loss(torch.nn.CrossEntropyLoss())})
    Validation(evaluator, batches[:1]).attach(trainer)
    return trainer


def test_one_line_per_validated_epoch(make_model, batches):
    trainer = _trainer(make_model(), batches, precision="fp16")
    stream = io.StringIO()
    Progress(stream=stream).attach(trainer)
    expected = []
    trainer.add_event_handler(EpochEvents.EPOCH_RECORDED,
                              lambda e: expected.append(format_epoch_line(epoch_record(e.state), 3)))
    trainer.run(batches, max_epochs=3)
    lines = stream.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"]
    for line, wanted in zip(lines, expected):  # the same figures (the timing differs by the logger's own time)
        assert line.split("  ")[:6] == wanted.split("  ")[:6]
        assert "val_accuracy" in line and "loss_scale 65536" in line


def test_quiet_prints_nothing_and_attaches_nothing(make_model, batches, capsys):
    trainer = _trainer(make_model(), batches)
    assert Progress(quiet=True).attach(trainer) == []
    trainer.run(batches, max_epochs=1)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_the_bar_draws_on_a_terminal_and_is_not_attached_elsewhere(make_model, batches, monkeypatch):
    """On a pseudo-terminal the bar draws (its loss shows); on a pipe there is no bar, only the clock of the
    plain progress lines."""
    import fcntl
    import os
    import struct
    import termios

    from ignite.engine import Events

    def iteration_handlers(trainer):
        return len(trainer._event_handlers.get(Events.ITERATION_COMPLETED, []))

    def bar_handlers(trainer):  # ignite's bar: an _OutputHandler on ITERATION_COMPLETED
        return [h for h, _, _ in trainer._event_handlers.get(Events.ITERATION_COMPLETED, [])
                if type(getattr(h, "__wrapped__", h)).__name__ == "_OutputHandler"]

    trainer = _trainer(make_model(), batches)
    before = iteration_handlers(trainer)
    read_end, write_end = os.pipe()
    with os.fdopen(write_end, "w") as pipe:
        monkeypatch.setattr("sys.stderr", pipe)
        Progress(stream=io.StringIO(), line_seconds=0).attach(trainer)
        assert iteration_handlers(trainer) == before  # without progress lines: only the epoch line
        trainer = _trainer(make_model(), batches)
        Progress(stream=io.StringIO()).attach(trainer)
        assert iteration_handlers(trainer) == before + 1 and not bar_handlers(trainer)  # the lines' clock
    os.close(read_end)

    trainer = _trainer(make_model(), batches)
    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0x0: nothing fits
    with os.fdopen(follower, "w") as terminal:
        monkeypatch.setattr("sys.stderr", terminal)
        Progress(stream=io.StringIO()).attach(trainer)
        assert bar_handlers(trainer)
        trainer.run(batches, max_epochs=1)
        terminal.flush()
        drawn = os.read(leader, 65536).decode(errors="replace")
    os.close(leader)
    assert "loss=" in drawn


def test_progress_lines_show_each_named_groups_lr(make_model, batches):
    """A fine-tune's head and body train at two LRs: the lines inside an epoch show both."""
    model = make_model()
    params = list(model.parameters())
    optimizer = torch.optim.SGD([{"params": params[-2:], "name": "head", "lr": 0.1},
                                 {"params": params[:-2], "name": "body", "lr": 0.01}], lr=0.1)
    trainer = create_trainer(model, optimizer, F.cross_entropy)
    stream = io.StringIO()
    Progress(stream=stream, line_seconds=1e-9).attach(trainer)
    trainer.run(batches, max_epochs=1)
    lines = [line for line in stream.getvalue().splitlines() if "iteration" in line]
    assert len(lines) == len(batches) - 1 and all("  lr head 1.00e-01 body 1.00e-02  " in line for line in lines)
