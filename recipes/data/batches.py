"""Batching: in-memory tensors sliced by index (or a DataLoader), in an order that is a function of (seed, epoch).

The batched augmentations they apply are ``recipes.data.augment``'s.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

import torch

__all__ = ["EpochBatchSampler", "TensorBatches", "LoaderBatches", "augment_batch", "mix_seed", "split_indices"]


def mix_seed(*numbers: int) -> int:
    """A 62-bit seed from a tuple of integers (e.g. seed, epoch, batch): stable across runs and machines."""
    h = 0x243F6A8885A308D3
    for n in numbers:
        h = (h ^ (int(n) + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
    return h & 0x3FFFFFFFFFFFFFFF


class EpochBatchSampler(torch.utils.data.Sampler):
    """Batches of sample indices whose order is a pure function of (seed, epoch, rank, world size).

    The order of epoch ``e`` is ``randperm(n)`` from a generator seeded with (seed, e), so it is the
    same in every process and after every resume; with ``world_size > 1`` each rank takes every
    ``world_size``-th index of that shared order. ``set_position(epoch, start_batch)`` (called by the
    trainer at EPOCH_STARTED) makes ``iter()`` yield that epoch from batch ``start_batch`` on, without
    touching the batches before it; the position holds until the next call. Usable as a DataLoader
    ``batch_sampler`` (which may call ``iter()`` on it more than once per pass).

    Args:
        n: samples in the data set.
        batch_size: samples per batch (per rank).
        shuffle: shuffle every epoch (else keep the stored order).
        seed: the run's seed.
        drop_last: drop a last, smaller batch.
        rank, world_size: the data-parallel shard this process reads.
    """

    def __init__(self, n: int, batch_size: int, *, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                 rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {batch_size}")
        self.n, self.batch_size, self.shuffle, self.seed, self.drop_last = n, batch_size, shuffle, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_batch = 1, 0

    @property
    def samples_per_rank(self) -> int:
        """Samples this rank sees in an epoch."""
        return self.n // self.world_size if self.world_size > 1 else self.n

    def __len__(self) -> int:
        n = self.samples_per_rank
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        """Every ``iter()`` from now on yields epoch ``epoch`` (1-based) from batch ``start_batch`` on."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be in [0, {len(self)}], not {start_batch}")
        self.epoch, self.start_batch = epoch, start_batch

    def order(self, epoch: int) -> torch.Tensor:
        """This rank's sample indices for ``epoch``."""
        if self.shuffle:
            indices = torch.randperm(self.n, generator=torch.Generator().manual_seed(mix_seed(self.seed, epoch)))
        else:
            indices = torch.arange(self.n)
        if self.world_size > 1:
            indices = indices[: self.samples_per_rank * self.world_size][self.rank :: self.world_size]
        return indices

    def index_batches(self, epoch: int, start: int) -> Iterator[tuple[int, torch.Tensor]]:
        """``(batch number, indices)`` for the batches ``start..`` of ``epoch``."""
        indices = self.order(epoch)
        for b in range(start, len(self)):
            yield b, indices[b * self.batch_size : (b + 1) * self.batch_size]

    def __iter__(self) -> Iterator[list[int]]:
        return (idx.tolist() for _, idx in self.index_batches(self.epoch, self.start_batch))


class TensorBatches:
    """Batches of in-memory tensors, sliced by index: no per-sample Python, no collate, no workers.

    The order comes from an :class:`EpochBatchSampler` (a function of seed and epoch; an epoch can
    start at any batch). ``prepare(x)`` turns every batch into what the model takes (e.g. uint8
    images into normalised floats, on the device: the data set stays small in memory);
    ``augment(x, generator)`` then runs on whole training batches with a generator seeded by (seed,
    epoch, batch), so augmentation does not depend on where a run was resumed.

    Args:
        x: inputs, ``(N, ...)``; put them on the GPU to train there without copies.
        y: targets, ``(N,)``.
        batch_size: samples per batch (per rank).
        shuffle: shuffle every epoch.
        seed: the run's seed.
        drop_last: drop a last, smaller batch.
        augment: an optional batched augmentation.
        rank, world_size: the data-parallel shard this process reads.
        prepare: an optional deterministic transform of every batch, before ``augment``.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, augment: Callable | None = None, rank: int = 0, world_size: int = 1,
                 prepare: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        if len(x) != len(y):
            raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
        self.x, self.y = x, y
        self.sampler = EpochBatchSampler(len(x), batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last,
                                         rank=rank, world_size=world_size)
        self.seed = seed
        self.augment = augment
        self.prepare = prepare

    def __len__(self) -> int:
        return len(self.sampler)

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        """The next ``iter()`` yields epoch ``epoch`` (1-based) from batch ``start_batch`` on."""
        self.sampler.set_position(epoch, start_batch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._batches(self.sampler.epoch, self.sampler.start_batch)

    def _batches(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for b, idx in self.sampler.index_batches(epoch, start):
            idx = idx.to(self.x.device, non_blocking=True)
            xb, yb = self.x.index_select(0, idx), self.y.index_select(0, idx)
            if self.prepare is not None:
                xb = self.prepare(xb)
            yield (xb, yb) if self.augment is None else (augment_batch(self.augment, xb, self.seed, epoch, b), yb)


class LoaderBatches:
    """A DataLoader driven by an :class:`EpochBatchSampler`, with the same seeded batched augmentation.

    Workers only load and collate; randomness is applied in the main process per batch position,
    so the batches equal :class:`TensorBatches`' for the same seed whatever ``num_workers`` is.

    Args:
        loader: a DataLoader whose ``batch_sampler`` is an EpochBatchSampler.
        seed: the run's seed.
        augment: an optional batched augmentation.
    """

    def __init__(self, loader: torch.utils.data.DataLoader, seed: int = 0, augment: Callable | None = None) -> None:
        if not isinstance(loader.batch_sampler, EpochBatchSampler):
            raise ValueError("the loader's batch_sampler must be an EpochBatchSampler")
        self.loader, self.sampler, self.seed, self.augment = loader, loader.batch_sampler, seed, augment

    def __len__(self) -> int:
        return len(self.sampler)

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        """The next ``iter()`` yields epoch ``epoch`` (1-based) from batch ``start_batch`` on."""
        self.sampler.set_position(epoch, start_batch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, start = self.sampler.epoch, self.sampler.start_batch
        return self._batches(iter(self.loader), epoch, start)

    def _batches(self, batches: Iterator, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for b, (xb, yb) in enumerate(batches, start):
            yield (xb, yb) if self.augment is None else (augment_batch(self.augment, xb, self.seed, epoch, b), yb)


def augment_batch(augment: Callable, x: torch.Tensor, seed: int, epoch: int, batch: int) -> torch.Tensor:
    """Apply ``augment`` to batch ``batch`` of ``epoch`` with its own seeded generator."""
    generator = torch.Generator(device=x.device).manual_seed(mix_seed(seed, epoch, batch))
    return augment(x, generator)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded train/val split of ``range(n)``."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, 0x5111)))
    n_val = max(1, round(n * val_fraction))
    return perm[n_val:].sort().values, perm[:n_val].sort().values
