"""Tune on a held-out split, report on the test split.

The fashion-mnist and mnist recipes validate on their data set's official test split
(``data.val_fraction`` 0), so a sweep or a range test run on them as they are would tune on the
test set, and the test accuracy reported afterwards would be optimistic. ``kiln sweep`` and
``kiln lr-find`` therefore hold out :data:`TUNING_VAL_FRACTION` of the training split instead
(seeded, as any ``data.val_fraction``) unless the user set ``data.val_fraction`` themselves, and say
so; ``kiln train`` keeps the recipe's split, so its final figure is on the unseen test split.
"""
from __future__ import annotations

from typing import Iterable

from recipes.config import Config, apply_overrides

__all__ = ["TUNING_VAL_FRACTION", "HOLDS_OUT", "tuning_split"]

#: The share of the training split that tuning validates on when the recipe validates on the test split.
TUNING_VAL_FRACTION = 0.1
#: Data sets whose ``data.val_fraction`` 0 means "validate on the official test split" and that can hold out
#: part of the training split instead (CIFAR-10 always validates on its test batch for now).
HOLDS_OUT = ("fashion-mnist", "mnist")


def tuning_split(cfg: Config, explicit: Iterable[str]) -> tuple[Config, str | None]:
    """``cfg`` for a tuning tool: with :data:`TUNING_VAL_FRACTION` of the training split held out when it would
    validate on a test split and ``data.val_fraction`` is not among the ``explicit`` keys; and the line that says
    so (None when nothing changed).

    Example:
        >>> from recipes import get_recipe
        >>> cfg, note = tuning_split(get_recipe("fashion-mnist"), explicit=[])
        >>> cfg.data.val_fraction, note.split(":")[1].strip()
        (0.1, 'tuning on 10% of the training split held out')
        >>> tuning_split(get_recipe("fashion-mnist"), explicit=["data.val_fraction"])[1] is None
        True
    """
    named = {key.rsplit(".", 1)[-1] for key in explicit}  # --set val_fraction=... or data.val_fraction=...
    if cfg.data.dataset not in HOLDS_OUT or cfg.data.val_fraction > 0 or "val_fraction" in named:
        return cfg, None
    note = (f"kiln: tuning on {TUNING_VAL_FRACTION:.0%} of the training split held out: {cfg.name} validates on "
            f"{cfg.data.dataset}'s test split, which stays unseen for the final figure (--set data.val_fraction=0 "
            "tunes on it)")
    return apply_overrides(cfg, {"data.val_fraction": TUNING_VAL_FRACTION}), note
