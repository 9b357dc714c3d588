"""An image folder decoded once into memory and trained on the in-memory path, when it fits ``data.memory_budget``.

A DataLoader decodes every image again every epoch, one sample at a time, through PIL and per-sample
transforms: on small images that costs more than the network (8,000 28x28 PNGs with kiln's small CNN
trained at a third of the in-memory Fashion-MNIST recipe's speed). A folder that fits the budget is
decoded once (in threads for files large enough to gain from it), resized a batch of same-sized images
at a time, and then batched like the in-memory data sets
(:class:`~recipes.data.batches.TensorBatches`):

- training images are kept as uint8 at the *training size* (the evaluation transform's resize side; the
  weights' for a fine-tune): shorter side to that, center square. Crops (``random_resized_crop_flip``) and
  flips run on whole batches on the device, seeded by (seed, epoch, batch), so a resume at any batch is exact;
- validation images are kept exactly as the evaluation transform makes them (float, before normalizing),
  so validation, ``kiln eval``, ``kiln predict`` and an exported model see the same numbers.
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import torch

from recipes.config import Config, parse_size
from recipes.data.base import DataError, usable_cpus
from recipes.data.augment import random_resized_crop_flip, with_erasing
from recipes.data.batches import TensorBatches
from recipes.data.preprocess import Preprocessing, _center_crop, _interpolate, _shorter_side_to, to_uint8_tensor
from recipes.data.screening import why_unreadable

log = logging.getLogger("kiln")

__all__ = ["auto_memory_budget", "memory_budget", "decoded_size", "in_memory_batches"]


def auto_memory_budget() -> int:
    """What ``data.memory_budget: auto`` stands for on this machine now: a quarter of the memory available
    (Linux's MemAvailable: free memory plus the page cache it can drop; not the free pages alone, which a
    busy page cache makes look small)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 4
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError, AttributeError):  # neither: a conservative 1 GiB
        return 1 << 30


def memory_budget(cfg: Config) -> int:
    """``data.memory_budget`` in bytes (``auto``: :func:`auto_memory_budget`; ``auto:SIZE``: what auto was when the
    run started)."""
    value = cfg.data.memory_budget
    return auto_memory_budget() if value == "auto" else int(parse_size(value.removeprefix("auto:")) or 0)


def decoded_size(n_train: int, n_val: int, channels: int, train_side: int, val_side: int) -> int:
    """Bytes the decoded images take: training images as uint8 at ``train_side``, validation ones as float32 at
    ``val_side`` (the model's input size)."""
    return n_train * channels * train_side ** 2 + n_val * channels * val_side ** 2 * 4


def _decoded(path: str, mode: str) -> torch.Tensor:
    """The file as a uint8 ``C x H x W`` tensor in PIL ``mode`` (``L`` or ``RGB``), at its own size."""
    from PIL import Image

    with Image.open(path) as image:
        return to_uint8_tensor(image.convert(mode))


#: Files at least this large on average are decoded in threads: below it, the per-file Python work (which holds
#: the GIL) outweighs the decoding (which releases it), and two threads took twice as long as one on 28x28 PNGs.
_THREADED_FILE_BYTES = 16 << 10


def _decode_all(paths: Sequence[str], mode: str) -> list[torch.Tensor]:
    """Every file as :func:`_decoded` makes it, in order: in threads (one per CPU this process may use: PIL and
    zlib release the GIL) when the files are large enough to gain from it. A file that fails to decode (it passed
    the screening's verify, but its pixel data is broken) is a DataError."""
    def one(path: str) -> torch.Tensor:
        try:
            return _decoded(path, mode)
        except Exception as e:  # noqa: BLE001 - whatever PIL raises, the file cannot be read
            raise DataError(f"{path} is not a readable image ({why_unreadable(path, e)}); remove it, or skip "
                            "unreadable files with --set data.skip_bad_images=true") from None

    workers = usable_cpus()
    sample = paths[:: max(1, len(paths) // 64)]
    if workers < 2 or sum(os.path.getsize(p) for p in sample) < _THREADED_FILE_BYTES * len(sample):
        return [one(path) for path in paths]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, paths, chunksize=64))


def _resized_in_batches(images: Sequence[torch.Tensor], resize: Any, out_dtype: torch.dtype) -> torch.Tensor:
    """``resize`` (float ``N x C x H x W`` in [0, 1] -> float) applied to ``images`` (uint8, any sizes), a batch of
    same-sized images at a time (one interpolation call per batch, not per image), stacked in their order;
    ``out_dtype`` uint8 rounds back to bytes."""
    out: list[torch.Tensor | None] = [None] * len(images)
    by_size: dict[tuple[int, ...], list[int]] = {}
    for n, image in enumerate(images):
        by_size.setdefault(tuple(image.shape), []).append(n)
    with torch.inference_mode(False):
        for indices in by_size.values():
            for start in range(0, len(indices), 512):
                chunk = indices[start:start + 512]
                x = resize(torch.stack([images[n] for n in chunk]).float().div_(255.0))
                if out_dtype == torch.uint8:
                    x = x.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
                for n, row in zip(chunk, x):
                    out[n] = row
    return torch.stack(out)  # type: ignore[arg-type]


def _to_square(side: int, interpolation: str) -> Any:
    """Float batch -> shorter side to ``side``, center square (left alone when already ``side`` x ``side``)."""
    def resize(x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) == (side, side):
            return x
        return _center_crop(_interpolate(x, _shorter_side_to(x.shape[-2:], side), interpolation), side)
    return resize


def in_memory_batches(cfg: Config, samples: Sequence[tuple[str, int]], train_idx: Sequence[int],
                      val_samples: Sequence[tuple[str, int]], val_idx: Sequence[int], evaluation: Preprocessing,
                      train_side: int, device: torch.device) -> tuple[TensorBatches, TensorBatches]:
    """The training and validation batches of an image folder, decoded into memory (on ``device``).

    Args:
        samples, train_idx: the training folder's ``(path, label)`` list and which of them train.
        val_samples, val_idx: the validation folder's list (the same list for a split folder) and which validate.
        evaluation: the evaluation transform (``kiln predict``'s).
        train_side: the side training images are kept at (the evaluation transform's resize side).
    """
    d, seed = cfg.data, cfg.train.seed
    start = time.monotonic()
    train_images = _decode_all([samples[i][0] for i in train_idx], evaluation.mode)
    x_train = _resized_in_batches(train_images, _to_square(train_side, evaluation.interpolation), torch.uint8)
    del train_images
    val_images = _decode_all([val_samples[i][0] for i in val_idx], evaluation.mode)
    x_val = _resized_in_batches(val_images, evaluation.resized, torch.float32)  # exactly what predict makes
    del val_images
    y_train = torch.tensor([samples[i][1] for i in train_idx], dtype=torch.int64)
    y_val = torch.tensor([val_samples[i][1] for i in val_idx], dtype=torch.int64)
    log.debug("decoded %d images in %.1f s", len(x_train) + len(x_val), time.monotonic() - start)

    size = evaluation.size
    if d.augment == "none":
        def prepare(xb: torch.Tensor) -> torch.Tensor:
            return _center_crop(evaluation.from_uint8(xb), size)
        augment = None
    else:
        prepare = evaluation.from_uint8
        flip = d.augment == "crop+flip"
        augment = lambda xb, g: random_resized_crop_flip(xb, g, size, flip=flip)  # noqa: E731
    augment = with_erasing(augment, d.erase)
    train = TensorBatches(x_train.to(device), y_train.to(device), d.batch_size, shuffle=True, seed=seed,
                          augment=augment, prepare=prepare)
    val = TensorBatches(x_val.to(device), y_val.to(device), max(d.batch_size, 64), shuffle=False,
                        prepare=evaluation.normalize)
    return train, val
