"""The one-cycle schedule of a recipe, computed without training: LR and beta1 at every optimizer step.

The series comes from the very scheduler a run uses (``recipes.run.parts.make_schedule``: a
``callbacks.OneCycle`` around torch's ``OneCycleLR``), stepped on a one-parameter AdamW the way the trainer steps it, so the plot shows
exactly what training will do: warm-up from ``lr`` to ``max_lr`` over ``pct_start`` of the steps,
then the cool-down to ``lr / final_div_factor``, with AdamW's beta1 cycled the other way. A fine-tune
(``finetune.freeze_epochs``) has two cycles: the head's while the body is frozen, then everything's from the
unfreeze, the body at ``finetune.body_lr_factor`` of the head's LR.
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
from callbacks import OneCycle
from recipes.run.parts import make_data, make_schedule, planned_freeze_epochs
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
    unfreeze_step: int | None = None  #: a fine-tune's first step with everything training (its second cycle)
    body_lr_factor: float | None = None  #: a fine-tune's body LR, as a fraction of the head's (the lr series)

    @property
    def phases(self) -> list[dict[str, Any]]:
        """Warm-up and cool-down (of each cycle: a fine-tune's frozen one first) as ``{"name", "first_step",
        "last_step", "lr_from", "lr_to"}``."""
        if self.unfreeze_step is None:
            return self._cycle("", self.steps[0], self.peak_step, self.steps[-1])
        second = max(range(self.unfreeze_step, self.steps[-1] + 1), key=lambda k: self.lr[k - 1])
        return (self._cycle("frozen ", self.steps[0], self.peak_step, self.unfreeze_step - 1)
                + self._cycle("", self.unfreeze_step, second, self.steps[-1]))

    def _cycle(self, prefix: str, first: int, peak: int, last: int) -> list[dict[str, Any]]:
        return [{"name": f"{prefix}warm-up", "first_step": first, "last_step": peak,
                 "lr_from": self.lr[first - 1], "lr_to": self.lr[peak - 1]},
                {"name": f"{prefix}cool-down", "first_step": peak, "last_step": last,
                 "lr_from": self.lr[peak - 1], "lr_to": self.lr[last - 1]}]

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
        data = make_data(cfg, torch.device("cpu"))
        batches, cfg = len(data.train), planned_freeze_epochs(cfg, data)  # a fine-tune's "auto" as the run decides
    t, s = cfg.train, cfg.schedule
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=cfg.optim.lr, betas=(0.9, cfg.optim.beta2))
    schedule = make_schedule(cfg, optimizer, batches)
    cycles = [schedule.total_steps]  # a fine-tune's second cycle starts at the unfreeze (callbacks.FineTune)
    frozen = cfg.finetune.freeze_epochs
    if frozen > 0:
        cycles.append(OneCycle.total_steps_for(t.epochs - frozen, batches, t.accumulation_steps))
    lrs, momenta = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, steps in enumerate(cycles):
            if i:
                schedule.restart(steps)
            for _ in range(steps):
                group = optimizer.param_groups[0]
                lrs.append(float(group["lr"]))
                momenta.append(float(group["betas"][0]))
                optimizer.step()  # no gradient: a no-op that keeps torch's step-order check satisfied
                if schedule.scheduler.last_epoch + 1 < steps:  # exactly what OneCycle does per optimizer step
                    schedule.scheduler.step()
    total = sum(cycles)
    peak = max(range(cycles[0]), key=lambda i: lrs[i]) + 1
    fine_tune = {"unfreeze_step": cycles[0] + 1, "body_lr_factor": cfg.finetune.body_lr_factor} if frozen > 0 else {}
    return ScheduleSeries(
        recipe=cfg.name, epochs=t.epochs, batches_per_epoch=batches, accumulation_steps=t.accumulation_steps,
        steps_per_epoch=math.ceil(batches / t.accumulation_steps), total_steps=total, max_lr=s.max_lr,
        initial_lr=lrs[0], final_lr=lrs[-1], pct_start=s.pct_start, anneal_strategy=s.anneal_strategy,
        momentum_name="beta1", peak_step=peak, steps=list(range(1, total + 1)), lr=lrs,
        momentum=momenta if s.cycle_momentum else [], **fine_tune,
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
    if series.unfreeze_step is not None:
        lines[0] += (f"; fine-tune: the body frozen until step {series.unfreeze_step}, then a second cycle "
                     f"(the body's LR x{series.body_lr_factor:g})")
    width = max(len(phase["name"]) for phase in series.phases)
    for phase in series.phases:
        first, last = phase["first_step"], phase["last_step"]
        text = (f"  {phase['name']:<{width}} steps {first:>5}-{last:<5}  lr {phase['lr_from']:.2e} -> {phase['lr_to']:.2e}")
        if m:
            text += f"   {series.momentum_name} {m[first - 1]:.3f} -> {m[last - 1]:.3f}"
        lines.append(text)
    return "\n".join(lines)
