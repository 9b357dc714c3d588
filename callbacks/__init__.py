"""kiln's handlers: each one concern, in its own file, attached with ``attach(engine)``."""
from callbacks.amp import AMP
from callbacks.checkpoint import Checkpointer
from callbacks.early_stop import EarlyStop
from callbacks.ema import EMA
from callbacks.graceful_stop import GracefulStop
from callbacks.grad_clip import GradClip
from callbacks.metrics_log import MetricsLog
from callbacks.mix import MixUpCutMix
from callbacks.nan_guard import NanGuard
from callbacks.one_cycle import OneCycle
from callbacks.optuna_pruning import OptunaPruning
from callbacks.progress import Progress
from callbacks.run_summary import RunSummary
from callbacks.tensorboard import TensorBoard
from callbacks.validation import Validation

__all__ = ["AMP", "Checkpointer", "EarlyStop", "EMA", "GracefulStop", "GradClip", "MetricsLog", "MixUpCutMix", "NanGuard", "OneCycle", "OptunaPruning", "Progress", "RunSummary", "TensorBoard", "Validation"]
