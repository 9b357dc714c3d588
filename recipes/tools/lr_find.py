"""The LR range test: ramp the LR exponentially on a throwaway trainer, suggest a one-cycle ``max_lr``.

ignite's ``FastaiLRFinder`` does the ramp, the stop on divergence (on its own EMA of the loss) and the
restoring of the model and optimizer. It runs on a bare ``engine.create_trainer`` built here, because
every handler on the trainer it is attached to fires during the search (checkpoints, schedules and
loggers of a real run would act on it). kiln adds what the finder lacks: the LR each iteration really
used (the finder records the *next* iteration's LR), the raw losses, a rule for one-cycle's peak LR,
and the run-directory records (lr_find.json, events.jsonl, config.json, TensorBoard). Its picture,
lr_find.png, is drawn by ``recipes.report.plots.plot_lr_find``.

The curve and the rule that turns it into a one-cycle peak: :mod:`recipes.lr_rule`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, TextIO

import torch
from ignite.engine import Events
from ignite.handlers import FastaiLRFinder

from callbacks import AMP, GradClip
from callbacks.files import append_jsonl, write_json_atomic
from engine import Precision, create_trainer
from engine.precision import resolve_for_model
from recipes.config import Config, ConfigError, with_max_lr
from recipes.run.parts import training_parts
from recipes.run.rundir import RunDir, read_config_json
from recipes.lr_rule import (DEFAULT_DIVERGE_TH, DEFAULT_END_LR, DEFAULT_FALL, DEFAULT_MULTIPLIER, DEFAULT_NUM_ITER,
                             DEFAULT_SMOOTH_F, DEFAULT_START_LR, DEFAULT_WINDOW, centred_average, suggest_max_lr)

__all__ = [
    "LRFindResult", "lr_range_test", "find_lr", "suggest_max_lr", "apply_suggestion", "choose_max_lr",
    "save_lr_find", "record_in_run", "format_result", "load_lr_find",
]

@dataclass(frozen=True)
class LRFindResult:
    """What a range test measured and suggests; ``to_dict()`` is the content of lr_find.json.

    ``lrs[i]``, ``losses[i]`` and ``smoothed[i]`` belong to iteration ``i + 1``: the LR that step used,
    its batch loss, and the centred moving average of the losses around it (:func:`centred_average`).
    """

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float  #: the suggested one-cycle max_lr
    rule: str  #: the rule that produced it, in words, with its numbers
    min_loss_lr: float  #: the LR at the lowest smoothed loss
    fall_lr: float  #: the LR where the smoothed loss had made ``fall`` of its fall to its lowest (x multiplier: the suggestion)
    steepest_lr: float | None  #: the LR where the smoothed loss fell fastest (per decade), for reference
    diverged: bool  #: the test stopped early: ignite's EMA of the loss passed diverge_th x its best
    start_lr: float
    end_lr: float
    num_iter: int
    smooth_f: float  #: the weight of ignite's EMA, which decides only the stop
    diverge_th: float
    multiplier: float = DEFAULT_MULTIPLIER
    fall: float = DEFAULT_FALL
    window: float = DEFAULT_WINDOW  #: decades of LR each side of the centred average
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)  #: caveats about this curve, for the user

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (non-finite losses become strings)."""
        data = dataclasses.asdict(self)
        for key in ("losses", "smoothed"):
            data[key] = [v if math.isfinite(v) else str(v) for v in data[key]]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LRFindResult":
        """Rebuild a result from :meth:`to_dict`'s output (unknown keys ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        for key in ("losses", "smoothed"):
            values[key] = [float(v) for v in values.get(key, [])]
        values.setdefault("fall_lr", values.get("min_loss_lr", 0.0))  # a file from before the rule read the fall
        return cls(**values)

    def summary(self) -> dict[str, Any]:
        """The result without the curves: what events.jsonl and config.json record."""
        data = self.to_dict()
        for key in ("lrs", "losses", "smoothed"):
            data.pop(key)
        data["iterations"] = len(self.lrs)
        return data


def lr_range_test(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    data: Iterable,
    *,
    device: str | torch.device | None = None,
    precision: str | Precision = "auto",
    clip_norm: float | None = None,
    init_scale: float = 2.0**16,
    growth_interval: int = 2000,
    seed: int | None = None,
    start_lr: float = DEFAULT_START_LR,
    end_lr: float = DEFAULT_END_LR,
    num_iter: int = DEFAULT_NUM_ITER,
    smooth_f: float = DEFAULT_SMOOTH_F,
    diverge_th: float = DEFAULT_DIVERGE_TH,
    multiplier: float = DEFAULT_MULTIPLIER,
    fall: float = DEFAULT_FALL,
    window: float = DEFAULT_WINDOW,
) -> LRFindResult:
    """Run an exponential LR range test on ``model`` and leave it, ``optimizer`` and torch's RNG as they were.

    The test trains on a bare trainer (kiln's step, plus gradient clipping and fp16 loss scaling when
    asked, as in a real run) for ``num_iter`` iterations with the LR rising from ``start_lr`` to
    ``end_lr``; it stops early once the finder's EMA of the loss (``smooth_f``) exceeds ``diverge_th`` times its
    best. The suggestion comes from the losses' centred average (:mod:`recipes.lr_rule`). Afterwards
    the model's parameters and buffers, the optimizer's state and LRs, the model's train/eval mode and
    the global torch RNG are restored exactly. (Long for its signature and this docstring: every knob of the
    test is an argument, so the CLI, ``--max-lr auto`` and a notebook call the same function.)

    Raises:
        ConfigError: bad arguments, or a curve the rule cannot use (see :func:`suggest_max_lr`).

    Example:
        >>> import torch, torch.nn.functional as F
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        >>> opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        >>> x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
        >>> data = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
        >>> before = [p.clone() for p in model.parameters()]
        >>> result = lr_range_test(model, opt, F.cross_entropy, data, start_lr=1e-5, end_lr=10.0, num_iter=60)
        >>> all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        True
        >>> 1e-5 <= result.suggestion <= 10.0
        True
    """
    if not 0 < start_lr < end_lr:
        raise ConfigError(f"the range test needs 0 < start_lr < end_lr, not {start_lr:g} and {end_lr:g}")
    if num_iter < 3:
        raise ConfigError(f"the range test needs num_iter >= 3, not {num_iter}")
    device, precision = resolve_for_model(model, device, precision)

    trainer = create_trainer(model, optimizer, loss_fn, device=device, precision=precision, seed=seed)
    to_save: dict[str, Any] = {"model": model, "optimizer": optimizer}
    if precision.needs_scaler:
        amp = AMP(device=device.type, init_scale=init_scale, growth_interval=growth_interval)
        amp.attach(trainer)
        to_save["amp"] = amp
    if clip_norm:
        GradClip(model.parameters(), max_norm=clip_norm).attach(trainer)
    used_lrs: list[float] = []
    losses: list[float] = []

    @trainer.on(Events.ITERATION_COMPLETED)
    def _record(engine: Any) -> None:
        used_lrs.append(float(engine.state.lr))
        losses.append(float(engine.state.loss))

    finder = FastaiLRFinder()
    was_training = model.training
    cuda = [device.index or 0] if device.type == "cuda" else []
    started = time.perf_counter()
    with torch.random.fork_rng(devices=cuda), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Run completed without loss diverging")
        with finder.attach(trainer, to_save, output_transform=lambda out: out.loss, num_iter=num_iter,
                           start_lr=float(start_lr), end_lr=float(end_lr), step_mode="exp",
                           smooth_f=smooth_f, diverge_th=diverge_th) as search:
            for group in optimizer.param_groups:  # else the first iteration runs at the optimizer's own LR
                group["lr"] = float(start_lr)
            search.run(data, max_epochs=1)
    model.train(was_training)
    seconds = time.perf_counter() - started

    count = min(len(finder.get_results()["loss"]), len(used_lrs))  # the finder drops the step it stopped on
    lrs, losses = used_lrs[:count], losses[:count]
    smoothed = centred_average(lrs, losses, window)
    found = suggest_max_lr(lrs, smoothed, multiplier, fall)
    return LRFindResult(lrs=lrs, losses=losses, smoothed=smoothed, suggestion=found.max_lr, rule=found.rule,
                        min_loss_lr=found.min_loss_lr, fall_lr=found.fall_lr, steepest_lr=found.steepest_lr,
                        diverged=bool(finder._diverge_flag), start_lr=float(start_lr), end_lr=float(end_lr),
                        num_iter=int(num_iter), smooth_f=smooth_f, diverge_th=diverge_th, multiplier=multiplier,
                        fall=fall, window=window, seconds=round(seconds, 3), notes=found.notes)


def find_lr(cfg: Config, *, start_lr: float = DEFAULT_START_LR, end_lr: float = DEFAULT_END_LR,
            num_iter: int = DEFAULT_NUM_ITER, multiplier: float = DEFAULT_MULTIPLIER, window: float = DEFAULT_WINDOW,
            smooth_f: float = DEFAULT_SMOOTH_F, diverge_th: float = DEFAULT_DIVERGE_TH) -> LRFindResult:
    """The range test for recipe ``cfg``: its model (same seed, so the same initial weights as its run),
    optimizer, loss (with label smoothing), training data, precision and gradient clipping."""
    model, optimizer, loss_fn, data, device, precision = training_parts(cfg)
    t = cfg.train
    return lr_range_test(model, optimizer, loss_fn, data.train, device=device, precision=precision,
                         clip_norm=t.clip_norm or None, init_scale=t.init_scale, growth_interval=t.growth_interval,
                         seed=t.seed, start_lr=start_lr, end_lr=end_lr, num_iter=num_iter, smooth_f=smooth_f,
                         diverge_th=diverge_th, multiplier=multiplier, window=window)


def apply_suggestion(cfg: Config, result: LRFindResult) -> Config:
    """``cfg`` with ``schedule.max_lr`` set to the suggestion; ``optim.lr`` (where the cycle starts)
    keeps the recipe's ratio ``max_lr / lr`` (one-cycle's div_factor)."""
    return with_max_lr(cfg, float(f"{result.suggestion:.3g}"))


def choose_max_lr(cfg: Config, *, quiet: bool = False, stream: TextIO | None = None) -> tuple[Config, LRFindResult]:
    """``kiln train --max-lr auto``: run :func:`find_lr` with the defaults and return ``cfg`` at its
    suggestion (see :func:`apply_suggestion`) with the result; prints what it chose."""
    result = find_lr(cfg)
    chosen = apply_suggestion(cfg, result)
    out = stream or sys.stdout
    if quiet:
        print(f"kiln: --max-lr auto: max_lr {chosen.schedule.max_lr:g} (LR range test; {result.rule})", file=out)
    else:
        print(format_result(result, cfg.name).rsplit("\nnext:", 1)[0], file=out)
        print(f"kiln: --max-lr auto: training at max_lr {chosen.schedule.max_lr:g}, lr {chosen.optim.lr:.3g} "
              "(where the cycle starts), from the same initial weights", file=out)
    return chosen, result


def save_lr_find(result: LRFindResult, out_dir: str | Path) -> Path:
    """Write ``lr_find.json`` into ``out_dir`` (created); returns its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = RunDir(out_dir).lr_find
    write_json_atomic(json_path, result.to_dict())
    return json_path


def load_lr_find(path: str | Path) -> LRFindResult:
    """Read an ``lr_find.json``."""
    return LRFindResult.from_dict(json.loads(Path(path).read_text()))


def record_in_run(run: Any, result: LRFindResult) -> None:
    """Record a range test that chose a run's max_lr: lr_find.json in the run directory, an
    ``{"event": "lr_find"}`` line in events.jsonl, an ``lr_find`` section in config.json, and the
    curve in TensorBoard (``lr_find/*`` tags). ``run`` is a ``recipes.run.Assembly`` whose config.json
    has been written."""
    run_dir = RunDir(run.run_dir)
    save_lr_find(result, run_dir.root)
    summary = {"max_lr": "auto", "chosen_max_lr": run.config.schedule.max_lr,
               "chosen_lr": run.config.optim.lr, **result.summary()}
    append_jsonl(run_dir.events, {"event": "lr_find", "iteration": 0, "time": time.time(), **summary})
    config = read_config_json(run_dir.root)
    if config is not None:
        config["lr_find"] = summary
        write_json_atomic(run_dir.config, config)
    tensorboard = getattr(run, "handlers", {}).get("tensorboard")
    if tensorboard is not None and hasattr(tensorboard, "log_lr_find"):
        tensorboard.log_lr_find(result.lrs, result.losses, result.smoothed, result.suggestion)


def format_result(result: LRFindResult, recipe: str = "RECIPE") -> str:
    """The console lines for a range test: what ran, the suggestion with its rule, and the next command."""
    ended = (f"stopped at iteration {len(result.lrs)}: the loss passed {result.diverge_th:g}x its best"
             if result.diverged else f"ran all {len(result.lrs)} iterations without diverging")
    lines = [
        f"LR range test: LR {result.start_lr:.0e} -> {result.end_lr:g} over {result.num_iter} iterations; "
        f"{ended} ({result.seconds:.1f}s)",
        f"suggested max_lr: {result.suggestion:.2e}",
        f"  rule: {result.rule}",
    ]
    if result.steepest_lr is not None:
        lines.append(f"  (steepest descent of the smoothed loss at {result.steepest_lr:.2e}: "
                     "a constant-LR choice, low for one-cycle's peak)")
    lines += [f"  note: {note}" for note in result.notes]
    lines.append(f"next: kiln train {recipe} --max-lr {result.suggestion:.2g}   (or --max-lr auto)")
    return "\n".join(lines)
