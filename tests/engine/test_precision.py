"""The precision policy: what each name resolves to, and what its autocast does."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import Precision, resolve_device, resolve_precision
from engine.precision import cpu_has_amx


def _cpuinfo_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="needs Linux's /proc/cpuinfo to know the CPU")
def test_auto_on_the_cpu_is_bf16_with_amx_else_fp32():
    has_amx = "amx_tile" in _cpuinfo_flags()  # the kernel's view, independent of torch's probe
    assert cpu_has_amx() is has_amx
    precision = resolve_precision("auto", "cpu")
    assert precision == Precision("bf16" if has_amx else "fp32", "cpu")
    assert not precision.needs_scaler


@pytest.mark.parametrize("name, dtype, needs_scaler", [
    ("fp32", torch.float32, False), ("bf16", torch.bfloat16, False), ("fp16", torch.float16, True),
])
def test_explicit_names_resolve_as_given(name, dtype, needs_scaler):
    precision = resolve_precision(name, torch.device("cpu"))
    assert (precision.name, precision.device_type) == (name, "cpu")
    assert precision.dtype == dtype
    assert precision.needs_scaler is needs_scaler


@pytest.mark.parametrize("bad", ["fp64", "FP32", "", "half"])
def test_unknown_names_are_refused(bad):
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision(bad, "cpu")


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16"])
def test_autocast_computes_matmuls_in_the_precision_dtype(name):
    precision = resolve_precision(name, "cpu")
    layer = torch.nn.Linear(4, 4)
    with precision.autocast():
        out = layer(torch.randn(2, 4))
    assert out.dtype == precision.dtype
    assert layer.weight.dtype == torch.float32  # autocast never changes the stored weights


def test_resolve_device():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.gpu
def test_auto_on_cuda_is_bf16_where_supported_else_fp16():
    precision = resolve_precision("auto", "cuda")
    assert precision.name == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
