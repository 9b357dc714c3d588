"""The networks kiln's recipes train."""
from __future__ import annotations

from typing import Sequence

from torch import nn

__all__ = ["small_cnn", "build_model", "parameter_groups"]


def small_cnn(in_channels: int = 1, num_classes: int = 10, channels: Sequence[int] = (32, 64, 128),
              image_size: int = 32) -> nn.Sequential:
    """Blocks of conv3x3 (no bias), BatchNorm, ReLU and 2x2 max-pool, then flatten and a linear layer.

    The model of the digits recipe and of kiln's benchmarks (32, 64, 128 channels at 32x32: 4x4x128
    features into the classifier).
    """
    layers: list[nn.Module] = []
    previous = in_channels
    for width in channels:
        layers += [
            nn.Conv2d(previous, width, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        ]
        previous = width
    side = image_size // 2 ** len(channels)
    if side < 1:
        raise ValueError(f"{len(channels)} pooling blocks are too many for {image_size}x{image_size} images")
    layers += [nn.Flatten(), nn.Linear(previous * side * side, num_classes)]
    return nn.Sequential(*layers)


def build_model(name: str, in_channels: int, num_classes: int, image_size: int, channels: Sequence[int]) -> nn.Module:
    """The model called ``name`` (only ``small_cnn`` so far)."""
    if name == "small_cnn":
        return small_cnn(in_channels, num_classes, channels, image_size)
    raise ValueError(f"unknown model {name!r}")


def parameter_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool) -> list[dict]:
    """AdamW parameter groups: no weight decay on biases and norm weights (1-D tensors) unless asked."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if decay_norm_and_bias or p.ndim > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


