"""Precision policy: which autocast dtype a device trains in, and whether it needs loss scaling."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from engine.precision_names import PRECISIONS

__all__ = ["Precision", "resolve_precision", "resolve_device", "resolve_for_model", "cpu_has_amx", "PRECISIONS"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """A resolved precision: ``name`` is one of fp32, bf16, fp16; ``device_type`` is "cpu" or "cuda".

    ``needs_scaler`` is True for fp16 only: its gradients underflow without loss scaling.
    """

    name: str
    device_type: str

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.name]

    @property
    def needs_scaler(self) -> bool:
        return self.name == "fp16"

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context for the forward pass (a no-op for fp32)."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` is CUDA when available, else the CPU; anything else is passed to ``torch.device``."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_has_amx() -> bool:
    """Whether this CPU has Intel AMX tiles: matrix units that multiply bf16 natively (Sapphire Rapids on).

    On such a CPU bf16 autocast trains convolutional networks about twice as fast as fp32 (measured on
    kiln's digits and Fashion-MNIST recipes, same accuracy); on CPUs without it, bf16 is emulated and slower.
    (``torch.cpu._is_amx_tile_supported`` is private; an older or newer torch without it answers False.)
    """
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except Exception:  # a build without the probe's kernels
        return False


def resolve_precision(precision: str, device: str | torch.device) -> Precision:
    """Turn ``auto | fp32 | bf16 | fp16`` into a concrete :class:`Precision` for ``device``.

    ``auto`` is the fastest precision that trains as well as fp32: on CUDA, bf16 where the GPU supports it,
    else fp16 (with a scaler); on the CPU, bf16 where the CPU has AMX (:func:`cpu_has_amx`), else fp32.

    Raises:
        ValueError: for an unknown name, or bf16 on a GPU without bf16 support.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    device_type = torch.device(device).type
    if precision == "auto":
        if device_type != "cuda":
            return Precision("bf16" if device_type == "cpu" and cpu_has_amx() else "fp32", device_type)
        return Precision("bf16" if torch.cuda.is_bf16_supported() else "fp16", device_type)
    if precision == "bf16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU does not support bf16; use --precision fp16")
    return Precision(precision, device_type)


def resolve_for_model(model: torch.nn.Module, device: str | torch.device | None,
                      precision: str | Precision) -> tuple[torch.device, Precision]:
    """The device (default: the model's) and the resolved precision the builders run with."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    return device, resolve_precision(precision, device) if isinstance(precision, str) else precision
