"""The precision policy: what each name resolves to, and what its autocast does."""
from __future__ import annotations

import pytest
import torch

from engine import Precision, resolve_device, resolve_precision


def test_auto_is_fp32_on_the_cpu():
    precision = resolve_precision("auto", "cpu")
    assert precision == Precision("fp32", "cpu")
    assert precision.dtype == torch.float32 and not precision.needs_scaler


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
