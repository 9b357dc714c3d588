"""Transfer on real data: does fine-tuning kiln's own pretrained network beat training from scratch on 500 images?

Fashion-MNIST's IDX files (Debian's ``dataset-fashion-mnist``) are written as PNG folders, one per class:
classes 0-4 (all 30,000 training images) to pretrain on, and classes 5-9 as the small job: 100 training
images per class (seeded) and all 5,000 test images of those classes as the validation folder. Every run
is a whole ``kiln train imagefolder`` process (small_cnn at 28x28, crops, no flips):

- ``pretrain``: classes 0-4, once;
- ``fine-tune``: classes 5-9 from the pretrained ``last.pt`` with the body frozen for the first epoch
  (``finetune.freeze_epochs=1``: the two sets have as many classes, so the head loads too and auto
  would not freeze);
- ``fine-tune-body-0.1x``, ``fine-tune-body-1x``: the same, with the body at 0.1x or 1x the head's LR once
  unfrozen (``body_lr_factor``; the default is 0.3; 1x: what the frozen first epoch alone does);
- ``unfrozen``: the same weights, everything training from the first step at one LR (``freeze_epochs=0``);
- ``scratch``: the same network from random weights, the same epochs (it takes at least as long: no
  phase with a frozen body).

Each variant runs ``--seeds`` times (``train.seed``: the split of the 500 images is fixed, the
initialisation, shuffling and crops vary); the table gives the median final validation accuracy on the
5,000 test images and the median wall time. Results go to ``results/`` as JSON.

Usage::

    python benchmarks/transfer.py [--seeds 5] [--epochs 10] [--pretrain-epochs 4] [--max-lr 0.01]
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

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import cpu_model, save_result  # noqa: E402

from recipes.data.idx import FASHION_MNIST_DIR, find_idx_files, read_images_and_labels  # noqa: E402

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--model", "small_cnn", "--image-size", "28", "--set", "data.augment=crop", "--quiet", "--no-report"]


def write_folders(out: Path, per_class: int, seed: int) -> tuple[Path, Path]:
    """The pretraining folder (classes 0-4, every training image) and the small job's (classes 5-9: ``per_class``
    training images each, every test image as val/)."""
    files = find_idx_files(FASHION_MNIST_DIR, "fashion-mnist")
    (x_train, y_train), (x_test, y_test) = (read_images_and_labels(*files[s]) for s in ("train", "test"))
    rng = np.random.default_rng(seed)

    def save(images: np.ndarray, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for n, image in enumerate(images):
            Image.fromarray(image, mode="L").save(folder / f"{n:05d}.png")

    pre, small = out / "pre", out / "small"
    for c in range(5):
        save(x_train[y_train == c], pre / "train" / f"class{c}")
    for c in range(5, 10):
        chosen = rng.choice(np.flatnonzero(y_train == c), per_class, replace=False)
        save(x_train[np.sort(chosen)], small / "train" / f"class{c}")
        save(x_test[y_test == c], small / "val" / f"class{c}")
    return pre, small


def kiln_train(run_dir: Path, *args: str) -> dict:
    """One ``kiln train imagefolder`` process: its final and best validation accuracy and its wall time."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "recipes.cli", "train", "imagefolder", *args, *COMMON,
                           "--out", str(run_dir)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"kiln train failed ({done.returncode}): {done.stderr.strip()}")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"final_val_accuracy": metrics[-1]["val_accuracy"],
            "best_val_accuracy": max(m["val_accuracy"] for m in metrics), "seconds": round(seconds, 1)}


def main() -> None:
    """Write the folders, pretrain, run the variants per seed, print the table, save JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=10, help="epochs of each run on the 500 images")
    parser.add_argument("--pretrain-epochs", type=int, default=4)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--variants", nargs="+", default=["fine-tune", "fine-tune-body-0.1x", "fine-tune-body-1x",
                                                           "unfrozen", "scratch"])
    parser.add_argument("--max-lr", type=float, default=0.01, help="peak LR of every run, the pretraining too "
                        "(small_cnn's, as the digits recipe has it; the imagefolder recipe's 1e-3 is for big models)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pre, small = write_folders(tmp, args.per_class, seed=0)
        pretrained = kiln_train(tmp / "pre-run", "--data-dir", str(pre), "--epochs", str(args.pretrain_epochs),
                                "--val-fraction", "0.05", "--batch-size", "128", "--max-lr", str(args.max_lr))
        print(f"pretrained on classes 0-4: val_accuracy {pretrained['final_val_accuracy']:.4f} "
              f"in {pretrained['seconds']:.0f} s", flush=True)
        weights = str(tmp / "pre-run" / "checkpoints" / "last.pt")
        variants = {"fine-tune": ["--weights", weights, "--set", "finetune.freeze_epochs=1"],
                    "fine-tune-body-0.1x": ["--weights", weights, "--set", "finetune.freeze_epochs=1",
                                            "--set", "finetune.body_lr_factor=0.1"],
                    "fine-tune-body-1x": ["--weights", weights, "--set", "finetune.freeze_epochs=1",
                                          "--set", "finetune.body_lr_factor=1"],
                    "unfrozen": ["--weights", weights, "--set", "finetune.freeze_epochs=0"],
                    "scratch": []}
        variants = {name: extra for name, extra in variants.items() if name in args.variants}
        runs: dict[str, list[dict]] = {name: [] for name in variants}
        for seed in range(args.seeds):
            for name, extra in variants.items():  # interleaved: a slow spell hits every variant alike
                run = kiln_train(tmp / f"{name}-{seed}", "--data-dir", str(small), "--epochs", str(args.epochs),
                                 "--batch-size", "32", "--seed", str(seed), "--max-lr", str(args.max_lr), *extra)
                runs[name].append(run)
                print(f"seed {seed} {name:<17} final {run['final_val_accuracy']:.4f} best "
                      f"{run['best_val_accuracy']:.4f} {run['seconds']:.0f} s", flush=True)
    table = {name: {"median_final_val_accuracy": statistics.median(r["final_val_accuracy"] for r in rs),
                    "median_best_val_accuracy": statistics.median(r["best_val_accuracy"] for r in rs),
                    "median_seconds": statistics.median(r["seconds"] for r in rs), "runs": rs}
             for name, rs in runs.items()}
    print(f"\n{cpu_model()}: {args.per_class} images per class of Fashion-MNIST 5-9, {args.epochs} epochs, "
          f"validated on the 5,000 test images of those classes; medians of {args.seeds} seeds")
    for name, row in table.items():
        print(f"  {name:<17}  final {row['median_final_val_accuracy']:.4f}  best {row['median_best_val_accuracy']:.4f}"
              f"  {row['median_seconds']:.0f} s")
    save_result("transfer", {"benchmark": "transfer", "pretrain": pretrained, "epochs": args.epochs,
                             "max_lr": args.max_lr,
                             "per_class": args.per_class, "seeds": args.seeds, "variants": table})


if __name__ == "__main__":
    main()
