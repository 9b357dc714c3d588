"""Batched, seeded augmentations of whole training batches on their device (``TensorBatches(augment=...)``):
each takes ``(x, generator)``, the generator seeded by (seed, epoch, batch), so a resume at any batch is exact.

- :func:`random_crop_flip`: shifts of up to ``pad`` pixels (zero padding) and mirrors (the built-in data sets);
- :func:`random_resized_crop_flip`: torchvision's RandomResizedCrop and flips (an image folder held in memory);
- :func:`random_erasing`: a random rectangle of each image set to 0, the mean after normalizing (``data.erase``);
  :func:`with_erasing` adds it to another augmentation.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["random_crop_flip", "random_resized_crop_flip", "random_erasing", "with_erasing"]

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


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


def random_resized_crop_flip(x: torch.Tensor, generator: torch.Generator, size: int, flip: bool = False,
                             scale: tuple[float, float] = (0.08, 1.0),
                             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """Batched ``RandomResizedCrop(size)`` (and, with ``flip``, ``RandomHorizontalFlip``) of a float batch.

    Each image gets a box of ``scale`` of its area and an aspect ratio drawn log-uniformly from ``ratio``
    (torchvision's ranges; a box wider or taller than the image is clamped to it instead of redrawn),
    placed uniformly, and resampled to ``size`` x ``size`` bilinearly (``F.affine_grid`` + ``F.grid_sample``:
    one call for the batch, on its device; without antialiasing, which matters little here, as the box is
    at most the stored image, a few percent larger than ``size``).
    """
    n, _, h, w = x.shape
    u = torch.rand(n, 4, generator=generator, device=x.device)
    area = h * w * (scale[0] + u[:, 0] * (scale[1] - scale[0]))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + u[:, 1] * (log_hi - log_lo))
    box_w, box_h = (area * aspect).sqrt().clamp(1, w), (area / aspect).sqrt().clamp(1, h)
    left, top = u[:, 2] * (w - box_w), u[:, 3] * (h - box_h)
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)  # output [-1, 1] -> the box, in input [-1, 1]
    theta[:, 0, 0], theta[:, 0, 2] = box_w / w, (2 * left + box_w) / w - 1
    theta[:, 1, 1], theta[:, 1, 2] = box_h / h, (2 * top + box_h) / h - 1
    grid = F.affine_grid(theta, [n, x.shape[1], size, size], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if flip:
        mirror = torch.rand(n, generator=generator, device=x.device) < 0.5
        out = torch.where(mirror[:, None, None, None], out.flip(3), out)
    return out


def random_erasing(x: torch.Tensor, generator: torch.Generator, p: float = 0.5, scale: tuple[float, float] = (0.02, 0.33),
                   ratio: tuple[float, float] = (0.3, 3.3)) -> torch.Tensor:
    """Batched ``RandomErasing`` (Zhong et al., 2017; torchvision's ranges): each image, with probability ``p``, gets
    a rectangle of ``scale`` of its area and aspect ratio log-uniform in ``ratio`` set to 0 (on normalized inputs:
    the mean), placed uniformly (a rectangle larger than the image is clamped to it instead of redrawn).

    Example:
        >>> x = torch.ones(8, 1, 16, 16)
        >>> out = random_erasing(x, torch.Generator().manual_seed(0), p=1.0)
        >>> bool((out == 0).any(dim=(1, 2, 3)).all()), out.shape
        (True, torch.Size([8, 1, 16, 16]))
    """
    n, _, h, w = x.shape
    u = torch.rand(n, 5, generator=generator, device=x.device)
    area = h * w * (scale[0] + u[:, 0] * (scale[1] - scale[0]))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + u[:, 1] * (log_hi - log_lo))
    eh, ew = (area * aspect).sqrt().round().clamp(1, h), (area / aspect).sqrt().round().clamp(1, w)
    top, left = (u[:, 2] * (h - eh + 1)).floor(), (u[:, 3] * (w - ew + 1)).floor()
    rows = torch.arange(h, device=x.device)[None, :]
    cols = torch.arange(w, device=x.device)[None, :]
    inside_rows = (rows >= top[:, None]) & (rows < (top + eh)[:, None])
    inside_cols = (cols >= left[:, None]) & (cols < (left + ew)[:, None])
    mask = inside_rows[:, :, None] & inside_cols[:, None, :] & (u[:, 4] < p)[:, None, None]
    return x.masked_fill(mask[:, None], 0.0)


def with_erasing(augment: Augment | None, p: float) -> Augment | None:
    """``augment`` followed by :func:`random_erasing` with probability ``p`` (``augment`` itself when ``p`` is 0)."""
    if not p:
        return augment

    def augmented(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return random_erasing(augment(x, generator) if augment is not None else x, generator, p=p)
    return augmented
