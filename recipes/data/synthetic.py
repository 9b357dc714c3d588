"""Random images of a class-dependent pattern plus noise: learnable, made in milliseconds, held in memory.

Above :func:`synthetic_data` this module imports nothing of kiln (only torch), like ``digits.py``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from recipes.config import Config
    from recipes.data.base import Data

__all__ = ["synthetic_tensors", "synthetic_data"]


def synthetic_tensors(samples: int, num_classes: int, image_size: int, seed: int,
                      channels: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images of a class-dependent pattern plus noise: learnable, made in milliseconds."""
    from recipes.data.batches import mix_seed  # here, not at the top: the module stays loadable as a plain file

    generator = torch.Generator().manual_seed(mix_seed(seed, 0x5E7))
    prototypes = torch.randn(num_classes, channels, image_size, image_size, generator=generator)
    y = torch.arange(samples) % num_classes
    y = y[torch.randperm(samples, generator=generator)]
    x = 0.6 * prototypes[y] + torch.randn(samples, channels, image_size, image_size, generator=generator)
    return x, y


def synthetic_data(cfg: "Config", device: torch.device) -> "Data":
    """The synthetic data set of ``cfg`` (``data.samples`` images of ``data.num_classes`` classes) as a
    :class:`~recipes.data.base.Data` (see :func:`~recipes.data.tensors.tensor_data`)."""
    from recipes.data.tensors import tensor_data  # here: the module stays loadable as a plain file

    d = cfg.data
    x, y = synthetic_tensors(d.samples, d.num_classes, d.image_size, cfg.train.seed)
    return tensor_data(x, y, [f"class{i}" for i in range(d.num_classes)], cfg, device)
