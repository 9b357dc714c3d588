"""kiln's loop: ignite engines for training and evaluation, the step events, and the precision policy.

The names below are imported from their modules when first used (PEP 562): importing a light module of
the package, such as ``engine.precision_names``, does not load torch and ignite.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from engine.lazy import lazy_exports

#: Each public name and the module that defines it.
_MODULES = {"create_trainer": "step", "create_evaluator": "evaluator", "StepEvents": "events", "EpochEvents": "events",
            "StepOutput": "step", "Precision": "precision", "resolve_precision": "precision",
            "resolve_device": "precision", "prepare_batch": "step", "iteration_seed": "rng", "is_epoch_end": "events"}

__all__ = [
    "create_trainer",
    "create_evaluator",
    "StepEvents",
    "EpochEvents",
    "StepOutput",
    "Precision",
    "resolve_precision",
    "resolve_device",
    "prepare_batch",
    "iteration_seed",
    "is_epoch_end",
]


__getattr__, __dir__ = lazy_exports(__name__, _MODULES, __all__)


if TYPE_CHECKING:  # pragma: no cover
    from engine.evaluator import create_evaluator
    from engine.events import EpochEvents, StepEvents, is_epoch_end
    from engine.precision import Precision, resolve_device, resolve_precision
    from engine.rng import iteration_seed
    from engine.step import StepOutput, create_trainer, prepare_batch
