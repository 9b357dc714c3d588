"""Which rule turns an LR range test into a one-cycle max_lr? Candidate rules against a grid of whole runs.

For each seed, ``kiln lr-find RECIPE`` runs as a whole process (the ramp of ``--num-iter`` steps from
``--start-lr`` to ``--end-lr``, kiln's defaults unless given; tuning recipes hold out part of their
training split, as the grid did), and its raw per-step losses (lr_find.json) are turned into a suggestion
by each candidate rule:

- ``kiln``: the suggestion ``kiln lr-find`` printed (``recipes.lr_rule``: 10x the LR where the losses'
  centred average had made 90% of its fall to its lowest point);
- ``ema-min/3``: kiln's rule until December 2026: the LR at the lowest point of an EMA of the losses
  (weight 0.05 on the new value, as ignite's finder smooths; it lags the raw loss by about 20 steps),
  divided by 3;
- ``centred-min``, ``centred-min/3``, ``centred-min/10``: the LR at the lowest point of the centred average
  (no lag: the window reaches as far ahead as behind), times 1, 1/3, 1/10;
- ``centred-steepest``: where the centred curve falls fastest per decade, before its lowest point;
- ``valley``: fastai's valley: the longest run of falling loss on the centred curve, two thirds of the way in.

Each suggestion is compared with the grid's best max_lr (``benchmarks/lr_grid.py``'s JSON: the factor
with the highest median final accuracy) and with its plateau (factors within ``--tolerance`` of that
accuracy): the ratio, and whether it lies within 2x of the best. Results go to ``results/`` as JSON.

Usage::

    python benchmarks/lr_find_calibration.py digits --grid results/...-lr-grid-digits.json [--seeds 2]
        [--precision fp32] [--num-iter 200] [--start-lr 1e-6] [--end-lr 1] [-- EXTRA KILN ARGS]
"""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lr_grid import against_grid_parser, best_of  # noqa: E402
from machine import cpu_model, save_result  # noqa: E402

from recipes.lr_rule import DEFAULT_END_LR, DEFAULT_NUM_ITER, DEFAULT_START_LR, centred_average  # noqa: E402

__all__ = ["main", "rules"]

ROOT = Path(__file__).resolve().parents[1]


def ema(values: list[float], weight: float = 0.05) -> list[float]:
    """An exponential moving average (``weight`` on the new value), as ignite's finder smooths."""
    out = [values[0]]
    for v in values[1:]:
        out.append(weight * v + (1 - weight) * out[-1] if math.isfinite(v) else out[-1])
    return out


def _argmin(values: list[float]) -> int:
    return min((i for i, v in enumerate(values) if math.isfinite(v)), key=lambda i: values[i])


def rules(result: dict) -> dict[str, float]:
    """Every candidate rule's suggestion for one range test (an lr_find.json)."""
    lrs, losses = result["lrs"], [float(v) for v in result["losses"]]
    curve = centred_average(lrs, losses, result["window"])
    i_min = _argmin(curve)
    found = {"kiln": result["suggestion"], "ema-min/3": lrs[_argmin(ema(losses))] / 3, "centred-min": lrs[i_min],
             "centred-min/3": lrs[i_min] / 3, "centred-min/10": lrs[i_min] / 10}
    slopes = [((curve[i + 1] - curve[i - 1]) / (math.log10(lrs[i + 1]) - math.log10(lrs[i - 1])), i)
              for i in range(1, i_min) if lrs[i + 1] > lrs[i - 1]]
    if slopes:
        found["centred-steepest"] = lrs[min(slopes)[1]]
    best_start, best_len, start = 0, 0, 0
    for i in range(1, i_min + 1):  # the longest stretch of falling loss up to the lowest point
        if curve[i] >= curve[i - 1]:
            start = i
        elif i - start > best_len:
            best_start, best_len = start, i - start
    if best_len:
        found["valley"] = lrs[best_start + (2 * best_len) // 3]
    return found


def lr_find(recipe: str, seed: int, precision: str, out: Path, extra: list[str]) -> dict:
    """One ``kiln lr-find`` process; its lr_find.json."""
    done = subprocess.run([sys.executable, "-m", "recipes.cli", "lr-find", recipe, "--set", f"train.seed={seed}",
                           "--set", f"train.precision={precision}", *extra, "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    if done.returncode:
        raise SystemExit(f"kiln lr-find failed ({done.returncode}): {done.stderr.strip()}")
    return json.loads((out / "lr_find.json").read_text())


def main() -> None:
    """Run the range tests, apply every rule, compare with the grid, print and save."""
    parser = against_grid_parser(__doc__.splitlines()[0])
    parser.add_argument("--num-iter", type=int, default=DEFAULT_NUM_ITER)
    parser.add_argument("--start-lr", type=float, default=DEFAULT_START_LR)
    parser.add_argument("--end-lr", type=float, default=DEFAULT_END_LR)
    parser.add_argument("--tolerance", type=float, default=0.002, help="the plateau: accuracy within this of the best")
    args, rest = parser.parse_known_args()  # the rest (after --): more kiln lr-find arguments
    args.extra = [a for a in rest if a != "--"]
    grid = json.loads(args.grid.read_text())
    top_row = best_of(grid["grid"])
    best, top = top_row["max_lr"], top_row["median_final_val_accuracy"]
    plateau = [row["max_lr"] for row in grid["grid"] if row["median_final_val_accuracy"] >= top - args.tolerance]
    extra = ["--num-iter", str(args.num_iter), "--start-lr", str(args.start_lr), "--end-lr", str(args.end_lr)]
    found: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            result = lr_find(args.recipe, seed, args.precision, Path(tmp) / str(seed), extra + args.extra)
            for name, lr in rules(result).items():
                found.setdefault(name, []).append(lr)
    table = {}
    print(f"\n{cpu_model()}, {args.precision}: {args.recipe}; grid best max_lr {best:.3g}, plateau "
          f"{min(plateau):.3g}..{max(plateau):.3g} (within {100 * args.tolerance:.1f} points)")
    for name, lrs in found.items():
        ratios = [lr / best for lr in lrs]
        within = all(0.5 <= r <= 2 for r in ratios)
        on_plateau = all(min(plateau) / 2 <= lr <= max(plateau) * 2 for lr in lrs)
        table[name] = {"suggestions": lrs, "ratios_to_best": ratios, "within_2x_of_best": within,
                       "within_2x_of_plateau": on_plateau, "spread": max(lrs) / min(lrs)}
        print(f"  {name:<17} " + "  ".join(f"{lr:.3g} (x{r:.2g})" for lr, r in zip(lrs, ratios))
              + f"   {'within 2x' if within else 'outside 2x'}; spread x{max(lrs) / min(lrs):.2g}")
    save_result(f"lr-find-calibration-{args.recipe}", {
        "benchmark": "lr_find_calibration", "recipe": args.recipe, "precision": args.precision, "seeds": args.seeds,
        "num_iter": args.num_iter, "start_lr": args.start_lr, "end_lr": args.end_lr, "extra": args.extra,
        "grid": str(args.grid), "best_max_lr": best, "plateau": plateau, "rules": table,
        "median_ratio": {name: statistics.median(row["ratios_to_best"]) for name, row in table.items()}})


if __name__ == "__main__":
    main()
