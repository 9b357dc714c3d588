"""Time to accuracy on Fashion-MNIST: ``kiln train fashion-mnist`` against the same job as a tutorial loop.

Both run as whole processes (``kiln train fashion-mnist --quiet`` and ``fashion_tutorial.py`` with the
recipe's settings from ``kiln show``), interleaved, rotating which goes first. The variants: ``kiln``
(its defaults: ``precision auto`` is bf16 on a CPU with AMX), ``tutorial`` (fp32, as tutorials write it)
and ``tutorial-bf16`` (the same loop with bf16 autocast, for the engine-for-engine comparison). This script watches
each one's per-epoch records (kiln's metrics.jsonl, the loop's JSONL) as they are written and notes,
from the moment the process was launched, when the test accuracy first reached each threshold; the
table gives medians over the repeats, the final accuracy and the whole run's wall time. Results go
to ``results/`` as JSON.

Usage::

    python benchmarks/time_to_accuracy.py [--repeats 2] [--thresholds 0.93 0.94] [--set KEY=VALUE ...]
        [--variants kiln tutorial tutorial-bf16]
"""
from __future__ import annotations

import argparse
import json
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
VARIANTS = ("kiln", "tutorial", "tutorial-bf16")


def watch(command: list[str], records: Path, env: dict) -> dict:
    """Run ``command``; return ``{"epochs": [(epoch, accuracy, seconds since launch)], "wall": s, "code": rc}``."""
    seen: list[tuple[int, float, float]] = []
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while True:
        done = proc.poll() is not None
        if records.exists():
            lines = [json.loads(line) for line in records.read_text().splitlines() if line.strip()]
            now = time.perf_counter() - started
            for record in lines[len(seen):]:
                seen.append((int(record["epoch"]), float(record["val_accuracy"]), round(now, 2)))
        if done:
            break
        time.sleep(0.05)
    wall = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stderr.read()[-2000:]}")
    return {"epochs": seen, "wall": round(wall, 2)}


def first_time(epochs: list[tuple[int, float, float]], threshold: float) -> float | None:
    """Seconds since launch at the first epoch record with accuracy >= ``threshold`` (None: never)."""
    return next((t for _, accuracy, t in epochs if accuracy >= threshold), None)


def main() -> None:
    """Measure, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.93, 0.94])
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override given to both (kiln show and kiln train)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    options = parser.parse_args()
    sets = [arg for pair in options.sets for arg in ("--set", pair)]
    kiln = [sys.executable, "-m", "recipes"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    scratch = Path(tempfile.mkdtemp(prefix="kiln-tta-"))
    shown = subprocess.run([*kiln, "show", "fashion-mnist", *sets], cwd=ROOT, env=env, capture_output=True, text=True,
                           check=True).stdout
    import yaml

    recipe = scratch / "recipe.json"
    recipe.write_text(json.dumps(yaml.safe_load(shown)))
    runs: dict[str, list[dict]] = {name: [] for name in options.variants}
    try:
        for repeat in range(options.repeats):
            order = options.variants[repeat % len(options.variants):] + options.variants[:repeat % len(options.variants)]
            for name in order:
                out = scratch / f"{name}-{repeat}"
                if name == "kiln":
                    result = watch([*kiln, "train", "fashion-mnist", *sets, "--quiet", "--out", str(out)],
                                   out / "metrics.jsonl", env)
                    result["precision"] = json.loads((out / "config.json").read_text())["runtime"]["precision"]
                else:
                    out.mkdir()
                    bf16 = ["--bf16"] if name == "tutorial-bf16" else []
                    result = watch([sys.executable, str(ROOT / "benchmarks" / "fashion_tutorial.py"), "--recipe",
                                    str(recipe), "--out", str(out / "epochs.jsonl"), *bf16], out / "epochs.jsonl", env)
                    result["precision"] = "bf16" if bf16 else "fp32"
                runs[name].append(result)
                print(f"{name} repeat {repeat + 1}: " + ", ".join(f"{e}:{a:.4f}@{t:.0f}s" for e, a, t in result["epochs"])
                      + f"; wall {result['wall']:.1f}s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rows = []
    for name, results in runs.items():
        row = {"variant": name, "precision": results[0]["precision"], "final_accuracy": [r["epochs"][-1][1] for r in results],
               "wall_s": statistics.median(r["wall"] for r in results)}
        for threshold in options.thresholds:
            times = [first_time(r["epochs"], threshold) for r in results]
            row[f"s_to_{threshold:g}"] = statistics.median(times) if None not in times else None
        rows.append(row)
    head = ["variant", "precision"] + [f"s to {t:g}" for t in options.thresholds] + ["final accuracy", "wall s"]
    print("  ".join(f"{h:>14}" for h in head))
    for row in rows:
        cells = [row["variant"], row["precision"]] + [f"{row[f's_to_{t:g}']:.1f}" if row[f"s_to_{t:g}"] is not None else "never"
                                    for t in options.thresholds]
        cells += [" ".join(f"{a:.4f}" for a in row["final_accuracy"]), f"{row['wall_s']:.1f}"]
        print("  ".join(f"{c:>14}" for c in cells))
    save_result("fashion-mnist", {"benchmark": "time_to_accuracy", "recipe": "fashion-mnist", "sets": options.sets,
                                  "repeats": options.repeats, "rows": rows, "runs": runs})


if __name__ == "__main__":
    main()
