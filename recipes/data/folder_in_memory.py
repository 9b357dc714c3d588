"""An image folder decoded once into memory and trained on the in-memory path, when it fits ``data.memory_budget``.

A DataLoader decodes every image again every epoch, one sample at a time, through PIL and per-sample
transforms: on small images that costs more than the network (8,000 28x28 PNGs with kiln's small CNN
trained at a third of the in-memory Fashion-MNIST recipe's speed). A folder that fits the budget is
decoded once, in threads (PIL and zlib release the GIL), and then batched like the in-memory data sets
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

import numpy as np
import torch

from recipes.config import Config, parse_size
from recipes.data.base import DataError
from recipes.data.batches import TensorBatches, random_resized_crop_flip
from recipes.data.preprocess import Preprocessing, _center_crop, _interpolate, _shorter_side_to, to_tensor
from recipes.data.screening import why_unreadable

log = logging.getLogger("kiln")

__all__ = ["auto_memory_budget", "memory_budget", "decoded_size", "in_memory_batches"]


def auto_memory_budget() -> int:
    """What ``data.memory_budget: auto`` stands for on this machine now: a quarter of the memory available."""
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not on Linux: a conservative 1 GiB
        return 1 << 30
    return available // 4


def memory_budget(cfg: Config) -> int:
    """``data.memory_budget`` in bytes (``auto``: :func:`auto_memory_budget`; ``auto:SIZE``: what auto was when the
    run started)."""
    value = cfg.data.memory_budget
    return auto_memory_budget() if value == "auto" else int(parse_size(value.removeprefix("auto:")) or 0)


def decoded_size(n_train: int, n_val: int, channels: int, train_side: int, val_side: int) -> int:
    """Bytes the decoded images take: training images as uint8 at ``train_side``, validation ones as float32 at
    ``val_side`` (the model's input size)."""
    return n_train * channels * train_side ** 2 + n_val * channels * val_side ** 2 * 4


def _training_image(path: str, mode: str, side: int, interpolation: str) -> torch.Tensor:
    """The file as a uint8 ``C x side x side`` tensor: shorter side to ``side``, center square."""
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image.convert(mode), dtype=np.uint8)
    x = torch.from_numpy(array.copy())
    x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1).contiguous()
    if tuple(x.shape[-2:]) == (side, side):
        return x
    resized = _interpolate(x.float().div_(255.0), _shorter_side_to(x.shape[-2:], side), interpolation)
    return _center_crop(resized, side).mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)


def _validation_image(path: str, evaluation: Preprocessing) -> torch.Tensor:
    """The file as the evaluation transform makes it, before normalizing: float ``C x size x size``."""
    from PIL import Image

    with Image.open(path) as image:
        return evaluation.resized(to_tensor(image.convert(evaluation.mode)))


def _decode_all(jobs: Sequence[tuple[str, Any]], decode: Any) -> list[torch.Tensor]:
    """``decode(path, arg)`` for every job, in threads (one per CPU this process may use), in order; a file
    that fails to decode (it passed the screening's verify, but its pixel data is broken) is a DataError."""
    def one(job: tuple[str, Any]) -> torch.Tensor:
        try:
            return decode(*job)
        except Exception as e:  # noqa: BLE001 - whatever PIL raises, the file cannot be read
            raise DataError(f"{job[0]} is not a readable image ({why_unreadable(job[0], e)}); remove it, or skip "
                            "unreadable files with --set data.skip_bad_images=true") from None

    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with torch.inference_mode(False), ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(one, jobs, chunksize=64))


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
    mode, interpolation = evaluation.mode, evaluation.interpolation
    x_train = torch.stack(_decode_all([(samples[i][0], mode, train_side, interpolation) for i in train_idx],
                                      lambda path, *args: _training_image(path, *args)))
    x_val = torch.stack(_decode_all([(val_samples[i][0], evaluation) for i in val_idx], _validation_image))
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
    train = TensorBatches(x_train.to(device), y_train.to(device), d.batch_size, shuffle=True, seed=seed,
                          augment=augment, prepare=prepare)
    val = TensorBatches(x_val.to(device), y_val.to(device), max(d.batch_size, 64), shuffle=False,
                        prepare=evaluation.normalize)
    return train, val
