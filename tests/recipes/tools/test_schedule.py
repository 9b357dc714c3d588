"""``kiln schedule``: the one-cycle LR and beta1 of every optimizer step, computed without training."""
from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from matplotlib.image import imread

from recipes import get_recipe
from recipes.cli import cli
from recipes.config import apply_overrides
from recipes.tools.schedule import batches_per_epoch, schedule_series


def _torch_one_cycle(cfg, total):
    """What torch's OneCycleLR gives, stepped after every optimizer step of a plain AdamW."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=cfg.optim.lr)
    s = cfg.schedule
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=s.max_lr, total_steps=total, pct_start=s.pct_start, div_factor=s.max_lr / cfg.optim.lr,
        final_div_factor=s.final_div_factor, anneal_strategy=s.anneal_strategy, cycle_momentum=s.cycle_momentum)
    lrs, betas = [], []
    for step in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        betas.append(optimizer.param_groups[0]["betas"][0])
        optimizer.step()
        if step + 1 < total:
            scheduler.step()
    return lrs, betas


def test_series_equals_torch_one_cycle():
    cfg = apply_overrides(get_recipe("digits"), {"train.epochs": 3})
    series = schedule_series(cfg, batches=7)
    assert series.total_steps == 21 and series.steps == list(range(1, 22))
    lrs, betas = _torch_one_cycle(cfg, 21)
    assert series.lr == pytest.approx(lrs, rel=1e-12)
    assert series.momentum == pytest.approx(betas, rel=1e-12)
    assert series.momentum_name == "beta1"
    assert series.initial_lr == pytest.approx(cfg.optim.lr)
    assert series.final_lr == pytest.approx(cfg.optim.lr / cfg.schedule.final_div_factor)
    # the peak falls between two steps when pct_start x total_steps is not whole: close to max_lr, never above
    assert series.lr[series.peak_step - 1] == pytest.approx(cfg.schedule.max_lr, rel=0.01)
    assert max(series.lr) <= cfg.schedule.max_lr
    assert series.peak_step == max(range(1, 22), key=lambda k: lrs[k - 1])


def test_phases_meet_at_the_peak_and_beta1_moves_against_the_lr():
    series = schedule_series(get_recipe("digits"), batches=23)
    warm, cool = series.phases
    assert (warm["name"], cool["name"]) == ("warm-up", "cool-down")
    assert warm["first_step"] == 1 and warm["last_step"] == cool["first_step"] == series.peak_step
    assert cool["last_step"] == series.total_steps
    peak = series.peak_step - 1
    assert all(a <= b for a, b in zip(series.lr[:peak], series.lr[1:peak + 1]))  # warm-up rises
    assert all(a >= b for a, b in zip(series.lr[peak:], series.lr[peak + 1:]))  # cool-down falls
    assert series.momentum[peak] == min(series.momentum)  # beta1 is lowest where the LR is highest
    assert series.momentum[0] == max(series.momentum)


def test_accumulation_counts_optimizer_steps_and_maps_them_to_iterations():
    cfg = apply_overrides(get_recipe("digits"), {"train.epochs": 2, "train.accumulation_steps": 3})
    series = schedule_series(cfg, batches=10)
    assert series.steps_per_epoch == 4 and series.total_steps == 8
    assert series.iterations() == [3, 6, 9, 10, 13, 16, 19, 20]  # windows close at each epoch's end


def test_without_momentum_cycling_there_is_no_beta1_series():
    cfg = apply_overrides(get_recipe("digits"), {"schedule.cycle_momentum": False})
    assert schedule_series(cfg, batches=5).momentum == []


def test_batches_per_epoch_comes_from_the_recipe_split():
    cfg = get_recipe("synthetic")
    expected = math.ceil((cfg.data.samples - round(cfg.data.samples * cfg.data.val_fraction)) / cfg.data.batch_size)
    assert batches_per_epoch(cfg) == expected


def test_cli_writes_png_and_json_without_training(tmp_path):
    out = tmp_path / "sched"
    result = CliRunner().invoke(cli, ["schedule", "digits", "--epochs", "4", "--max-lr", "0.02", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["schedule.json", "schedule.png"]  # no run was made
    data = json.loads((out / "schedule.json").read_text())
    cfg = apply_overrides(get_recipe("digits"), {"train.epochs": 4, "schedule.max_lr": 0.02})
    total = 4 * batches_per_epoch(cfg)
    assert data["total_steps"] == total and len(data["lr"]) == len(data["beta1"]) == len(data["steps"]) == total
    assert max(data["lr"]) == pytest.approx(0.02)
    assert [p["name"] for p in data["phases"]] == ["warm-up", "cool-down"]
    assert "warm-up" in result.output and "cool-down" in result.output
    image = imread(out / "schedule.png")
    assert image.shape[0] > 400 and image.shape[1] > 600 and image.std() > 0.05


def test_cli_schedule_of_an_unknown_recipe_is_a_config_error():
    result = CliRunner().invoke(cli, ["schedule", "nope"])
    assert result.exit_code != 0 and "unknown recipe" in str(result.exception)


def test_schedule_plot_is_labelled_and_marks_the_phases():
    from recipes.report.plots import schedule_figure

    series = schedule_series(get_recipe("digits"), batches=23)
    fig = schedule_figure(series, title="digits: one-cycle schedule")
    lr_axis, momentum_axis = fig.axes[:2]
    assert fig.get_suptitle() == "digits: one-cycle schedule"
    assert "learning rate" in lr_axis.get_ylabel() and "beta1" in momentum_axis.get_ylabel()
    assert "optimizer step" in momentum_axis.get_xlabel()
    texts = " ".join(t.get_text() for t in lr_axis.texts)
    assert "warm-up" in texts and "cool-down" in texts and f"step {series.peak_step}" in texts
    peak_lines = [line for line in lr_axis.lines if list(line.get_xdata()) == [series.peak_step] * 2]
    assert peak_lines, "the peak is marked by a vertical line"
