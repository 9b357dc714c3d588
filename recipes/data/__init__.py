"""Data sets for the recipes: one :func:`load` for every data set, and the batching they share.

One module per data set, each with a function that turns a config into a :class:`Data`: ``digits.py``,
``synthetic.py`` (both through ``tensors.py``), ``cifar10.py``, ``imagefolder.py`` and ``idx.py`` (MNIST and
Fashion-MNIST: the IDX format); ``base``, ``batches`` and ``preprocess`` are what they share. Add a data set
the same way, with a name in ``recipes.config.DATASETS`` and a line in :data:`LOADERS`.
"""
from __future__ import annotations

from typing import Callable

import torch

from recipes.config import Config
from recipes.data.base import Data, DataError, num_samples
from recipes.data.augment import random_crop_flip
from recipes.data.batches import EpochBatchSampler, LoaderBatches, TensorBatches, augment_batch, mix_seed, split_indices
from recipes.data.cifar10 import cifar10_data
from recipes.data.digits import digits_data, digits_tensors
from recipes.data.idx import idx_data
from recipes.data.imagefolder import imagefolder_data, imagefolder_eval_data
from recipes.data.synthetic import synthetic_data, synthetic_tensors

__all__ = [
    "load", "LOADERS", "Data", "DataError", "num_samples", "EpochBatchSampler", "TensorBatches", "LoaderBatches",
    "augment_batch", "mix_seed", "random_crop_flip", "split_indices", "digits_tensors", "synthetic_tensors",
    "imagefolder_eval_data",
]

#: data.dataset -> the function that reads it: ``(cfg, device) -> Data``.
LOADERS: dict[str, Callable[[Config, torch.device], Data]] = {
    "digits": digits_data,
    "synthetic": synthetic_data,
    "cifar10": cifar10_data,
    "imagefolder": imagefolder_data,
    "fashion-mnist": idx_data,
    "mnist": idx_data,
}


def load(cfg: Config, device: torch.device) -> Data:
    """``cfg``'s data set, split, batched and (where it fits in memory) on ``device``.

    Raises:
        DataError: missing or unreadable files (one line saying where kiln looked and what to do).

    Example:
        >>> from recipes import get_recipe
        >>> data = load(get_recipe("digits"), torch.device("cpu"))
        >>> len(data.train), data.in_channels, data.num_classes, data.class_names[:3]
        (23, 1, 10, ['0', '1', '2'])
    """
    try:
        loader = LOADERS[cfg.data.dataset]
    except KeyError:  # pragma: no cover - DataConfig validates the name
        raise DataError(f"unknown data set {cfg.data.dataset!r}") from None
    return loader(cfg, device)
