"""Per-step overhead with near-zero compute (issue 17): what the loop and its handlers cost per step.

On a GPU a small network's step takes well under a millisecond of device time, and then the host's
own per-step work (Python, ignite's event dispatch, small tensor ops) is what the user waits for. To
see that work, the model here computes almost nothing, so a step's time is nearly all overhead.

Linear variants (the issue's set-up: a 16->4 ``nn.Linear``, batch 1, cross-entropy, fused AdamW):

- ``bare``: zero_grad, forward, backward, ``optimizer.step()``: the compute floor.
- ``tutorial``: the tutorial loop as the issue states it: ``clip_grad_norm_(1.0)``, ``OneCycleLR.step()``
  every step and ``loss.item()`` every step (a host sync on a GPU).
- ``tutorial-noitem``: the same loop without the per-step ``loss.item()``.
- ``ignite``: ignite's ``create_supervised_trainer`` (its default ``output_transform`` reads ``loss.item()``
  every step), ``LRScheduler(OneCycleLR)`` on ITERATION_COMPLETED, and the clipping as an optimizer
  step pre-hook (``register_step_pre_hook``: ignite's trainer has no clipping of its own).
- ``kiln-bare``: ``engine.create_trainer`` alone (fp32, no per-iteration reseeding).
- ``kiln-clip-cycle``: + ``callbacks.GradClip(max_norm=1)`` + ``callbacks.OneCycle``.
- ``kiln-guard``: + ``callbacks.NanGuard`` (the rollback policy, every default).

kiln with every handler ``kiln train`` attaches cannot run a bare ``nn.Linear``: ``recipes.run.build``
makes the model from the config, and no config makes a lone linear layer. Swapping the model after
``build`` would measure an assembly the CLI never makes. So the ``cnn`` variants use the smallest model a
config does make, through the CLI's own code path: the ``synthetic`` recipe with ``data.image_size=8
data.batch_size=1 data.num_classes=4 model.channels=1`` (a 3->1 3x3 convolution, BatchNorm, ReLU, 2x2
max-pool, then exactly a 16->4 linear layer), fp32 (``train.precision=fp32``: the tutorial loops have no
autocast; ``auto`` would pick bf16 on a CPU with AMX), one epoch of ``--warmup`` + ``--steps`` batches:

- ``bare-cnn``: that model's compute floor (same model, initial weights, batches, optimizer and loss:
  ``recipes.run.parts.training_parts``), channels_last as kiln trains it.
- ``tutorial-cnn``: the tutorial loop (clip, OneCycleLR, ``loss.item()``) on the same.
- ``kiln-train``: ``recipes.run.train(cfg, run_dir)``, what ``kiln train`` runs: ``build`` (every handler:
  AMP, GradClip, OneCycle, Validation, MetricsLog, TensorBoard, RunSummary, NanGuard, Checkpointer,
  GracefulStop, Progress; the run directory; the seeded per-iteration reseeding; kiln's batching) and
  the run. Its overhead is ``kiln-train - bare-cnn``, to compare with ``tutorial-cnn - bare-cnn``.

The tutorial and bare loops iterate a list of prebuilt batches (a DataLoader at batch 1 would cost more
than everything measured here); kiln's batching (an ``index_select`` per batch) is part of kiln's figure.

Timing: every variant calls the same ``StepClock.tick`` once per step (inline in the loops, an
ITERATION_COMPLETED handler attached after all the others in the engines), which notes
``perf_counter`` and ``process_time`` after step ``--warmup`` and after step ``--warmup + --steps``. The
figure is the mean over those steps, so periodic work (logging every 10 steps, NanGuard's check every
20) is in it; the epoch end (validation, checkpoints) is not. One torch thread
(``torch.set_num_threads(1)``, ``OMP_NUM_THREADS=1``). Each variant runs in a fresh process; rounds go
A B C ... A B C ..., and the table gives the median over rounds (``us/step``, wall; ``cpu us``, CPU
time of all threads: a gap between them is waiting, e.g. for a file flush) and the fastest round
(``best``: the least disturbed on a shared machine). ``x tutorial`` is the median's ratio to the tutorial
loop on the same model, ``over floor`` the median minus the floor's (``bare`` or ``bare-cnn``). The progress bar is attached only on a
terminal: here stderr is a pipe, so there is none (as under CI, ``nohup`` or a batch scheduler).

Usage::

    python benchmarks/overhead.py [--rounds 5] [--steps 2000] [--warmup 200] [--variants tutorial,kiln-guard]

Writes ``results/<date>-cpu-overhead.json`` (``machine.save_result``) unless ``--no-save``.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

__all__ = ["VARIANTS", "StepClock", "main"]

#: variant -> (model family, what it is)
VARIANTS: dict[str, tuple[str, str]] = {
    "bare": ("linear", "fwd/bwd/AdamW step only (the floor)"),
    "tutorial": ("linear", "tutorial loop: clip, OneCycleLR, loss.item() every step"),
    "tutorial-noitem": ("linear", "tutorial loop without the per-step loss.item()"),
    "ignite": ("linear", "create_supervised_trainer + LRScheduler + clip hook"),
    "kiln-bare": ("linear", "engine.create_trainer alone"),
    "kiln-clip-cycle": ("linear", "+ GradClip + OneCycle"),
    "kiln-guard": ("linear", "+ NanGuard (rollback, defaults)"),
    "bare-cnn": ("cnn", "fwd/bwd/AdamW step only (the floor)"),
    "tutorial-cnn": ("cnn", "tutorial loop: clip, OneCycleLR, loss.item() every step"),
    "kiln-train": ("cnn", "recipes.run.train: every handler kiln train attaches"),
}
BASELINES = {"linear": ("tutorial", "bare"), "cnn": ("tutorial-cnn", "bare-cnn")}  # family -> (ratio base, floor)
MAX_LR, DIV_FACTOR, CLIP = 1e-2, 10.0, 1.0


class StepClock:
    """Notes wall and CPU time after step ``warmup`` and after step ``warmup + steps`` (1-based step numbers).

    Example:
        >>> clock = StepClock(warmup=1, steps=2)
        >>> for step in (1, 2, 3):
        ...     clock.tick(step)
        >>> sorted(clock.figures())
        ['cpu_us_per_step', 'steps', 'us_per_step']
    """

    def __init__(self, warmup: int, steps: int) -> None:
        self.first, self.last, self.steps = warmup, warmup + steps, steps
        self.marks: list[tuple[float, float]] = []

    def tick(self, step: int) -> None:
        """Call once at the end of every step."""
        if step == self.first or step == self.last:
            self.marks.append((time.perf_counter(), time.process_time()))

    def attach(self, engine: Any) -> None:
        """Tick at the end of each of ``engine``'s iterations (attach it after every other handler)."""
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: self.tick(e.state.iteration))

    def figures(self) -> dict[str, float]:
        """Microseconds per step over the timed steps: wall and CPU (all threads)."""
        if len(self.marks) != 2:
            raise RuntimeError(f"the run did not reach step {self.last}")
        (w0, c0), (w1, c1) = self.marks
        return {"us_per_step": (w1 - w0) / self.steps * 1e6, "cpu_us_per_step": (c1 - c0) / self.steps * 1e6,
                "steps": self.steps}


# ---- the variants (each runs in a fresh worker process) -------------------------------------------------

def _linear_parts(total: int):
    """The 16->4 linear model, fused AdamW and ``total`` prebuilt batches of one sample."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=MAX_LR / DIV_FACTOR, weight_decay=1e-2, fused=True)
    x, y = torch.randn(total, 1, 16), torch.randint(0, 4, (total, 1))
    return model, optimizer, torch.nn.functional.cross_entropy, [(x[i], y[i]) for i in range(total)]


def cnn_config(total: int):
    """The synthetic recipe at its smallest: 3x8x8 images, batch 1, ``small_cnn`` with one 1-channel block
    (16 features into a 16->4 linear layer), fp32 on the CPU, one epoch of at least ``total`` batches."""
    from recipes import get_recipe
    from recipes.config import apply_overrides

    val_fraction = 0.2
    samples = math.ceil(total / (1 - val_fraction)) + 2  # the split keeps round(n * 0.2) for validation
    return apply_overrides(get_recipe("synthetic"), {
        "data.image_size": 8, "data.batch_size": 1, "data.num_classes": 4, "data.samples": samples,
        "data.val_fraction": val_fraction, "model.channels": (1,), "train.epochs": 1, "train.precision": "fp32",
        "train.device": "cpu"})


def _cnn_parts(total: int):
    """``bare-cnn``/``tutorial-cnn``: the model, optimizer, loss and batches ``build`` would make for
    :func:`cnn_config`, channels_last as kiln trains it, the batches prebuilt."""
    import torch

    from recipes.run.parts import training_parts

    cfg = cnn_config(total)
    parts = training_parts(cfg)
    model = parts.model.to(memory_format=torch.channels_last)
    parts.data.train.set_position(1, 0)
    batches = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in parts.data.train][:total]
    return model, parts.optimizer, parts.loss_fn, batches


def _one_cycle(optimizer, total: int):
    from torch.optim.lr_scheduler import OneCycleLR

    return OneCycleLR(optimizer, max_lr=MAX_LR, total_steps=total, div_factor=DIV_FACTOR)


def run_loop(model, optimizer, loss_fn, batches, clock: StepClock, *, tutorial: bool, item: bool) -> None:
    """The hand-written loop: the floor (``tutorial=False``) or the tutorial's, with or without ``loss.item()``."""
    import torch

    scheduler = _one_cycle(optimizer, len(batches)) if tutorial else None
    model.train()
    running = 0.0
    for step, (x, y) in enumerate(batches, 1):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        if tutorial:
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        if tutorial:
            scheduler.step()
            if item:
                running += loss.item()
        clock.tick(step)


def run_ignite(model, optimizer, loss_fn, batches, clock: StepClock) -> None:
    """ignite's supervised trainer, its LRScheduler on OneCycleLR, clipping as an optimizer pre-step hook."""
    import torch
    from ignite.engine import Events, create_supervised_trainer
    from ignite.handlers import LRScheduler

    params = list(model.parameters())

    def clip(*_: Any) -> None:  # a step pre-hook must return None
        torch.nn.utils.clip_grad_norm_(params, CLIP)

    optimizer.register_step_pre_hook(clip)
    trainer = create_supervised_trainer(model, optimizer, loss_fn)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, LRScheduler(_one_cycle(optimizer, len(batches))))
    clock.attach(trainer)
    trainer.run(batches, max_epochs=1)


def run_kiln(model, optimizer, loss_fn, batches, clock: StepClock, *, handlers: int) -> None:
    """kiln's trainer with 0 (bare), 2 (GradClip, OneCycle) or 3 (+ NanGuard) handlers."""
    from callbacks import GradClip, NanGuard, OneCycle
    from engine import create_trainer

    trainer = create_trainer(model, optimizer, loss_fn, precision="fp32")
    if handlers >= 2:
        schedule = OneCycle(optimizer, max_lr=MAX_LR, total_steps=len(batches), div_factor=DIV_FACTOR)
        GradClip(model.parameters(), max_norm=CLIP).attach(trainer)
        schedule.attach(trainer)
        if handlers >= 3:
            NanGuard(model, optimizer, schedule=schedule).attach(trainer)
    clock.attach(trainer)
    trainer.run(batches, max_epochs=1)


def run_kiln_train(total: int, clock: StepClock) -> None:
    """``recipes.run.train`` on :func:`cnn_config`: the CLI's assembly and run, the clock attached last."""
    from recipes.run import train

    cfg = cnn_config(total)
    with tempfile.TemporaryDirectory(prefix="kiln-overhead-") as tmp:
        run = train(cfg, Path(tmp) / "run", quiet=False, stream=io.StringIO(), extra_handlers={"clock": clock})
        if len(run.train_data) < total or run.status != "completed":
            raise RuntimeError(f"kiln-train: {len(run.train_data)} batches, status {run.status}")


def worker(variant: str, warmup: int, steps: int) -> dict[str, Any]:
    """Run one variant in this process; its figures."""
    import torch

    torch.set_num_threads(1)
    total = warmup + steps
    clock = StepClock(warmup, steps)
    runners: dict[str, Callable[[], None]] = {
        "bare": lambda: run_loop(*_linear_parts(total), clock, tutorial=False, item=False),
        "tutorial": lambda: run_loop(*_linear_parts(total), clock, tutorial=True, item=True),
        "tutorial-noitem": lambda: run_loop(*_linear_parts(total), clock, tutorial=True, item=False),
        "ignite": lambda: run_ignite(*_linear_parts(total), clock),
        "kiln-bare": lambda: run_kiln(*_linear_parts(total), clock, handlers=0),
        "kiln-clip-cycle": lambda: run_kiln(*_linear_parts(total), clock, handlers=2),
        "kiln-guard": lambda: run_kiln(*_linear_parts(total), clock, handlers=3),
        "bare-cnn": lambda: run_loop(*_cnn_parts(total), clock, tutorial=False, item=False),
        "tutorial-cnn": lambda: run_loop(*_cnn_parts(total), clock, tutorial=True, item=True),
        "kiln-train": lambda: run_kiln_train(total, clock),
    }
    runners[variant]()
    return {"variant": variant, **clock.figures()}


# ---- the parent: fresh processes, interleaved rounds, medians ---------------------------------------------

def _spawn(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--steps", str(args.steps),
           "--warmup", str(args.warmup)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=args.timeout,
                          check=False)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"variant": variant, "error": f"exit {done.returncode}: {tail}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(records: list[dict[str, Any]], variants: list[str]) -> dict[str, Any]:
    """Medians over the rounds per variant, ratios to the tutorial loop of the same model, overhead over the floor."""
    table: dict[str, dict[str, Any]] = {}
    for v in variants:
        ok = [r for r in records if r["variant"] == v and "error" not in r]
        family = VARIANTS[v][0]
        table[v] = {"model": family, "what": VARIANTS[v][1], "rounds": len(ok),
                    "us_per_step": statistics.median(r["us_per_step"] for r in ok) if ok else None,
                    "cpu_us_per_step": statistics.median(r["cpu_us_per_step"] for r in ok) if ok else None,
                    "best_us_per_step": min(r["us_per_step"] for r in ok) if ok else None,
                    "runs_us_per_step": [round(r["us_per_step"], 1) for r in ok],
                    "errors": [r["error"] for r in records if r["variant"] == v and "error" in r]}
    for v, row in table.items():
        base, floor = BASELINES[row["model"]]
        b, f = table.get(base, {}).get("us_per_step"), table.get(floor, {}).get("us_per_step")
        row["ratio_vs_tutorial"] = row["us_per_step"] / b if row["us_per_step"] and b else None
        row["overhead_us"] = row["us_per_step"] - f if row["us_per_step"] is not None and f is not None else None
    return table


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(table: dict[str, dict[str, Any]], meta: dict[str, Any]) -> None:
    """The figures, one line per variant, grouped by model."""
    print(f"\n{meta['cpu']}  torch {meta['torch']}  ignite {meta['ignite']}  1 thread  {meta['rounds']} rounds x "
          f"{meta['steps']} steps (+{meta['warmup']} warm-up)  load {meta['load_before']} -> {meta['load_after']}")
    print(f"  {'variant':<16} {'us/step':>8} {'cpu us':>8} {'best':>8} {'x tutorial':>10} {'over floor':>10}  what")
    for family in ("linear", "cnn"):
        rows = [(v, r) for v, r in table.items() if r["model"] == family]
        if rows:
            print(f"  -- {'16->4 linear, batch 1' if family == 'linear' else 'synthetic small_cnn (1 ch, 8x8 -> 16->4), batch 1'}")
        for v, r in rows:
            print(f"  {v:<16} {_fmt(r['us_per_step'], '8.1f')} {_fmt(r['cpu_us_per_step'], '8.1f')} "
                  f"{_fmt(r['best_us_per_step'], '8.1f')} "
                  f"{_fmt(r['ratio_vs_tutorial'], '10.3f')} {_fmt(r['overhead_us'], '10.1f')}  {r['what']}"
                  + (f"  [{len(r['errors'])} failed: {r['errors'][0]}]" if r["errors"] else ""))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Per-step overhead of the tutorial loop, ignite and kiln at near-zero compute.")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (each variant once per round)")
    p.add_argument("--steps", type=int, default=2000, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=200, help="untimed steps before them")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--timeout", type=float, default=600, help="seconds before a variant's process is given up")
    p.add_argument("--no-save", action="store_true", help="print only; write no results JSON")
    p.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rounds < 1 or args.steps < 1 or args.warmup < 1:
        p.error("--rounds, --steps and --warmup must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark (or, with the hidden ``--worker``, one variant of it)."""
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.warmup, args.steps)))
        return
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        sys.exit(f"overhead: unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    import ignite
    import torch
    from machine import cpu_model, save_result

    meta = {"cpu": cpu_model(), "torch": torch.__version__, "ignite": ignite.__version__,
            "python": platform.python_version(), "command": " ".join(sys.argv), "rounds": args.rounds,
            "steps": args.steps, "warmup": args.warmup, "threads": 1,
            "load_before": [round(x, 2) for x in os.getloadavg()]}
    records = []
    for round_ in range(1, args.rounds + 1):
        for v in variants:
            record = {**_spawn(v, args), "round": round_}
            records.append(record)
            figure = f"{record['us_per_step']:.1f} us/step" if "error" not in record else record["error"]
            print(f"round {round_} {v:<16} {figure}", flush=True)
    meta["load_after"] = [round(x, 2) for x in os.getloadavg()]
    table = summarize(records, variants)
    print_table(table, meta)
    if not args.no_save:
        save_result("overhead", {"meta": meta, "variants": table, "runs": records})


if __name__ == "__main__":
    main()
