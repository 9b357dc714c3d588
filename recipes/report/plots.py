"""The PNG plots of a run, of an LR range test, of a one-cycle schedule and of a confusion matrix (matplotlib, Agg).

Every plot is drawn on its own ``Figure`` with an explicit Agg canvas (no pyplot state, safe in
threads and tests) from the records a run has already written: metrics.jsonl, steps.jsonl and
config.json. Nothing here runs per iteration.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from callbacks.files import write_atomic
from recipes.run.rundir import RUN_PLOTS

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    from recipes.report.rundata import RunData
    from recipes.tools.lr_find import LRFindResult
    from recipes.tools.schedule import ScheduleSeries

__all__ = [
    "MAX_ANNOTATED_CLASSES",
    "ema",
    "lr_find_figure",
    "plot_confusion_matrix",
    "plot_lr_find",
    "plot_run",
    "plot_schedule",
    "run_figures",
    "schedule_figure",
]

#: More classes than this: the confusion matrix's cells carry no numbers.
MAX_ANNOTATED_CLASSES = 20

_DPI = 110
_SIZE = (8.0, 4.6)
#: Fixed margins (fractions of the figure) of the one-axes plots. matplotlib's constrained layout
#: draws every text twice to measure it, which cost the end of each digits run 0.14 s for the same
#: picture; tick labels here are at most six characters wide, so fixed margins fit them.
_MARGINS = {"left": 0.105, "right": 0.975, "bottom": 0.11, "top": 0.905}
_TOP_UNDER_EPOCH_AXIS = 0.845
_TRAIN, _VAL, _ACCENT, _WARN = "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e"


def ema(values: Sequence[float], beta: float = 0.8) -> list[float]:
    """Bias-corrected exponential moving average (weight ``beta`` on the past); NaNs are carried over.

    Example:
        >>> [round(v, 3) for v in ema([1.0, 1.0, 4.0], beta=0.5)]
        [1.0, 1.0, 2.714]
    """
    out, avg, weight = [], 0.0, 0.0
    for v in values:
        if math.isfinite(v):
            avg = beta * avg + (1 - beta) * v
            weight = beta * weight + (1 - beta)
        out.append(avg / weight if weight else float("nan"))
    return out


def _new_figure(**kwargs: Any) -> Figure:
    """A matplotlib Figure on its own Agg canvas. matplotlib is imported here, at the first plot, not with
    this module: a run that draws nothing (``--no-report``, predict, export) starts ~0.35 s sooner."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _formatter(label: Any) -> FuncFormatter:
    """A tick formatter calling ``label(value, position)``."""
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(label)


def _figure(title: str, size: tuple[float, float] = _SIZE) -> tuple[Figure, Any]:
    fig = _new_figure(figsize=size, dpi=_DPI)
    fig.subplots_adjust(**_MARGINS)
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=12)
    ax.grid(True, which="major", alpha=0.3)
    return fig, ax


def _save(fig: Figure, path: Path, dpi: float | str = _DPI) -> Path:
    """Write ``fig`` to ``path`` atomically (an OSError names the path); the format is the file's suffix."""
    write_atomic(path, lambda f: fig.savefig(f, format=path.suffix.lstrip(".") or "png", dpi=dpi))
    return path


def _number(value: Any) -> float:
    """A float from a logged value (non-finite values were logged as the strings 'nan', 'inf')."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _epoch_axis(ax: Any, batches_per_epoch: int | None) -> None:
    """A second x-axis on top, in epochs, for plots whose x is the iteration."""
    if batches_per_epoch:
        top = ax.secondary_xaxis("top", functions=(lambda it: it / batches_per_epoch, lambda ep: ep * batches_per_epoch))
        top.set_xlabel("epoch")
        ax.figure.subplots_adjust(top=_TOP_UNDER_EPOCH_AXIS)


def _label_log_minor_ticks(ax: Any) -> None:
    """On a log y axis spanning few decades, also label minor ticks (all of them within a decade,
    2, 3 and 5 within two), so the reader is never left with a single number on the axis."""
    low, high = ax.get_ylim()
    span = math.log10(high / low) if low > 0 and high > low else 3.0
    keep = (2, 3, 5) if span < 2.5 else ()

    def label(value: float, _pos: Any = None) -> str:
        if value <= 0:
            return ""
        mantissa = round(value / 10 ** math.floor(math.log10(value)), 6)
        return f"{value:.3g}" if span < 0.8 or mantissa in keep else ""

    ax.yaxis.set_minor_formatter(_formatter(label))


def _sci(value: float, _pos: Any = None) -> str:
    return f"{value:.0e}".replace("e-0", "e-").replace("e+0", "e")


def run_figures(run: RunData) -> dict[str, Figure]:
    """A run's figures by file name: lr.png, loss.png, accuracy.png, grad_norm.png and, for an fp16 run,
    loss_scale.png; a figure whose records are absent is left out."""
    figures = {}
    # the files plot_run may write into RUN_DIR/plots (loss_scale.png only for fp16 runs), by the record they draw
    for name, draw in zip(RUN_PLOTS, (_plot_lr, _plot_loss, _plot_accuracy, _plot_grad_norm, _plot_loss_scale),
                          strict=True):
        fig = draw(run)
        if fig is not None:
            figures[name] = fig
    return figures


def plot_run(run: RunData, plots_dir: str | Path) -> list[Path]:
    """Draw a run's plots (see :func:`run_figures`) into ``plots_dir``; returns the paths written."""
    plots_dir = Path(plots_dir)
    return [_save(fig, plots_dir / name) for name, fig in run_figures(run).items()]


def _title(run: RunData, what: str) -> str:
    name = run.config.get("name") or Path(run.run_dir).name
    return f"{name}: {what}"


def _plot_lr(run: RunData) -> Figure | None:
    steps = [s for s in run.steps if s.get("lr") is not None]
    if not steps and not run.metrics:
        return None
    planned = run.planned_schedule()
    if max(len(planned["iteration"]) if planned else 0, len(steps)) < 2:
        return None  # one optimizer step: no curve to draw, only an empty frame
    fig, ax = _figure(_title(run, "learning rate (one-cycle)"))
    if planned is not None:
        ax.plot(planned["iteration"], planned["lr"], color="0.55", lw=1.2, ls="--", label="planned schedule")
    if steps:
        ax.plot([s["iteration"] for s in steps], [s["lr"] for s in steps], "o-", color=_TRAIN, ms=3, lw=1.5,
                label=f"logged (every {run.log_every} iterations)")
    for key in sorted({k for s in steps for k in s if k.startswith("lr_") and s[k] != s["lr"]}):  # a fine-tune's body
        ax.plot([s["iteration"] for s in steps if key in s], [s[key] for s in steps if key in s], "o--", ms=2, lw=1,
                color=_VAL, label=f"logged, {key[3:]} group")
    max_lr = run.config.get("schedule", {}).get("max_lr")
    if max_lr:
        ax.axhline(max_lr, color=_WARN, lw=0.8, ls=":", label=f"max_lr = {max_lr:.2g}")
    ax.set_xlabel("iteration (batches)")
    ax.set_ylabel("learning rate (param group 0)")
    ax.yaxis.set_major_formatter(_formatter(lambda v, _: f"{v:.2g}"))
    ax.set_ylim(bottom=0)
    _epoch_axis(ax, run.batches_per_epoch)
    ax.legend(loc="upper right", fontsize=9)
    return fig


def _plot_loss(run: RunData) -> Figure | None:
    steps = [s for s in run.steps if s.get("loss") is not None]
    epochs = [m for m in run.metrics if m.get("iteration") is not None]
    if not steps and not epochs:
        return None
    fig, ax = _figure(_title(run, "loss"))
    smoothing = run.config.get("train", {}).get("label_smoothing")
    train_note = f", label smoothing {smoothing:g}" if smoothing else ""
    if steps:
        its = [s["iteration"] for s in steps]
        raw = [_number(s["loss"]) for s in steps]
        ax.plot(its, raw, color=_TRAIN, alpha=0.25, lw=1, label=f"train, every {run.log_every} iterations (raw)")
        beta = round(max(0.0, min(0.8, 1 - 4 / len(raw))), 2)  # lighter smoothing when there are few points
        ax.plot(its, ema(raw, beta), color=_TRAIN, lw=2, label=f"train, per iteration (smoothed, EMA {beta:g})")
        bad = [it for it, v in zip(its, raw) if not math.isfinite(v)]
        if bad:
            ax.plot(bad, [max((v for v in raw if math.isfinite(v)), default=1.0)] * len(bad), "x", color=_VAL,
                    ms=8, mew=2, label="non-finite loss")
    train_epochs = [(m["iteration"], m["train_loss"]) for m in epochs if m.get("train_loss") is not None]
    if train_epochs:
        ax.plot(*zip(*train_epochs), "s-", color="#08306b", ms=5, lw=1.2, label=f"train, per epoch (mean{train_note})")
    val_epochs = [(m["iteration"], m["val_loss"]) for m in epochs if m.get("val_loss") is not None]
    if val_epochs:
        ax.plot(*zip(*val_epochs), "o-", color=_VAL, ms=5, lw=1.5, label="validation, per epoch (cross-entropy)")
    ax.set_yscale("log")
    ax.set_xlabel("iteration (batches)")
    ax.set_ylabel("loss (cross-entropy, nats; log scale)")
    ax.yaxis.set_major_formatter(_formatter(lambda v, _: f"{v:g}"))
    _label_log_minor_ticks(ax)
    _epoch_axis(ax, run.batches_per_epoch)
    ax.legend(loc="upper right", fontsize=9)
    return fig


def _plot_accuracy(run: RunData) -> Figure | None:
    points = [(m["epoch"], 100 * m["val_accuracy"]) for m in run.metrics if m.get("val_accuracy") is not None]
    if not points:
        return None
    fig, ax = _figure(_title(run, "validation accuracy"))
    epochs, accuracy = zip(*points)
    ax.plot(epochs, accuracy, "o-", color=_ACCENT, lw=2, ms=6, label="validation accuracy")
    best = max(range(len(accuracy)), key=lambda i: accuracy[i])
    ax.plot([epochs[best]], [accuracy[best]], "*", color=_WARN, ms=16, zorder=5,
            label=f"best: {accuracy[best]:.2f}% (epoch {epochs[best]})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)")
    low = min(accuracy)
    ax.set_ylim(max(0.0, low - max(2.0, 0.1 * (100 - low))), 100.5)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(loc="lower right", fontsize=9)
    return fig


def _plot_grad_norm(run: RunData) -> Figure | None:
    points = [(s["iteration"], _number(s["grad_norm"])) for s in run.steps if s.get("grad_norm") is not None]
    points = [(it, v) for it, v in points if math.isfinite(v) and v > 0]
    if not points:
        return None
    fig, ax = _figure(_title(run, "gradient norm before clipping"))
    its, norms = zip(*points)
    ax.plot(its, norms, "o-", color=_TRAIN, ms=3, lw=1.2, label=f"total L2 norm, every {run.log_every} iterations")
    clip = run.config.get("train", {}).get("clip_norm")
    if clip:
        above = sum(v > clip for v in norms)
        ax.axhline(clip, color=_VAL, lw=1.5, ls="--",
                   label=f"clip_norm = {clip:g} (exceeded on {above} of {len(norms)} logged steps)")
    ax.set_yscale("log")
    ax.set_xlabel("iteration (batches)")
    ax.set_ylabel("gradient norm (L2, true scale; log scale)")
    _label_log_minor_ticks(ax)
    _epoch_axis(ax, run.batches_per_epoch)
    ax.legend(loc="upper right", fontsize=9)
    return fig


def _plot_loss_scale(run: RunData) -> Figure | None:
    from matplotlib.ticker import LogLocator

    points = [(s["iteration"], _number(s["loss_scale"])) for s in run.steps if s.get("loss_scale") is not None]
    if not points:
        return None
    fig, ax = _figure(_title(run, "fp16 loss scale"))
    init = run.config.get("train", {}).get("init_scale")
    if init and points[0][0] > 0:
        points.insert(0, (0, float(init)))  # the scale the run started with (train.init_scale)
    its, scales = zip(*points)
    ax.plot(its, scales, "o-", color=_TRAIN, lw=1.8, ms=4,
            label=f"loss scale: init_scale at 0, then every {run.log_every} iterations")
    skipped = [s["iteration"] for s in run.steps if s.get("step_skipped")]
    if skipped:
        lookup = dict(points)
        ax.plot(skipped, [lookup[i] for i in skipped], "v", color=_VAL, ms=7, label="step skipped (inf/NaN grads)")
    total = run.skipped_steps
    if total is not None:
        ax.text(0.01, 0.96, f"{total} optimizer steps skipped in all", transform=ax.transAxes, fontsize=9, va="top")
    ax.set_yscale("log", base=2)
    ax.set_ylim(min(scales) / 2, max(scales) * 2)
    ax.yaxis.set_major_locator(LogLocator(base=2, numticks=12))
    ax.yaxis.set_major_formatter(_formatter(lambda v, _: f"2^{math.log2(v):.0f}" if v > 0 else ""))
    ax.set_xlabel("iteration (batches)")
    ax.set_ylabel("loss scale (multiplier, log2 scale)")
    _epoch_axis(ax, run.batches_per_epoch)
    ax.legend(loc="upper right", fontsize=9)
    return fig


def plot_lr_find(result: LRFindResult, path: str | Path, title: str = "") -> Path:
    """lr_find.png: see :func:`lr_find_figure`."""
    return _save(lr_find_figure(result, title), Path(path))


def lr_find_figure(result: LRFindResult, title: str = "") -> Figure:
    """Raw and smoothed loss against the LR (log x), the lowest point and the suggestion marked."""
    fig, ax = _figure(title or "LR range test")
    ax.plot(result.lrs, [_clip(v) for v in result.losses], color=_TRAIN, alpha=0.3, lw=1, label="loss per iteration (raw)")
    ax.plot(result.lrs, [_clip(v) for v in result.smoothed], color=_TRAIN, lw=2.2,
            label=f"smoothed loss (centred average, {result.window:g} decades each side)")
    i_min = result.lrs.index(result.min_loss_lr) if result.min_loss_lr in result.lrs else None
    if i_min is not None:
        ax.plot([result.min_loss_lr], [result.smoothed[i_min]], "o", color="k", ms=7,
                label=f"lowest smoothed loss at LR {result.min_loss_lr:.2e}")
    i_fall = result.lrs.index(result.fall_lr) if result.fall_lr in result.lrs else None
    if i_fall is not None:
        ax.plot([result.fall_lr], [result.smoothed[i_fall]], "s", color=_VAL, ms=7,
                label=f"{100 * result.fall:g}% of the fall made at LR {result.fall_lr:.2e}")
    if result.steepest_lr is not None:
        ax.axvline(result.steepest_lr, color="0.5", lw=1, ls=":", label=f"steepest descent at {result.steepest_lr:.2e}")
    ax.axvline(result.suggestion, color=_VAL, lw=2, ls="--",
               label=f"suggested max_lr = {result.suggestion:.2e} ({result.multiplier:g} x that LR)")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(_formatter(_sci))
    smooth = [v for v in result.smoothed if math.isfinite(v)]
    raw = [v for v in result.losses if math.isfinite(v)]
    if smooth:  # the whole valley (raw and smoothed) in view; the divergence runs off the top
        low, start = min(smooth + raw), smooth[0]
        span = max(start - low, 1e-3)
        ax.set_ylim(max(0.0, low - 0.08 * span), start + 0.5 * span)
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss (cross-entropy, nats)")
    ended = "stopped: loss diverged" if result.diverged else "no divergence before end_lr"
    ax.text(0.01, 0.02, f"{len(result.lrs)} iterations, LR {result.start_lr:.0e} to {result.end_lr:g}; {ended}",
            transform=ax.transAxes, fontsize=9, color="0.3")
    ax.legend(loc="upper left", fontsize=9)
    return fig


def _clip(value: float) -> float:
    return value if math.isfinite(value) else float("nan")


def plot_schedule(series: ScheduleSeries, path: str | Path, title: str = "") -> Path:
    """schedule.png: see :func:`schedule_figure`; the default title gives the step count."""
    kind = "fine-tune (two one-cycles)" if series.unfreeze_step is not None else "one-cycle"
    title = title or (f"{series.recipe}: {kind} schedule, {series.epochs} epochs x {series.steps_per_epoch} "
                      f"steps = {series.total_steps} optimizer steps")
    return _save(schedule_figure(series, title), Path(path))


def schedule_figure(series: ScheduleSeries, title: str = "") -> Figure:
    """The LR (top) and beta1 / momentum (bottom) over optimizer steps, with the warm-up and cool-down
    phases shaded and the peak marked."""
    fig = _new_figure(figsize=(8.0, 6.2), dpi=_DPI, layout="constrained")
    ax_lr, ax_m = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
    fig.suptitle(title or "one-cycle schedule", fontsize=12)
    steps = series.steps
    peak = series.peak_step
    top = max(series.lr) * 1.08
    for phase in series.phases:  # one warm-up and cool-down per cycle (a fine-tune has two)
        first, last, warm = phase["first_step"], phase["last_step"], phase["name"].endswith("warm-up")
        for ax in (ax_lr, ax_m):
            ax.axvspan(first, last, color=_WARN if warm else _TRAIN, alpha=0.08 if warm else 0.06)
            if warm:
                ax.axvline(last, color="k", lw=1, ls="--")
        name = (phase["name"] if warm else f"{phase['name']} ({series.anneal_strategy})").replace("frozen ", "frozen\n")
        ax_lr.text((first + last) / 2, top, f"{name}\nsteps {first}-{last}", ha="center", va="center", fontsize=9)
    ax_lr.plot(steps, series.lr, color=_TRAIN, lw=2, label="learning rate" if series.unfreeze_step is None else "head")
    ax_lr.set_ylabel("learning rate (param group 0)" if series.unfreeze_step is None else "learning rate")
    ax_lr.set_ylim(0, max(series.lr) * (1.18 if series.unfreeze_step is None else 1.3))
    ax_lr.yaxis.set_major_formatter(_formatter(lambda v, _: f"{v:.2g}"))
    ax_lr.annotate(f"peak {max(series.lr):.2g}\nat step {peak}", (peak, max(series.lr)),
                   xytext=(8, -28), textcoords="offset points", fontsize=9)
    ax_lr.annotate(f"start {series.lr[0]:.2g}", (steps[0], series.lr[0]), xytext=(4, 6),
                   textcoords="offset points", fontsize=9)
    ax_lr.annotate(f"final {series.lr[-1]:.1e}", (steps[-1], series.lr[-1]), xytext=(-70, 10),
                   textcoords="offset points", fontsize=9)
    if series.unfreeze_step is not None:  # a fine-tune: the second cycle, with the body at its LR factor
        start = series.unfreeze_step
        for ax in (ax_lr, ax_m):
            ax.axvline(start, color="k", lw=1.5, ls=":")
        ax_lr.plot(steps[start - 1:], [lr * series.body_lr_factor for lr in series.lr[start - 1:]], color=_TRAIN,
                   lw=1.5, ls="--", label=f"body (x{series.body_lr_factor:g})")
        ax_lr.annotate(f"unfreeze at step {start}", (start, top / 1.08 * 0.6), xytext=(6, 0),
                       textcoords="offset points", fontsize=9)
        ax_lr.legend(loc="center right", fontsize=8)
    if series.momentum:
        ax_m.plot(steps, series.momentum, color=_VAL, lw=2, label=series.momentum_name)
        ax_m.set_ylabel(f"AdamW {series.momentum_name} (momentum)")
        low, high = min(series.momentum), max(series.momentum)
        ax_m.set_ylim(low - 0.1 * (high - low + 1e-3), high + 0.1 * (high - low + 1e-3))
    else:
        ax_m.text(0.5, 0.5, "momentum is not cycled (schedule.cycle_momentum = false)", transform=ax_m.transAxes,
                  ha="center", va="center")
        ax_m.set_ylabel(series.momentum_name)
    ax_m.set_xlabel("optimizer step (= iteration without gradient accumulation)")
    if series.steps_per_epoch:
        spe = series.steps_per_epoch
        top_axis = ax_lr.secondary_xaxis("top", functions=(lambda s: s / spe, lambda e: e * spe))
        top_axis.set_xlabel("epoch")
    return fig


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], class_names: Sequence[str], path: str | Path,
                          title: str = "Confusion matrix") -> Path:
    """Write the confusion matrix as a PNG (matplotlib, Agg canvas): counts shaded by row share, labelled."""
    import torch

    counts = torch.tensor(matrix, dtype=torch.float64)
    share = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    n = len(class_names)
    side = min(max(4.5, 0.45 * n + 2.5), 30.0)
    fig = _new_figure(figsize=(side + 1.2, side), dpi=100)
    ax = fig.add_subplot()
    image = ax.imshow(share.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ticks = range(n)
    font = 9 if n <= 20 else max(4, 9 - n // 20)
    ax.set_xticks(list(ticks), [str(c) for c in class_names], fontsize=font)
    if n > 5:
        ax.tick_params(axis="x", labelrotation=45)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
            label.set_rotation_mode("anchor")
    ax.set_yticks(list(ticks), [str(c) for c in class_names], fontsize=font)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    if n <= MAX_ANNOTATED_CLASSES:
        for i in range(n):
            for j in range(n):
                value = int(counts[i, j])
                if value:
                    ax.text(j, i, str(value), ha="center", va="center", fontsize=8,
                            color="white" if share[i, j] > 0.5 else "black")
    fig.tight_layout()
    return _save(fig, Path(path), dpi="figure")
