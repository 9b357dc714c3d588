"""RUN_DIR/plots: drawn after every run from the records, readable (titles, units, log scales), and true to the data."""
from __future__ import annotations

import io
import json
import math

import pytest
from matplotlib.image import imread

from recipes.cli.options import resolve_config
from recipes.report.plots import ema, run_figures
from recipes.report import finish_run, load_run
from recipes.run import train

RUN_PLOTS = {"lr.png", "loss.png", "accuracy.png", "grad_norm.png"}


def _train(tmp_path_factory, name, *sets, **options):
    cfg = resolve_config("synthetic", sets, **options)
    run_dir = tmp_path_factory.mktemp(name) / "run"
    train(cfg, run_dir, quiet=True, stream=io.StringIO())
    finish_run(run_dir, io.StringIO())  # plots/, report.html, findings: as the CLI does after a run
    return run_dir


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory):
    return _train(tmp_path_factory, "fp32", "train.log_every=2")


@pytest.fixture(scope="module")
def fp16_run(tmp_path_factory):
    return _train(tmp_path_factory, "fp16", "train.log_every=2", "data.samples=320", "data.image_size=16",
                  "model.channels=8,16", "train.init_scale=16777216", epochs=2, precision="fp16")


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_run_gets_its_plots(fp32_run):
    names = {p.name for p in (fp32_run / "plots").iterdir()}
    assert names == RUN_PLOTS  # no loss_scale.png: fp32 has no loss scale
    for name in names:
        image = imread(fp32_run / "plots" / name)
        assert image.shape[0] >= 400 and image.shape[1] >= 700
        assert image.std() > 0.05  # not blank


def test_a_one_iteration_run_draws_no_empty_lr_plot_and_its_report_stands(tmp_path_factory):
    run_dir = _train(tmp_path_factory, "one", "data.samples=60", "data.image_size=16", "data.num_classes=3",
                     epochs=1, batch_size=64)
    assert json.loads((run_dir / "summary.json").read_text())["iterations"] == 1
    names = {p.name for p in (run_dir / "plots").iterdir()}
    assert "lr.png" not in names and {"loss.png", "accuracy.png"} <= names
    page = (run_dir / "report.html").read_text()
    assert "lr.png" not in page and "loss.png" in page


def test_titles_labels_units_and_scales(fp32_run, fp16_run):
    for run_dir, names in ((fp32_run, RUN_PLOTS), (fp16_run, RUN_PLOTS | {"loss_scale.png"})):
        figures = run_figures(load_run(run_dir))
        assert set(figures) == names
        for name, fig in figures.items():
            ax = fig.axes[0]
            assert ax.get_title().startswith("synthetic: "), name
            assert ax.get_xlabel() in ("iteration (batches)", "epoch"), name
            assert ax.get_ylabel(), name
            assert ax.get_legend() is not None, name
        scales = {name: fig.axes[0].get_yscale() for name, fig in figures.items()}
        assert scales["loss.png"] == "log" and scales["grad_norm.png"] == "log"
        assert scales["lr.png"] == "linear" and scales["accuracy.png"] == "linear"
        assert "%" in figures["accuracy.png"].axes[0].get_ylabel()
        assert "nats" in figures["loss.png"].axes[0].get_ylabel()
        if "loss_scale.png" in figures:
            assert scales["loss_scale.png"] == "log"
            assert figures["loss_scale.png"].axes[0].yaxis.get_scale() == "log"


def _line(ax, label_start):
    found = [line for line in ax.lines if line.get_label().startswith(label_start)]
    assert found, [line.get_label() for line in ax.lines]
    return found[0]


def test_plots_show_the_recorded_values(fp32_run):
    steps, metrics = _lines(fp32_run / "steps.jsonl"), _lines(fp32_run / "metrics.jsonl")
    config = json.loads((fp32_run / "config.json").read_text())
    figures = run_figures(load_run(fp32_run))

    loss = figures["loss.png"].axes[0]
    raw = _line(loss, "train, every")
    assert list(raw.get_xdata()) == [s["iteration"] for s in steps]
    assert list(raw.get_ydata()) == pytest.approx([s["loss"] for s in steps])
    val = _line(loss, "validation")
    assert list(val.get_xdata()) == [m["iteration"] for m in metrics]
    assert list(val.get_ydata()) == pytest.approx([m["val_loss"] for m in metrics])
    assert list(_line(loss, "train, per epoch").get_ydata()) == pytest.approx([m["train_loss"] for m in metrics])

    accuracy = figures["accuracy.png"].axes[0]
    best = max(metrics, key=lambda m: m["val_accuracy"])
    star = _line(accuracy, "best")
    assert list(star.get_ydata()) == pytest.approx([100 * best["val_accuracy"]])

    grad = figures["grad_norm.png"].axes[0]
    threshold = _line(grad, "clip_norm")
    assert set(threshold.get_ydata()) == {config["train"]["clip_norm"]}
    above = sum(s["grad_norm"] > config["train"]["clip_norm"] for s in steps)
    assert f"exceeded on {above} of {len(steps)}" in threshold.get_label()


def test_the_planned_schedule_is_the_lr_the_run_used(fp32_run):
    steps = _lines(fp32_run / "steps.jsonl")
    planned = load_run(fp32_run).planned_schedule()
    by_iteration = dict(zip(planned["iteration"], planned["lr"]))
    for s in steps:
        assert by_iteration[s["iteration"]] == pytest.approx(s["lr"], rel=1e-9)


def test_fp16_plot_marks_the_start_scale_and_the_skips(fp16_run):
    steps, config = _lines(fp16_run / "steps.jsonl"), json.loads((fp16_run / "config.json").read_text())
    ax = run_figures(load_run(fp16_run))["loss_scale.png"].axes[0]
    scale = _line(ax, "loss scale")
    assert list(scale.get_xdata()) == [0] + [s["iteration"] for s in steps]
    assert list(scale.get_ydata()) == pytest.approx([config["train"]["init_scale"]] + [s["loss_scale"] for s in steps])
    skipped = [s["iteration"] for s in steps if s["step_skipped"]]
    if skipped:
        assert list(_line(ax, "step skipped").get_xdata()) == skipped


def test_ema_is_bias_corrected_and_skips_non_finite_values():
    assert ema([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
    smoothed = ema([1.0, float("nan"), 3.0], beta=0.5)
    assert smoothed[1] == pytest.approx(1.0) and smoothed[2] == pytest.approx((0.25 * 1 + 0.5 * 3) / 0.75)
    assert math.isnan(ema([float("inf")])[0])
