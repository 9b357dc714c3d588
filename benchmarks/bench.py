"""kiln side by side with a hand-written loop and with the floor, interleaved and repeated.

For each model (the digits small CNN, and ResNet-18 with a 32x32 stem on the same data), with the
same data, initial weights and hyperparameters (the digits recipe's), it runs these variants, each
in a fresh process, in the order A B C D A B C D ... so that a slow spell of a shared machine hits
them all alike:

- ``limit``: forward, backward and AdamW step on pre-built batch tensors in a tight loop (the floor);
- ``plain``: ``benchmarks/plain_loop.py``, the tutorial loop (DataLoader, ``loss.item()`` every step,
  GradScaler, ``clip_grad_norm_``, OneCycleLR per batch, validation every epoch);
- ``kiln``: the same job through kiln's Python API (``recipes.run.build``: every handler the CLI
  attaches, run directory included);
- ``kiln-cli``: ``kiln train digits`` as a process, with kiln's own defaults (channels_last whatever
  ``--channels-last`` says; whole-run wall time, from spawn to exit).

Per variant it reports the median iteration time (intervals between consecutive iterations within an
epoch, warm-up left out; the median over runs of each run's median), the training seconds, the
process's wall seconds, peak RSS and minor page faults (from ``wait4``), and the final validation
accuracy; then kiln/plain and kiln/limit. ``--malloc`` picks glibc's allocator settings for every
variant: ``default`` (glibc as is; ``KILN_MALLOC=default`` for the CLI) or ``tuned`` (the plain,
limit and kiln processes get ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``; the CLI tunes
itself, as it does for users), or ``both``. On CUDA the kiln run also counts host syncs per
iteration (``torch.cuda.set_sync_debug_mode("warn")``).

The figures go to stdout as a table and to ``--out`` as one JSON file per invocation.
See benchmarks/README.md for the commands and the JSON layout.
"""
from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import math
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from timing import IterationClock  # noqa: E402

__all__ = ["main"]

MODELS = ("small_cnn", "resnet18_32")
VARIANTS = ("limit", "plain", "kiln", "kiln-cli")
MALLOC_MODES = ("tuned", "default")


# ---- the variants that run inside a worker process ------------------------------------------------

def _autocast(device: torch.device, precision: str):
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    return torch.autocast(device.type, dtype=dtypes.get(precision, torch.float32), enabled=precision in dtypes)


def run_limit(args: argparse.Namespace) -> dict[str, Any]:
    """The floor: forward, loss, backward, AdamW step (fused where torch has it) on batches built once."""
    import plain_loop

    device = torch.device(args.device)
    x_train, y_train, x_val, y_val = plain_loop.digits_split(plain_loop.DIGITS["seed"])
    torch.manual_seed(plain_loop.DIGITS["seed"])
    model = plain_loop.make_model(args.model, x_train.shape[1], 10).to(device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    if args.compile:
        model = torch.compile(model)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": plain_loop.DIGITS["weight_decay"]},
              {"params": no_decay, "weight_decay": 0.0}]
    try:  # the fastest AdamW torch has: fused (CUDA, and the CPU since torch 2.4), else foreach
        optimizer = torch.optim.AdamW(groups, lr=plain_loop.DIGITS["lr"], fused=True)
    except (RuntimeError, TypeError, ValueError):
        optimizer = torch.optim.AdamW(groups, lr=plain_loop.DIGITS["lr"], foreach=True)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=plain_loop.DIGITS["label_smoothing"])
    scaler = torch.amp.GradScaler(device.type) if args.precision == "fp16" else None
    bs = plain_loop.DIGITS["batch_size"]
    order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(0))
    batches = [(x_train[idx].to(device).contiguous(memory_format=memory_format), y_train[idx].to(device))
               for idx in order.split(bs)]
    clock = IterationClock(device, warmup=args.warmup)
    model.train()
    for _ in range(args.epochs):
        clock.start_epoch()
        for x, y in batches:
            optimizer.zero_grad(set_to_none=True)
            with _autocast(device, args.precision):
                loss = criterion(model(x), y)
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            clock.tick()
    figures = clock.summary()
    model.eval()
    correct = 0
    with torch.no_grad(), _autocast(device, args.precision):
        for x, y in zip(x_val.split(256), y_val.split(256)):
            correct += int((model(x.to(device).contiguous(memory_format=memory_format)).argmax(1) == y.to(device)).sum())
    return {"final_accuracy": round(correct / len(y_val), 4), **figures}


def kiln_config(model: str, epochs: int, device: str, precision: str, channels_last: bool, compile: bool):
    """The digits recipe with the benchmark's settings; returns ``(config, --set pairs for kiln train)``."""
    from recipes import get_recipe
    from recipes.config import ConfigError, apply_overrides

    overrides = {"train.epochs": epochs, "train.device": device, "train.precision": precision,
                 "train.channels_last": channels_last, "train.compile": compile, "model.name": model}
    try:
        cfg = apply_overrides(get_recipe("digits"), overrides)
    except ConfigError as e:
        sys.exit(f"bench: kiln cannot run this configuration: {e}")
    # kiln-cli runs `kiln train digits` as a user types it: the memory format stays kiln's default
    sets = [f"{k}={str(v).lower()}" for k, v in overrides.items() if k not in ("train.epochs", "train.device",
                                                                              "train.precision", "train.channels_last")]
    return cfg, sets


class SyncCounter:
    """Counts the host syncs of each training iteration on CUDA (``set_sync_debug_mode("warn")``).

    The syncs seen from one ITERATION_STARTED to the next are charged to that iteration, so logging
    every N iterations and the epoch-end validation show up in a few iterations, and a sync in the
    step itself in all of them.
    """

    def __init__(self) -> None:
        self.per_iteration: list[int] = []
        self.sources: dict[str, int] = {}
        self._records: list = []
        self._counted = 0

    def attach(self, trainer) -> None:
        from ignite.engine import Events

        trainer.add_event_handler(Events.STARTED, self._start)
        trainer.add_event_handler(Events.ITERATION_STARTED, self._next)
        trainer.add_event_handler(Events.COMPLETED, self._stop)

    def _start(self, _) -> None:
        self._catcher = warnings.catch_warnings(record=True)
        self._records = self._catcher.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")

    def _next(self, _) -> None:
        self._close_iteration()
        self.per_iteration.append(0)

    def _close_iteration(self) -> None:
        new = [w for w in self._records[self._counted:] if "synchroniz" in str(w.message)]
        self._counted = len(self._records)
        if self.per_iteration:
            self.per_iteration[-1] += len(new)
        for w in new:
            where = f"{Path(w.filename).name}:{w.lineno}"
            self.sources[where] = self.sources.get(where, 0) + 1

    def _stop(self, _) -> None:
        self._close_iteration()
        torch.cuda.set_sync_debug_mode(0)
        self._catcher.__exit__(None, None, None)

    def report(self, log_every: int, epochs: int) -> dict[str, Any]:
        n = len(self.per_iteration)
        syncing = sum(1 for c in self.per_iteration if c)
        allowed = math.ceil(n / log_every) + epochs  # the every-N log reads and the epoch ends
        return {"iterations": n, "iterations_with_sync": syncing, "allowed": allowed, "ok": syncing <= allowed,
                "sources": dict(sorted(self.sources.items(), key=lambda kv: -kv[1])[:10])}


def run_kiln(args: argparse.Namespace) -> dict[str, Any]:
    """The job through kiln's Python API: ``recipes.run.build`` (all the CLI's handlers) and a timed run."""
    from ignite.engine import Events

    from recipes.run import build, execute, write_config

    cfg, _ = kiln_config(args.model, args.epochs, args.device, args.precision, args.channels_last, args.compile)
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        # Progress as `kiln train` attaches it (its bar draws only on a terminal); epoch lines discarded
        run = build(cfg, Path(tmp) / "run", quiet=False, stream=io.StringIO())
        clock = IterationClock(run.device, warmup=args.warmup)
        run.trainer.add_event_handler(Events.EPOCH_STARTED, lambda _: clock.start_epoch())
        run.trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda _: clock.tick())  # after every kiln handler
        sync = None
        if run.device.type == "cuda" and args.sync_check:
            sync = SyncCounter()
            sync.attach(run.trainer)
        write_config(run)
        execute(run)
        figures = {"final_accuracy": round(run.handlers["summary"].final_val_accuracy, 4), **clock.summary(),
                   "status": run.status}
        if sync is not None:
            figures["sync_check"] = sync.report(cfg.train.log_every, cfg.train.epochs)
    return figures


def worker(args: argparse.Namespace) -> None:
    """Run one variant in this (fresh) process and write its figures to ``--result``."""
    figures = run_limit(args) if args.worker == "limit" else run_kiln(args)
    Path(args.result).write_text(json.dumps(figures))


# ---- the parent: processes, interleaving, figures ---------------------------------------------------

def _child_env(mode: str, variant: str) -> dict[str, str]:
    from recipes.cli.allocator import MMAP_THRESHOLD, TRIM_THRESHOLD

    env = {k: v for k, v in os.environ.items() if k != "KILN_MALLOC" and not k.startswith("MALLOC_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if mode == "default":
        env["KILN_MALLOC"] = "default"
    elif variant != "kiln-cli":  # the CLI tunes malloc by itself
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
        env["MALLOC_TRIM_THRESHOLD_"] = str(TRIM_THRESHOLD)
    return env


def _kiln_command() -> list[str]:
    script = Path(sys.executable).with_name("kiln")
    return [str(script)] if script.exists() else [sys.executable, "-m", "recipes"]


def _spawn(cmd: list[str], env: dict[str, str], log_path: Path) -> dict[str, Any]:
    """Run ``cmd`` to its end; its wall seconds (spawn to exit), peak RSS and minor faults, from wait4."""
    with open(log_path, "w") as log:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"returncode": proc.returncode, "wall_seconds": round(wall, 3),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "minor_faults": usage.ru_minflt,
            "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 3)}


def run_variant(variant: str, mode: str, args: argparse.Namespace, model: str, device: str, precision: str,
                channels_last: bool, cli_sets: list[str], tmp: Path) -> dict[str, Any]:
    """One run of one variant in a fresh process; returns its record."""
    tag = f"{model}-{device}-{mode}-{variant}-{time.monotonic_ns()}"
    result = tmp / f"{tag}.json"
    common = ["--model", model, "--epochs", str(args.epochs), "--device", device, "--precision", precision,
              "--warmup", str(args.warmup), "--result", str(result)]
    common += ["--channels-last"] if channels_last else []
    common += ["--compile"] if args.compile else []
    if variant == "plain":
        cmd = [sys.executable, str(HERE / "plain_loop.py"), *common]
    elif variant in ("limit", "kiln"):
        cmd = [sys.executable, str(HERE / "bench.py"), "--worker", variant, *common]
        cmd += [] if channels_last else ["--no-channels-last"]
        cmd += ["--sync-check"] if variant == "kiln" and device == "cuda" else []
    else:
        run_dir = tmp / tag
        cmd = [*_kiln_command(), "train", "digits", "--out", str(run_dir), "--epochs", str(args.epochs),
               "--device", device, "--precision", precision]
        for pair in cli_sets:
            cmd += ["--set", pair]
    record = {"model": model, "device": device, "precision": precision, "malloc": mode, "variant": variant}
    record.update(_spawn(cmd, _child_env(mode, variant), tmp / f"{tag}.log"))
    if record["returncode"] != 0:
        tail = (tmp / f"{tag}.log").read_text(errors="replace").splitlines()[-15:]
        print(f"  {variant} ({mode}) failed with exit status {record['returncode']}:", *tail, sep="\n    ", file=sys.stderr)
        return record
    if variant == "kiln-cli":
        record.update(_cli_figures(run_dir))
        shutil.rmtree(run_dir, ignore_errors=True)
    else:
        record.update(json.loads(result.read_text()))
    return record


def _cli_figures(run_dir: Path) -> dict[str, Any]:
    """Accuracy and training time from a run directory (per-iteration: epoch means, from metrics.jsonl)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    batches = json.loads((run_dir / "config.json").read_text())["runtime"]["batches_per_epoch"]
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    seconds = [e["epoch_seconds"] for e in epochs]
    return {"final_accuracy": round(summary["final_val_accuracy"], 4), "iter_ms": None,
            "iter_ms_mean": round(statistics.median(seconds[1:] or seconds) / batches * 1e3, 3),
            "train_seconds": round(sum(seconds), 3), "status": summary["status"]}


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians over repeats per (model, device, malloc, variant), and the ratios the acceptance reads."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        if r["returncode"] == 0:
            groups.setdefault((r["model"], r["device"], r["precision"], r["malloc"]), []).append(r)
    out = []
    for (model, device, precision, mode), runs in groups.items():
        variants = {}
        for variant in VARIANTS:
            mine = [r for r in runs if r["variant"] == variant]
            if mine:
                variants[variant] = {k: _median([r.get(k) for r in mine]) for k in
                                     ("iter_ms", "iter_ms_mean", "iter_cpu_ms", "train_seconds", "wall_seconds", "peak_rss_mib",
                                      "minor_faults", "cpu_seconds", "final_accuracy")}
                variants[variant]["runs"] = len(mine)
        ratios = {}

        def ratio(a, b, key):
            x, y = variants.get(a, {}).get(key), variants.get(b, {}).get(key)
            return round(x / y, 4) if x and y else None

        ratios["kiln/plain iter"] = ratio("kiln", "plain", "iter_ms")
        ratios["kiln/limit iter"] = ratio("kiln", "limit", "iter_ms")
        ratios["kiln/plain cpu"] = ratio("kiln", "plain", "iter_cpu_ms")
        ratios["kiln/limit cpu"] = ratio("kiln", "limit", "iter_cpu_ms")
        ratios["kiln-cli/plain wall"] = ratio("kiln-cli", "plain", "wall_seconds")
        ratios["kiln/plain wall"] = ratio("kiln", "plain", "wall_seconds")
        ratios["kiln-cli/plain cpu"] = ratio("kiln-cli", "plain", "cpu_seconds")
        acc = {v: variants[v]["final_accuracy"] for v in ("plain", "kiln", "kiln-cli") if v in variants}
        out.append({"model": model, "device": device, "precision": precision, "malloc": mode,
                    "variants": variants, "ratios": ratios, "accuracy": acc})
    # kiln as users run it (the CLI tunes malloc) against the tutorial as users run it (glibc's default)
    for s in out:
        if s["malloc"] == "tuned":
            other = next((o for o in out if o["malloc"] == "default" and
                          (o["model"], o["device"], o["precision"]) == (s["model"], s["device"], s["precision"])), None)
            cli, plain = s["variants"].get("kiln-cli", {}), (other or {}).get("variants", {}).get("plain", {})
            if cli.get("wall_seconds") and plain.get("wall_seconds"):
                s["ratios"]["kiln-cli (tuned)/plain (default malloc) wall"] = round(
                    cli["wall_seconds"] / plain["wall_seconds"], 4)
    return out


def _fmt(value: Any, spec: str) -> str:
    """``value`` formatted with ``spec``; a missing value is a ``-`` as wide as the spec asks."""
    if value is None:
        width = spec.split(".")[0].rstrip("fd")
        return "-".rjust(int(width)) if width.isdigit() else "-"
    return format(value, spec)


def print_table(summary: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """The human-readable figures."""
    print(f"\n{meta['date']}  {meta['machine']['cpu']} ({meta['machine']['cores']} cores)  torch {meta['versions']['torch']}"
          f"  {meta['repeats']} repeats x {meta['epochs']} epochs  load {meta['load_before']} -> {meta['load_after']}")
    for s in summary:
        layout = "channels_last" if meta.get("channels_last") else "contiguous (NCHW)"
        print(f"\n{s['model']}  {s['device']} {s['precision']}  malloc {s['malloc']}  limit/plain/kiln: {layout}; "
              f"kiln-cli: kiln's defaults (channels_last)")
        print(f"  {'variant':<9} {'iter ms':>8} {'mean':>8} {'cpu ms':>8} {'train s':>8} {'wall s':>8} {'cpu s':>8} {'RSS MiB':>8} "
              f"{'faults':>9} {'accuracy':>8}")
        for name, v in s["variants"].items():
            print(f"  {name:<9} {_fmt(v['iter_ms'], '8.2f')} {_fmt(v['iter_ms_mean'], '8.2f')} {_fmt(v['iter_cpu_ms'], '8.2f')} "
                  f"{_fmt(v['train_seconds'], '8.2f')} {_fmt(v['wall_seconds'], '8.2f')} {_fmt(v['cpu_seconds'], '8.2f')} {_fmt(v['peak_rss_mib'], '8.0f')} "
                  f"{_fmt(v['minor_faults'], '9.0f')} {_fmt(v['final_accuracy'], '8.4f')}")
        print("  " + "  ".join(f"{k} {_fmt(r, '.3f')}" for k, r in s["ratios"].items()))


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"host": socket.gethostname(), "cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "platform": platform.platform(), "libc": "-".join(platform.libc_ver()),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def _check_same_recipe() -> None:
    """plain_loop's hyperparameters must still be the digits recipe's, or the comparison means nothing."""
    import plain_loop
    from recipes import get_recipe

    c, d = get_recipe("digits"), plain_loop.DIGITS
    ours = {"batch_size": c.data.batch_size, "val_fraction": c.data.val_fraction, "image_size": c.data.image_size,
            "channels": tuple(c.model.channels), "lr": c.optim.lr, "max_lr": c.schedule.max_lr,
            "pct_start": c.schedule.pct_start, "final_div_factor": c.schedule.final_div_factor,
            "weight_decay": c.optim.weight_decay, "beta2": c.optim.beta2, "eps": c.optim.eps,
            "label_smoothing": c.train.label_smoothing, "clip_norm": c.train.clip_norm, "seed": c.train.seed}
    differ = {k: (v, d[k]) for k, v in ours.items() if d[k] != v}
    extras = ("ema_decay", "mixup_alpha", "cutmix_alpha")  # what the tutorial loop does not do
    if any(getattr(c.train, k, 0) for k in extras):
        differ["train." + "/".join(extras)] = "must be 0"
    if differ or c.data.augment != "none" or c.optim.decay_norm_and_bias or c.train.accumulation_steps != 1:
        sys.exit(f"bench: plain_loop.DIGITS no longer matches the digits recipe: {differ} (recipe, plain)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="kiln against a hand-written loop and the floor, interleaved.")
    p.add_argument("--model", default="small_cnn", choices=[*MODELS, "resnet18", "all"])
    p.add_argument("--repeats", type=int, default=5, help="runs of each variant (interleaved)")
    p.add_argument("--epochs", type=int, default=10, help="epochs per run (the digits recipe trains 10)")
    p.add_argument("--device", default="all", choices=["cpu", "cuda", "all"], help="all: the CPU, and CUDA when present")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="default: fp32 on the CPU, bf16 on CUDA")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="memory format of limit, plain and kiln (default: channels_last, kiln's default); "
                        "kiln-cli always runs with kiln's defaults")
    p.add_argument("--compile", action="store_true", help="torch.compile the model in every variant")
    p.add_argument("--malloc", default="both", choices=[*MALLOC_MODES, "both"])
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--warmup", type=int, default=5, help="iterations per run left out of the per-iteration figures")
    p.add_argument("--out", type=Path, default=HERE / "results", help="folder for the JSON file")
    p.add_argument("--worker", choices=["limit", "kiln"], help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--sync-check", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark (or, with the hidden ``--worker``, one variant of it)."""
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    _check_same_recipe()
    models = list(MODELS) if args.model == "all" else ["resnet18_32" if args.model == "resnet18" else args.model]
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        if args.device == "cuda":
            sys.exit("bench: --device cuda but no CUDA device is available")
        devices.remove("cuda")
    modes = list(MALLOC_MODES) if args.malloc == "both" else [args.malloc]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        sys.exit(f"bench: unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")

    meta = {"date": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": _machine(),
            "versions": {"torch": torch.__version__, "python": platform.python_version()},
            "command": " ".join(sys.argv), "repeats": args.repeats, "epochs": args.epochs, "warmup": args.warmup,
            "compile": args.compile, "channels_last": args.channels_last, "load_before": [round(x, 2) for x in os.getloadavg()],
            "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ}}
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp_name:
        tmp = Path(tmp_name)
        for device in devices:
            precision = args.precision or ("bf16" if device == "cuda" else "fp32")
            channels_last = args.channels_last
            for model in models:
                _, cli_sets = kiln_config(model, args.epochs, device, precision, channels_last, args.compile)
                plan = [(mode, v) for mode in modes for v in variants]
                for repeat in range(1, args.repeats + 1):
                    for mode, variant in plan:
                        record = run_variant(variant, mode, args, model, device, precision, channels_last, cli_sets, tmp)
                        record["repeat"] = repeat
                        records.append(record)
                        print(f"{model} {device} {mode:<7} {variant:<8} #{repeat}: iter {_fmt(record.get('iter_ms'), '.2f')} ms"
                              f"  wall {record['wall_seconds']:.2f} s  acc {_fmt(record.get('final_accuracy'), '.4f')}",
                              flush=True)
    meta["load_after"] = [round(x, 2) for x in os.getloadavg()]
    summary = summarize(records)
    print_table(summary, meta)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}-{'-'.join(devices)}-{'-'.join(models)}.json"
    path = args.out / name
    path.write_text(json.dumps({"meta": meta, "summary": summary, "runs": records}, indent=1) + "\n")
    print(f"\nfigures written to {path}")


if __name__ == "__main__":
    main()
