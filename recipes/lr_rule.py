"""The rule of kiln's LR range test, without torch: the centred curve of a ramp's losses and the
one-cycle max_lr it suggests, with the test's defaults (``kiln lr-find``'s options show them; this module
sits outside ``recipes.tools`` so that the command line can show them without loading the tools and torch).
The test itself: :mod:`recipes.tools.lr_find`.

The curve is a centred moving average of the raw losses (``window`` decades of LR each side), not an
exponential average: ignite's EMA (weight 0.05 on the new value) lags the raw loss by about 20 steps,
over a decade of LR on a 100-step ramp across 8 decades, so its lowest point sat far right of the raw
loss's and moved with the noise (suggestions 0.009-0.21 for one recipe across seeds and machines).

The rule: ``max_lr = multiplier x (the LR where the centred curve had made 90% of its fall)``, from its
first value to its lowest, with a multiplier of 10. Calibrated against grids of whole one-cycle runs at
each recipe's max_lr x 1/8 .. 8 (``benchmarks/lr_grid.py``, ``benchmarks/lr_find_calibration.py``;
figures in docs/watch.md, "The LR range test"). The rule reads the curve where it falls steeply, so a
seed moves it little: on digits and Fashion-MNIST, 1.5x the LR of the curve's lowest point (its flat
floor, which noise slides along) swung 2.1x between seeds and missed the grid's best by more than 2x
on one of four; the 90%-of-the-fall point swung 1.4x.
"""
from __future__ import annotations

import math
from typing import NamedTuple

from recipes.config import ConfigError

__all__ = ["centred_average", "suggest_max_lr", "Suggestion", "DEFAULT_START_LR", "DEFAULT_END_LR", "DEFAULT_NUM_ITER",
           "DEFAULT_MULTIPLIER", "DEFAULT_FALL", "DEFAULT_WINDOW", "DEFAULT_SMOOTH_F", "DEFAULT_DIVERGE_TH"]

DEFAULT_START_LR = 1e-6
DEFAULT_END_LR = 1.0  #: AdamW: a peak LR above 1 does not train
DEFAULT_NUM_ITER = 200  #: 33 steps per decade from 1e-6 to 1
DEFAULT_MULTIPLIER = 10.0
DEFAULT_FALL = 0.9  #: the share of the loss's fall (first value to lowest) the rule reads the LR at
DEFAULT_WINDOW = 0.125  #: decades of LR each side of the centred average (4 steps at the defaults)
DEFAULT_SMOOTH_F = 0.05  #: the EMA of ignite's finder, used only for its stop on divergence
DEFAULT_DIVERGE_TH = 5.0


def centred_average(lrs: list[float], losses: list[float], window: float = DEFAULT_WINDOW) -> list[float]:
    """The mean of the finite losses within ``window`` decades of LR each side of each point (a centred
    moving average over the same number of steps each side, fewer at the ends): a smoothed curve with no lag.

    Example:
        >>> lrs = [10 ** (k / 4) for k in range(5)]  # 4 steps per decade: 0.25 decades = 1 step each side
        >>> centred_average(lrs, [4.0, 2.0, 0.0, float("nan"), 6.0], window=0.25)
        [3.0, 2.0, 1.0, 3.0, 6.0]
    """
    if len(lrs) < 2 or lrs[-1] <= lrs[0]:
        half = 0
    else:
        per_decade = (len(lrs) - 1) / (math.log10(lrs[-1]) - math.log10(lrs[0]))
        half = max(1, round(window * per_decade))
    out = []
    for i in range(len(losses)):
        near = [v for v in losses[max(0, i - half): i + half + 1] if math.isfinite(v)]
        out.append(sum(near) / len(near) if near else math.nan)
    return out


class Suggestion(NamedTuple):
    """What :func:`suggest_max_lr` read off a curve."""

    max_lr: float  #: the suggested one-cycle peak
    rule: str  #: the rule, in words, with its numbers
    min_loss_lr: float  #: the LR at the lowest smoothed loss
    fall_lr: float  #: the LR where the smoothed loss had made ``fall`` of its fall to that lowest point
    steepest_lr: float | None  #: where the smoothed loss fell fastest per decade (ignite's rule), for reference
    notes: list[str]  #: caveats about this curve, for the user


def suggest_max_lr(lrs: list[float], smoothed: list[float], multiplier: float = DEFAULT_MULTIPLIER,
                   fall: float = DEFAULT_FALL) -> Suggestion:
    """Apply kiln's rule to a range-test curve (``smoothed``: :func:`centred_average` of the losses): the
    suggestion is ``multiplier`` times the first LR at which the smoothed loss had made ``fall`` of its fall,
    from its first value to its lowest.

    That point sits where the curve is steep, so noise moves it little; the lowest point itself sits on a
    flat floor that noise slides along (2.1x between seeds on Fashion-MNIST).

    Raises:
        ConfigError: fewer than 3 points, or a loss that never fell (its lowest point is the first).

    Example:
        >>> lrs = [10 ** (k / 4 - 5) for k in range(17)]
        >>> loss = [2.0, 2.0, 1.9, 1.7, 1.4, 1.0, 0.7, 0.5, 0.45, 0.6, 1.5, 3, 6, 9, 12, 15, 18]
        >>> found = suggest_max_lr(lrs, loss)  # 90% of the fall from 2.0 to 0.45: at or below 0.605
        >>> round(found.min_loss_lr, 6), round(found.fall_lr, 6), round(found.max_lr, 6)
        (0.001, 0.000562, 0.005623)
    """
    if multiplier <= 0:
        raise ConfigError(f"the multiplier must be > 0, not {multiplier}")
    if not 0 < fall <= 1:
        raise ConfigError(f"the share of the fall must be in (0, 1], not {fall}")
    finite = [i for i, v in enumerate(smoothed) if math.isfinite(v)]
    if len(finite) < 3:
        raise ConfigError(f"the range test recorded {len(finite)} finite losses; it needs at least 3 (raise --num-iter)")
    i_min = min(finite, key=lambda i: smoothed[i])
    if i_min == finite[0]:
        raise ConfigError(f"the range test's loss never fell (lowest at the first LR, {lrs[0]:.1e}): lower --start-lr")
    notes = []
    if i_min == finite[-1]:
        notes.append(f"the loss was still falling at the last LR tried ({lrs[i_min]:.1e}): "
                     "the suggestion may be low; raise --end-lr or --num-iter")
    steepest = None
    slopes = []
    for i in range(1, i_min):
        span = math.log10(lrs[i + 1]) - math.log10(lrs[i - 1])
        if span > 0 and math.isfinite(smoothed[i + 1]) and math.isfinite(smoothed[i - 1]):
            slopes.append(((smoothed[i + 1] - smoothed[i - 1]) / span, i))
    if slopes:
        steepest = lrs[min(slopes)[1]]
    start, lowest = smoothed[finite[0]], smoothed[i_min]
    level = lowest + (1 - fall) * (start - lowest)
    i_fall = next(i for i in finite if i <= i_min and smoothed[i] <= level)
    rule = (f"{multiplier:g} x the LR where the smoothed loss had made {100 * fall:g}% of its fall "
            f"({lrs[i_fall]:.2e}; from {start:.3f} to its lowest, {lowest:.3f} at {lrs[i_min]:.2e})")
    return Suggestion(lrs[i_fall] * multiplier, rule, lrs[i_min], lrs[i_fall], steepest, notes)
