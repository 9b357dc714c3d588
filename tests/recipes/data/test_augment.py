"""The batched augmentations: random-resized crops (an image folder in memory) and random erasing (``data.erase``):
what they do to images, seeded by their generator, and erasing on a real recipe's batches."""
from __future__ import annotations

import math

import pytest
import torch

from recipes import get_recipe
from recipes.config import ConfigError, apply_overrides
from recipes.data.augment import random_erasing, random_resized_crop_flip, with_erasing
from recipes.run.parts import make_data


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_random_resized_crops_zoom_into_each_image_differently_and_flip_some():
    ramp = torch.linspace(0, 1, 32).expand(32, 32)  # brightness grows left to right
    x = ramp.expand(64, 1, 32, 32).clone()
    out = random_resized_crop_flip(x, _g(0), 24)
    assert out.shape == (64, 1, 24, 24)
    spans = out[:, 0, 12, -1] - out[:, 0, 12, 0]  # how much of the ramp each crop kept, left to right
    assert (spans > 0).all() and spans.max() > 0.9 and spans.min() < 0.5  # from nearly whole to small boxes
    assert torch.equal(out, random_resized_crop_flip(x, _g(0), 24))  # the generator decides everything
    flipped = random_resized_crop_flip(x, _g(0), 24, flip=True)
    mirrored = (flipped[:, 0, 12, -1] - flipped[:, 0, 12, 0]) < 0
    assert 10 < int(mirrored.sum()) < 54  # about half


def test_random_erasing_blanks_one_rectangle_in_about_p_of_the_images():
    x = torch.ones(400, 1, 28, 28)
    out = random_erasing(x, _g(1), p=0.5)
    erased = (out == 0).flatten(1).sum(1)
    hit = erased > 0
    assert 150 < int(hit.sum()) < 250
    areas = erased[hit].float() / (28 * 28)
    assert areas.min() >= 0.005 and areas.max() <= 0.4  # scale (0.02, 0.33), rounded to whole pixels
    for image in out[hit][:20, 0]:  # one axis-aligned rectangle each
        rows, cols = (image == 0).any(1).nonzero(), (image == 0).any(0).nonzero()
        h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert int((image == 0).sum()) == h * w
    assert torch.equal(out, random_erasing(x, _g(1), p=0.5))
    assert with_erasing(None, 0.0) is None  # off: no augmentation to add
    assert (with_erasing(None, 1.0)(x[:4], _g(2)) == 0).flatten(1).any(1).all()


def test_data_erase_reaches_the_training_batches_only(tmp_path):
    cfg = apply_overrides(get_recipe("digits"), {"data.erase": 1.0, "data.augment": "none", "data.image_size": 16})
    data = make_data(cfg, torch.device("cpu"))
    data.train.set_position(1, 0)
    x, _ = next(iter(data.train))
    plain = make_data(apply_overrides(cfg, {"data.erase": 0.0}), torch.device("cpu"))
    plain.train.set_position(1, 0)
    x0, _ = next(iter(plain.train))
    changed = (x != x0).flatten(1).any(1)
    assert changed.all() and torch.equal(x[x != x0], torch.zeros_like(x[x != x0]))  # set to the mean (0)
    assert torch.equal(next(iter(data.val))[0], next(iter(plain.val))[0])
    with pytest.raises(ConfigError, match=r"data.erase must be a probability in \[0, 1\]"):
        apply_overrides(cfg, {"data.erase": 1.5})
    assert math.isclose(cfg.data.erase, 1.0)
