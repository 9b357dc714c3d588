"""The flip probe on real images: mirrored digits find another class, mirrored clothes their own."""
from __future__ import annotations

import torch

from recipes import get_recipe
from recipes.config import apply_overrides
from recipes.report.flip_probe import flip_probe, flips_hurt
from recipes.run.evaluate import evaluation_data
from tests.recipes.data.test_idx import _real_files_or_skip


def _probe(recipe: str) -> dict:
    data = evaluation_data(apply_overrides(get_recipe(recipe), {"data.augment": "none"}), torch.device("cpu"))
    data.train.set_position(1, 0)
    return flip_probe(data.train, data.val, data.num_classes)


def test_mirrored_digits_look_like_other_digits():
    probe = _probe("digits")
    assert probe["samples"] == 359 and probe["bank"] == 1438 and probe["chance"] == 0.1
    assert probe["accuracy"] > 0.9 and probe["flipped_accuracy"] < 0.5
    assert flips_hurt(probe)


def test_mirrored_clothes_still_look_like_their_class():
    _real_files_or_skip()
    probe = _probe("fashion-mnist")
    assert (probe["bank"], probe["samples"]) == (2000, 1000)
    assert probe["accuracy"] > 0.7 and probe["flipped_accuracy"] > 0.5
    assert not flips_hurt(probe)


def test_a_probe_that_knows_too_little_judges_nothing():
    """Random labels: neither the images nor their mirrors are classified better than chance."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(600, 1, 8, 8, generator=g), torch.randint(0, 2, (600,), generator=g)
    probe = flip_probe([(x[:500], y[:500])], [(x[500:], y[500:])], num_classes=2)
    assert probe["bank"] == 500 and probe["samples"] == 100
    assert not flips_hurt(probe) and flip_probe([], [(x, y)], 2) is None
