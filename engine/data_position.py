"""Telling the training data which epoch starts, and at which batch, so that a resumed run continues its order."""
from __future__ import annotations

import logging
from typing import Any

__all__ = ["position_data"]

log = logging.getLogger("kiln")


def position_data(data: Any, epoch: int, start_batch: int) -> None:
    """Tell the data which epoch starts, and at which batch (non-zero only when resuming mid-epoch).

    Works with anything that has ``set_position(epoch, start_batch)`` (kiln's batchers and samplers),
    and with a DataLoader whose sampler has ``set_epoch`` (e.g. DistributedSampler), which ignite
    itself never calls.
    """
    target = data
    if not hasattr(target, "set_position"):
        sampler = getattr(data, "batch_sampler", None)
        sampler = getattr(sampler, "sampler", None) or getattr(data, "sampler", None)
        target = sampler if sampler is not None else data
    if hasattr(target, "set_position"):
        target.set_position(epoch, start_batch)
    elif hasattr(target, "set_epoch"):
        target.set_epoch(epoch - 1)
        if start_batch:
            log.warning("this data loader cannot start mid-epoch: the resumed epoch restarts its order")
