"""The LR range test: a sane suggestion with its rule, plots and records, and everything restored afterwards."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from recipes import get_recipe
from recipes.cli import cli, main
from recipes.config import ConfigError
from recipes.run.parts import training_parts
from recipes.tools.lr_find import LRFindResult, find_lr, lr_range_test
from recipes.lr_rule import centred_average, suggest_max_lr
from tests.runs import kiln


def _learnable(count=6, batch_size=16, seed=0):
    """Batches whose label is the channel with the largest mean: a task the tiny CNN can learn."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(count * batch_size, 3, 16, 16, generator=generator)
    y = x.mean(dim=(2, 3)).argmax(dim=1)
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]


def _snapshot(model, optimizer):
    return ({k: v.clone() for k, v in model.state_dict().items()}, _clone(optimizer.state_dict()))


def _clone(tree):
    if isinstance(tree, torch.Tensor):
        return tree.clone()
    if isinstance(tree, dict):
        return {k: _clone(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_clone(v) for v in tree]
    return tree


def _assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_model_optimizer_mode_and_rng_are_restored_bit_for_bit(make_model, precision):
    model = make_model(batch_norm=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    data = _learnable()
    x, y = data[0]
    F.cross_entropy(model(x), y).backward()  # a real optimizer state (moments, step) to restore
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.eval()
    weights, opt_state = _snapshot(model, optimizer)
    rng = torch.get_rng_state()

    result = lr_range_test(model, optimizer, F.cross_entropy, data, precision=precision, clip_norm=1.0, seed=3,
                           start_lr=1e-5, end_lr=10.0, num_iter=40)

    assert len(result.lrs) > 3  # it really trained
    _assert_same(weights, model.state_dict())  # parameters and BatchNorm statistics, bit for bit
    _assert_same(opt_state, optimizer.state_dict())  # moments, step counts and the LR
    assert not model.training
    assert torch.equal(rng, torch.get_rng_state())


def test_the_ramp_is_exponential_and_the_curve_is_centred_on_each_step():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    result = lr_range_test(model, optimizer, F.cross_entropy, _learnable(), start_lr=1e-4, end_lr=1.0, num_iter=30,
                           diverge_th=1e9)
    ratio = (1.0 / 1e-4) ** (1 / 30)
    steps = [b / a for a, b in zip(result.lrs, result.lrs[1:])]
    # every step multiplies the LR by the same factor (ignite's schedule holds its first value twice)
    assert all(s == pytest.approx(ratio, rel=1e-6) or s == pytest.approx(1.0) for s in steps)
    assert sum(s == pytest.approx(1.0) for s in steps) <= 1
    assert 1e-4 <= result.lrs[0] <= 1e-4 * ratio * 1.001 and result.lrs[-1] <= 1.0
    assert len(result.lrs) == len(result.losses) == len(result.smoothed) <= 30
    half = max(1, round(result.window * 30 / 4))  # 30 steps over 4 decades: the window's steps each side
    assert half == 1
    expected = [sum(result.losses[max(0, i - half): i + half + 1]) / len(result.losses[max(0, i - half): i + half + 1])
                for i in range(len(result.losses))]  # no lag: as many steps ahead as behind
    assert result.smoothed == pytest.approx(expected, rel=1e-9)
    assert not result.diverged


def test_the_centred_curve_finds_the_raw_minimum_where_an_ema_lags_behind_it():
    """The reason for the centred curve: on a noisy valley, an EMA's lowest point trails the raw loss's by
    about 1/f steps (20 steps here, 0.6 decades on this ramp), the centred average's sits on it."""
    generator = torch.Generator().manual_seed(0)
    lrs = [10 ** (-6 + 6 * i / 199) for i in range(200)]
    true = [2.3 - 1.8 * math.exp(-((math.log10(lr) + 2.5) ** 2) / 0.5) for lr in lrs]  # lowest at 10^-2.5
    noisy = [v + 0.1 * float(torch.randn(1, generator=generator)) for v in true]
    ema = [noisy[0]]
    for v in noisy[1:]:
        ema.append(0.05 * v + 0.95 * ema[-1])
    at = 10 ** -2.5
    centred_min = suggest_max_lr(lrs, centred_average(lrs, noisy)).min_loss_lr
    ema_min = suggest_max_lr(lrs, ema).min_loss_lr
    assert 1 / 1.5 < centred_min / at < 1.5
    assert ema_min / at > 2  # to the right of the raw minimum: a suggestion over 2x too high


def test_suggestion_is_the_multiplier_times_the_lr_where_most_of_the_fall_was_made():
    lrs = [10 ** (k / 4 - 6) for k in range(21)]
    loss = [2.3] * 4 + [2.2, 2.0, 1.7, 1.3, 1.0, 0.8, 0.7, 0.65, 0.9, 1.5, 3.0, 6.0, 9.0, 12.0, 15.0, 18.0, 21.0]
    found = suggest_max_lr(lrs, loss, multiplier=4.0, fall=0.8)
    assert found.min_loss_lr == lrs[loss.index(min(loss))]
    assert found.fall_lr == lrs[loss.index(0.8)]  # the first loss within 20% of the fall (2.3 -> 0.65) of the lowest
    assert found.max_lr == pytest.approx(found.fall_lr * 4.0)
    assert found.rule.startswith("4 x the LR where the smoothed loss had made 80% of its fall")
    assert f"{found.fall_lr:.2e}" in found.rule and f"{found.min_loss_lr:.2e}" in found.rule
    slopes = {i: loss[i + 1] - loss[i - 1] for i in range(1, loss.index(min(loss)))}
    assert found.steepest_lr == lrs[min(slopes, key=slopes.get)]
    assert found.notes == []


def test_the_rule_reads_the_steep_part_so_noise_on_the_floor_moves_it_little():
    """Two curves alike but for noise on the flat floor of the valley: the lowest point moves a decade,
    the point where 90% of the fall was made does not move."""
    lrs = [10 ** (-6 + k / 10) for k in range(61)]
    descent = [2.3 - 1.8 * min(1.0, max(0.0, (k - 10) / 20)) for k in range(61)]  # falls over LRs 1e-5..1e-3
    first = [v - (0.01 if k == 35 else 0.0) for k, v in enumerate(descent)]
    second = [v - (0.01 if k == 45 else 0.0) for k, v in enumerate(descent)]
    a, b = suggest_max_lr(lrs, first), suggest_max_lr(lrs, second)
    assert b.min_loss_lr / a.min_loss_lr == pytest.approx(10.0)
    assert a.fall_lr == b.fall_lr and a.max_lr == b.max_lr


def test_a_curve_that_never_falls_or_is_too_short_is_refused():
    with pytest.raises(ConfigError, match="never fell"):
        suggest_max_lr([1e-5, 1e-4, 1e-3, 1e-2], [1.0, 1.5, 3.0, 9.0])
    with pytest.raises(ConfigError, match="at least 3"):
        suggest_max_lr([1e-5, 1e-4], [1.0, 0.5])


def test_a_loss_still_falling_at_the_end_gets_a_note():
    notes = suggest_max_lr([1e-4, 1e-3, 1e-2, 1e-1], [2.0, 1.5, 1.0, 0.5]).notes
    assert notes and "--end-lr" in notes[0]


def test_the_test_measures_the_model_the_run_trains(tmp_path):
    from recipes.run import build

    cfg = get_recipe("digits")
    model, optimizer, loss_fn, data, _device, _precision = training_parts(cfg)
    run = build(cfg, tmp_path / "run", quiet=True)
    _assert_same(run.model.state_dict(), model.state_dict())  # same initial weights (same seed)
    assert len(data.train) == len(run.train_data)
    assert loss_fn.label_smoothing == cfg.train.label_smoothing
    ours, theirs = optimizer.param_groups, run.optimizer.param_groups
    assert [g["weight_decay"] for g in ours] == [g["weight_decay"] for g in theirs]
    assert [len(g["params"]) for g in ours] == [len(g["params"]) for g in theirs]


@pytest.fixture(scope="module")
def digits_result() -> LRFindResult:
    return find_lr(get_recipe("digits"))


def test_digits_suggestion_is_sane(digits_result):
    assert 1e-3 <= digits_result.suggestion <= 1e-1
    assert digits_result.suggestion == pytest.approx(digits_result.fall_lr * digits_result.multiplier)
    assert digits_result.fall_lr < digits_result.min_loss_lr
    assert digits_result.smoothed == centred_average(digits_result.lrs, digits_result.losses, digits_result.window)
    i = digits_result.lrs.index(digits_result.min_loss_lr)
    assert digits_result.smoothed[i] == min(digits_result.smoothed)
    assert digits_result.smoothed[i] < digits_result.smoothed[0]  # the loss really fell before it rose
    if digits_result.diverged:  # stopped early on ignite's EMA of the loss: the raw loss had risen far above its best
        assert len(digits_result.lrs) < digits_result.num_iter
        assert max(digits_result.losses[-5:]) > 2 * min(digits_result.smoothed)


def test_lr_find_png_is_labelled(digits_result):
    from recipes.report.plots import lr_find_figure

    fig = lr_find_figure(digits_result, title="digits: LR range test")
    ax = fig.axes[0]
    assert ax.get_title() == "digits: LR range test"
    assert ax.get_xscale() == "log" and "learning rate" in ax.get_xlabel() and "loss" in ax.get_ylabel()
    suggested = [line for line in ax.lines if list(line.get_xdata()) == [digits_result.suggestion] * 2]
    assert suggested and "suggested max_lr" in suggested[0].get_label()


def test_cli_prints_the_suggestion_and_rule_and_writes_files(tmp_path):
    out = tmp_path / "lrf"
    result = CliRunner().invoke(cli, ["lr-find", "digits", "--num-iter", "120", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "lr_find.json").read_text())
    assert f"suggested max_lr: {data['suggestion']:.2e}" in result.output
    assert "rule: 10 x the LR where the smoothed loss had made 90% of its fall" in result.output
    assert f"kiln train digits --max-lr {data['suggestion']:.2g}" in result.output
    assert data["num_iter"] == 120 and len(data["lrs"]) == len(data["losses"]) <= 120
    assert (out / "lr_find.png").stat().st_size > 10_000


@pytest.mark.parametrize("args, message", [
    (["train", "digits", "--max-lr", "fast"], "neither a number nor 'auto'"),
    (["train", "digits", "--max-lr", "auto", "--resume", "nowhere/last.pt"], "cannot be used with --resume"),
    (["lr-find", "nope"], "unknown recipe"),
    (["lr-find", "digits", "--start-lr", "1", "--end-lr", "0.1"], "start_lr < end_lr"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


@pytest.mark.slow
def test_train_max_lr_auto_reaches_the_default_bar_and_records_the_test(tmp_path):
    run_dir = tmp_path / "auto"
    done = kiln("train", "digits", "--max-lr", "auto", "--out", run_dir, timeout=600)  # its report is read below
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["final_val_accuracy"] >= 0.97

    config = json.loads((run_dir / "config.json").read_text())
    found = json.loads((run_dir / "lr_find.json").read_text())
    assert 1e-3 <= found["suggestion"] <= 1e-1
    assert config["schedule"]["max_lr"] == pytest.approx(found["suggestion"], rel=1e-2)
    recipe = get_recipe("digits")  # the cycle keeps the recipe's max_lr / lr ratio
    assert config["schedule"]["max_lr"] / config["optim"]["lr"] == pytest.approx(recipe.schedule.max_lr / recipe.optim.lr)
    assert config["lr_find"]["max_lr"] == "auto" and config["lr_find"]["suggestion"] == found["suggestion"]
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    lr_events = [e for e in events if e["event"] == "lr_find"]
    assert len(lr_events) == 1 and lr_events[0]["suggestion"] == found["suggestion"]
    assert f"max_lr {config['schedule']['max_lr']:g}" in done.stdout
    assert (run_dir / "lr_find.png").exists() and (run_dir / "report.html").exists()
    from recipes.report import find_issues, load_run

    assert "max_lr_vs_range_test" not in {f.kind for f in find_issues(load_run(run_dir))}

    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    tb = EventMultiplexer(size_guidance={"scalars": 0})
    tb.AddRunsFromDirectory(str(run_dir / "tb"))
    tb.Reload()
    assert len(tb.Scalars("lr_find", "lr_find/smoothed_loss")) == len(found["lrs"])
    assert tb.Scalars("lr_find", "lr_find/suggested_max_lr")[0].value == pytest.approx(found["suggestion"])
    assert math.isclose(tb.Scalars("lr_find", "lr_find/lr")[0].value, found["lrs"][0], rel_tol=1e-6)
