"""Fine-tuning: the pretrained body frozen while the new head learns, then everything on a second one-cycle with
the body at ``finetune.body_lr_factor`` of the head's LR; on by default when ``--weights`` replaced the head; exact
resume before, at and after the unfreeze."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from ignite.engine import Events

from engine import StepEvents
from recipes import get_recipe
from recipes.config import ConfigError, apply_overrides
from recipes.models import build_model, head_parameters
from recipes.run import build, execute
from recipes.run.parts import training_parts
from recipes.run.rundir import read_jsonl
from recipes.tools.schedule import schedule_series
from tests.runs import FAST, assert_same_run, kiln, shared_run, start, wait_for_iteration

FINE_TUNE = ["--set", "finetune.freeze_epochs=1"]


def _config(**overrides):
    return apply_overrides(get_recipe("digits"), {"train.epochs": 2, "data.image_size": 16, "train.log_every": 1,
                                                   "finetune.freeze_epochs": 1, **overrides})


def test_the_body_waits_while_the_head_learns_then_trains_slower_on_a_second_cycle(tmp_path):
    run = build(_config(), tmp_path / "run", quiet=True)
    model, optimizer, trainer = run.model, run.optimizer, run.trainer
    head = {id(p) for p in head_parameters(model)}
    body = [(n, p) for n, p in model.named_parameters() if id(p) not in head]
    conv = next(p for n, p in body if p.ndim == 4)  # a frozen body weight
    norm = next(p for n, p in body if p.ndim == 1 and "weight" in n)  # a norm layer's weight: trains (train_bn)
    start_conv, start_norm = conv.detach().clone(), norm.detach().clone()
    start_head = head_parameters(model)[0].detach().clone()
    after_epoch, lrs = {}, {"head": [], "body": []}
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: after_epoch.__setitem__(
        e.state.epoch, (conv.detach().clone(), norm.detach().clone(), head_parameters(model)[0].detach().clone())))

    def _lrs(engine) -> None:
        for group in optimizer.param_groups:
            lrs[group["name"]].append((engine.state.iteration, group["lr"]))
    trainer.add_event_handler(StepEvents.BEFORE_OPTIMIZER_STEP, _lrs)
    execute(run)

    epoch_length = trainer.state.epoch_length
    conv1, norm1, head1 = after_epoch[1]
    assert torch.equal(conv1, start_conv), "the frozen body trained in phase 1"
    assert not torch.equal(norm1, start_norm) and not torch.equal(head1, start_head)
    assert not torch.equal(after_epoch[2][0], conv1) and conv.requires_grad
    head_lr = {it: lr for it, lr in lrs["head"]}
    body_lr = {it: lr for it, lr in lrs["body"]}
    phase1, phase2 = range(1, epoch_length + 1), range(epoch_length + 1, 2 * epoch_length + 1)
    cfg = run.config
    assert max(head_lr[i] for i in phase1) == pytest.approx(cfg.schedule.max_lr, rel=0.01)  # a whole cycle in phase 1
    assert head_lr[epoch_length + 1] == pytest.approx(cfg.schedule.max_lr / cfg.div_factor)  # a new cycle starts
    assert max(head_lr[i] for i in phase2) == pytest.approx(cfg.schedule.max_lr, rel=0.01)
    assert all(body_lr[i] == pytest.approx(cfg.finetune.body_lr_factor * head_lr[i]) for i in phase2)
    assert cfg.finetune.body_lr_factor < 1  # the body does train slower
    preview = schedule_series(cfg, batches=epoch_length)  # kiln schedule draws what the run did, both cycles
    assert preview.unfreeze_step == epoch_length + 1 and len(preview.phases) == 4
    assert preview.lr == pytest.approx([head_lr[i] for i in range(1, 2 * epoch_length + 1)], rel=1e-12)


def test_a_rollback_to_before_the_unfreeze_starts_the_second_cycle_again_at_the_lowered_lr(tmp_path):
    """NanGuard's last sound state at the unfreeze is the epoch end before it: rolling back there brings back the
    first cycle's spent schedule, and phase 2 would crawl at its final LR (about max_lr / 1e5) to the end."""
    cfg = _config(**{"train.epochs": 3, "guard.on_nan": "rollback", "guard.check_every": 5})
    run = build(cfg, tmp_path / "run", quiet=True)
    model, optimizer, trainer = run.model, run.optimizer, run.trainer
    head = {id(p) for p in head_parameters(model)}
    conv = next(p for p in model.parameters() if id(p) not in head and p.ndim == 4)  # a body weight
    lrs, body_after_rollback = {}, {}
    trainer.add_event_handler(StepEvents.BEFORE_OPTIMIZER_STEP, lambda e: lrs.__setitem__(
        e.state.iteration, {g["name"]: g["lr"] for g in optimizer.param_groups}))

    @trainer.on(Events.ITERATION_STARTED)
    def _poison_after_the_unfreeze(engine):
        if engine.state.iteration == engine.state.epoch_length + 2:
            with torch.no_grad():
                head_parameters(model)[0].view(-1)[0] = float("nan")
        if engine.state.iteration == engine.state.epoch_length + 3:
            body_after_rollback["conv"] = conv.detach().clone()
    execute(run)

    n = trainer.state.epoch_length
    [rollback] = [record for record in read_jsonl(run.events_path) if record["event"] == "rollback"]
    assert (rollback["iteration"], rollback["restored_iteration"]) == (n + 2, n)  # back across the unfreeze
    assert run.status == "completed" and conv.requires_grad
    restarted = range(n + 3, 3 * n + 1)  # a new second cycle at half the peak, the body at its factor of it
    peak = cfg.schedule.max_lr * cfg.guard.lr_factor
    assert lrs[n + 3]["head"] == pytest.approx(peak / cfg.div_factor)
    assert max(lrs[i]["head"] for i in restarted) == pytest.approx(peak, rel=0.01)
    assert max(lrs[i]["body"] for i in restarted) == pytest.approx(peak * cfg.finetune.body_lr_factor, rel=0.01)
    assert not torch.equal(conv, body_after_rollback["conv"])  # and the body trains on


def test_the_range_test_of_a_fine_tune_loads_the_weights_and_trains_the_head_alone(tmp_path):
    path = tmp_path / "weights.pt"
    weights = build_model("small_cnn", 1, 5, 16, (32, 64, 128)).state_dict()
    torch.save(weights, path)
    parts = training_parts(_config(**{"finetune.freeze_epochs": -1, "model.weights": str(path)}))
    trained = [n for n, p in parts.model.named_parameters() if any(p is q for g in parts.optimizer.param_groups
                                                                   for q in g["params"])]
    head = {id(p) for p in head_parameters(parts.model)}
    assert all(id(dict(parts.model.named_parameters())[n]) in head or dict(parts.model.named_parameters())[n].ndim == 1
               for n in trained)  # the head and the norm layers' weights (train_bn), nothing else
    conv = next(n for n, p in parts.model.named_parameters() if p.ndim == 4)
    assert torch.equal(parts.model.state_dict()[conv], weights[conv])  # from the weights, as the run starts


def test_auto_freezes_one_epoch_only_when_the_weights_head_is_replaced(tmp_path):
    def freeze_epochs(weights_classes: int | None) -> int:
        sets = {"finetune.freeze_epochs": -1}
        if weights_classes is not None:
            path = tmp_path / f"weights-{weights_classes}.pt"
            torch.save(build_model("small_cnn", 1, weights_classes, 16, (32, 64, 128)).state_dict(), path)
            sets["model.weights"] = str(path)
        run = build(_config(**sets), tmp_path / f"run-{weights_classes}", quiet=True)
        return run.config.finetune.freeze_epochs

    assert freeze_epochs(None) == 0  # from scratch: nothing to freeze
    assert freeze_epochs(10) == 0  # the whole network loads as it was (digits has 10 classes)
    assert freeze_epochs(5) == 1  # a new head for the data's 10 classes


def test_freezing_every_epoch_is_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"finetune.freeze_epochs \(2\) must be less than train.epochs \(2\)"):
        build(_config(**{"finetune.freeze_epochs": 2}), tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


@pytest.fixture
def reference(tmp_path_factory) -> Path:
    """The uninterrupted fine-tune every stopped-and-resumed one must equal."""
    def train(run_dir: Path) -> None:
        done = kiln("train", "digits", *FAST, *FINE_TUNE, "--out", run_dir)
        assert done.returncode == 0, done.stderr
    return shared_run(tmp_path_factory, "fast-digits-fine-tune", train)


@pytest.mark.slow
@pytest.mark.parametrize("stop_at", [10, 23, 30], ids=["frozen", "at-the-unfreeze", "unfrozen"])
def test_sigterm_before_at_and_after_the_unfreeze_resumes_bit_identically(tmp_path, reference, stop_at):
    run_dir = tmp_path / "run"
    proc = start("train", "digits", *FAST, *FINE_TUNE, "--out", str(run_dir))
    wait_for_iteration(run_dir, stop_at, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert json.loads((run_dir / "config.json").read_text())["finetune"]["freeze_epochs"] == 1
    resumed = kiln("resume", str(run_dir), "--quiet", "--no-report")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(run_dir, reference)
