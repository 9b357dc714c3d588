"""MixUpCutMix: mix each training batch (torchvision's MixUp or CutMix), seeded by the batch's position."""
from __future__ import annotations

from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.engine.events import RemovableEventHandle

from engine.rng import iteration_seed

__all__ = ["MixUpCutMix"]

_SALT = 0x6D69_7863_7574  # keeps these draws apart from the step's own per-iteration seed
_GOLDEN = 0x9E37_79B9_7F4A_7C15


class MixUpCutMix:
    """Replace every training batch ``(x, y)`` by a MixUp or CutMix of it, with soft labels.

    At GET_BATCH_COMPLETED (the batch is fetched; ITERATION_STARTED and the step have not run yet)
    ``state.batch`` becomes ``(x_mixed, y_soft)``: torchvision's ``v2.MixUp``/``v2.CutMix`` blend
    each image with its neighbour in the (shuffled) batch, or paste a box of it, and ``y_soft`` is
    ``(N, num_classes)`` float, the one-hot labels mixed in the same proportion.
    ``torch.nn.CrossEntropyLoss`` (label smoothing included) takes class-probability targets as they
    are. With both alphas above 0 each batch gets one of the two, CutMix with probability
    ``cutmix_prob``. The draws use torch's generator inside ``torch.random.fork_rng``, seeded by
    (seed, iteration, rank): a pure function of the batch's position, so a resumed run mixes exactly
    as the uninterrupted one, and the global generator is left as it was.

    Events: GET_BATCH_COMPLETED. Reads ``state.batch``, ``state.iteration``. Writes ``state.batch``
    (so every handler from ITERATION_STARTED on, and ``state.output.y``, sees the soft labels;
    metrics on the trainer must accept them). State: none (the draws follow the position).

    Args:
        num_classes: classes of the labels (for the one-hot encoding).
        mixup_alpha: MixUp's Beta(alpha, alpha) parameter; 0 turns MixUp off.
        cutmix_alpha: CutMix's Beta(alpha, alpha) parameter; 0 turns CutMix off.
        seed: the run's seed.
        cutmix_prob: with both on, the share of batches that get CutMix.

    Example:
        >>> import torch
        >>> mix = MixUpCutMix(num_classes=3, mixup_alpha=0.2, seed=0)
        >>> x, y = mix.mix((torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])), iteration=1)
        >>> y.shape, bool(torch.allclose(y.sum(1), torch.ones(4)))
        (torch.Size([4, 3]), True)
    """

    def __init__(self, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, seed: int = 0,
                 cutmix_prob: float = 0.5) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, not {num_classes}")
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0, not {mixup_alpha} and {cutmix_alpha}")
        if mixup_alpha == 0 and cutmix_alpha == 0:
            raise ValueError("mixup_alpha or cutmix_alpha must be > 0")
        if not 0.0 <= cutmix_prob <= 1.0:
            raise ValueError(f"cutmix_prob must be in [0, 1], not {cutmix_prob}")
        self.num_classes, self.seed = num_classes, seed
        self.mixup_alpha, self.cutmix_alpha, self.cutmix_prob = mixup_alpha, cutmix_alpha, cutmix_prob
        from torchvision.transforms import v2  # here, not at import: it costs every kiln start 0.5 s

        mixes = []
        if mixup_alpha > 0:
            mixes.append((v2.MixUp(alpha=mixup_alpha, num_classes=num_classes), 1.0 - cutmix_prob))
        if cutmix_alpha > 0:
            mixes.append((v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes), cutmix_prob))
        if len(mixes) == 1:
            self.transform = mixes[0][0]
        else:
            self.transform = v2.RandomChoice([m for m, _ in mixes], p=[p for _, p in mixes])

    def attach(self, engine: Engine) -> list[RemovableEventHandle]:
        """Mix ``engine``'s batches; returns the handles."""
        return [engine.add_event_handler(Events.GET_BATCH_COMPLETED, self)]

    def __call__(self, engine: Engine) -> None:
        # GET_BATCH_COMPLETED comes before ignite counts the iteration: this batch's is one more
        engine.state.batch = self.mix(engine.state.batch, engine.state.iteration + 1)

    def mix(self, batch: Any, iteration: int) -> tuple:
        """The mixed ``(x, y_soft, *rest)`` of ``batch = (x, y, *rest)``, drawn from (seed, iteration, rank)."""
        x, y, *rest = batch
        seed = iteration_seed(self.seed, iteration) ^ _SALT ^ ((idist.get_rank() * _GOLDEN) & (2**62 - 1))
        with torch.random.fork_rng(devices=[]):  # every draw is on the CPU, whatever the batch's device
            torch.default_generator.manual_seed(seed)  # not torch.manual_seed: no lazy CUDA seeding queued
            x, y = self.transform(x, y)
        return (x, y, *rest)
