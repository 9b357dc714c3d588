"""Does ``kiln train RECIPE --max-lr auto`` land where the grid of whole runs says is best, whatever max_lr the
recipe carries?

For each seed and each factor (default 1/8, 1, 8), a whole ``kiln train RECIPE --max-lr auto`` process
runs on a copy of the recipe whose max_lr and lr (where the one-cycle starts) are both multiplied by the
factor: a recipe shipped with a max_lr 8x too high or too low. The range test measures the model and
data, so the max_lr it trains at should not move with the factor. Each run is compared with
``benchmarks/lr_grid.py``'s result for the recipe: the chosen max_lr against the grid's best (within 2x?),
and the final val_accuracy against the best grid point's median (at most 0.2 points below?). Runs
validate where the grid's did (a hold-out of the training split for recipes that validate on their test
split). Results go to ``results/`` as JSON.

Usage::

    python benchmarks/max_lr_auto.py digits --grid results/...-lr-grid-digits.json [--seeds 2] [--precision fp32]
        [--factors 0.125 1 8] [-- EXTRA KILN ARGS]
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lr_grid import against_grid_parser, best_of, train, tuning_args  # noqa: E402
from machine import cpu_model, save_result  # noqa: E402

from recipes import get_recipe  # noqa: E402

__all__ = ["main"]


def main() -> None:
    """Run ``--max-lr auto`` at each seed and factor, compare with the grid, print and save."""
    parser = against_grid_parser(__doc__.splitlines()[0])
    parser.add_argument("--factors", type=float, nargs="+", default=[0.125, 1.0, 8.0])
    args, rest = parser.parse_known_args()  # the rest (after --): more kiln train arguments
    extra = tuning_args(args.recipe, [a for a in rest if a != "--"])
    best = best_of(json.loads(args.grid.read_text())["grid"])
    base = get_recipe(args.recipe)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for factor in args.factors:
                shifted = ["--set", f"schedule.max_lr={base.schedule.max_lr * factor:.6g}",
                           "--set", f"optim.lr={base.optim.lr * factor:.6g}"]
                run = train(Path(tmp) / f"{factor}-{seed}", args.recipe, "auto", seed, args.precision, extra + shifted)
                run.update(seed=seed, recipe_factor=factor, ratio_to_best=run["max_lr"] / best["max_lr"],
                           below_best_points=round(100 * (best["median_final_val_accuracy"] - run["final_val_accuracy"]), 2))
                rows.append(run)
                print(f"seed {seed} recipe max_lr x{factor:<6g} auto chose {run['max_lr']:<9.3g} (x{run['ratio_to_best']:.2g} "
                      f"the grid's best) final {run['final_val_accuracy']:.4f} "
                      f"({run['below_best_points']:+.2f} points below the best)  {run['seconds']:.0f} s", flush=True)
    within = all(0.5 <= r["ratio_to_best"] <= 2 for r in rows)
    median_below = statistics.median(r["below_best_points"] for r in rows)
    print(f"\n{cpu_model()}, {args.precision}: {args.recipe}; grid best max_lr {best['max_lr']:.3g} "
          f"(final {best['median_final_val_accuracy']:.4f}); --max-lr auto {'within' if within else 'NOT within'} 2x "
          f"on every run; median {median_below:+.2f} points below the best")
    save_result(f"max-lr-auto-{args.recipe}", {
        "benchmark": "max_lr_auto", "recipe": args.recipe, "precision": args.precision, "seeds": args.seeds,
        "factors": args.factors, "extra": extra, "grid": str(args.grid), "grid_best_max_lr": best["max_lr"],
        "grid_best_accuracy": best["median_final_val_accuracy"], "runs": rows, "within_2x": within,
        "median_points_below_best": median_below})


if __name__ == "__main__":
    main()
