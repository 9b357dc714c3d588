"""``create_evaluator``: an ignite engine that runs the model in eval and inference mode under autocast."""
from __future__ import annotations

from typing import Any, Callable, Mapping


import torch
from ignite.engine import Engine, Events
from ignite.metrics import Metric

from engine.precision import Precision, resolve_for_model
from engine.step import prepare_batch

__all__ = ["create_evaluator"]


def create_evaluator(
    model: torch.nn.Module,
    metrics: Mapping[str, Metric],
    *,
    device: str | torch.device | None = None,
    precision: str | Precision = "auto",
    memory_format: torch.memory_format = torch.contiguous_format,
    prepare: Callable = prepare_batch,
) -> Engine:
    """Build an evaluator whose output is ``(y_pred as fp32, y)``, the form ignite's metrics expect.

    The model runs under ``model.eval()``, ``torch.inference_mode()`` and the same autocast as training;
    the model's previous train/eval mode is restored after each run.

    Args:
        model: the network.
        metrics: name -> ignite metric, attached to the evaluator (results in ``state.metrics``).
        device: where batches go; defaults to the model's device.
        precision: ``auto | fp32 | bf16 | fp16`` or a resolved :class:`Precision`.
        memory_format: e.g. ``torch.channels_last``.
        prepare: ``prepare(batch, device) -> (x, y)``.

    Example:
        >>> import torch
        >>> from ignite.metrics import Accuracy
        >>> from engine import create_evaluator
        >>> model = torch.nn.Linear(4, 3)
        >>> evaluator = create_evaluator(model, {"accuracy": Accuracy()})
        >>> data = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
        >>> 0.0 <= evaluator.run(data).metrics["accuracy"] <= 1.0
        True
    """
    device, precision = resolve_for_model(model, device, precision)

    def eval_step(engine: Engine, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = prepare(batch, device)
        if x.dim() == 4 and memory_format is not torch.contiguous_format:
            x = x.contiguous(memory_format=memory_format)
        with torch.inference_mode(), precision.autocast():
            y_pred = model(x)
        return y_pred.float(), y

    evaluator = Engine(eval_step)
    was_training = {"mode": True}

    def _eval_mode(engine: Engine) -> None:
        was_training["mode"] = model.training
        model.eval()

    def _restore_mode(engine: Engine) -> None:
        model.train(was_training["mode"])

    evaluator.add_event_handler(Events.STARTED, _eval_mode)
    evaluator.add_event_handler(Events.COMPLETED, _restore_mode)
    for name, metric in metrics.items():
        metric.attach(evaluator, name)
    return evaluator
