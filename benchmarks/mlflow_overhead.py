"""What mirroring a run in MLflow costs a training iteration: ``kiln train digits`` with and without ``--mlflow``.

A local ``mlflow server`` (SQLite store, one worker; tests/mlflow_server.py starts it) runs beside the training
processes, on the same cores, as a team's laptop would have it. Each round runs, one after another (interleaved,
so a slow spell of the machine hits all alike, in reversed order every other round, so no way always
comes first), whole ``kiln train digits --quiet --no-report`` processes:

- ``without``: no mirror;
- ``with``: ``--mlflow URI`` at the default pace (a sync at most every ``tracking.mlflow_every_seconds``, 5 s);
- ``every-epoch``: ``--mlflow URI --set tracking.mlflow_every_seconds=0``, a sync after every epoch (the most
  the mirror can send: digits' epochs take under half a second).

The figure is the time per training iteration: metrics.jsonl's ``epoch_seconds`` summed over the epochs after
the first, over their iterations; the median over ``--rounds`` rounds. Precision fp32 unless ``--precision``
says otherwise. Results go to ``results/`` as JSON.

Usage::

    python benchmarks/mlflow_overhead.py [--rounds 5] [--epochs 20] [--precision fp32]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import cpu_model, save_result  # noqa: E402

from tests.mlflow_server import MlflowServer  # noqa: E402

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[1]


def per_iteration_ms(run_dir: Path) -> float:
    """Milliseconds per training iteration over the epochs after the first (metrics.jsonl)."""
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    per_epoch = metrics[0]["iteration"]
    timed = metrics[1:] or metrics
    return 1e3 * sum(m["epoch_seconds"] for m in timed) / (per_epoch * len(timed))


def kiln_train(run_dir: Path, *args: str) -> float:
    """One ``kiln train digits`` process; its time per iteration."""
    done = subprocess.run([sys.executable, "-m", "recipes.cli", "train", "digits", *args, "--quiet", "--no-report",
                           "--out", str(run_dir)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    if done.returncode:
        raise SystemExit(f"kiln train failed ({done.returncode}): {done.stderr.strip()}")
    return per_iteration_ms(run_dir)


def main() -> None:
    """Start the server, run the three ways round by round, print the table, save JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=20, help="epochs of every run (digits: 23 iterations each)")
    parser.add_argument("--precision", default="fp32")
    args = parser.parse_args()
    server = MlflowServer().start()
    try:
        common = ["--epochs", str(args.epochs), "--precision", args.precision]
        ways = {"without": common, "with": [*common, "--mlflow", server.uri],
                "every-epoch": [*common, "--mlflow", server.uri, "--set", "tracking.mlflow_every_seconds=0"]}
        runs: dict[str, list[float]] = {name: [] for name in ways}
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.rounds):
                order = list(ways.items()) if r % 2 == 0 else list(ways.items())[::-1]  # no way always runs first
                for name, way in order:
                    runs[name].append(kiln_train(Path(tmp) / f"{name}-{r}", *way))
                    print(f"round {r} {name:<12} {runs[name][-1]:7.3f} ms/iteration", flush=True)
    finally:
        server.stop()
    medians = {name: statistics.median(values) for name, values in runs.items()}
    print(f"\n{cpu_model()}, {args.precision}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '2')}: "
          f"medians of {args.rounds} rounds, {args.epochs} epochs each")
    for name, median in medians.items():
        print(f"  {name:<12} {median:7.3f} ms/iteration  {median / medians['without']:.3f}x without")
    save_result("mlflow-overhead", {"benchmark": "mlflow_overhead", "precision": args.precision, "epochs": args.epochs,
                                    "rounds": args.rounds, "ms_per_iteration": runs, "medians": medians,
                                    "ratios": {n: m / medians["without"] for n, m in medians.items()}})


if __name__ == "__main__":
    main()
