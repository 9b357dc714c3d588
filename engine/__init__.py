"""kiln's loop: ignite engines for training and evaluation, the step events, and the precision policy."""
from engine.evaluator import create_evaluator
from engine.events import EpochEvents, StepEvents
from engine.precision import Precision, resolve_device, resolve_precision
from engine.step import StepOutput, create_trainer, is_epoch_end, iteration_seed, prepare_batch

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
