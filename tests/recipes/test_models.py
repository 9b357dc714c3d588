"""The recipes' networks: every name the config accepts builds; ResNet-18 for 32x32 images keeps full resolution."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from recipes.config import KILN_MODELS
from recipes.models import build_model, resnet18_32


@pytest.mark.parametrize("in_channels", [1, 3])
def test_resnet18_32_classifies_32x32_images(in_channels):
    model = resnet18_32(num_classes=7, in_channels=in_channels)
    out = model(torch.randn(2, in_channels, 32, 32))
    assert out.shape == (2, 7)


def test_resnet18_32_keeps_32x32_into_the_first_residual_stage():
    model = resnet18_32(num_classes=10, in_channels=3).eval()
    seen = {}

    def record(module, args, out):
        seen["layer1"] = tuple(out.shape)

    model.layer1.register_forward_hook(record)
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert seen["layer1"] == (1, 64, 32, 32)  # the ImageNet stem would give 8x8 here
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)


def test_resnet18_32_is_resnet18_sized():
    model = resnet18_32(num_classes=10, in_channels=3)
    assert 11_000_000 < sum(p.numel() for p in model.parameters()) < 11_300_000


def test_build_model_knows_resnet18_32():
    model = build_model("resnet18_32", in_channels=1, num_classes=10, image_size=32, channels=(32,))
    assert model.conv1.in_channels == 1 and model.fc.out_features == 10
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet19", 1, 10, 32, (32,))


def test_resnet18_32_learns_a_batch():
    torch.manual_seed(0)
    model = resnet18_32(num_classes=3, in_channels=1)
    x, y = torch.randn(8, 1, 32, 32), torch.arange(8) % 3
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name", KILN_MODELS)
def test_every_name_config_accepts_is_one_build_model_builds(name):
    model = build_model(name, 1, 10, 28, (16, 32, 64, 128))
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
