"""The training techniques as recipe options: EMA, mixup/cutmix, early stopping, accumulation, channels_last, compile.

Each option reaches the config, the run assembly and its checkpoints; the end-to-end tests (slow) run
them through the real CLI and stop and resume a run that uses them.
"""
from __future__ import annotations

import json
import logging
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from ignite.engine import Events

from engine import create_trainer
from recipes import get_recipe
from recipes.cli import cli
from recipes.cli.options import resolve_config
from recipes.run.compiled import CompiledForward
from recipes.config import ConfigError, apply_overrides
from recipes.run import build, evaluate_checkpoint, execute, resume, write_config

TECHNIQUE_KEYS = ("ema_decay", "mixup_alpha", "cutmix_alpha", "early_stop_patience", "early_stop_min_delta",
                  "accumulation_steps", "channels_last", "compile", "compile_backend")


def tiny(**overrides):
    """The synthetic recipe at toy size: 128 training images of 3x8x8 in 8 batches, 32 for validation."""
    base = {"data.samples": 160, "data.image_size": 8, "data.batch_size": 16, "model.channels": "4,8",
            "train.epochs": 2, "train.device": "cpu", "checkpoint.every_minutes": 0, "train.log_every": 4}
    return apply_overrides(get_recipe("synthetic"), {**base, **overrides})


def _load(path):
    return torch.load(path, weights_only=True)


# --- config and CLI ---------------------------------------------------------------------------------

def test_every_technique_but_channels_last_is_off_by_default_and_set_by_its_cli_option():
    t = get_recipe("synthetic").train
    assert (t.ema_decay, t.mixup_alpha, t.cutmix_alpha, t.early_stop_patience, t.accumulation_steps,
            t.channels_last, t.compile, t.compile_backend) == (0.0, 0.0, 0.0, 0, 1, True, False, "inductor")
    cfg = resolve_config("synthetic", ("train.early_stop_min_delta=0.01", "train.compile_backend=aot_eager"),
                         ema=0.999, mixup=0.2, cutmix=1.0, early_stop=3, accumulation_steps=4,
                         channels_last=False, compile=True)
    t = cfg.train
    assert (t.ema_decay, t.mixup_alpha, t.cutmix_alpha, t.early_stop_patience, t.early_stop_min_delta,
            t.accumulation_steps, t.channels_last, t.compile, t.compile_backend) == (
        0.999, 0.2, 1.0, 3, 0.01, 4, False, True, "aot_eager")


@pytest.mark.parametrize("key, value", [("train.ema_decay", 1.0), ("train.ema_decay", -0.1), ("train.mixup_alpha", -1),
                                        ("train.cutmix_alpha", -0.5), ("train.early_stop_patience", -1),
                                        ("train.early_stop_min_delta", -0.01), ("train.compile_backend", " ")])
def test_a_bad_value_is_a_one_line_config_error(key, value):
    with pytest.raises(ConfigError, match=key) as error:
        apply_overrides(get_recipe("synthetic"), {key: value})
    assert "\n" not in str(error.value)


# --- EMA ----------------------------------------------------------------------------------------------

def test_ema_is_validated_checkpointed_and_preferred_by_eval(tmp_path):
    run = build(tiny(**{"train.ema_decay": 0.9}), tmp_path / "run", quiet=True)
    ema = run.handlers["ema"]
    assert run.evaluator is run.handlers["validation"].evaluator
    assert {"ema", "ema_model"} <= run.to_save().keys()
    execute(run)
    assert run.status == "completed" and ema.updates == 16

    last = _load(tmp_path / "run" / "checkpoints" / "last.pt")
    assert last["ema"] == {"updates": 16, "decay": 0.9}
    assert last["ema_model"].keys() == last["model"].keys()  # plain model keys: loadable into the recipe's model
    assert not torch.equal(last["ema_model"]["0.weight"], last["model"]["0.weight"])
    best = next((tmp_path / "run" / "checkpoints").glob("best-*.pt"))
    assert "ema_model" in _load(best)  # ranked by the EMA's val_accuracy, so it holds the EMA weights

    result = evaluate_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert result["weights"] == "ema"
    # the last validation ran on the EMA weights: `kiln eval` of last.pt measures the same thing
    assert result["loss"] == pytest.approx(run.trainer.state.metrics["val_loss"], rel=1e-5)
    assert result["accuracy"] == pytest.approx(run.trainer.state.metrics["val_accuracy"])


def test_a_nan_guard_rollback_restores_the_average_too(tmp_path):
    run = build(tiny(**{"train.ema_decay": 0.9}), tmp_path / "run", quiet=True)
    assert run.handlers["nan_guard"].to_snapshot["ema_model"] is run.handlers["ema"].ema_model


# --- early stopping ---------------------------------------------------------------------------------------

def test_an_early_stop_completes_the_run_and_resume_has_nothing_to_do(tmp_path):
    run_dir = tmp_path / "run"
    # a gain of 0.5 in val accuracy never comes: epoch 1 sets the best, epoch 2 fails to beat it
    run = build(tiny(**{"train.epochs": 4, "train.early_stop_patience": 1, "train.early_stop_min_delta": 0.5}),
                run_dir, quiet=True)
    write_config(run)
    execute(run)
    assert run.status == "completed" and run.trainer.state.epoch == 2
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["stopped_early"] is True and summary["stopped_epoch"] == 2
    assert summary["epochs_completed"] == 2 and "did not rise" in summary["reason"]
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events if e["event"] in ("early_stop", "interrupted")] == ["early_stop"]
    last = _load(run_dir / "checkpoints" / "last.pt")
    assert last["early_stop"]["stopped_epoch"] == 2 and last["trainer"]["iteration"] == 16

    again = resume(run_dir, quiet=True)
    assert again.status == "completed" and again.trainer.state.iteration == 0  # nothing was trained


# --- mixup / cutmix -----------------------------------------------------------------------------------------

def test_mixup_and_cutmix_train_on_soft_labels_and_validate_on_hard_ones(tmp_path):
    run = build(tiny(**{"train.mixup_alpha": 0.2, "train.cutmix_alpha": 1.0, "train.epochs": 1}), tmp_path / "run",
                quiet=True)
    labels = []
    run.trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: labels.append(e.state.batch[1]))
    execute(run)
    assert run.status == "completed" and len(labels) == 8
    assert all(y.shape == (16, 10) and y.dtype == torch.float32 for y in labels)
    metrics = run.trainer.state.metrics
    assert 0.0 <= metrics["val_accuracy"] <= 1.0 and metrics["train_loss"] > 0


# --- channels_last ------------------------------------------------------------------------------------------

def _channels_last(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def test_channels_last_step_uses_channels_last_weights_and_inputs_and_trains_alike(make_model, batches):
    def trained(memory_format):
        model = make_model().to(memory_format=memory_format)
        trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy,
                                 memory_format=memory_format)
        seen = []
        model[0].register_forward_pre_hook(lambda m, args: seen.append((_channels_last(args[0]),
                                                                         _channels_last(m.weight))))
        trainer.run(batches, max_epochs=2)
        return model, seen

    model_cl, seen_cl = trained(torch.channels_last)
    model_c, seen_c = trained(torch.contiguous_format)
    assert seen_cl == [(True, True)] * 8 and seen_c == [(False, False)] * 8
    for p, q in zip(model_cl.parameters(), model_c.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_channels_last_option_converts_the_model_and_both_engines(tmp_path):
    runs = {}
    for flag in (True, False):
        run = build(tiny(**{"train.channels_last": flag, "train.epochs": 1, "train.precision": "fp32"}),
                    tmp_path / str(flag), quiet=True)  # fp32: the two layouts' weights are compared to 1e-4
        seen = []
        run.model.register_forward_pre_hook(lambda m, args: seen.append(_channels_last(args[0])))
        execute(run)
        runs[flag] = (run, seen)
    run, seen = runs[True]
    conv = next(m for m in run.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert _channels_last(conv.weight)
    assert seen == [True] * len(seen) and len(seen) == 9  # 8 training batches and the validation batch
    assert runs[False][1] == [False] * 9
    contiguous = runs[False][0]
    for p, q in zip(run.model.parameters(), contiguous.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4)
    last = _load(tmp_path / "True" / "checkpoints" / "last.pt")
    assert last["model"].keys() == contiguous.model.state_dict().keys()


# --- compile --------------------------------------------------------------------------------------------------

def _losses(model, forward, batches, epochs=2):
    trainer = create_trainer(forward, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy, seed=0)
    losses = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.loss.item()))
    trainer.run(batches, max_epochs=epochs)
    return losses


def _eager_losses(model, batches, epochs=2):
    return _losses(model, model, batches, epochs)


def test_compiled_training_gives_the_losses_of_eager_training(make_model, batches):
    """The aot_eager backend (the graph capture and autograd of torch.compile, no code generation): ~2 s here."""
    eager = _eager_losses(make_model(), batches)
    model = make_model()
    forward = CompiledForward(model, backend="aot_eager")
    compiled = _losses(model, forward, batches)
    assert forward.compiled
    assert compiled == pytest.approx(eager, rel=1e-5)
    assert forward.state_dict().keys() == {f"module.{k}" for k in model.state_dict()}  # no _orig_mod. anywhere
    assert not any("_orig_mod" in k for k in model.state_dict())


def test_an_unknown_backend_falls_back_to_eager_with_one_warning(make_model, batches, caplog):
    eager = _eager_losses(make_model(), batches)
    model = make_model()
    with caplog.at_level(logging.WARNING, logger="kiln"):
        forward = CompiledForward(model, backend="no_such_backend")
        losses = _losses(model, forward, batches)
    warnings = [r.getMessage() for r in caplog.records if "torch.compile" in r.getMessage()]
    assert len(warnings) == 1 and "InvalidBackend" in warnings[0] and "training without it" in warnings[0]
    assert not forward.compiled and losses == eager


def test_a_compiler_failing_at_the_first_call_falls_back_to_eager(make_model, batches, caplog):
    def broken_backend(graph_module, example_inputs):
        raise RuntimeError("no C++ compiler here")

    eager = _eager_losses(make_model(), batches)
    model = make_model()
    with caplog.at_level(logging.WARNING, logger="kiln"):
        forward = CompiledForward(model, backend=broken_backend)
        assert forward.compiled  # torch.compile itself is lazy
        losses = _losses(model, forward, batches)
    warnings = [r.getMessage() for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert len(warnings) == 1 and "no C++ compiler here" in warnings[0]
    assert not forward.compiled and losses == eager


def test_the_compile_option_trains_the_original_module_and_checkpoints_its_keys(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="kiln"):
        run = build(tiny(**{"train.compile": True, "train.compile_backend": "no_such_backend", "train.epochs": 1}),
                    tmp_path / "run", quiet=True)
        execute(run)
    assert run.status == "completed"
    assert sum("torch.compile failed" in r.getMessage() for r in caplog.records) == 1
    last = _load(tmp_path / "run" / "checkpoints" / "last.pt")
    assert last["model"].keys() == run.model.state_dict().keys()


@pytest.mark.slow
def test_inductor_compiles_on_this_cpu_and_matches_eager(make_model, batches):
    """A real compile (inductor generates and builds C++; ~30-40 s cold on a busy 2-core machine)."""
    eager = _eager_losses(make_model(), batches)
    model = make_model()
    forward = CompiledForward(model, backend="inductor")
    compiled = _losses(model, forward, batches)
    assert forward.compiled, "inductor fell back to eager on this machine"
    assert compiled == pytest.approx(eager, rel=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the notice is about a machine without a GPU")
def test_inductor_on_a_machine_without_a_gpu_prints_nothing_about_cuda(tmp_path):
    """A CUDA build of torch with CUDA_HOME set logs "No CUDA runtime is found" when inductor builds C++ for
    the CPU, which needs no CUDA: kiln keeps that line off the user's screen (a fresh process: torch logs it
    once, when it first looks for CUDA)."""
    import os
    import subprocess
    import sys

    code = ("import torch; from recipes.run.compiled import CompiledForward; "
            "f = CompiledForward(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Softplus())); "
            "f(torch.ones(3, 2)); assert f.compiled")  # elementwise ops: inductor generates and builds C++
    env = {**os.environ, "CUDA_HOME": str(tmp_path), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}  # a cold build
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                          cwd=Path(__file__).resolve().parents[3])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "CUDA" not in done.stderr, done.stderr


# --- end to end through the CLI (slow) -------------------------------------------------------------------------

SYNTHETIC_TINY = ["--set", "data.samples=160", "--set", "data.image_size=8", "--set", "model.channels=4,8",
                  "--batch-size", "16", "--set", "train.log_every=1", "--quiet", "--no-report"]


@pytest.mark.slow
def test_every_option_runs_through_kiln_train_and_lands_in_config_json(tmp_path):
    from tests.runs import final_state, kiln

    run_dir = tmp_path / "run"
    done = kiln("train", "synthetic", *SYNTHETIC_TINY, "--epochs", "3", "--ema", "0.99", "--mixup", "0.2",
                "--cutmix", "1.0", "--early-stop", "5", "--accumulation-steps", "2", "--channels-last",
                "--compile", "--set", "train.compile_backend=aot_eager", "--out", str(run_dir))
    assert done.returncode == 0, done.stderr
    assert "torch.compile failed" not in done.stderr
    train = json.loads((run_dir / "config.json").read_text())["train"]
    assert {k: train[k] for k in TECHNIQUE_KEYS} == {
        "ema_decay": 0.99, "mixup_alpha": 0.2, "cutmix_alpha": 1.0, "early_stop_patience": 5,
        "early_stop_min_delta": 0.0, "accumulation_steps": 2, "channels_last": True, "compile": True,
        "compile_backend": "aot_eager"}
    state = final_state(run_dir)
    assert state["trainer"]["optimizer_step"] == 12  # 8 batches per epoch, 2 per step
    assert state["ema"]["updates"] == 12 and state["early_stop"]["stopped_epoch"] is None
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    evaluated = kiln("eval", str(run_dir / "checkpoints" / "last.pt"))
    assert evaluated.returncode == 0, evaluated.stderr


def test_no_channels_last_trains_in_nchw_and_says_so_in_config_json(tmp_path):
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "synthetic", *SYNTHETIC_TINY, "--epochs", "1", "--no-channels-last",
                                      "--out", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert json.loads((run_dir / "config.json").read_text())["train"]["channels_last"] is False
    conv_weight = next(v for k, v in _load(run_dir / "checkpoints" / "last.pt")["model"].items() if v.dim() == 4)
    assert conv_weight.is_contiguous() and not conv_weight.is_contiguous(memory_format=torch.channels_last)


# digits, 23 iterations an epoch: early stopping (no gain of 0.5 can come) ends the 4-epoch run after epoch 2
TECHNIQUES = ["--epochs", "4", "--set", "data.image_size=16", "--set", "train.log_every=1",
              "--set", "checkpoint.every_iterations=5", "--ema", "0.9", "--mixup", "0.2", "--cutmix", "1.0",
              "--early-stop", "1", "--set", "train.early_stop_min_delta=0.5", "--quiet", "--no-report"]


@pytest.fixture(scope="module")
def techniques_reference(tmp_path_factory):
    """The uninterrupted run with EMA, mixup/cutmix and early stopping."""
    from tests.runs import kiln

    reference = tmp_path_factory.mktemp("techniques") / "reference"
    done = kiln("train", "digits", *TECHNIQUES, "--out", str(reference))
    assert done.returncode == 0, done.stderr
    assert "stopped early after epoch 2 of 4" in done.stdout
    return reference


@pytest.mark.slow
@pytest.mark.parametrize("stop_at", [12, 30])
def test_sigterm_then_resume_with_ema_mixing_and_early_stop_is_bit_identical(tmp_path, techniques_reference, stop_at):
    from tests.runs import assert_same_run, final_state, kiln, start, wait_for_iteration

    reference = techniques_reference
    run_dir = tmp_path / "run"
    proc = start("train", "digits", *TECHNIQUES, "--out", str(run_dir))
    wait_for_iteration(run_dir, stop_at, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "stopped by SIGTERM" in out, err
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"
    resumed = kiln("resume", str(run_dir), "--quiet", "--no-report")
    assert resumed.returncode == 0, resumed.stderr

    assert_same_run(run_dir, reference)
    got, want = final_state(run_dir), final_state(reference)
    for name, tensor in want["ema_model"].items():
        assert torch.equal(got["ema_model"][name], tensor), f"ema_model.{name} differs"
    assert got["ema"] == want["ema"] and got["early_stop"] == want["early_stop"]
    assert got["early_stop"]["stopped_epoch"] == 2
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped_early"] is True and summary["epochs_completed"] == 2
