"""What a trained model gets wrong: its highest-loss validation images and its confusion matrix.

A practitioner's first question after the accuracy (fastai's ``plot_top_losses``). One validation pass of
the run's best checkpoint (last.pt when no best one was kept) writes ``RUN_DIR/mistakes.json`` (the
confusion matrix and the top-loss images' true class, prediction, probability and loss),
``RUN_DIR/plots/mistakes.png`` (those images, titled, also the image ``val/mistakes`` in the run's
TensorBoard) and ``RUN_DIR/plots/confusion.png``; report.html shows them under "What it gets wrong". The pass
runs again only when the checkpoint is newer than mistakes.json. A run trained with horizontal flips also
gets ``flip_probe`` in mistakes.json (``recipes.report.flip_probe``: do mirrored images show the same class?),
which the flip finding reads.
"""
from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.nn.functional as F

from callbacks.files import write_atomic, write_json_atomic
from recipes.config import apply_overrides
from recipes.report.flip_probe import flip_probe, trained_with_flips
from recipes.run.rundir import CHECKPOINT_PLOTS, RunDir, read_config_json, read_json

__all__ = ["TOP_LOSSES", "analyse_checkpoint", "chosen_checkpoint", "measure_mistakes", "write_mistakes"]

#: How many of the highest-loss validation images are kept and drawn.
TOP_LOSSES = 16


def chosen_checkpoint(run_dir: Path) -> Path | None:
    """The run's best checkpoint (the newest best-*.pt), else last.pt, else None."""
    paths = RunDir(run_dir)
    best = paths.best_checkpoints()
    if best:
        return best[-1]
    return paths.last if paths.last.exists() else None


def analyse_checkpoint(path: Path, k: int = TOP_LOSSES) -> tuple[dict[str, Any], torch.Tensor]:
    """One pass of the checkpoint's model over its validation data: the record for mistakes.json and the
    ``k`` highest-loss images (CPU, as the model saw them)."""
    from recipes.run.evaluate import evaluation_data
    from recipes.run.inference import load

    trained = load(path)
    flipped = trained_with_flips(trained.config.data.augment)
    # without augmentation: the validation data is the same, the training images are the flip probe's reference
    cfg = apply_overrides(trained.config, {"data.augment": "none"}) if flipped else trained.config
    quiet = logging.getLogger("kiln")  # the data's warnings (e.g. skipped bad images) were given by the run itself
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        data = evaluation_data(cfg, trained.device)
    finally:
        quiet.setLevel(level)
    memory_format = torch.channels_last if trained.channels_last else torch.contiguous_format
    classes = len(trained.class_names)
    confusion = torch.zeros(classes, classes, dtype=torch.long)
    kept: tuple[torch.Tensor, ...] | None = None  # loss, image, true, predicted, probability of the top k so far
    correct = samples = 0
    model = trained.model.eval()
    with torch.inference_mode(), trained.precision.autocast():
        for x, y in data.val:
            x, y = x.to(trained.device), y.to(trained.device)
            logits = model(x.contiguous(memory_format=memory_format) if x.dim() == 4 else x).float()
            loss = F.cross_entropy(logits, y, reduction="none")
            prob, pred = logits.softmax(1).max(1)
            confusion += torch.bincount(y * classes + pred, minlength=classes * classes).view(classes, classes).cpu()
            correct += int((pred == y).sum())
            samples += len(y)
            batch = (loss.cpu(), x.float().cpu(), y.cpu(), pred.cpu(), prob.cpu())
            merged = batch if kept is None else tuple(torch.cat([a, b]) for a, b in zip(kept, batch))
            order = merged[0].topk(min(k, len(merged[0]))).indices
            kept = tuple(t[order] for t in merged)
    top_loss, top_images, top_true, top_pred, top_prob = kept if kept is not None else (torch.empty(0),) * 5
    names = list(trained.class_names)
    record = {
        "checkpoint": path.name, "recipe": trained.config.name, "samples": samples, "accuracy": correct / samples if samples else None,
        "class_names": names, "confusion_matrix": confusion.tolist(),
        "top_losses": [{"true": names[int(t)], "predicted": names[int(p)], "probability": float(q), "loss": float(v)}
                       for t, p, q, v in zip(top_true, top_pred, top_prob, top_loss)],
    }
    if flipped:  # trained with horizontal flips: do mirrored images show the same class? (the flip finding)
        try:
            record["flip_probe"] = flip_probe(data.train, data.val, classes)
        except Exception as e:  # noqa: BLE001 - a bonus measurement: it must not cost the mistakes themselves
            record["flip_probe"] = None
            record["flip_probe_error"] = f"{type(e).__name__}: {e}"[:200]
    return record, top_images


def _displayable(images: torch.Tensor) -> torch.Tensor:
    """Each image scaled to [0, 1] (channel by channel) from whatever normalisation the data used, HWC."""
    flat = images.flatten(2)
    low, high = flat.min(2, keepdim=True).values, flat.max(2, keepdim=True).values
    scaled = ((flat - low) / (high - low).clamp(min=1e-8)).view_as(images)
    return scaled.permute(0, 2, 3, 1)


def _plot_mistakes(record: dict[str, Any], images: torch.Tensor, path: Path, title: str) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shown = _displayable(images)
    n = len(shown)
    columns = min(8, max(n, 1))
    rows = max(1, math.ceil(n / columns))
    fig = Figure(figsize=(1.55 * columns, 1.85 * rows + 0.5), dpi=100)
    FigureCanvasAgg(fig)
    fig.suptitle(title, fontsize=11)
    for i in range(rows * columns):
        ax = fig.add_subplot(rows, columns, i + 1)
        ax.axis("off")
        if i >= n:
            continue
        item = record["top_losses"][i]
        image = shown[i].numpy()
        ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray" if image.shape[-1] == 1 else None)
        wrong = item["true"] != item["predicted"]
        ax.set_title(f"{item['true']} -> {item['predicted']}\np={item['probability']:.2f} loss={item['loss']:.2f}",
                     fontsize=7.5, color="#c62828" if wrong else "#1d2330")
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png"))
    return path


def _lacks_flip_probe(path: Path) -> bool:
    """Whether mistakes.json is of a run trained with flips but was written before the flip probe existed."""
    record = read_json(path)
    try:
        config = read_config_json(path.parent) or {}
    except ValueError:  # ConfigError is a ValueError
        return False
    flipped = trained_with_flips(config.get("data", {}).get("augment"))
    return record is not None and flipped and "flip_probe" not in record


def write_mistakes(run_dir: str | Path, title: str = "") -> Path | None:
    """mistakes.json, plots/mistakes.png and plots/confusion.png from the run's chosen checkpoint; the
    path of mistakes.json, or None when there is no checkpoint. Skipped when mistakes.json is newer than the
    checkpoint and both plots are there."""
    from recipes.report.plots import plot_confusion_matrix

    paths = RunDir(run_dir)
    checkpoint = chosen_checkpoint(paths.root)
    if checkpoint is None:
        return None
    path, plots = paths.mistakes, paths.plots
    mistakes_png, confusion_png = (plots / name for name in CHECKPOINT_PLOTS)
    drawn = mistakes_png.exists() and confusion_png.exists()
    if drawn and path.exists() and path.stat().st_mtime >= checkpoint.stat().st_mtime and not _lacks_flip_probe(path):
        return path
    record, images = analyse_checkpoint(checkpoint)
    plots.mkdir(parents=True, exist_ok=True)
    name = title or record.get("recipe") or paths.root.name
    _plot_mistakes(record, images, mistakes_png,
                   f"{name}: the {len(images)} highest-loss validation images ({checkpoint.name}); true -> predicted")
    plot_confusion_matrix(record["confusion_matrix"], record["class_names"], confusion_png,
                          title=f"{name}: confusion matrix ({checkpoint.name}, validation)")
    if paths.tensorboard.is_dir():  # at the run's last iteration
        _to_tensorboard(paths.tensorboard, mistakes_png, int((read_json(paths.summary) or {}).get("iterations") or 0))
    write_json_atomic(path, record)
    return path


def _to_tensorboard(log_dir: Path, png: Path, step: int) -> None:
    """The mistakes picture as the image ``val/mistakes`` in the run's TensorBoard, at its last iteration (an
    event file of its own: the training writer is closed by now)."""
    import numpy as np
    from matplotlib.image import imread
    from tensorboardX import SummaryWriter

    image = (imread(png)[..., :3] * 255).round().astype(np.uint8)
    with SummaryWriter(logdir=str(log_dir), filename_suffix=".mistakes") as writer:
        writer.add_image("val/mistakes", image, step, dataformats="HWC")



def measure_mistakes(run_dir: str | Path, stream: TextIO | None = None, title: str = "") -> Path | None:
    """:func:`write_mistakes` after a run, on rank 0 only; a failure is one line on ``stream``, never an
    exception (the run is done; this is a bonus for its report)."""
    import ignite.distributed as idist

    if idist.get_rank() != 0:
        return None
    try:
        return write_mistakes(run_dir, title=title)
    except Exception as e:  # noqa: BLE001 - e.g. the data moved since the run, or a full disk
        from callbacks.files import os_error_line

        reason = os_error_line(e) if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
        print(f"kiln: could not measure what the model gets wrong: {reason}", file=stream or sys.stdout)
        return None
