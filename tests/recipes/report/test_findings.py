"""Findings: each condition is produced on a real run and found, with evidence and the next command; a clean run has none."""
from __future__ import annotations

import io
import json
import math

import pytest
import torch

from recipes.cli import main
from recipes.cli.options import resolve_config
from recipes.report import finish_run, format_findings, find_issues, load_run, write_report
from recipes.report.mistakes import measure_mistakes
from recipes.run import train

KINDS = {"divergence", "loss_spikes", "chance", "flip", "fp16_loss_scale", "clipping", "overfitting", "max_lr_vs_range_test"}


def _run(tmp_path_factory, recipe, *sets, **options):
    """Train in this process; return the run directory and what the run printed."""
    cfg = resolve_config(recipe, sets, **options)
    run_dir = tmp_path_factory.mktemp(recipe) / "run"
    stream = io.StringIO()
    train(cfg, run_dir, quiet=True, stream=stream)
    finish_run(run_dir, stream)
    return run_dir, stream.getvalue()


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _by_kind(run_dir):
    findings = find_issues(load_run(run_dir))
    assert len({f.kind for f in findings}) == len(findings)
    for f in findings:  # every finding is complete: evidence, why, and a command to run
        assert f.kind in KINDS and f.title and f.evidence and f.advice
        assert f.command.startswith("kiln train ")
    return {f.kind: f for f in findings}


def _options(command):
    """``--flag value`` and ``--set key=value`` pairs of a kiln command, as a dict."""
    words = command.split()[3:]
    pairs = {}
    for flag, value in zip(words[::2], words[1::2]):
        if flag == "--set":
            key, _, value = value.partition("=")
            pairs[key] = value
        else:
            pairs[flag] = value
    return pairs


@pytest.mark.parametrize("after, fires", [(0.83, False), (1.6, True), (None, True)])
def test_a_loss_spike_is_one_the_next_logged_loss_has_not_recovered_from(tmp_path, after, fires):
    """The default digits run in fp32 logs 0.85, 0.86, 0.89, 0.85, then one hard batch at 1.75, then 0.83:
    a blip, not progress undone. Still high at the next log (or the last one logged), it is a spike."""
    from recipes.report.rundata import RunData

    config = {"name": "digits", "data": {"dataset": "digits"}, "train": {"epochs": 1}, "schedule": {"max_lr": 0.01},
              "runtime": {"class_names": [str(i) for i in range(10)]}}
    losses = [0.85, 0.86, 0.89, 0.85, 1.75] + ([after] if after is not None else [])
    steps = [{"iteration": 10 * (i + 1), "loss": v, "lr": 0.01} for i, v in enumerate(losses)]
    metrics = [{"epoch": 1, "iteration": 10 * len(steps), "val_accuracy": 0.9, "train_loss": 0.9}]
    found = {f.kind: f for f in find_issues(RunData(tmp_path, config, metrics, steps, [], None, None))}
    assert ("loss_spikes" in found) is fires
    if fires:
        assert found["loss_spikes"].evidence == ["iteration 50: loss 1.75 = 2.0x the median of the logged values "
                                                 "before it (lr 0.01)"]


@pytest.mark.parametrize("accuracies, fires", [([0.217], True), ([0.30, 0.36], True), ([0.30, 0.40], False)])
def test_a_validation_accuracy_at_chance_is_a_finding(tmp_path, accuracies, fires):
    """3 classes: chance is 1/3; a best val_accuracy up to 1.1x that is no better than a guess."""
    from recipes.report.rundata import RunData

    config = {"name": "synthetic", "data": {"dataset": "synthetic", "num_classes": 3}, "train": {"epochs": 1},
              "runtime": {"class_names": ["a", "b", "c"]}}
    metrics = [{"epoch": e, "iteration": e, "val_accuracy": a, "train_loss": 1.0} for e, a in enumerate(accuracies, 1)]
    run = RunData(tmp_path, config, metrics, [], [], None, None)
    found = {f.kind: f for f in find_issues(run)}
    assert ("chance" in found) is fires
    if fires:
        f = found["chance"]
        assert f"best val_accuracy {max(accuracies):.3f}" in f.evidence[0] and "3 classes" in f.evidence[0]
        assert "too short to learn" in f.evidence[1]
        assert f.command.startswith("kiln train synthetic") and "--max-lr auto" in f.command
        assert "--epochs 10" in f.command


@pytest.mark.parametrize("final_accuracy, fires", [(0.985, True), (0.986, True), (0.994, False)])
def test_a_rising_val_loss_is_overfitting_only_when_the_accuracy_gains_nothing(tmp_path, final_accuracy, fires):
    """The digits recipe's own shape in bf16: val loss lowest at epoch 4, 29% above it at epoch 10, the train loss
    still falling. With the accuracy still climbing, stopping at epoch 4 (the finding's advice) would cost it."""
    from recipes.report.rundata import RunData

    config = {"name": "digits", "data": {"dataset": "digits", "num_classes": 10, "augment": "crop"},
              "train": {"epochs": 10, "label_smoothing": 0.1}, "optim": {"weight_decay": 0.05}}
    val_loss = [0.43, 0.38, 0.25, 0.117, 0.177, 0.194, 0.162, 0.156, 0.158, 0.151]
    accuracy = [0.91, 0.85, 0.94, 0.986, 0.989, 0.994, 0.997, 0.994, 0.994, final_accuracy]
    metrics = [{"epoch": e, "iteration": 23 * e, "train_loss": 1.06 - 0.054 * e, "val_loss": v, "val_accuracy": a}
               for e, (v, a) in enumerate(zip(val_loss, accuracy), 1)]
    found = {f.kind: f for f in find_issues(RunData(tmp_path, config, metrics, [], [], None, None))}
    assert ("overfitting" in found) is fires
    if fires:
        assert found["overfitting"].evidence[0].startswith("val loss rose 29% from its best 0.117 (epoch 4)")


@pytest.mark.parametrize("augment, fires", [("crop+flip", True), ("crop", False)])
def test_flips_on_digits_are_a_finding_that_says_train_without_them(tmp_path_factory, augment, fires):
    """The end-of-run pass probes whether mirrored images keep their class only for a run trained with flips."""
    run_dir, _ = _run(tmp_path_factory, "digits", f"data.augment={augment}", "train.epochs=1")
    measure_mistakes(run_dir)
    probe = json.loads((run_dir / "mistakes.json").read_text()).get("flip_probe")
    found = _by_kind(run_dir)
    assert ("flip" in found) is fires and (probe is not None) is fires
    if fires:
        f = found["flip"]
        assert f"{probe['accuracy']:.3f}" in f.evidence[1] and f"{probe['flipped_accuracy']:.3f}" in f.evidence[1]
        assert _options(f.command) == {"--epochs": "1", "data.augment": "crop"}, f.command
        assert "[flip] horizontal flips change what these images show" in format_findings(list(found.values()))
        # a mistakes.json from before the probe existed is measured again, though the checkpoint is older
        path = run_dir / "mistakes.json"
        path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "flip_probe"}))
        measure_mistakes(run_dir)
        assert json.loads(path.read_text())["flip_probe"] == probe


@pytest.mark.slow
def test_a_clean_default_run_has_no_findings(tmp_path_factory):
    run_dir, printed = _run(tmp_path_factory, "digits")
    assert _by_kind(run_dir) == {}
    assert "kiln noticed nothing to fix" in printed
    assert json.loads((run_dir / "summary.json").read_text())["best_val_accuracy"] >= 0.97


def test_clipping_so_tight_that_eps_shrinks_adamws_steps(tmp_path_factory):
    run_dir, printed = _run(tmp_path_factory, "digits", clip_norm=1e-7, epochs=3)
    finding = _by_kind(run_dir)["clipping"]
    norms = [s["grad_norm"] for s in _lines(run_dir / "steps.jsonl") if s.get("grad_norm") is not None]
    clipped = sum(n > 1e-7 for n in norms)
    assert clipped / len(norms) > 0.5
    assert f"on {clipped} of {len(norms)} logged steps" in finding.evidence[0]
    parameters = json.loads((run_dir / "config.json").read_text())["runtime"]["parameters"]
    assert f"over {parameters:,} parameters" in finding.evidence[1]
    left = float(finding.evidence[1].rsplit("about ", 1)[1].split("%")[0]) / 100
    assert left == pytest.approx(_adamw_step_left(1e-7, parameters), abs=0.01)  # what a real AdamW step does
    suggested = float(_options(finding.command)["--clip-norm"])
    assert _adamw_step_left(suggested, parameters) > 0.95  # the suggested threshold leaves the steps whole


def _adamw_step_left(clip_norm, parameters):
    """How much of its unclipped size a real AdamW step keeps when a gradient of norm 1 is clipped to
    clip_norm (first step: the update is lr * g / (|g| + eps) per element)."""
    g = torch.randn(parameters, generator=torch.Generator().manual_seed(0))
    g /= g.norm()
    steps = []
    for scale in (1.0, min(1.0, clip_norm)):
        w = torch.zeros(parameters, requires_grad=True)
        opt = torch.optim.AdamW([w], lr=1.0, weight_decay=0.0, eps=1e-8)
        w.grad = g * scale
        opt.step()
        steps.append(float(w.detach().abs().mean()))
    return steps[1] / steps[0]


@pytest.mark.parametrize("recipe, epochs", [("digits", 3), ("synthetic", None), ("synthetic", 3)])
def test_recipe_defaults_pass_their_own_findings(tmp_path_factory, recipe, epochs):
    """A recipe's defaults (digits clips at 1.0, below most of its gradient norms: harmless under AdamW) end
    with no finding, also when the schedule is shortened to 3 epochs."""
    run_dir, printed = _run(tmp_path_factory, recipe, **({"epochs": epochs} if epochs else {}))
    assert _by_kind(run_dir) == {}
    assert "kiln noticed nothing to fix" in printed


@pytest.fixture(scope="module")
def high_lr_run(tmp_path_factory):
    return _run(tmp_path_factory, "digits", max_lr=1.0, epochs=3)[0]


def test_a_max_lr_of_1_gives_loss_spikes_or_divergence(high_lr_run):
    findings = _by_kind(high_lr_run)
    found = findings.get("divergence") or findings.get("loss_spikes")
    assert found is not None, findings
    assert _options(found.command)["--max-lr"] == "auto"
    assert _options(found.command)["--epochs"] == "3"  # the run's own overrides are kept
    chance = math.log(10)
    epochs = _lines(high_lr_run / "metrics.jsonl")
    assert max(m["train_loss"] for m in epochs) > 2 * chance or max(m["val_loss"] for m in epochs) > 2 * chance


def test_max_lr_far_from_the_range_test_suggestion(high_lr_run, capsys):
    assert "max_lr_vs_range_test" not in _by_kind(high_lr_run)  # no range test yet: nothing to compare
    with pytest.raises(SystemExit) as exit_:
        main(["lr-find", str(high_lr_run)])  # a RUN_DIR: the results go into it
    assert exit_.value.code == 0
    suggestion = json.loads((high_lr_run / "lr_find.json").read_text())["suggestion"]
    assert 1.0 / suggestion > 4
    report = write_report(high_lr_run)
    finding = {f.kind: f for f in report.findings}["max_lr_vs_range_test"]
    assert f"{1.0 / suggestion:.3g}x the range test's suggestion" in finding.evidence[0]
    assert float(_options(finding.command)["--max-lr"]) == pytest.approx(suggestion, rel=0.05)
    html = report.html_path.read_text()
    assert 'data-kind="max_lr_vs_range_test"' in html and 'id="lr-find"' in html


@pytest.mark.slow
def test_overfitting_without_augmentation_or_regularisation(tmp_path_factory):
    run_dir, _ = _run(tmp_path_factory, "digits", epochs=12, label_smoothing=0.0, weight_decay=0.0)
    finding = _by_kind(run_dir)["overfitting"]
    last = _lines(run_dir / "metrics.jsonl")[-1]
    assert last["train_loss"] < 0.1 * last["val_loss"]
    options = _options(finding.command)
    assert options["data.augment"] == "crop" and float(options["--label-smoothing"]) > 0
    assert float(options["--weight-decay"]) > 0


def _fp16(tmp_path_factory, *sets):
    small = ("data.samples=640", "data.image_size=16", "model.channels=8,16")
    return _run(tmp_path_factory, "synthetic", *small, *sets, precision="fp16", epochs=2)[0]


def test_fp16_a_too_high_init_scale_skips_the_first_steps(tmp_path_factory):
    run_dir = _fp16(tmp_path_factory, f"train.init_scale={2.0 ** 24}")
    finding = _by_kind(run_dir)["fp16_loss_scale"]
    epochs = _lines(run_dir / "metrics.jsonl")
    skipped, steps = epochs[-1]["skipped_steps"], epochs[-1]["iteration"]
    assert f"{skipped} of {steps} optimizer steps skipped" in finding.evidence[0]
    assert "init_scale" in finding.advice
    assert float(_options(finding.command)["train.init_scale"]) == epochs[-1]["loss_scale"]


def test_fp16_a_short_growth_interval_skips_all_along(tmp_path_factory):
    run_dir = _fp16(tmp_path_factory, "train.growth_interval=1")
    finding = _by_kind(run_dir)["fp16_loss_scale"]
    assert "growth_interval" in finding.advice
    assert int(_options(finding.command)["train.growth_interval"]) > 1


def test_fp16_with_default_scaling_has_no_loss_scale_finding(tmp_path_factory):
    run_dir = _fp16(tmp_path_factory)
    assert "fp16_loss_scale" not in _by_kind(run_dir)


def test_console_lists_each_finding_with_evidence_and_next_command(high_lr_run):
    findings = find_issues(load_run(high_lr_run))
    text = format_findings(findings)
    assert text.startswith(f"kiln noticed {len(findings)} thing")
    for f in findings:
        assert f"[{f.kind}] {f.title}" in text and f"next: {f.command}" in text
        assert all(f"- {e}" in text for e in f.evidence)
