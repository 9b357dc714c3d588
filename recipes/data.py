"""Data for the recipes: in-memory tensors batched by index, in an order that is a function of (seed, epoch)."""
from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

__all__ = ["TensorBatches", "mix_seed", "split_indices", "digits_tensors", "synthetic_tensors", "random_crop_flip", "DataError"]


class DataError(ValueError):
    """A data set that is missing or unreadable; the message says where kiln looked and what to do."""


def mix_seed(*numbers: int) -> int:
    """A 62-bit seed from a tuple of integers (e.g. seed, epoch, batch): stable across runs and machines."""
    h = 0x243F6A8885A308D3
    for n in numbers:
        h = (h ^ (int(n) + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
    return h & 0x3FFFFFFFFFFFFFFF


class TensorBatches:
    """Batches of in-memory tensors, sliced by index: no per-sample Python, no collate, no workers.

    The order of epoch ``e`` is ``randperm(n)`` from a generator seeded with (seed, e), so it is the
    same in every process and after every resume; an epoch can start at any batch offset without
    touching the batches before it (``set_position``, called by the trainer at EPOCH_STARTED).
    ``augment(x, generator)`` runs on whole batches with a generator seeded by (seed, epoch, batch).
    With ``world_size > 1`` each rank takes every ``world_size``-th sample of the shared order.

    Args:
        x: inputs, ``(N, ...)``; put them on the GPU to train there without copies.
        y: targets, ``(N,)``.
        batch_size: samples per batch (per rank).
        shuffle: shuffle every epoch (else keep the stored order).
        seed: the run's seed.
        drop_last: drop a last, smaller batch.
        augment: an optional batched augmentation.
        rank, world_size: the data-parallel shard this process reads.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, augment: Callable | None = None, rank: int = 0, world_size: int = 1) -> None:
        if len(x) != len(y):
            raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {batch_size}")
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.augment = augment
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_batch = 1, 0

    @property
    def samples_per_rank(self) -> int:
        """Samples this rank sees in an epoch."""
        return len(self.x) // self.world_size if self.world_size > 1 else len(self.x)

    def __len__(self) -> int:
        n = self.samples_per_rank
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        """The next ``iter()`` yields epoch ``epoch`` (1-based) from batch ``start_batch`` on."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be in [0, {len(self)}], not {start_batch}")
        self.epoch, self.start_batch = epoch, start_batch

    def order(self, epoch: int) -> torch.Tensor:
        """This rank's sample indices for ``epoch``."""
        n = len(self.x)
        if self.shuffle:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
            indices = torch.randperm(n, generator=generator)
        else:
            indices = torch.arange(n)
        if self.world_size > 1:
            indices = indices[: self.samples_per_rank * self.world_size][self.rank :: self.world_size]
        return indices

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, start = self.epoch, self.start_batch
        self.start_batch = 0
        return self._batches(epoch, start)

    def _batches(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices = self.order(epoch).to(self.x.device, non_blocking=True)
        for b in range(start, len(self)):
            idx = indices[b * self.batch_size : (b + 1) * self.batch_size]
            xb, yb = self.x.index_select(0, idx), self.y.index_select(0, idx)
            if self.augment is not None:
                generator = torch.Generator(device=xb.device).manual_seed(mix_seed(self.seed, epoch, b))
                xb = self.augment(xb, generator)
            yield xb, yb


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded train/val split of ``range(n)``."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, 0x5111)))
    n_val = max(1, round(n * val_fraction))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def digits_tensors(image_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 digits (1797 images, no download), upsampled to ``image_size``, in [0, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise DataError("the digits data set comes with scikit-learn: pip install scikit-learn") from e
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return x, torch.tensor(digits.target, dtype=torch.long)


def synthetic_tensors(samples: int, num_classes: int, image_size: int, seed: int,
                      channels: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images of a class-dependent pattern plus noise: learnable, made in milliseconds."""
    generator = torch.Generator().manual_seed(mix_seed(seed, 0x5E7))
    prototypes = torch.randn(num_classes, channels, image_size, image_size, generator=generator)
    y = torch.arange(samples) % num_classes
    y = y[torch.randperm(samples, generator=generator)]
    x = 0.6 * prototypes[y] + torch.randn(samples, channels, image_size, image_size, generator=generator)
    return x, y


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 2, flip: bool = False) -> torch.Tensor:
    """Batched augmentation: each image shifted by up to ``pad`` pixels (zero padding), optionally mirrored."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None].expand(n, c, h, w + 2 * pad)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :].expand(n, c, h, w)
    out = out.gather(3, cols)
    if flip:
        mirror = torch.rand(n, generator=generator, device=x.device) < 0.5
        out = torch.where(mirror[:, None, None, None], out.flip(3), out)
    return out
