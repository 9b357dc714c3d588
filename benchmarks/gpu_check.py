"""The GPU check of issue 17: kiln's epoch time against an airbench-style raw loop, and host syncs per step.

One prepared run for the day a GPU is lent (``benchmarks/gpu_check.sh`` checks CUDA first, then runs
this). The job is the cifar10 recipe's (ResNet-9, batch 512, AdamW + one-cycle, label smoothing 0.2,
random crop + flip on the device) on CIFAR-10-shaped synthetic data: 50,000 training images of
3x32x32 in 10 classes, held in GPU memory. Each variant runs in its own process with a timeout, so a
failing or hanging variant costs only itself; the table and the JSON are printed whatever happens.

Variants (``--variants``):

- ``raw``: the floor, airbench-style: the data made on the device (class prototypes plus noise,
  standardised), reshuffled on the device every epoch, batches by ``index_select``, the same batched
  crop+flip (``recipes.data.augment.random_crop_flip``), channels_last, bf16 autocast, fused AdamW,
  ``OneCycleLR.step()`` per batch, nothing read back: no host sync in the loop.
- ``kiln-bf16``, ``kiln-fp16``: ``kiln train`` with the recipe's defaults in bf16 (what ``auto`` picks on
  a GPU with bf16) and in fp16 (what GPUs without bf16 run: the loss scaler). The run is
  ``recipes.run.train`` on the config the CLI makes of ``kiln train cifar10 --set data.dataset=synthetic
  --set data.data_dir= --set data.samples=60000 --set data.val_fraction=0.1666667 --precision P`` (the
  printed command): kiln's ``synthetic`` data set is made at start-up on the CPU and then held on the
  device (``recipes.data.tensors``), batched by index there like ``cifar10``; 10,000 images are
  validated after every epoch. ``--quiet`` as a batch job runs it: the progress bar reads the loss every
  0.5 s, a sync by the clock rather than per step. Two handlers are attached after kiln's own (as
  ``train(extra_handlers=...)`` does for ``kiln sweep``): the epoch clock and the sync check below.
- ``raw-compile``, ``kiln-bf16-compile``, ``kiln-fp16-compile``: the same with ``torch.compile``
  (``--compile``: kiln compiles the training forward).

Timing: CUDA events recorded at each epoch's start and after its last training iteration (all of
kiln's per-iteration handlers included; validation not), read after the run, so timing adds no sync.
Epoch 1 is the warm-up (cuDNN, compilation), epochs 2..E-1 are timed (median), and during the last
epoch ``torch.cuda.set_sync_debug_mode("error")`` is on over its steady-state iterations: every
iteration (its batch fetch included) but the epoch's first and last, kiln's logging iterations
(``train.log_every``) and NanGuard's check iterations (``guard.check_every``). The first sync raises;
the variant keeps its timed epochs and reports the kiln line that synced. Ratios: kiln / raw of the
median epoch time (compiled against compiled), and images/s.

``--dry-run``: the same script on the CPU with tiny sizes (100 training images of 3x8x8, batch 32, 3 epochs,
``aot_eager`` as the compile backend, no sync check: sync debug mode is CUDA's) to test the plumbing;
its figures mean nothing.

Usage (on the GPU machine, from the repository root, with kiln's dependencies importable)::

    bash benchmarks/gpu_check.sh                 # everything: estimated 5-6 minutes on one modern GPU
    bash benchmarks/gpu_check.sh --variants raw,kiln-bf16,kiln-fp16 --epochs 4
    bash benchmarks/gpu_check.sh --dry-run       # the CPU smoke run

Writes ``results/<date>-<cuda|cpu>-gpu-check.json`` (``--out FILE`` elsewhere).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

__all__ = ["VARIANTS", "EpochClock", "SyncCheck", "main"]

VARIANTS = ("raw", "kiln-bf16", "kiln-fp16", "raw-compile", "kiln-bf16-compile", "kiln-fp16-compile")
CLASSES, SIDE = 10, 32
#: The recipe's job on synthetic data: kiln train cifar10 with these --set pairs (data.data_dir= : the
#: synthetic data set reads no files).
SYNTHETIC_SETS = ("data.dataset=synthetic", "data.data_dir=")


class EpochClock:
    """Marks each epoch's start and the end of its last training iteration: CUDA events (no sync), or
    ``perf_counter`` on the CPU. Read with :meth:`seconds` after the run."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.marks: list[list[Any]] = []

    def _mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        import torch

        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start_epoch(self) -> None:
        """Call as an epoch starts."""
        self.marks.append([self._mark()])

    def end_epoch(self) -> None:
        """Call after the epoch's last training iteration."""
        self.marks[-1].append(self._mark())

    def attach(self, engine: Any) -> None:
        """Mark ``engine``'s epochs (attach it after kiln's handlers: the mark follows theirs)."""
        from ignite.engine import Events

        from engine import is_epoch_end

        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self.start_epoch())
        engine.add_event_handler(Events.ITERATION_COMPLETED,
                                 lambda e: self.end_epoch() if is_epoch_end(e.state) else None)

    def seconds(self) -> list[float]:
        """Each completed epoch's training seconds."""
        done = [m for m in self.marks if len(m) == 2]
        if not self.cuda:
            return [b - a for a, b in done]
        import torch

        torch.cuda.synchronize()
        return [a.elapsed_time(b) / 1000.0 for a, b in done]


class SyncCheck:
    """``torch.cuda.set_sync_debug_mode("error")`` over the steady-state iterations of the last epoch.

    The mode is switched at the end of each iteration (after every other handler) for the next one, so a
    checked iteration's batch fetch is checked too. Left out: the epoch's first and last iteration, and
    iterations where ``iteration % n == 0`` for each ``n`` of ``every`` (logging, NanGuard's checks).
    """

    def __init__(self, epochs: int, every: tuple[int, ...] = ()) -> None:
        self.epochs, self.every = epochs, every
        self.checked = 0

    def checks(self, iteration: int, epoch_length: int) -> bool:
        """Whether ``iteration`` (1-based, counted over the run) runs under the check."""
        position = (iteration - 1) % epoch_length + 1
        epoch = (iteration - 1) // epoch_length + 1
        return (epoch == self.epochs and 1 < position < epoch_length
                and not any(iteration % n == 0 for n in self.every))

    def set_for(self, next_iteration: int, epoch_length: int) -> None:
        """Turn the check on or off for ``next_iteration``."""
        import torch

        on = self.checks(next_iteration, epoch_length)
        self.checked += on
        torch.cuda.set_sync_debug_mode("error" if on else 0)

    def attach(self, engine: Any) -> None:
        """Check ``engine``'s iterations (attach it after every other handler)."""
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED,
                                 lambda e: self.set_for(e.state.iteration + 1, e.state.epoch_length))
        engine.add_event_handler(Events.COMPLETED, lambda _: self.off())

    @staticmethod
    def off() -> None:
        """Sync debug mode off."""
        import torch

        torch.cuda.set_sync_debug_mode(0)


# ---- the variants (each in a fresh worker process) ---------------------------------------------------------

def job_sizes(dry_run: bool) -> dict[str, Any]:
    """Training images, image side, batch size and epochs of the check (tiny for ``--dry-run``)."""
    if dry_run:
        return {"train_samples": 100, "side": 8, "batch_size": 32, "epochs": 3}  # fp16 convolutions crawl on CPUs
    return {"train_samples": 50_000, "side": SIDE, "batch_size": 512, "epochs": 4}


def kiln_command(variant: str, args: argparse.Namespace) -> list[str]:
    """The ``kiln train`` arguments of a kiln variant (the data set's size included)."""
    sizes = job_sizes(args.dry_run)
    total = sizes["train_samples"] + math.ceil(sizes["train_samples"] / 5)  # validation: a sixth of them
    sets = [*SYNTHETIC_SETS, f"data.samples={total}", "data.val_fraction=0.1666667",
            f"data.image_size={sizes['side']}", f"data.batch_size={sizes['batch_size']}"]
    if args.dry_run:
        sets.append("train.compile_backend=aot_eager")  # the plumbing, not inductor's C++ build
    cmd = ["train", "cifar10", *[a for s in sets for a in ("--set", s)], "--epochs", str(args.epochs or sizes["epochs"]),
           "--precision", "fp16" if "fp16" in variant else "bf16", "--device", "cpu" if args.dry_run else "cuda",
           "--quiet"]
    return cmd + (["--compile"] if variant.endswith("-compile") else [])


def run_kiln(variant: str, args: argparse.Namespace, result: dict[str, Any]) -> None:
    """``recipes.run.train`` on the config ``kiln train`` makes of :func:`kiln_command`, with the clock and
    the sync check attached after kiln's handlers."""
    from recipes.cli.allocator import tune_malloc
    from recipes.cli.options import resolve_config
    from recipes.run import train

    cmd = kiln_command(variant, args)
    result["command"] = shlex.join(["kiln", *cmd])
    sets = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]
    options = {"epochs": int(cmd[cmd.index("--epochs") + 1]), "precision": cmd[cmd.index("--precision") + 1],
               "device": cmd[cmd.index("--device") + 1], "compile": "--compile" in cmd or None}
    cfg = resolve_config("cifar10", sets, **options)
    tune_malloc()  # as the CLI does at start-up
    cuda = not args.dry_run
    clock = EpochClock(cuda)
    extra: dict[str, Any] = {"clock": clock}
    check = SyncCheck(cfg.train.epochs, (cfg.train.log_every, cfg.guard.check_every)) if cuda else None
    if check is not None:
        extra["sync_check"] = check
    with tempfile.TemporaryDirectory(prefix="kiln-gpu-check-") as tmp:
        run_dir = Path(tmp) / "run"
        try:
            run = train(cfg, run_dir, quiet=True, extra_handlers=extra)
            result["status"] = run.status
        finally:
            if check is not None:
                check.off()
                result["sync_check"] = {"checked_iterations": check.checked}
            result["epoch_seconds"] = clock.seconds()
            result["kiln_metrics"] = _kiln_epochs(run_dir)


def _kiln_epochs(run_dir: Path) -> list[dict[str, Any]]:
    """kiln's own per-epoch figures from metrics.jsonl (epoch_seconds is host time, unsynced)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    keys = ("epoch", "epoch_seconds", "images_per_second", "val_accuracy", "loss_scale", "skipped_steps")
    return [{k: r.get(k) for k in keys if k in r} for r in map(json.loads, path.read_text().splitlines())]


def _device_data(samples: int, side: int, device: Any, seed: int = 0):
    """CIFAR-10-shaped synthetic data made on the device: class prototypes plus noise, standardised."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    prototypes = torch.randn(CLASSES, 3, side, side, generator=g, device=device)
    y = torch.randint(0, CLASSES, (samples,), generator=g, device=device)
    x = 0.6 * prototypes[y] + torch.randn(samples, 3, side, side, generator=g, device=device)
    return (x - x.mean()) / x.std(), y, g


def run_raw(variant: str, args: argparse.Namespace, result: dict[str, Any]) -> None:
    """The airbench-style loop on the recipe's model and hyperparameters: data on the device, no syncs."""
    import torch
    from torch.optim.lr_scheduler import OneCycleLR

    from recipes import get_recipe
    from recipes.data.augment import random_crop_flip
    from recipes.models import parameter_groups, resnet9

    sizes = job_sizes(args.dry_run)
    epochs, batch = args.epochs or sizes["epochs"], sizes["batch_size"]
    cuda = not args.dry_run
    device = torch.device("cuda" if cuda else "cpu")
    cfg = get_recipe("cifar10")
    o, s = cfg.optim, cfg.schedule
    x, y, g = _device_data(sizes["train_samples"], sizes["side"], device)
    torch.manual_seed(cfg.train.seed)
    model = resnet9(CLASSES, 3).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(parameter_groups(model, o.weight_decay, o.decay_norm_and_bias), lr=o.lr,
                                  betas=(0.9, o.beta2), eps=o.eps, fused=True)
    steps = math.ceil(len(x) / batch)
    schedule = OneCycleLR(optimizer, max_lr=s.max_lr, total_steps=epochs * steps, pct_start=s.pct_start,
                          div_factor=cfg.div_factor, final_div_factor=s.final_div_factor,
                          anneal_strategy=s.anneal_strategy, cycle_momentum=s.cycle_momentum)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
    forward = torch.compile(model, backend="aot_eager" if args.dry_run else "inductor") \
        if variant.endswith("-compile") else model
    pad = max(1, sizes["side"] // 8)
    clock = EpochClock(cuda)
    check = SyncCheck(epochs) if cuda else None
    try:
        for epoch in range(1, epochs + 1):
            clock.start_epoch()
            order = torch.randperm(len(x), generator=g, device=device)
            for step in range(steps):
                if check is not None:
                    check.set_for((epoch - 1) * steps + step + 1, steps)
                idx = order[step * batch:(step + 1) * batch]
                xb = random_crop_flip(x.index_select(0, idx), g, pad=pad, flip=True)
                xb = xb.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    loss = loss_fn(forward(xb), y.index_select(0, idx))
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                schedule.step()
            if check is not None:
                check.off()
            clock.end_epoch()
        result["status"] = "completed"
    finally:
        if check is not None:
            check.off()
            result["sync_check"] = {"checked_iterations": check.checked}
        result["epoch_seconds"] = clock.seconds()


def worker(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one variant here; its record (what it got to, and the error that stopped it, if one did)."""
    import torch

    result: dict[str, Any] = {"variant": variant}
    started = time.perf_counter()
    try:
        (run_raw if variant.startswith("raw") else run_kiln)(variant, args, result)
    except Exception as e:  # noqa: BLE001 - the record says what failed; the parent goes on with the others
        result["error"] = " ".join(f"{type(e).__name__}: {e}".split())[:500]
        result["error_at"] = _kiln_frames(e)
        if "synchroniz" in str(e) and "sync_check" in result:
            result["sync_check"].update(ok=False, first_sync=result["error_at"][:3])
    else:
        if "sync_check" in result:
            result["sync_check"]["ok"] = True
    result["seconds_in_process"] = round(time.perf_counter() - started, 2)
    if torch.cuda.is_available():
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def _kiln_frames(error: BaseException) -> list[str]:
    """The repository's lines in the error's traceback, innermost first (where a sync came from)."""
    frames = []
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        try:
            relative = Path(frame.filename).resolve().relative_to(ROOT)
        except ValueError:
            continue
        frames.append(f"{relative.as_posix()}:{frame.lineno} {frame.name}")
    return frames[:6]


# ---- the parent ------------------------------------------------------------------------------------------------

def _spawn(variant: str, args: argparse.Namespace, timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="kiln-gpu-check-") as tmp:
        result_path = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--result", str(result_path)]
        cmd += ["--dry-run"] if args.dry_run else []
        cmd += ["--epochs", str(args.epochs)] if args.epochs else []
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        started = time.perf_counter()
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return {"variant": variant, "error": f"timed out after {timeout:.0f} s",
                    "wall_seconds": round(time.perf_counter() - started, 1)}
        wall = round(time.perf_counter() - started, 1)
        if result_path.exists():
            return {**json.loads(result_path.read_text()), "wall_seconds": wall}
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-3:]
        return {"variant": variant, "error": f"exit {done.returncode}: {' | '.join(tail)}", "wall_seconds": wall}


def summarize(records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per variant: the median timed epoch (epochs 2..E-1; epoch 1 is the warm-up), images/s, ratio to raw."""
    table = {}
    for name, r in records.items():
        timed = r.get("epoch_seconds", [])[1:r.get("epochs", 0) - 1]  # not the warm-up, not the checked epoch
        median = statistics.median(timed) if timed else None
        samples = r.get("train_samples")
        table[name] = {"epoch_seconds": round(median, 4) if median else None,
                       "images_per_second": round(samples / median) if median and samples else None,
                       "sync_check": r.get("sync_check"), "error": r.get("error")}
    for name, row in table.items():
        base = table.get("raw-compile" if name.endswith("-compile") else "raw", {}).get("epoch_seconds")
        row["ratio_vs_raw"] = round(row["epoch_seconds"] / base, 3) if row["epoch_seconds"] and base else None
    return table


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(table: dict[str, Any], meta: dict[str, Any]) -> None:
    """One line per variant."""
    print(f"\n{meta['device']}  torch {meta['torch']}  {meta['train_samples']} images {meta['side']}x{meta['side']}, "
          f"batch {meta['batch_size']}, resnet9{'  (DRY RUN: figures mean nothing)' if meta['dry_run'] else ''}")
    print(f"  {'variant':<18} {'epoch s':>8} {'img/s':>9} {'x raw':>7}  sync check")
    for name, r in table.items():
        sync = r["sync_check"] or {}
        verdict = (f"no sync in {sync.get('checked_iterations', 0)} steady-state iterations" if sync.get("ok")
                   else f"SYNC at {sync.get('first_sync')}" if sync.get("ok") is False else "-")
        print(f"  {name:<18} {_fmt(r['epoch_seconds'], '8.3f')} {_fmt(r['images_per_second'], '9.0f')} "
              f"{_fmt(r['ratio_vs_raw'], '7.3f')}  {verdict}" + (f"  [{r['error'][:160]}]" if r["error"] else ""))


def _device_line(dry_run: bool) -> dict[str, Any]:
    import torch
    from machine import cpu_model

    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "cpu": cpu_model(),
                            "python": platform.python_version()}
    if torch.cuda.is_available() and not dry_run:
        props = torch.cuda.get_device_properties(0)
        info.update(device=torch.cuda.get_device_name(0), capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1), bf16=torch.cuda.is_bf16_supported())
    else:
        info["device"] = f"CPU ({info['cpu']}), dry run"
    return info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="kiln vs an airbench-style loop on the GPU, and host syncs per step.")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--epochs", type=int, help="epochs per variant (default 4: warm-up, 2 timed, 1 sync-checked)")
    p.add_argument("--budget", type=float, default=420, help="seconds for all variants together; later ones are "
                   "skipped when less than --min-seconds is left")
    p.add_argument("--timeout", type=float, default=240, help="seconds before one variant's process is stopped")
    p.add_argument("--min-seconds", type=float, default=30, help="a variant does not start with less time left")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: tests the script, not the GPU")
    p.add_argument("--out", type=Path, help="the JSON file (default results/<date>-<cuda|cpu>-gpu-check.json)")
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.epochs is not None and args.epochs < 3:
        p.error("--epochs must be >= 3 (a warm-up, a timed and a checked epoch)")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the check (or, with the hidden ``--worker``, one variant of it); 0 when every variant ran."""
    args = parse_args(argv)
    if args.worker:
        record = worker(args.worker, args)
        record.update(train_samples=job_sizes(args.dry_run)["train_samples"],
                      epochs=args.epochs or job_sizes(args.dry_run)["epochs"])
        Path(args.result).write_text(json.dumps(record))
        return 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        sys.exit(f"gpu_check: unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    meta = {**_device_line(args.dry_run), **job_sizes(args.dry_run), "dry_run": args.dry_run,
            "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M")}
    if args.epochs:
        meta["epochs"] = args.epochs
    meta["kiln_commands"] = {v: shlex.join(["kiln", *kiln_command(v, args)]) for v in variants if v.startswith("kiln")}
    records: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + args.budget
    try:
        for v in variants:
            left = deadline - time.monotonic()
            if left < args.min_seconds:
                records[v] = {"variant": v, "error": f"skipped: {left:.0f} s of the --budget left"}
            else:
                records[v] = _spawn(v, args, min(args.timeout, left))
            r = records[v]
            print(f"{v:<18} {'error: ' + r['error'][:200] if r.get('error') else 'ok'}  "
                  f"epochs {[round(s, 3) for s in r.get('epoch_seconds', [])]}  ({r.get('wall_seconds', 0)} s)", flush=True)
    finally:  # the figures so far, whatever stopped the loop
        table = summarize(records)
        print_table(table, meta)
        kind = "cpu" if args.dry_run else "cuda"
        out = args.out or HERE / "results" / f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}-gpu-check.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": meta, "summary": table, "runs": records}, indent=1) + "\n")
        print(json.dumps({"summary": table}, indent=1))
        print(f"wrote {out}")
    return 0 if all(not r.get("error") for r in records.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
