"""Ground truth for the LR range test: whole runs of a recipe at its max_lr x {1/8, 1/4, 1/2, 1, 2, 4, 8}.

Each run is a whole ``kiln train RECIPE --max-lr X`` process (``optim.lr`` keeps the recipe's
max_lr / lr ratio: where the one-cycle starts), validated where tuning must validate: on a hold-out
of the training split for recipes that validate on their test split (``recipes.tools.holdout``),
else on the recipe's own validation split. The figure is the final epoch's val_accuracy (never the
best epoch's). The best max_lr is the grid point with the highest median over seeds. Results go to
``results/`` as JSON, which ``benchmarks/lr_find_calibration.py`` reads.

Usage::

    python benchmarks/lr_grid.py digits [--seeds 2] [--precision fp32] [--factors 0.125 ... 8] [-- EXTRA KILN ARGS]
    python benchmarks/lr_grid.py fashion-mnist --seeds 1 --factors 0.125 8 --add-to results/...-lr-grid-fashion-mnist.json

``--add-to`` completes a grid spread over sessions: the earlier file's rows for the factors not run now are
kept (their runs must have trained the same config: the same recipe, seeds and precision; its
``extra`` arguments are recorded beside this run's).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import cpu_model, save_result  # noqa: E402

from recipes import get_recipe  # noqa: E402
from recipes.tools.holdout import tuning_split  # noqa: E402

__all__ = ["main", "train", "tuning_args", "against_grid_parser", "best_of", "FACTORS"]

ROOT = Path(__file__).resolve().parents[1]
FACTORS = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def train(run_dir: Path, recipe: str, max_lr: float | str, seed: int, precision: str, extra: list[str]) -> dict:
    """One whole ``kiln train`` process (``max_lr`` a number or ``"auto"``): its final val_accuracy, the max_lr
    it trained at and its wall time."""
    started = time.perf_counter()
    max_lr = max_lr if isinstance(max_lr, str) else f"{max_lr:.6g}"
    done = subprocess.run([sys.executable, "-m", "recipes.cli", "train", recipe, "--max-lr", max_lr,
                           "--seed", str(seed), "--precision", precision, "--quiet", "--no-report", *extra,
                           "--out", str(run_dir)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    if done.returncode:
        raise SystemExit(f"kiln train failed ({done.returncode}): {done.stderr.strip()}")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained_at = json.loads((run_dir / "config.json").read_text())["schedule"]["max_lr"]
    return {"final_val_accuracy": metrics[-1]["val_accuracy"], "max_lr": trained_at,
            "seconds": round(time.perf_counter() - started, 1)}


def against_grid_parser(description: str) -> argparse.ArgumentParser:
    """The arguments of a benchmark that compares with this grid's result: RECIPE, ``--grid``, ``--seeds``,
    ``--precision`` (lr_find_calibration.py, max_lr_auto.py)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("recipe")
    parser.add_argument("--grid", type=Path, required=True, help="benchmarks/lr_grid.py's result JSON")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--precision", default="fp32")
    return parser


def best_of(rows: list[dict]) -> dict:
    """The grid point (a row of a result's ``grid``) with the highest median final accuracy, the first of a
    tie: its ``max_lr``, ``factor``, ``median_final_val_accuracy``."""
    return max(rows, key=lambda row: row["median_final_val_accuracy"])


def tuning_args(recipe: str, extra: list[str]) -> list[str]:
    """``extra`` plus the hold-out a tuning run of ``recipe`` validates on (``recipes.tools.holdout``), if any."""
    base = get_recipe(recipe)
    tuned, _ = tuning_split(base, explicit=[a.split("=")[0] for a in extra if "=" in a])
    if tuned.data.val_fraction != base.data.val_fraction:
        return [*extra, "--set", f"data.val_fraction={tuned.data.val_fraction}"]
    return list(extra)


def main() -> None:
    """Run the grid (seed by seed, every factor in each: a slow spell hits every factor alike), save JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--factors", type=float, nargs="+", default=list(FACTORS))
    parser.add_argument("--add-to", type=Path, help="an earlier result of this grid: keep its other factors' rows")
    args, rest = parser.parse_known_args()  # the rest (after --): more kiln train arguments
    args.extra = [a for a in rest if a != "--"]
    base = get_recipe(args.recipe)
    extra = tuning_args(args.recipe, args.extra)
    runs: dict[float, list[dict]] = {f: [] for f in args.factors}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for factor in args.factors:
                run = train(Path(tmp) / f"{factor}-{seed}", args.recipe, base.schedule.max_lr * factor, seed,
                            args.precision, extra)
                runs[factor].append(run)
                print(f"seed {seed} max_lr x{factor:<6g} {base.schedule.max_lr * factor:<9.3g} final "
                      f"{run['final_val_accuracy']:.4f}  {run['seconds']:.0f} s", flush=True)
    grid = [{"factor": f, "max_lr": base.schedule.max_lr * f,
             "median_final_val_accuracy": statistics.median(r["final_val_accuracy"] for r in rs), "runs": rs}
            for f, rs in runs.items()]
    merged = {}
    if args.add_to:
        earlier = json.loads(args.add_to.read_text())
        if (earlier["recipe"], earlier["seeds"], earlier["precision"]) != (args.recipe, args.seeds, args.precision):
            raise SystemExit(f"{args.add_to} is a grid of another recipe, seed count or precision")
        grid = sorted(grid + [row for row in earlier["grid"] if row["factor"] not in runs], key=lambda row: row["factor"])
        merged = {"added_to": str(args.add_to), "extra_of_added_to": earlier["extra"]}
    best = best_of(grid)
    print(f"\n{cpu_model()}, {args.precision}: {args.recipe}, medians of {args.seeds} seed(s); best max_lr "
          f"{best['max_lr']:.3g} (x{best['factor']:g}), final val_accuracy {best['median_final_val_accuracy']:.4f}")
    save_result(f"lr-grid-{args.recipe}", {"benchmark": "lr_grid", "recipe": args.recipe, "precision": args.precision,
                                           "seeds": args.seeds, "extra": extra, "recipe_max_lr": base.schedule.max_lr,
                                           "best_max_lr": best["max_lr"], "grid": grid, **merged})


if __name__ == "__main__":
    main()
