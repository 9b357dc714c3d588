"""A shared sweep on PostgreSQL (issue 19): wall time of one digits study with 1, 2 and 3 workers, and
what the storage costs per trial against SQLite.

Each configuration is a fresh study (a new database, or a new SQLite file) of ``--trials`` digits
trials (``--epochs`` each, the default search space, no pruning) run by N ``kiln sweep`` workers
started together, each with its own ``--out`` (as on separate machines). The PostgreSQL server is
the tests' (``tests/postgres.py``: initdb + pg_ctl on a loopback port, fsync off). Workers on one
machine share its cores: each gets ``OMP_NUM_THREADS`` = cores // workers (at least 1), as ``kiln train
--nproc-per-node`` does for its processes (``--threads default``: torch's own choice, every core per
worker). On a 2-core machine the speed-up is bounded by the cores, not by the storage.

Per-trial overhead: each trial's time in the study (Optuna's ``datetime_start`` to
``datetime_complete``) minus its run's own training (``summary.json``'s ``wall_seconds``): building the
run, the storage's reads and writes at the trial's start, each epoch's report and its end, and the
run's plots. Everything but the storage is the same for both storages, so their difference is the
storage's cost.

Usage::

    python benchmarks/sweep_storage.py [--trials 6] [--epochs 2] [--workers 1,2,3] [--no-save]
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
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

KILN = str(Path(sys.executable).with_name("kiln"))
STUDY = "digits-bench"


def run_study(url: str, workers: int, trials: int, epochs: int, out: Path, share_cores: bool = True) -> dict[str, Any]:
    """N workers on one new study; wall time and per-trial overhead."""
    import optuna

    threads = max(1, (os.cpu_count() or 1) // workers) if share_cores else None
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}

    args = lambda k: [KILN, "sweep", "digits", "--trials", str(trials), "--epochs", str(epochs), "--pruner", "none",  # noqa: E731
                      "--storage", url, "--study", STUDY, "--out", str(out / f"worker{k}")]
    started = time.monotonic()
    procs = [subprocess.Popen(args(k), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
             for k in range(workers)]
    errors = [p.communicate()[1] for p in procs]
    wall = time.monotonic() - started
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a worker failed: {[e[-500:] for e in errors]}")
    study = optuna.load_study(study_name=STUDY, storage=url)
    overheads = []
    for t in study.trials:
        if t.state != optuna.trial.TrialState.COMPLETE:
            continue
        summary = json.loads((Path(t.user_attrs["run_dir"]) / "summary.json").read_text())
        overheads.append((t.datetime_complete - t.datetime_start).total_seconds() - summary["wall_seconds"])
    return {"workers": workers, "threads_per_worker": threads, "wall_seconds": round(wall, 2), "trials": len(overheads),
            "overhead_seconds_median": round(statistics.median(overheads), 3),
            "overhead_seconds": [round(o, 3) for o in overheads]}


def main(argv: list[str] | None = None) -> None:
    """Run the configurations, print a table, save the JSON."""
    from machine import cpu_model, save_result
    from tests.postgres import start_or_skip

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", default="1,2,3")
    parser.add_argument("--threads", choices=("share", "default"), default="share",
                        help="share: OMP_NUM_THREADS = cores // workers; default: torch's own choice")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.workers.split(",")]
    server = start_or_skip()
    rows = []
    root = Path(tempfile.mkdtemp(prefix="kiln-sweep-bench-"))
    try:
        for n in counts:
            rows.append({"storage": "postgresql", **run_study(server.database(f"bench{n}"), n, args.trials, args.epochs,
                                                              root / f"pg{n}", args.threads == "share")})
            print(rows[-1], flush=True)
        sqlite = root / "sqlite"
        sqlite.mkdir()
        rows.append({"storage": "sqlite", **run_study(f"sqlite:///{sqlite / 'sweep.db'}", 1, args.trials, args.epochs,
                                                      sqlite, args.threads == "share")})
        print(rows[-1], flush=True)
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
    one = rows[0]["wall_seconds"]
    print(f"\n{cpu_model()}  {args.trials} digits trials x {args.epochs} epochs  threads: {args.threads}")
    print(f"  {'storage':<11} {'workers':>7} {'wall s':>8} {'speed-up':>8} {'overhead/trial s':>16}")
    for r in rows:
        print(f"  {r['storage']:<11} {r['workers']:>7} {r['wall_seconds']:>8.1f} {one / r['wall_seconds']:>8.2f} "
              f"{r['overhead_seconds_median']:>16.3f}")
    if not args.no_save:
        save_result("sweep-storage", {"trials": args.trials, "epochs": args.epochs, "threads": args.threads, "rows": rows})


if __name__ == "__main__":
    main()
