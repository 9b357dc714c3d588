"""The rule of kiln's LR range test, without torch: the centred curve of a ramp's losses and the
one-cycle max_lr it suggests, with the test's defaults (``kiln lr-find``'s options show them; this module
sits outside ``recipes.tools`` so that the command line can show them without loading the tools and torch).
The test itself: :mod:`recipes.tools.lr_find`.

The curve is a centred moving average of the raw losses (``window`` decades of LR each side), not an
exponential average: ignite's EMA (weight 0.05 on the new value) lags the raw loss by about 20 steps,
over a decade of LR on a 100-step ramp across 8 decades, so its lowest point sat far right of the raw
loss's and moved with the noise (suggestions 0.009-0.21 for one recipe across seeds and machines).

The rule: ``max_lr = multiplier x (LR at the lowest point of the centred curve)``, 1.5 by default,
calibrated against grids of whole one-cycle runs at each recipe's max_lr x 1/8 .. 8
(``benchmarks/lr_grid.py`` and ``benchmarks/lr_find_calibration.py``; figures in docs/watch.md, "The LR range test"): on
digits and Fashion-MNIST the best peak LR lay at 1-2.5x the LR of the ramp's lowest loss (a one-cycle
run reaches its peak after a warm-up has settled the weights, and stays there briefly).
"""
from __future__ import annotations

import math

from recipes.config import ConfigError

__all__ = ["centred_average", "suggest_max_lr", "DEFAULT_START_LR", "DEFAULT_END_LR", "DEFAULT_NUM_ITER",
           "DEFAULT_MULTIPLIER", "DEFAULT_WINDOW", "DEFAULT_SMOOTH_F", "DEFAULT_DIVERGE_TH"]

DEFAULT_START_LR = 1e-6
DEFAULT_END_LR = 1.0  #: AdamW: a peak LR above 1 does not train
DEFAULT_NUM_ITER = 200  #: 33 steps per decade from 1e-6 to 1
DEFAULT_MULTIPLIER = 1.5
DEFAULT_WINDOW = 0.25  #: decades of LR each side of the centred average (8 steps at the defaults)
DEFAULT_SMOOTH_F = 0.05  #: the EMA of ignite's finder, used only for its stop on divergence
DEFAULT_DIVERGE_TH = 5.0


def centred_average(lrs: list[float], losses: list[float], window: float = DEFAULT_WINDOW) -> list[float]:
    """The mean of the finite losses within ``window`` decades of LR each side of each point (a centred
    moving average over the same number of steps each side, fewer at the ends): a smoothed curve with no lag.

    Example:
        >>> lrs = [10 ** (k / 4) for k in range(5)]  # 4 steps per decade: 0.25 decades = 1 step each side
        >>> centred_average(lrs, [4.0, 2.0, 0.0, float("nan"), 6.0])
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


def suggest_max_lr(lrs: list[float], smoothed: list[float], multiplier: float = DEFAULT_MULTIPLIER) -> tuple[float, str, float, float | None, list[str]]:
    """Apply kiln's rule to a range-test curve (``smoothed``: :func:`centred_average` of the losses).

    Returns ``(suggestion, rule, min_loss_lr, steepest_lr, notes)``: the suggestion is ``multiplier`` times the
    LR at the lowest smoothed loss; ``steepest_lr`` is where the smoothed loss fell fastest per decade of LR
    before its minimum (ignite's ``lr_suggestion`` rule), for reference.

    Raises:
        ConfigError: fewer than 3 points, or a loss that never fell (its lowest point is the first).

    Example:
        >>> lrs = [10 ** (k / 4 - 5) for k in range(17)]
        >>> loss = [2.0, 2.0, 1.9, 1.7, 1.4, 1.0, 0.7, 0.5, 0.45, 0.6, 1.5, 3, 6, 9, 12, 15, 18]
        >>> suggestion, rule, at_min, steepest, notes = suggest_max_lr(lrs, loss)
        >>> round(at_min, 6), round(suggestion / at_min, 3)
        (0.001, 1.5)
    """
    if multiplier <= 0:
        raise ConfigError(f"the multiplier must be > 0, not {multiplier}")
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
    min_lr = lrs[i_min]
    suggestion = min_lr * multiplier
    rule = f"{multiplier:g} x the LR at the lowest smoothed loss ({min_lr:.2e}, loss {smoothed[i_min]:.3f})"
    return suggestion, rule, min_lr, steepest, notes
