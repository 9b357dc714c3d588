"""What every data set gives the run: the :class:`Data` record, and :class:`DataError` for data kiln cannot use."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from recipes.config import DataError
from recipes.data.preprocess import Preprocessing

__all__ = ["Data", "DataError", "num_samples", "usable_cpus"]


@dataclass
class Data:
    """A data set ready to train on: batched training and validation data and what the model must fit.

    ``train`` and ``val`` are :class:`~recipes.data.batches.TensorBatches` or
    :class:`~recipes.data.batches.LoaderBatches`: iterables of ``(x, y)`` batches with ``len()``, a
    ``sampler`` and ``set_position(epoch, start_batch)``.
    """

    train: Any
    val: Any
    in_channels: int
    num_classes: int
    class_names: list[str] = field(default_factory=list)  #: the classes in label order
    preprocessing: Preprocessing | None = None  #: how an image becomes an input of ``val`` (checkpoints record it)
    reading: str | None = None  #: how the data is read, when there is a choice (a line of the run's first lines)


def num_samples(data: Any) -> int:
    """How many samples one pass over ``data`` (TensorBatches or LoaderBatches) yields."""
    if hasattr(data, "x"):
        return len(data.x)
    return data.sampler.samples_per_rank


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity where the OS has one, else the machine's count)."""
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
