"""kiln's handlers: each one concern, in its own file, attached with ``attach(engine)``.

``from callbacks import AMP`` imports a handler's module when the handler is first named (PEP 562), so
importing a helper module such as ``callbacks.files`` does not load torch and ignite: ``kiln --help``
and the other commands that train nothing start in a fraction of a second.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from engine.lazy import lazy_exports

#: Each handler and the module that defines it.
_MODULES = {"AMP": "amp", "Checkpointer": "checkpoint", "DivergenceDetector": "divergence_detector",
            "EarlyStop": "early_stop", "EMA": "ema", "FineTune": "fine_tune", "GracefulStop": "graceful_stop", "GradClip": "grad_clip",
            "LossScaleMonitor": "loss_scale_monitor", "MetricsLog": "metrics_log", "MixUpCutMix": "mix",
            "NanGuard": "nan_guard", "OneCycle": "one_cycle", "OptunaPruning": "optuna_pruning", "Progress": "progress",
            "RollbackPolicy": "rollback_policy", "RunSummary": "run_summary", "TensorBoard": "tensorboard",
            "Validation": "validation"}

__all__ = ["AMP", "Checkpointer", "DivergenceDetector", "EarlyStop", "EMA", "FineTune", "GracefulStop", "GradClip",
           "LossScaleMonitor", "MetricsLog", "MixUpCutMix", "NanGuard", "OneCycle", "OptunaPruning", "Progress",
           "RollbackPolicy", "RunSummary", "TensorBoard", "Validation"]


__getattr__, __dir__ = lazy_exports(__name__, _MODULES, __all__)


if TYPE_CHECKING:  # pragma: no cover
    from callbacks.amp import AMP
    from callbacks.checkpoint import Checkpointer
    from callbacks.divergence_detector import DivergenceDetector
    from callbacks.early_stop import EarlyStop
    from callbacks.ema import EMA
    from callbacks.fine_tune import FineTune
    from callbacks.graceful_stop import GracefulStop
    from callbacks.grad_clip import GradClip
    from callbacks.loss_scale_monitor import LossScaleMonitor
    from callbacks.metrics_log import MetricsLog
    from callbacks.mix import MixUpCutMix
    from callbacks.nan_guard import NanGuard
    from callbacks.one_cycle import OneCycle
    from callbacks.optuna_pruning import OptunaPruning
    from callbacks.progress import Progress
    from callbacks.rollback_policy import RollbackPolicy
    from callbacks.run_summary import RunSummary
    from callbacks.tensorboard import TensorBoard
    from callbacks.validation import Validation
