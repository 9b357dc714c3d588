"""A data set held in memory as tensors (digits, synthetic): split, standardised and batched.

It is standardised with the training split's mean and standard deviation and batched by index
(:class:`TensorBatches`), or through a DataLoader with workers when ``data.num_workers`` asks for one
(:class:`LoaderBatches`): the batches are the same either way.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from recipes.data.base import Data, DataError
from recipes.data.augment import random_crop_flip, with_erasing
from recipes.data.batches import EpochBatchSampler, LoaderBatches, TensorBatches, split_indices
from recipes.data.preprocess import Preprocessing

if TYPE_CHECKING:  # pragma: no cover
    from recipes.config import Config

__all__ = ["tensor_data"]


def tensor_data(x: torch.Tensor, y: torch.Tensor, class_names: list[str], cfg: "Config", device: torch.device) -> Data:
    """Images ``x`` (N, C, H, W, in [0, 1] or any scale) and labels ``y`` of ``cfg``'s data set as a :class:`Data`: a
    seeded split, standardised with the training split's mean and std, batched in memory (or by a DataLoader
    with ``data.num_workers``)."""
    d = cfg.data
    if d.val_fraction <= 0:
        raise DataError(f"{d.dataset} has no validation split of its own: data.val_fraction must be > 0")
    train_idx, val_idx = split_indices(len(x), d.val_fraction, cfg.train.seed)
    channels = x.shape[1]
    mean, std = float(x[train_idx].mean()), float(x[train_idx].std())  # one figure for every channel
    preprocessing = Preprocessing(mode="L" if channels == 1 else "RGB", size=d.image_size, mean=(mean,) * channels,
                                  std=(std,) * channels)
    x = preprocessing.normalize(x)
    augment = None
    if d.augment != "none":
        flip = d.augment == "crop+flip"
        augment = lambda xb, g: random_crop_flip(xb, g, pad=max(1, d.image_size // 8), flip=flip)  # noqa: E731
    augment = with_erasing(augment, d.erase)
    seed = cfg.train.seed
    if d.num_workers > 0:  # the DataLoader path: workers load and collate, the batches are the same
        sampler = EpochBatchSampler(len(train_idx), d.batch_size, shuffle=True, seed=seed)
        dataset = torch.utils.data.TensorDataset(x[train_idx], y[train_idx])
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=d.num_workers,
                                             pin_memory=device.type == "cuda")
        train: Any = LoaderBatches(loader, seed=seed, augment=augment)
    else:
        x, y = x.to(device), y.to(device)
        train = TensorBatches(x[train_idx.to(device)], y[train_idx.to(device)], d.batch_size, shuffle=True,
                              seed=seed, augment=augment)
    val = TensorBatches(x[val_idx.to(x.device)].to(device), y[val_idx.to(y.device)].to(device),
                        max(d.batch_size, 256), shuffle=False)
    return Data(train, val, channels, len(class_names), class_names, preprocessing)
