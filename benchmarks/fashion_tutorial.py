"""``kiln train fashion-mnist``'s job written as the PyTorch tutorials write it: the baseline of
``time_to_accuracy.py``.

The same data (the IDX files read the way Fashion-MNIST's own ``utils/mnist_reader.py`` reads them),
normalisation, model and initial weights (kiln's ``recipes/models.py`` loaded as a plain file), AdamW
parameter groups, one-cycle schedule, label smoothing, epochs and batched random crop, flip and erasing
(kiln's ``recipes/data/augment.py`` loaded as a plain file), in a tutorial's loop: a DataLoader over a
TensorDataset, ``zero_grad``, forward, loss, ``backward``, ``step``, ``OneCycleLR.step()`` and
``loss.item()`` every batch, a validation pass over the test split every epoch. No kiln, ignite or
click is imported. After each epoch it appends ``{"epoch", "val_accuracy", "train_loss"}`` to
``--out`` (a JSONL file).

``--bf16`` wraps the forward passes in ``torch.autocast("cpu", torch.bfloat16)``, as the PyTorch AMP
recipe writes it: the tutorial loop given the precision ``kiln``'s ``auto`` picks on a CPU with AMX.

Usage::

    python benchmarks/fashion_tutorial.py --out FILE --recipe JSON [--bf16] [--data-dir /usr/share/datasets/fashion-mnist]
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from plain_loop import load_kiln_module  # noqa: E402


def load_mnist(path: Path, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST's own reader (``utils/mnist_reader.py``): labels and images from the gzipped IDX files."""
    with gzip.open(path / f"{kind}-labels-idx1-ubyte.gz", "rb") as f:
        labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8)
    with gzip.open(path / f"{kind}-images-idx3-ubyte.gz", "rb") as f:
        images = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(len(labels), 28, 28)
    return images, labels


def main() -> None:
    """Train, appending one JSON line per epoch to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--recipe", type=Path, required=True, help="the recipe's settings as JSON (kiln show)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast around the forward passes")
    options = parser.parse_args()
    r = json.loads(options.recipe.read_text())
    d, o, s, t, m = r["data"], r["optim"], r["schedule"], r["train"], r["model"]
    torch.manual_seed(t["seed"])

    x_train, y_train = load_mnist(options.data_dir, "train")
    x_test, y_test = load_mnist(options.data_dir, "t10k")
    x_train = torch.tensor(x_train, dtype=torch.float32).unsqueeze(1) / 255.0
    x_test = torch.tensor(x_test, dtype=torch.float32).unsqueeze(1) / 255.0
    mean, std = x_train.mean(), x_train.std()
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    train_loader = DataLoader(TensorDataset(x_train, torch.tensor(y_train, dtype=torch.long)),
                              batch_size=d["batch_size"], shuffle=True)
    test_loader = DataLoader(TensorDataset(x_test, torch.tensor(y_test, dtype=torch.long)), batch_size=512)

    models = load_kiln_module("models")
    augment = load_kiln_module("data/augment")
    model = models.build_model(m["name"], 1, 10, d["image_size"], m["channels"])
    optimizer = torch.optim.AdamW(models.parameter_groups(model, o["weight_decay"], o["decay_norm_and_bias"]),
                                  lr=o["lr"], betas=(0.9, o["beta2"]), eps=o["eps"])
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=s["max_lr"], total_steps=t["epochs"] * len(train_loader), pct_start=s["pct_start"],
        div_factor=s["max_lr"] / o["lr"], final_div_factor=s["final_div_factor"], anneal_strategy=s["anneal_strategy"])
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=t["label_smoothing"])
    generator = torch.Generator().manual_seed(t["seed"])
    flip = d["augment"] == "crop+flip"
    erase = d.get("erase", 0.0)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=options.bf16)

    for epoch in range(1, t["epochs"] + 1):
        model.train()
        total, count, started = 0.0, 0, time.perf_counter()
        for x, y in train_loader:
            if d["augment"] != "none":
                x = augment.random_crop_flip(x, generator, pad=2, flip=flip)
            if erase:
                x = augment.random_erasing(x, generator, p=erase)
            optimizer.zero_grad()
            with autocast:
                loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(y)
            count += len(y)
        model.eval()
        correct = 0
        with torch.no_grad(), autocast:
            for x, y in test_loader:
                correct += (model(x).argmax(1) == y).sum().item()
        accuracy = correct / len(test_loader.dataset)
        print(f"epoch {epoch}: train_loss {total / count:.4f} val_accuracy {accuracy:.4f} "
              f"({time.perf_counter() - started:.1f}s)", flush=True)
        with open(options.out, "a") as f:
            f.write(json.dumps({"epoch": epoch, "val_accuracy": accuracy, "train_loss": total / count}) + "\n")


if __name__ == "__main__":
    main()
