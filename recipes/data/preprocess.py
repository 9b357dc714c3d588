"""How an image becomes a model's input: :class:`Preprocessing`, recorded in every checkpoint.

Each data set makes its evaluation inputs with its own :class:`Preprocessing` (digits, CIFAR-10 and
the IDX sets normalise with it; an image folder's evaluation transform *is* it), so ``kiln predict``,
``recipes.run.load`` and the torch-only snippet (docs/load_without_kiln.py) feed a model exactly what validation fed it.

The steps, on one image (a PIL image, or a float tensor already in [0, 1]):

1. ``image.convert(mode)`` (``"L"``: one channel, ``"RGB"``: three), then ``to_tensor``: C x H x W, in [0, 1];
2. resize with antialiasing on the float tensor (torchvision's ``F.resize``), ``interpolation`` bilinear
   (kiln's default) or bicubic (pretrained weights that were trained so):
   ``resize`` None: the whole image to ``size`` x ``size`` (left alone when it already is);
   ``resize`` N: the shorter side to N, then a center crop of ``size`` x ``size``;
3. ``(x - mean) / std`` per channel (torchvision's ``F.normalize``).
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

__all__ = ["Preprocessing", "INTERPOLATIONS"]

#: How an image may be resized (``F.interpolate`` modes; torchvision's InterpolationMode values).
INTERPOLATIONS = ("bilinear", "bicubic")


@dataclass(frozen=True)
class Preprocessing:
    """What turns an image into the model's input; callable on a PIL image (or a C x H x W float tensor).

    Example:
        >>> p = Preprocessing(mode="L", size=32, mean=(0.3,), std=(0.4,))
        >>> p(torch.zeros(1, 8, 8)).shape
        torch.Size([1, 32, 32])
        >>> Preprocessing.from_dict(p.to_dict()) == p
        True
    """

    mode: str  #: PIL mode the image is converted to: "L" (one channel) or "RGB" (three)
    size: int  #: the model takes size x size images
    mean: tuple[float, ...]  #: per channel, subtracted after scaling to [0, 1]
    std: tuple[float, ...]  #: per channel, divided by after the mean
    resize: int | None = None  #: shorter side before a center crop of ``size``; None: the whole image to size x size
    interpolation: str = "bilinear"  #: one of :data:`INTERPOLATIONS`

    def __post_init__(self) -> None:
        if self.mode not in ("L", "RGB"):
            raise ValueError(f"mode must be L or RGB, not {self.mode!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, not {self.interpolation!r}")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"{self.mode} images have {self.channels} channel(s): mean and std need as many values")

    @property
    def channels(self) -> int:
        """1 for ``L``, 3 for ``RGB``."""
        return 1 if self.mode == "L" else 3

    def __call__(self, image: Any) -> torch.Tensor:
        """A PIL image (any mode, any size) or a C x H x W float tensor in [0, 1] -> the model's C x size x size input."""
        if not isinstance(image, torch.Tensor):
            image = to_tensor(image.convert(self.mode))
        return self.normalize(self.resized(image))

    def resized(self, x: torch.Tensor) -> torch.Tensor:
        """Step 2 on a float image or batch (``... x H x W``)."""
        if self.resize is None:
            if tuple(x.shape[-2:]) == (self.size, self.size):
                return x
            return _interpolate(x, (self.size, self.size), self.interpolation)
        return _center_crop(_interpolate(x, _shorter_side_to(x.shape[-2:], self.resize), self.interpolation), self.size)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Step 3 on a float image or batch in [0, 1] (``C x H x W`` or ``N x C x H x W``)."""
        return (x - _per_channel(self.mean, x.dtype, x.device)) / _per_channel(self.std, x.dtype, x.device)

    def from_uint8(self, x: torch.Tensor) -> torch.Tensor:
        """A uint8 image or batch (0..255) of the model's size, scaled to [0, 1] and normalized."""
        return self.normalize(x.float().div_(255.0))

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, numbers, strings): for checkpoints, config.json and exported files."""
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Preprocessing":
        """The inverse of :meth:`to_dict`; a ValueError names a missing or bad field."""
        try:
            return cls(mode=str(data["mode"]), size=int(data["size"]), mean=tuple(data["mean"]), std=tuple(data["std"]),
                       resize=None if data.get("resize") is None else int(data["resize"]),
                       interpolation=str(data.get("interpolation", "bilinear")))  # older records: bilinear
        except (KeyError, TypeError) as e:
            raise ValueError(f"preprocessing record lacks or garbles {e}") from None

    def describe(self) -> str:
        """In words, e.g. ``RGB, shorter side to 36, center crop 32x32, mean (0.485, ...) std (...)``."""
        how = f" ({self.interpolation})" if self.interpolation != "bilinear" else ""
        size = (f"shorter side to {self.resize}{how}, center crop {self.size}x{self.size}" if self.resize is not None
                else f"resized to {self.size}x{self.size}{how}")
        numbers = lambda v: "(" + ", ".join(f"{x:.4g}" for x in v) + ")"  # noqa: E731
        return f"{self.mode}, {size}, mean {numbers(self.mean)} std {numbers(self.std)}"


@functools.lru_cache(maxsize=64)
def _per_channel(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` as a C x 1 x 1 tensor on ``device``, made once: the IDX data sets normalise every training
    batch, and a new tensor each time would be a host-to-device copy per step on a GPU. Made outside inference
    mode, so that a first call under it does not leave an inference tensor for training to use."""
    with torch.inference_mode(False):
        return torch.tensor(values, dtype=dtype, device=device).view(-1, 1, 1)


def to_uint8_tensor(image: Any) -> torch.Tensor:
    """A PIL image (8-bit, ``L`` or ``RGB``) as a C x H x W uint8 tensor."""
    import numpy as np

    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1).contiguous()


def to_tensor(image: Any) -> torch.Tensor:
    """A PIL image as a C x H x W float tensor in [0, 1] (torchvision's ``to_tensor`` for 8-bit images)."""
    return to_uint8_tensor(image).float().div(255.0)


def _interpolate(x: torch.Tensor, size: Sequence[int], mode: str = "bilinear") -> torch.Tensor:
    """Antialiased ``mode`` resizing: what torchvision's ``F.resize`` does to a float tensor."""
    batch = x.unsqueeze(0) if x.ndim == 3 else x
    out = F.interpolate(batch, size=tuple(size), mode=mode, align_corners=False, antialias=True)
    return out[0] if x.ndim == 3 else out


def _shorter_side_to(hw: Sequence[int], side: int) -> tuple[int, int]:
    """The size torchvision's ``Resize(side)`` gives an ``hw`` image: shorter side ``side``, aspect kept."""
    h, w = int(hw[0]), int(hw[1])
    short, long = (h, w) if h <= w else (w, h)
    new_short, new_long = side, int(side * long / short)
    return (new_short, new_long) if h <= w else (new_long, new_short)


def _center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision's ``F.center_crop`` for an image at least ``size`` on each side."""
    h, w = x.shape[-2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return x[..., top:top + size, left:left + size]
