"""How long ``kiln`` takes to start, here against another checkout (e.g. before a refactor), side by side.

Each round runs every command once per checkout, in fresh processes, alternating which checkout goes
first; the table gives medians over the rounds. The commands: ``kiln recipes`` (imports and the
registry), ``kiln show digits`` and ``kiln train digits --epochs 1 --quiet`` (start-up, one short
epoch, the end-of-run report), each as ``python -m recipes ...`` with the checkout first on
``sys.path``, in the environment this script runs in. Results go to ``results/`` as JSON.

Usage::

    git worktree add /tmp/kiln-before <rev>
    python benchmarks/startup.py --baseline /tmp/kiln-before [--rounds 7]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import save_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "kiln recipes": ["recipes"],
    "kiln show digits": ["show", "digits"],
    "kiln train digits --epochs 1": ["train", "digits", "--epochs", "1", "--quiet", "--out", "{out}"],
}


def timed(checkout: Path, args: list[str]) -> float:
    """Wall seconds of ``python -m recipes ARGS`` run from ``checkout``."""
    scratch = Path(tempfile.mkdtemp(prefix="kiln-startup-"))
    try:
        argv = [a.replace("{out}", str(scratch / "run")) for a in args]
        env = {**os.environ, "PYTHONPATH": str(checkout)}
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "recipes", *argv], cwd=scratch, env=env,
                              capture_output=True, text=True, timeout=600)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"{checkout}: kiln {' '.join(argv)} failed:\n{done.stderr[-2000:]}")
        return seconds
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main() -> None:
    """Measure, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, required=True, help="another kiln checkout to compare with")
    parser.add_argument("--rounds", type=int, default=7)
    options = parser.parse_args()
    checkouts = {"baseline": options.baseline.resolve(), "this": ROOT}
    seconds: dict[str, dict[str, list[float]]] = {c: {name: [] for name in COMMANDS} for c in checkouts}
    for round_number in range(options.rounds):
        order = list(checkouts) if round_number % 2 == 0 else list(reversed(checkouts))
        for name, args in COMMANDS.items():
            for label in order:
                seconds[label][name].append(timed(checkouts[label], args))
        print(f"round {round_number + 1}/{options.rounds} done", file=sys.stderr)
    rows = []
    for name in COMMANDS:
        base, this = (statistics.median(seconds[c][name]) for c in checkouts)
        rows.append({"command": name, "baseline_s": round(base, 3), "this_s": round(this, 3),
                     "ratio": round(this / base, 3)})
    print(f"{'command':<32} {'baseline s':>10} {'this s':>8} {'this/baseline':>14}")
    for row in rows:
        print(f"{row['command']:<32} {row['baseline_s']:>10.3f} {row['this_s']:>8.3f} {row['ratio']:>14.3f}")
    save_result("startup", {"benchmark": "startup", "rounds": options.rounds, "baseline": str(checkouts["baseline"]),
                            "rows": rows, "seconds": seconds})


if __name__ == "__main__":
    main()
