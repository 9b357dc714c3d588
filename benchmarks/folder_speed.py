"""Your own images at in-memory speed: an image folder against the in-memory Fashion-MNIST recipe, images/s.

8,000 Fashion-MNIST training images (Debian's ``dataset-fashion-mnist``) are written as a class-per-folder
PNG tree (1-channel, 28x28), and trained with the same model (the fashion-mnist recipe's small CNN), batch
(64), augmentation (crops and flips; no random erasing, which the fashion-mnist recipe adds) and channels (``data.channels=1``) three ways, each a whole
``kiln train`` process, interleaved round by round so a slow spell of the machine hits all alike:

- ``in-memory``: ``kiln train fashion-mnist`` (60,000 images held as uint8 tensors; 2 epochs);
- ``folder``: ``kiln train imagefolder`` on the PNG tree, which fits ``data.memory_budget`` and is decoded
  into memory once (3 epochs);
- ``folder-loader``: the same with ``data.memory_budget=0``: a DataLoader with ``--num-workers`` workers
  decoding every PNG every epoch (what kiln did before; 3 epochs).

The figure is metrics.jsonl's ``images_per_second`` (training images over the epoch's time), the median of
the epochs after the first of every run, then the median over ``--rounds`` rounds; and each run's wall time.
Precision fp32 unless ``--precision`` says otherwise. Results go to ``results/`` as JSON.

Usage::

    python benchmarks/folder_speed.py [--rounds 3] [--images 8000] [--num-workers 2] [--precision fp32]
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

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import cpu_model, save_result  # noqa: E402

from recipes.data.idx import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, find_idx_files, read_images_and_labels  # noqa: E402

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[1]
SAME = ["--model", "small_cnn", "--set", "model.channels=[16,64,128,256]", "--batch-size", "64",
        "--set", "data.augment=crop+flip", "--set", "data.erase=0", "--quiet", "--no-report"]


def write_folder(out: Path, images: int) -> Path:
    """The first ``images`` Fashion-MNIST training images as ``out/CLASS/N.png`` (grayscale)."""
    files = find_idx_files(FASHION_MNIST_DIR, "fashion-mnist")
    x, y = read_images_and_labels(*files["train"])
    for n in range(images):
        folder = out / FASHION_MNIST_CLASSES[int(y[n])].replace("/", "-")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[n], mode="L").save(folder / f"{n:05d}.png")
    return out


def kiln_train(run_dir: Path, *args: str) -> dict:
    """One ``kiln train`` process: the median images/s of its epochs after the first, and its wall time."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "recipes.cli", "train", *args, *SAME, "--out", str(run_dir)],
                          cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"kiln train failed ({done.returncode}): {done.stderr.strip()}")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [m["images_per_second"] for m in (metrics[1:] or metrics)]
    return {"images_per_second": statistics.median(timed), "epochs": len(metrics), "seconds": round(seconds, 1),
            "final_val_accuracy": metrics[-1]["val_accuracy"]}


def main() -> None:
    """Write the PNG tree, run the three ways round by round, print the table, save JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=8000)
    parser.add_argument("--num-workers", type=int, default=2, help="the DataLoader's workers (folder-loader)")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--ways", nargs="+", default=["in-memory", "folder", "folder-loader"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        folder = write_folder(tmp / "pngs", args.images)
        print(f"wrote {args.images} PNG files in {time.perf_counter() - started:.0f} s", flush=True)
        common = ["--precision", args.precision]
        on_folder = ["imagefolder", "--data-dir", str(folder), "--image-size", "28", "--val-fraction", "0.1",
                     "--set", "data.channels=1", "--epochs", "3", *common]
        ways = {"in-memory": ["fashion-mnist", "--epochs", "2", *common],
                "folder": [*on_folder, "--num-workers", "0"],
                "folder-loader": [*on_folder, "--num-workers", str(args.num_workers), "--set", "data.memory_budget=0"]}
        ways = {name: way for name, way in ways.items() if name in args.ways}
        runs: dict[str, list[dict]] = {name: [] for name in ways}
        for r in range(args.rounds):
            for name, way in ways.items():  # interleaved
                run = kiln_train(tmp / f"{name}-{r}", *way)
                runs[name].append(run)
                print(f"round {r} {name:<14} {run['images_per_second']:7.0f} images/s  {run['seconds']:5.1f} s "
                      f"({run['epochs']} epochs)", flush=True)
    table = {name: {"median_images_per_second": statistics.median(x["images_per_second"] for x in rs), "runs": rs}
             for name, rs in runs.items()}
    base = table.get("in-memory", {}).get("median_images_per_second")
    print(f"\n{cpu_model()}, {args.precision}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '2')}: "
          f"medians of {args.rounds} rounds")
    for name, row in table.items():
        ratio = f"  {row['median_images_per_second'] / base:.2f}x in-memory" if base else ""
        print(f"  {name:<14} {row['median_images_per_second']:7.0f} images/s{ratio}")
    save_result("folder-speed", {"benchmark": "folder_speed", "images": args.images, "precision": args.precision,
                                 "rounds": args.rounds, "num_workers": args.num_workers, "ways": table})


if __name__ == "__main__":
    main()
