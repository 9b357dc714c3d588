"""NanGuard's cost per iteration on the digits run: the same training with and without the guard.

Builds the digits recipe's training step by hand (data, small CNN, AdamW, AMP, GradClip, OneCycle;
no validation or loggers, so the step is all that is timed), then runs it ``--repeats`` times with
NanGuard and as often without, interleaved (A B A B ...) so that a slow spell of a shared machine hits
both alike. Each run is ``--epochs`` epochs; the first epoch is a warm-up and is not timed. Reports
the median time per iteration of each variant and their relative difference, as CPU time of the
training thread (torch runs on that one thread here, so other processes on a shared machine disturb
it far less than wall time) and as wall time, and the CPU time spent inside NanGuard's own handlers
per iteration (a stopwatch around each handler call). Prints one JSON object.

Usage::

    python benchmarks/nan_guard_cost.py [--repeats 7] [--epochs 3] [--policy rollback] [--precision fp32]

Measured (torch 2.14.1, CPU, 1 thread, a shared 2-core machine, 11 interleaved repeats of 2 timed
epochs = 46 iterations each; median CPU time of the training iteration about 43-49 ms):

=========================  ===========================  ==================================
policy                     time inside NanGuard         end to end (with vs without)
=========================  ===========================  ==================================
rollback (default), skip   0.37 ms/iteration = 0.75%    -5.1% (paired -1.5%): within noise
stop                       0.61 ms/iteration = 1.43%    +4.2% (paired +2.9%): within noise
=========================  ===========================  ==================================

Single runs of the same variant differed by up to 15% on that machine, so the end-to-end difference
cannot resolve 2%; the time inside the handlers can. On a GPU the per-step work is a handful of small
kernels (no host sync) plus, for skip and rollback under fp32/bf16, one scalar read per optimizer
step; the weight check, snapshot and flag read happen every ``check_every`` (20) steps.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ignite.engine import Events  # noqa: E402

from callbacks import AMP, GradClip, NanGuard, OneCycle  # noqa: E402
from engine import create_trainer  # noqa: E402
from recipes import get_recipe  # noqa: E402
from recipes.data import TensorBatches, digits_tensors  # noqa: E402
from recipes.models import parameter_groups, small_cnn  # noqa: E402

__all__ = ["measure", "main"]

#: The handler methods of NanGuard's parts (detector, policy, fp16 monitor), each timed where it exists.
_HANDLERS = ("_on_started", "_on_before_step", "_on_step_completed", "_on_iteration_completed")


class TimedNanGuard(NanGuard):
    """NanGuard with a stopwatch around each handler of its parts (benchmark only)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seconds = 0.0
        for part in (self.detector, self.policy, self.monitor):
            for name in _HANDLERS:
                if part is not None and hasattr(part, name):
                    setattr(part, name, self._timed(getattr(part, name)))

    def _timed(self, handler):
        def timed(engine):
            start = time.thread_time()
            try:
                handler(engine)
            finally:
                self.seconds += time.thread_time() - start
        return timed


def _one_run(with_guard: bool, epochs: int, policy: str, precision: str, threads: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    cfg = get_recipe("digits")
    torch.manual_seed(0)
    x, y = digits_tensors(cfg.data.image_size)
    x = (x - x.mean()) / x.std()
    data = TensorBatches(x, y, cfg.data.batch_size, seed=0)
    model = small_cnn(1, 10, cfg.model.channels, cfg.data.image_size)
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.optim.weight_decay, False), lr=cfg.optim.lr, foreach=True)
    trainer = create_trainer(model, optimizer, torch.nn.CrossEntropyLoss(label_smoothing=0.1), precision=precision,
                             seed=0)
    amp = AMP(device="cpu")
    schedule = OneCycle(optimizer, max_lr=cfg.schedule.max_lr, total_steps=OneCycle.total_steps_for(epochs, len(data)),
                        div_factor=cfg.div_factor)
    handlers = [amp, GradClip(model.parameters(), max_norm=1.0), schedule]
    guard = None
    if with_guard:
        snapshot = {"model": model, "optimizer": optimizer, "schedule": schedule}
        if precision == "fp16":
            snapshot["scaler"] = amp.scaler
        guard = TimedNanGuard(model, optimizer, to_snapshot=snapshot, schedule=schedule,
                              scaler=amp.scaler if precision == "fp16" else None, policy=policy)
        handlers.append(guard)
    for handler in handlers:
        handler.attach(trainer)

    marks: dict[str, float] = {}

    @trainer.on(Events.EPOCH_COMPLETED(once=1))
    def _start_clock(engine):
        marks.update(wall=time.perf_counter(), cpu=time.thread_time(), guard=guard.seconds if guard else 0.0)

    @trainer.on(Events.COMPLETED)
    def _stop_clock(engine):
        marks.update(wall_end=time.perf_counter(), cpu_end=time.thread_time(),
                     guard_end=guard.seconds if guard else 0.0)

    state = trainer.run(data, max_epochs=epochs)
    n = state.iteration - state.epoch_length
    return {"cpu": (marks["cpu_end"] - marks["cpu"]) / n, "wall": (marks["wall_end"] - marks["wall"]) / n,
            "guard": (marks["guard_end"] - marks["guard"]) / n}


def measure(repeats: int = 7, epochs: int = 3, policy: str = "rollback", precision: str = "fp32",
            threads: int = 1) -> dict:
    """Interleaved runs with and without NanGuard; medians and the guard's relative cost.

    Example:
        >>> result = measure(repeats=1, epochs=2)  # doctest: +SKIP
    """
    without, with_guard = [], []
    for _ in range(repeats):
        without.append(_one_run(False, epochs, policy, precision, threads))
        with_guard.append(_one_run(True, epochs, policy, precision, threads))

    def median(runs: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    cpu, cpu_guarded = median(without, "cpu"), median(with_guard, "cpu")
    wall, wall_guarded = median(without, "wall"), median(with_guard, "wall")
    own = median(with_guard, "guard")
    return {
        "benchmark": "nan_guard_cost", "recipe": "digits", "policy": policy, "precision": precision,
        "device": "cpu", "threads": threads, "repeats": repeats, "timed_epochs": epochs - 1,
        "cpu_ms_per_iteration_without": round(cpu * 1e3, 3),
        "cpu_ms_per_iteration_with": round(cpu_guarded * 1e3, 3),
        "overhead_percent_cpu": round(100 * (cpu_guarded - cpu) / cpu, 2),
        "overhead_percent_cpu_paired": round(100 * statistics.median(
            (g["cpu"] - b["cpu"]) / b["cpu"] for b, g in zip(without, with_guard)), 2),
        "wall_ms_per_iteration_without": round(wall * 1e3, 3),
        "wall_ms_per_iteration_with": round(wall_guarded * 1e3, 3),
        "overhead_percent_wall": round(100 * (wall_guarded - wall) / wall, 2),
        "cpu_ms_in_nan_guard_per_iteration": round(own * 1e3, 4),
        "overhead_percent_in_handlers": round(100 * own / cpu, 2),
        "runs_cpu_ms_without": [round(r["cpu"] * 1e3, 2) for r in without],
        "runs_cpu_ms_with": [round(r["cpu"] * 1e3, 2) for r in with_guard],
        "torch": torch.__version__, "python": platform.python_version(),
    }


def main() -> None:
    """Parse the arguments, measure, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--policy", choices=("skip", "rollback", "stop"), default="rollback")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared machine)")
    args = parser.parse_args()
    print(json.dumps(measure(args.repeats, args.epochs, args.policy, args.precision, args.threads), indent=2))


if __name__ == "__main__":
    main()
