"""A full evaluation of a model: loss, top-1, top-5, per-class accuracy, a confusion matrix (text and PNG).

The figures come from ignite's metrics (Loss, Accuracy, TopKCategoricalAccuracy, ConfusionMatrix)
on kiln's evaluator; ``tta`` averages the logits of each image and its horizontal mirror.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from ignite.metrics import Accuracy, ConfusionMatrix, Loss, TopKCategoricalAccuracy
from torch import nn

from engine import Precision, create_evaluator

__all__ = ["FlipTTA", "evaluate", "format_evaluation", "plot_confusion_matrix", "eval_output_dir"]

#: More classes than this: the confusion matrix is left out of the text (it is in the PNG).
MAX_PRINTED_CLASSES = 20


class FlipTTA(nn.Module):
    """Test-time augmentation: the mean of the model's logits on an image and on its horizontal mirror."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return (self.model(x) + self.model(x.flip(-1))) / 2


def evaluate(model: nn.Module, data: Iterable, num_classes: int, *, device: torch.device,
             precision: Precision | str = "auto", tta: bool = False) -> dict[str, Any]:
    """Run ``model`` over ``data`` (``(x, y)`` batches); return the figures.

    Returns ``{"loss", "accuracy", "top5" (None with fewer than 5 classes), "per_class" (accuracy per
    class, None for a class without samples), "per_class_samples", "confusion_matrix" (rows: true
    class, columns: predicted; lists of ints), "samples", "tta"}``.
    """
    metrics = {
        "loss": Loss(nn.CrossEntropyLoss(), device=device),
        "accuracy": Accuracy(device=device),
        "confusion_matrix": ConfusionMatrix(num_classes, device=device),
    }
    if num_classes >= 5:
        metrics["top5"] = TopKCategoricalAccuracy(k=5, device=device)
    evaluator = create_evaluator(FlipTTA(model) if tta else model, metrics, device=device, precision=precision)
    figures = evaluator.run(data).metrics
    matrix = figures["confusion_matrix"].detach().cpu().long()
    counts = matrix.sum(dim=1)
    per_class = [float(matrix[i, i] / counts[i]) if counts[i] > 0 else None for i in range(num_classes)]
    return {
        "loss": float(figures["loss"]), "accuracy": float(figures["accuracy"]),
        "top5": float(figures["top5"]) if "top5" in figures else None,
        "per_class": per_class, "per_class_samples": counts.tolist(), "confusion_matrix": matrix.tolist(),
        "samples": int(counts.sum()), "tta": tta,
    }


def _short(name: str, width: int) -> str:
    return name if len(name) <= width else name[: width - 1] + "~"


def format_evaluation(result: Mapping[str, Any], source: str = "") -> str:
    """The figures as text: a header, per-class accuracy, the confusion matrix, then ``loss .. accuracy ..``.

    The headline line comes last, where a terminal leaves it in view (and scripts read it).
    """
    names: Sequence[str] = result["class_names"]
    epoch = f", epoch {result['epoch']}" if result.get("epoch") is not None else ""
    tta = " with flip TTA" if result.get("tta") else ""
    lines = [f"{source} ({result['recipe']}{epoch}) on {result['samples']} validation images{tta}:"]
    width = min(max(len(n) for n in names), 24)
    number = len(str(len(names) - 1))
    lines.append("per-class accuracy:")
    for i, (name, accuracy, count) in enumerate(zip(names, result["per_class"], result["per_class_samples"])):
        figure = f"{accuracy:.4f}" if accuracy is not None else "   -  "
        lines.append(f"  {i:>{number}} {_short(name, width):<{width}}  {figure}  ({count} image{'' if count == 1 else 's'})")
    matrix = result["confusion_matrix"]
    if len(names) <= MAX_PRINTED_CLASSES:
        cell = max(number, len(str(max(max(row) for row in matrix)))) + 2
        lines.append("confusion matrix (rows: true class, columns: predicted class, by number):")
        lines.append(" " * (width + number + 3) + "".join(f"{j:>{cell}}" for j in range(len(names))))
        for i, (name, row) in enumerate(zip(names, matrix)):
            lines.append(f"  {i:>{number}} {_short(name, width):<{width}}" + "".join(f"{v:>{cell}}" for v in row))
    else:
        lines.append(f"confusion matrix: {len(names)} classes, see the PNG")
    if result.get("confusion_matrix_png"):
        lines.append(f"confusion matrix plot: {result['confusion_matrix_png']}")
    top5 = f"  top-5 {result['top5']:.4f}" if result.get("top5") is not None else ""
    lines.append(f"  loss {result['loss']:.4f}  accuracy {result['accuracy']:.4f}{top5}")
    return "\n".join(lines)


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], class_names: Sequence[str], path: str | Path,
                          title: str = "Confusion matrix") -> Path:
    """Write the confusion matrix as a PNG (matplotlib, Agg canvas): counts shaded by row share, labelled."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = torch.tensor(matrix, dtype=torch.float64)
    share = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    n = len(class_names)
    side = min(max(4.5, 0.45 * n + 2.5), 30.0)
    fig = Figure(figsize=(side + 1.2, side), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(share.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ticks = range(n)
    font = 9 if n <= 20 else max(4, 9 - n // 20)
    ax.set_xticks(list(ticks), [str(c) for c in class_names], fontsize=font)
    if n > 5:
        ax.tick_params(axis="x", labelrotation=45)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
            label.set_rotation_mode("anchor")
    ax.set_yticks(list(ticks), [str(c) for c in class_names], fontsize=font)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    if n <= MAX_PRINTED_CLASSES:
        for i in range(n):
            for j in range(n):
                value = int(counts[i, j])
                if value:
                    ax.text(j, i, str(value), ha="center", va="center", fontsize=8,
                            color="white" if share[i, j] > 0.5 else "black")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def eval_output_dir(checkpoint: str | Path) -> Path:
    """Where ``kiln eval`` writes by default: the checkpoint's run directory, else the checkpoint's folder."""
    checkpoint = Path(checkpoint)
    folder = checkpoint.parent
    if folder.name == "checkpoints" and (folder.parent / "config.json").is_file():
        return folder.parent
    return folder
