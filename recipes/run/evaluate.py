"""Evaluating a model or a checkpoint: loss, top-1, top-5, per-class accuracy and a confusion matrix.

The figures come from ignite's metrics (Loss, Accuracy, TopKCategoricalAccuracy, ConfusionMatrix)
on kiln's evaluator; ``tta`` averages the logits of each image and its horizontal mirror. The
confusion matrix's picture is drawn by ``recipes.report.plots.plot_confusion_matrix``.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from ignite.metrics import Accuracy, ConfusionMatrix, Loss, TopKCategoricalAccuracy
from torch import nn

from engine import Precision, create_evaluator
from recipes.config import FILE_DATASETS, Config, ConfigError, apply_overrides
from recipes.data import Data, DataError, imagefolder_eval_data, num_samples
from recipes.run.inference import load
from recipes.run.parts import make_data
from recipes.run.rundir import RunDir
from recipes.words import plural

__all__ = ["FlipTTA", "evaluate", "evaluate_checkpoint", "evaluation_data", "format_evaluation", "eval_output_dir",
           "MAX_PRINTED_CLASSES"]

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
             precision: Precision | str = "auto", tta: bool = False,
             memory_format: torch.memory_format = torch.contiguous_format) -> dict[str, Any]:
    """Run ``model`` over ``data`` (``(x, y)`` batches), inputs in ``memory_format``; return the figures.

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
    evaluator = create_evaluator(FlipTTA(model) if tta else model, metrics, device=device, precision=precision,
                                 memory_format=memory_format)
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
        lines.append(f"  {i:>{number}} {_short(name, width):<{width}}  {figure}  ({plural(count, 'image')})")
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


def eval_output_dir(checkpoint: str | Path) -> Path:
    """Where ``kiln eval`` writes by default: the checkpoint's run directory, else the checkpoint's folder."""
    run = RunDir.of_checkpoint(checkpoint)
    if Path(checkpoint).parent == run.checkpoints and run.config.is_file():
        return run.root
    return Path(checkpoint).parent


def _check_data_dir(cfg: Config, data_dir: str, path: str | Path) -> None:
    """Refuse ``--data-dir`` for a model of a data set made in memory, and a folder that is not there."""
    if cfg.data.dataset not in FILE_DATASETS:
        raise ConfigError(f"{path} is a {cfg.name} model: the {cfg.data.dataset} data set is made in memory and reads "
                          f"no files; --data-dir is for checkpoints of {', '.join(FILE_DATASETS)}")
    if not Path(data_dir).is_dir():
        raise DataError(f"--data-dir {data_dir}: no such directory")


def evaluation_data(cfg: Config, device: torch.device, other_data: bool = False) -> Data:
    """The data a checkpoint is evaluated on: its data set (images decode in the main process, except an
    image folder's); for another image folder (``other_data``), its val/ folder or all its images."""
    workers = cfg.data.num_workers if cfg.data.dataset == "imagefolder" else 0  # folders of images decode in workers
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=workers))
    if other_data and cfg.data.dataset == "imagefolder":
        return imagefolder_eval_data(cfg, device)
    return make_data(cfg, device)


def evaluate_checkpoint(path: str | Path, *, device: str | None = None, batch_size: int | None = None,
                        data_dir: str | None = None, tta: bool = False) -> dict[str, Any]:
    """Evaluate a checkpoint (last.pt or best-*.pt) on its recipe's validation data (or on ``data_dir``'s).

    ``data_dir`` holds data of the checkpoint's data set, and its held-out part is evaluated: the test
    files (cifar10, mnist, fashion-mnist), or an image folder's val/ folder, else all of its images.
    ``tta`` averages the logits of each image and its horizontal mirror. Returns ``{"loss",
    "accuracy", "samples", "epoch", "recipe", "device", "top5" (None under 5 classes), "per_class",
    "per_class_samples", "confusion_matrix" (rows: true class), "class_names", "tta"}``
    (see :func:`evaluate`).

    Raises:
        ConfigError / DataError: an unusable checkpoint, missing data, ``data_dir`` for a data set made
            in memory, or data whose classes differ from the ones the checkpoint was trained on.
    """
    trained = load(path, device=device)
    if data_dir is not None:
        _check_data_dir(trained.config, data_dir, path)
    overrides: dict[str, Any] = {}
    if batch_size is not None:
        overrides["data.batch_size"] = batch_size
    if data_dir is not None:
        overrides["data.data_dir"] = data_dir
        if trained.config.data.dataset in ("fashion-mnist", "mnist"):
            overrides["data.val_fraction"] = 0.0  # DIR's test files, not a split of its training files
    cfg = apply_overrides(trained.config, overrides)
    data = evaluation_data(cfg, trained.device, other_data=data_dir is not None)
    if cfg.data.dataset == "imagefolder" and data.class_names != trained.class_names:
        raise DataError(f"the data in {cfg.data.data_dir} has classes {data.class_names}; {path} was trained on "
                        f"{trained.class_names}")
    if data.num_classes != len(trained.class_names):
        raise ConfigError(f"{path}: the model has {len(trained.class_names)} classes, its data set {data.num_classes}")
    memory_format = torch.channels_last if trained.channels_last else torch.contiguous_format
    result = evaluate(trained.model, data.val, data.num_classes, device=trained.device, precision=trained.precision,
                      tta=tta, memory_format=memory_format)
    return {**result, "samples": num_samples(data.val), "epoch": trained.epoch, "recipe": cfg.name,
            "device": str(trained.device), "class_names": trained.class_names, "weights": trained.weights}
