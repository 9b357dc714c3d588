"""The one-cycle schedule of a recipe, computed without training: LR and beta1 at every optimizer step.

The series comes from the very scheduler a run uses (``recipes.run.parts.make_schedule``: a
``callbacks.OneCycle`` around torch's ``OneCycleLR``), stepped on a one-parameter AdamW the way the trainer steps it, so the plot shows
exactly what training will do: warm-up from ``lr`` to ``max_lr`` over ``pct_start`` of the steps,
then the cool-down to ``lr / final_div_factor``, with AdamW's beta1 cycled the other way.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from callbacks.files import write_json_atomic
from recipes.config import Config
from recipes.run.parts import make_data, make_schedule
from recipes.run.rundir import RunDir

__all__ = ["ScheduleSeries", "schedule_series", "batches_per_epoch", "save_schedule", "format_schedule"]


@dataclass(frozen=True)
class ScheduleSeries:
    """A one-cycle schedule, one entry per optimizer step; ``to_dict()`` is schedule.json.

    ``steps`` are 1-based optimizer steps; ``lr[i]`` and ``momentum[i]`` are the values step
    ``steps[i]`` uses. ``peak_step`` is the step at max_lr, the boundary between the phases.
    """

    recipe: str
    epochs: int
    batches_per_epoch: int
    accumulation_steps: int
    steps_per_epoch: int
    total_steps: int
    max_lr: float
    initial_lr: float
    final_lr: float
    pct_start: float
    anneal_strategy: str
    momentum_name: str  #: "beta1" (AdamW) or "momentum" (SGD)
    peak_step: int
    steps: list[int]
    lr: list[float]
    momentum: list[float]  #: empty when the momentum is not cycled

    @property
    def phases(self) -> list[dict[str, Any]]:
        """Warm-up and cool-down as ``{"name", "first_step", "last_step", "lr_from", "lr_to"}``."""
        return [
            {"name": "warm-up", "first_step": self.steps[0], "last_step": self.peak_step,
             "lr_from": self.lr[0], "lr_to": self.lr[self.peak_step - 1]},
            {"name": "cool-down", "first_step": self.peak_step, "last_step": self.steps[-1],
             "lr_from": self.lr[self.peak_step - 1], "lr_to": self.lr[-1]},
        ]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data: the settings, the phases and the per-step series."""
        data = asdict(self)
        data["phases"] = self.phases
        data[self.momentum_name] = data.pop("momentum")
        return data

    def iterations(self) -> list[int]:
        """The trainer iteration (batch) at which each optimizer step happens; accumulation windows
        end at epoch ends, as in the training step."""
        out = []
        for step in self.steps:
            epoch, within = divmod(step - 1, self.steps_per_epoch)
            out.append(epoch * self.batches_per_epoch + min((within + 1) * self.accumulation_steps, self.batches_per_epoch))
        return out


def batches_per_epoch(cfg: Config) -> int:
    """Training batches per epoch for ``cfg`` (the data split is made, nothing is trained)."""
    return len(make_data(cfg, torch.device("cpu")).train)


def schedule_series(cfg: Config, batches: int | None = None) -> ScheduleSeries:
    """The LR and beta1 of every optimizer step of ``cfg``'s run, from ``callbacks.OneCycle``.

    Args:
        cfg: the recipe (epochs, batch size, optim.lr, the schedule section).
        batches: training batches per epoch; computed from the data split when not given.

    Example:
        >>> from recipes import get_recipe
        >>> s = schedule_series(get_recipe("digits"), batches=23)
        >>> s.total_steps, s.peak_step, round(max(s.lr), 6) == get_recipe("digits").schedule.max_lr
        (230, 58, True)
    """
    if batches is None:
        batches = batches_per_epoch(cfg)
    t, s = cfg.train, cfg.schedule
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=cfg.optim.lr, betas=(0.9, cfg.optim.beta2))
    schedule = make_schedule(cfg, optimizer, batches)
    total = schedule.total_steps
    lrs, momenta = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(total):
            group = optimizer.param_groups[0]
            lrs.append(float(group["lr"]))
            momenta.append(float(group["betas"][0]))
            optimizer.step()  # no gradient: a no-op that keeps torch's step-order check satisfied
            if schedule.scheduler.last_epoch + 1 < total:  # exactly what OneCycle does per optimizer step
                schedule.scheduler.step()
    peak = max(range(total), key=lambda i: lrs[i]) + 1
    return ScheduleSeries(
        recipe=cfg.name, epochs=t.epochs, batches_per_epoch=batches, accumulation_steps=t.accumulation_steps,
        steps_per_epoch=math.ceil(batches / t.accumulation_steps), total_steps=total, max_lr=s.max_lr,
        initial_lr=lrs[0], final_lr=lrs[-1], pct_start=s.pct_start, anneal_strategy=s.anneal_strategy,
        momentum_name="beta1", peak_step=peak, steps=list(range(1, total + 1)), lr=lrs,
        momentum=momenta if s.cycle_momentum else [],
    )


def save_schedule(series: ScheduleSeries, out_dir: str | Path) -> Path:
    """Write ``schedule.json`` into ``out_dir`` (created); returns its path. ``schedule.png`` is
    ``recipes.report.plots.plot_schedule``'s."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = RunDir(out_dir).schedule
    write_json_atomic(json_path, series.to_dict())
    return json_path


def format_schedule(series: ScheduleSeries) -> str:
    """The console summary: total steps and each phase's steps, LR and beta1 range."""
    m = series.momentum
    lines = [f"one-cycle schedule of {series.recipe}: {series.total_steps} optimizer steps "
             f"({series.epochs} epochs x {series.steps_per_epoch} steps)"]
    for phase in series.phases:
        first, last = phase["first_step"], phase["last_step"]
        text = (f"  {phase['name']:<10} steps {first:>5}-{last:<5}  lr {phase['lr_from']:.2e} -> {phase['lr_to']:.2e}")
        if m:
            text += f"   {series.momentum_name} {m[first - 1]:.3f} -> {m[last - 1]:.3f}"
        lines.append(text)
    return "\n".join(lines)
