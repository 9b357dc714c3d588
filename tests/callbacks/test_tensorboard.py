"""TensorBoard: scalars that TensorBoard's own reader finds, at x = the trainer's iteration."""
from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events
from ignite.metrics import Accuracy, Loss
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from callbacks import AMP, GradClip, TensorBoard, Validation
from engine import EpochEvents, create_evaluator, create_trainer
from tests.conftest import tmpfs


def _scalars(log_dir):
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def _trainer(model, batches, precision="fp32"):
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy, precision=precision)
    AMP(device="cpu").attach(trainer)
    GradClip(model.parameters(), max_norm=1.0).attach(trainer)
    evaluator = create_evaluator(model, {"accuracy": Accuracy(), "loss": Loss(torch.nn.CrossEntropyLoss())})
    Validation(evaluator, batches[:2]).attach(trainer)
    return trainer


def test_training_and_epoch_scalars(make_model, batches, tmp_path):
    trainer = _trainer(make_model(), batches)
    tb = TensorBoard(tmp_path, every=2)
    tb.attach(trainer)
    steps, epochs = {}, {}
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: steps.__setitem__(
        e.state.iteration, (e.state.loss.item(), e.state.lr, e.state.grad_norm.item())))
    trainer.add_event_handler(EpochEvents.VALIDATION_COMPLETED, lambda e: epochs.__setitem__(
        e.state.iteration, dict(e.state.metrics)))
    trainer.run(batches, max_epochs=2)
    tb.close()

    scalars = _scalars(tmp_path)
    for tag in ("train/loss", "train/lr", "train/grad_norm", "val/loss", "val/accuracy",
                "epoch/train_loss", "epoch/images_per_second", "epoch/lr"):
        assert tag in scalars, tag
    assert "train/loss_scale" not in scalars  # fp32
    assert [step for step, _ in scalars["train/loss"]] == [2, 4, 6, 8]
    for index, tag in enumerate(("train/loss", "train/lr", "train/grad_norm")):
        for step, value in scalars[tag]:
            assert value == pytest.approx(steps[step][index], rel=1e-6)
    assert [step for step, _ in scalars["val/accuracy"]] == [4, 8]
    for step, value in scalars["val/accuracy"]:
        assert value == pytest.approx(epochs[step]["val_accuracy"])
    for step, value in scalars["val/loss"]:
        assert value == pytest.approx(epochs[step]["val_loss"], rel=1e-6)
    for step, value in scalars["epoch/train_loss"]:
        assert value == pytest.approx(epochs[step]["train_loss"], rel=1e-6)
    assert all(value > 0 for _, value in scalars["epoch/images_per_second"])


def test_fp16_writes_the_loss_scale(make_model, batches, tmp_path):
    trainer = _trainer(make_model(), batches, precision="fp16")
    tb = TensorBoard(tmp_path, every=1)
    tb.attach(trainer)
    trainer.run(batches, max_epochs=1)
    tb.close()
    assert _scalars(tmp_path)["train/loss_scale"] == [(i, 65536.0) for i in range(1, 5)]


def test_every_point_up_to_a_checkpoint_is_on_disk_when_it_is_written(make_model, batches, tmp_path):
    """Points are flushed every flush_seconds, and before each checkpoint (whatever the handlers' order),
    so a run killed after a checkpoint keeps every point up to it; tensorboardX's own flush leaves its
    queue behind."""
    from callbacks import Checkpointer

    model = make_model()
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy)
    Checkpointer(tmp_path / "checkpoints", {"model": model}, every_iterations=2).attach(trainer)  # before TB
    tb = TensorBoard(tmp_path / "tb", every=1, flush_seconds=3600)
    tb.attach(trainer)
    on_disk = {}
    trainer.add_event_handler(Events.ITERATION_COMPLETED(every=2), lambda e: on_disk.__setitem__(
        e.state.iteration, [step for step, _ in _scalars(tmp_path / "tb").get("train/loss", [])]))
    trainer.run(batches[:3], max_epochs=1)
    assert on_disk[2] == [1, 2]  # the checkpoint at 2 came before TB's handler: its point was written first
    tb.close()
    assert [step for step, _ in _scalars(tmp_path / "tb")["train/loss"]] == [1, 2, 3]


def test_the_file_is_readable_before_close(make_model, batches, tmp_path):
    trainer = _trainer(make_model(), batches)
    tb = TensorBoard(tmp_path, every=1)
    tb.attach(trainer)
    trainer.run(batches, max_epochs=1)  # flushed after each validation and at the end of the run
    assert len(_scalars(tmp_path)["train/loss"]) == 4
    tb.close()


def test_purge_step_drops_the_points_a_resumed_run_rewrites(tmp_path):
    first = TensorBoard(tmp_path, every=1)
    for step in range(1, 11):
        first.logger.writer.add_scalar("train/loss", 1.0, step)
    first.close()
    time.sleep(1.05)  # tensorboardX names event files by the second: a later process gets its own file
    resumed = TensorBoard(tmp_path, every=1, purge_step=7)
    for step in range(7, 13):
        resumed.logger.writer.add_scalar("train/loss", 2.0, step)
    resumed.close()
    assert _scalars(tmp_path)["train/loss"] == [(s, 1.0) for s in range(1, 7)] + [(s, 2.0) for s in range(7, 13)]


def test_every_must_be_positive(tmp_path):
    with pytest.raises(ValueError):
        TensorBoard(tmp_path, every=0)


FULL_DISK_SCRIPT = """
import os, sys
from callbacks import TensorBoard
from callbacks.files import os_error_line
disk = sys.argv[1]
tb = TensorBoard(os.path.join(disk, "tb"), hparams={"train.epochs": 1})
tb.logger.writer.add_scalar("train/loss", 1.0, 1)
fd = os.open(os.path.join(disk, "filler"), os.O_WRONLY | os.O_CREAT)
try:
    while True:
        os.write(fd, bytes(65536))
except OSError:
    pass
for step in range(2, 40):  # more events than tensorboardX's queue holds: its thread must not be dead and full
    tb.logger.writer.add_scalar("train/loss", 1.0, step)
try:
    tb._flush()
except OSError as e:
    print(os_error_line(e))
for step in range(40, 80):  # a writer that failed takes no more events, and never blocks
    tb.logger.writer.add_scalar("train/loss", 1.0, step)
tb.close()  # nothing more is written: no second error
print("closed")
"""


def test_a_full_disk_is_one_error_naming_the_folder_then_silence(tmp_path):
    """tensorboardX writes from a thread and retries at exit: after a failed write, kiln's handler raises one
    OSError naming log_dir and shuts the writer down, so no traceback comes later from its thread or exit hook."""
    import subprocess
    import sys
    from pathlib import Path

    with tmpfs(tmp_path / "disk", "1m") as disk:
        result = subprocess.run([sys.executable, "-c", FULL_DISK_SCRIPT, str(disk)], capture_output=True, text=True,
                                timeout=120, cwd=Path(__file__).resolve().parents[2], check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"no space left on device: {disk / 'tb'}", "closed"]
    assert result.stderr == ""


def test_train_accuracy_of_the_logged_batch_and_the_config_as_text(make_model, batches, tmp_path):
    trainer = _trainer(make_model(), batches)
    tb = TensorBoard(tmp_path, every=2, config_text="train:\n  epochs: 2\n")
    tb.attach(trainer)
    expected = {}
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: expected.__setitem__(
        e.state.iteration, (e.state.output.y_pred.argmax(1) == e.state.output.y).float().mean().item()))
    trainer.run(batches, max_epochs=2)
    tb.close()
    scalars = _scalars(tmp_path)
    assert [step for step, _ in scalars["train/accuracy"]] == [2, 4, 6, 8]
    for step, value in scalars["train/accuracy"]:
        assert value == pytest.approx(expected[step])
    accumulator = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    accumulator.Reload()
    (text,) = accumulator.Tensors("config/text_summary")
    assert "    epochs: 2" in text.tensor_proto.string_val[0].decode()


def test_the_validation_confusion_matrix_is_an_image_each_validation(make_model, batches, tmp_path):
    from ignite.metrics import ConfusionMatrix

    model = make_model()
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy)
    evaluator = create_evaluator(model, {"accuracy": Accuracy(), "confusion_matrix": ConfusionMatrix(3)})
    Validation(evaluator, batches[:2]).attach(trainer)
    tb = TensorBoard(tmp_path, every=2)
    tb.attach(trainer)
    matrices = []
    trainer.add_event_handler(EpochEvents.VALIDATION_COMPLETED, lambda e: matrices.append(
        e.state.metrics["val_confusion_matrix"].clone()))
    trainer.run(batches, max_epochs=2)
    tb.close()
    accumulator = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    accumulator.Reload()
    images = accumulator.Images("val/confusion_matrix")
    assert [image.step for image in images] == [4, 8]
    assert (images[0].width, images[0].height) == (3 * 12, 3 * 12)
    assert all(int(m.sum()) == sum(len(y) for _, y in batches[:2]) for m in matrices)
