"""Inference throughput: ``kiln predict`` on a folder of 2,000 PNG files against a plain torchvision loop.

The images: 2,000 64x64 RGB PNG files in 10 class folders (class-coloured stripes plus noise, made
here with a fixed seed). The model: torchvision's ResNet-18 at image size 64 from a real one-epoch
``kiln train imagefolder`` on them (made once, before the timing). Then, in rounds, each a fresh
process, the order rotating from round to round:

- ``kiln``: ``kiln predict CKPT FOLDER --format csv --out /dev/null`` (its defaults: the precision
  the checkpoint was validated in, min(4, cores) DataLoader workers, batches of 256); wall time
  from launch to exit;
- ``kiln-1``: the same command on one of the images, so ``kiln``'s time without the start
  (interpreter, imports, checkpoint) is ``kiln - kiln-1``, taken per round (the worker start is left in);
- ``plain-fp32`` / ``plain-PRECISION``: what a tutorial writes, in a process of its own (this file
  with ``--plain``, importing no kiln): ``torchvision.datasets.ImageFolder`` with the same evaluation
  transform written in torchvision (``ToTensor``, ``Resize(72, antialias)``, ``CenterCrop(64)``,
  ``Normalize``), a ``DataLoader`` with the same workers and batch size, ``torchvision.models.resnet18``
  with the checkpoint's weights through ``load_state_dict``, ``inference_mode``, argmax; in fp32, and
  under the autocast kiln used. Its wall time, and its loop's own time (DataLoader start included).

Each plain run writes its predicted classes; the script checks that every image gets the class
``kiln predict`` gave it (in the same precision) and reports the agreement. The table gives, per
variant, the median wall time over the rounds, the fastest round (the least disturbed one on a
shared machine) and the median CPU seconds the process and its DataLoader workers used (user +
system: far less sensitive to other load than the wall time). Results go to ``results/`` as JSON.

Usage::

    nice -n 10 python benchmarks/predict_throughput.py [--rounds 3] [--images 2000] [--image-size 64]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLASSES = 10


def write_images(root: Path, count: int, side: int = 64) -> None:
    """``count`` RGB PNG files, ``root/classK/NNNN.png``: stripes whose colour and period say the class, plus noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    columns = np.arange(side)
    for n in range(count):
        k = n % CLASSES
        folder = root / f"class{k}"
        folder.mkdir(parents=True, exist_ok=True)
        stripes = (np.sin(columns * (k + 2) * np.pi / side)[None, :, None] + 1) * 60
        colour = np.array([(k * 37) % 120, (k * 71) % 120, (k * 113) % 120])[None, None, :]
        pixels = stripes + colour + rng.integers(0, 70, (side, side, 3))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8), mode="RGB").save(folder / f"{n:04d}.png")


def train_checkpoint(images: Path, run_dir: Path, image_size: int, env: dict) -> Path:
    """A real checkpoint: ``kiln train imagefolder --model resnet18`` for one epoch on ``images``."""
    subprocess.run([sys.executable, "-m", "recipes", "train", "imagefolder", "--data-dir", str(images), "--model",
                    "resnet18", "--image-size", str(image_size), "--epochs", "1", "--quiet", "--out", str(run_dir)],
                   cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return next((run_dir / "checkpoints").glob("best-*.pt"))


def timed(command: list[str], env: dict) -> tuple[float, float]:
    """Wall seconds of ``command`` from launch to exit, and the CPU seconds (user + system) it and its workers used.

    On a shared machine the wall time suffers from others' load; the CPU time much less so.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return seconds, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def plain(checkpoint: str, folder: str, precision: str, workers: int, batch_size: int, image_size: int,
          out: str) -> None:
    """The plain loop (no kiln imported): predicted class per file into ``out`` (JSON), and the loop's seconds."""
    import torch
    import torchvision
    from torchvision import transforms as T

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    transform = T.Compose([T.ToTensor(), T.Resize(int(image_size * 1.14), antialias=True), T.CenterCrop(image_size),
                           T.Normalize(mean, std)])
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    model = torchvision.models.resnet18(num_classes=CLASSES)
    model.load_state_dict(state["ema_model"] if "ema_model" in state else state["model"])
    model.eval()
    dataset = torchvision.datasets.ImageFolder(folder, transform=transform)
    started = time.perf_counter()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    predicted = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        for x, _ in loader:
            predicted += model(x).float().argmax(1).tolist()
    seconds = time.perf_counter() - started
    files = [path for path, _ in dataset.samples]
    Path(out).write_text(json.dumps({"seconds": seconds, "classes": dict(zip(files, predicted))}))


def kiln_classes(stdout_csv: Path) -> dict[str, int]:
    """File -> predicted class index from ``kiln predict --format csv`` output (class names are classK)."""
    with open(stdout_csv) as f:
        return {row["input"]: int(row["class_1"].removeprefix("class")) for row in csv.DictReader(f)}


def main() -> None:
    """Make the images and the checkpoint, measure in rounds, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--plain", nargs=4, metavar=("CKPT", "FOLDER", "PRECISION", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--batch-size", type=int, default=256)
    options = parser.parse_args()
    if options.plain:
        ckpt, folder, precision, out = options.plain
        plain(ckpt, folder, precision, options.workers, options.batch_size, options.image_size, out)
        return

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine import save_result

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    scratch = Path(tempfile.mkdtemp(prefix="kiln-predict-bench-"))
    try:
        images = scratch / "images"
        write_images(images, options.images)
        checkpoint = train_checkpoint(images, scratch / "run", options.image_size, env)
        import torch

        precision = torch.load(checkpoint, map_location="cpu", weights_only=False)["kiln"]["precision"]
        one = str(next((images / "class0").glob("*.png")))
        kiln = [sys.executable, "-m", "recipes", "predict", str(checkpoint)]
        flags = ["--format", "csv", "--workers", str(options.workers), "--batch-size", str(options.batch_size)]
        answers = scratch / "kiln.csv"
        variants = {
            "kiln": lambda: timed(kiln + [str(images), *flags, "--out", "/dev/null"], env),
            "kiln-1": lambda: timed(kiln + [one, *flags, "--out", "/dev/null"], env),
        }
        for p in dict.fromkeys(["fp32", precision]):
            out = scratch / f"plain-{p}.json"
            variants[f"plain-{p}"] = (lambda p=p, out=out: timed(
                [sys.executable, __file__, "--plain", str(checkpoint), str(images), p, str(out), "--workers",
                 str(options.workers), "--batch-size", str(options.batch_size), "--image-size", str(options.image_size)],
                env))
        walls: dict[str, list[float]] = {name: [] for name in variants}
        cpus: dict[str, list[float]] = {name: [] for name in variants}
        loops: dict[str, list[float]] = {name: [] for name in variants if name.startswith("plain")}
        names = list(variants)
        for r in range(options.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                seconds, cpu = variants[name]()
                walls[name].append(seconds)
                cpus[name].append(cpu)
                if name in loops:
                    loops[name].append(json.loads((scratch / f"{name}.json").read_text())["seconds"])
                print(f"round {r + 1}: {name:<12} {seconds:6.2f} s wall {cpu:6.2f} s CPU", flush=True)
        # Agreement: kiln's classes once more (into a file this time) against each plain loop's.
        timed(kiln + [str(images), *flags, "--out", str(answers)], env)
        ours = kiln_classes(answers)
        agreement = {}
        for name in loops:
            theirs = json.loads((scratch / f"{name}.json").read_text())["classes"]
            agreement[name] = sum(ours[f] == c for f, c in theirs.items()) / len(theirs)

        n = options.images
        median = {name: statistics.median(values) for name, values in walls.items()}
        fastest = {name: min(values) for name, values in walls.items()}
        cpu = {name: statistics.median(values) for name, values in cpus.items()}
        without_start = [a - b for a, b in zip(walls["kiln"], walls["kiln-1"])]  # per round: they ran side by side
        rows = {  # label: (median wall s, fastest wall s, median CPU s, images in it)
            "kiln predict (process)": (median["kiln"], fastest["kiln"], cpu["kiln"], n),
            "kiln predict without start (kiln - kiln-1)": (statistics.median(without_start),
                                                             min(without_start), cpu["kiln"] - cpu["kiln-1"], n - 1),
            "kiln start (1 image)": (median["kiln-1"], fastest["kiln-1"], cpu["kiln-1"], 0),
        }
        for name in loops:
            rows[f"{name} (process)"] = (median[name], fastest[name], cpu[name], n)
            rows[f"{name} loop only"] = (statistics.median(loops[name]), min(loops[name]), None, n)
        print(f"\n{n} PNG files (64x64 RGB), resnet18 at {options.image_size}, kiln precision {precision}, "
              f"{options.workers} workers, batch {options.batch_size}; {options.rounds} rounds")
        print(f"{'':<45} {'median s':>8} {'img/s':>6} {'best s':>7} {'img/s':>6} {'CPU s':>6}")
        rate = lambda images, s: "-" if not images else str(round(images / s))  # noqa: E731
        for label, (med, best, used, images) in rows.items():
            print(f"{label:<45} {med:8.2f} {rate(images, med):>6} {best:7.2f} {rate(images, best):>6} "
                  f"{'-' if used is None else f'{used:.1f}':>6}")
        for name, share in agreement.items():
            print(f"same top-1 as kiln predict: {name} {share:.4f}")
        save_result("predict", {
            "benchmark": "predict_throughput", "images": n, "image_size": options.image_size, "model": "resnet18",
            "images_desc": "64x64 RGB PNG files in 10 class folders: class-coloured stripes plus noise",
            "kiln_precision": precision, "workers": options.workers, "batch_size": options.batch_size,
            "rounds": options.rounds, "wall_seconds": walls, "cpu_seconds": cpus, "loop_seconds": loops,
            "table": {label: {"median_seconds": round(med, 3), "fastest_seconds": round(best, 3),
                              "median_cpu_seconds": None if used is None else round(used, 2),
                              "images_per_second_median": round(images / med, 1) if images else None,
                              "images_per_second_fastest": round(images / best, 1) if images else None}
                      for label, (med, best, used, images) in rows.items()},
            "same_top1_as_kiln": agreement,
        })
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
