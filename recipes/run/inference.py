"""Using a trained model: what a checkpoint records about feeding its model, and :func:`load`.

Every checkpoint's ``kiln`` section (and config.json's ``runtime``) holds an inference record
(:func:`inference_record`): the model's constructor arguments, the input size and channels, the exact
evaluation preprocessing, the memory format, next to the class names and the precision it was
validated in. :func:`load` turns a checkpoint into a :class:`Trained` model from that record alone;
for a checkpoint written before kiln recorded it, from the recipe (reading the data set again where
its mean and std came from the training split).

Example:
    >>> from recipes.run import load                                    # doctest: +SKIP
    >>> trained = load("runs/digits/checkpoints/best-0.9944.pt")        # doctest: +SKIP
    >>> probabilities = trained.probabilities([PIL.Image.open("3.png")])  # doctest: +SKIP
    >>> trained.class_names[int(probabilities.argmax(1))]               # doctest: +SKIP
    '3'
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from engine import Precision
from recipes.config import Config, ConfigError, apply_overrides
from recipes.data import DataError
from recipes.data.cifar10 import CIFAR10_PREPROCESSING
from recipes.data.imagefolder import imagefolder_transforms
from recipes.data.preprocess import Preprocessing
from recipes.models import build_model
from recipes.run.checkpoints import load_checkpoint, with_run_precision
from recipes.run.parts import make_data, resolve_runtime

__all__ = ["Trained", "load", "inference_record", "ONE_CHANNEL_DATASETS"]

#: Data sets of one-channel (grayscale) images; the others are RGB.
ONE_CHANNEL_DATASETS = ("digits", "fashion-mnist", "mnist")


def inference_record(cfg: Config, in_channels: int, num_classes: int, preprocessing: Preprocessing,
                     initial_weights: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a checkpoint says about using its model (plain data, ``weights_only``-safe).

    ``{"model": {"name", "in_channels", "num_classes", "image_size", "channels"}`` (the arguments of
    ``recipes.models.build_model``), ``"preprocessing"`` (:meth:`Preprocessing.to_dict`),
    ``"input": {"channels", "size"}``, ``"channels_last"``, and with ``model.weights``,
    ``"initial_weights"``: ``{"name", "file", "sha256", "head_replaced"}`` (where training started from)}.
    """
    extra = {"initial_weights": initial_weights} if initial_weights is not None else {}
    return {
        "model": {"name": cfg.model.name, "in_channels": in_channels, "num_classes": num_classes,
                  "image_size": cfg.data.image_size, "channels": list(cfg.model.channels)},
        "preprocessing": preprocessing.to_dict(),
        "input": {"channels": in_channels, "size": preprocessing.size},
        "channels_last": bool(cfg.train.channels_last),
        **extra,
    }


@dataclass
class Trained:
    """A trained model, ready to use: ``model`` (eval mode, on ``device``), its ``preprocess`` and ``class_names``.

    ``logits`` and ``probabilities`` run the model as validation did: under ``precision``'s autocast,
    inputs in the run's memory format, in inference mode.
    """

    model: nn.Module
    preprocess: Preprocessing
    class_names: list[str]
    device: torch.device
    precision: Precision
    config: Config
    path: Path
    weights: str = "model"  #: "ema" when the checkpoint's averaged weights were loaded
    epoch: int | None = None  #: the epoch a last.pt was written in (best-* do not say)
    channels_last: bool = False
    record: dict[str, Any] = field(default_factory=dict)  #: the inference record it was built from (recovered if old)
    validated_precision: str | None = None  #: what the checkpoint says it was validated in (None: from before kiln said)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The model's fp32 logits for a batch ``x`` of preprocessed images (N x C x H x W)."""
        x = x.to(self.device)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), self.precision.autocast():
            return self.model(x).float()

    def probabilities(self, images: Sequence[Any]) -> torch.Tensor:
        """Softmax probabilities (N x classes) for PIL images (any mode and size) or float tensors in [0, 1]."""
        return torch.softmax(self.logits(torch.stack([self.preprocess(image) for image in images])), dim=1)


def load(path: str | Path, *, device: str | None = None, precision: str | None = None) -> Trained:
    """A checkpoint (best-*.pt or last.pt) as a :class:`Trained` model; its EMA weights when the run kept an EMA.

    ``device`` defaults to ``auto`` (CUDA when there is one, else the CPU), whatever the run trained on: a
    checkpoint written on a GPU loads on the CPU. ``precision`` defaults to the one the model was validated in.

    Raises:
        ConfigError: an unusable checkpoint, or an old one whose preprocessing cannot be recovered
            (the line says what is missing).
    """
    checkpoint, cfg = load_checkpoint(path)
    overrides = {"train.device": device or "auto", **({"train.precision": precision} if precision else {})}
    cfg = with_run_precision(apply_overrides(cfg, overrides), checkpoint)
    dev, resolved = resolve_runtime(cfg)
    meta = checkpoint["kiln"]
    class_names = [str(n) for n in meta.get("class_names") or []]
    record = meta.get("inference") or _recovered_record(cfg, class_names, path)
    try:
        preprocess = Preprocessing.from_dict(record["preprocessing"])
        model = build_model(**{**record["model"], "channels": tuple(record["model"]["channels"])})
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{path}: its inference record is unusable ({e})") from None
    weights = "ema_model" if "ema_model" in checkpoint else "model"
    try:
        model.load_state_dict(checkpoint[weights])
    except (RuntimeError, KeyError) as e:
        raise ConfigError(f"{path}: the model weights do not fit the recorded model ({str(e).splitlines()[0]})") from None
    channels_last = bool(record.get("channels_last", False))
    model = model.to(dev, memory_format=torch.channels_last if channels_last else torch.contiguous_format).eval()
    trainer_state = checkpoint.get("trainer")
    epoch = int(trainer_state["iteration"]) // int(trainer_state["epoch_length"]) if trainer_state else None
    if not class_names:
        class_names = [str(i) for i in range(int(record["model"]["num_classes"]))]
    return Trained(model, preprocess, class_names, dev, resolved, cfg, Path(path),
                   weights="ema" if weights == "ema_model" else "model", epoch=epoch, channels_last=channels_last,
                   record=record, validated_precision=meta.get("precision"))


def _recovered_record(cfg: Config, class_names: Sequence[str], path: str | Path) -> dict[str, Any]:
    """The inference record of a checkpoint from before kiln wrote one, rebuilt from its recipe.

    CIFAR-10 and image folders use fixed statistics; digits, synthetic, MNIST and Fashion-MNIST were
    standardised with their training split's, so that data set is read again (a one-line ConfigError
    when it cannot be).
    """
    dataset = cfg.data.dataset
    in_channels = 1 if dataset in ONE_CHANNEL_DATASETS else 3
    num_classes = len(class_names) or (cfg.data.num_classes if dataset in ("synthetic", "imagefolder") else 10)
    if dataset == "cifar10":
        preprocessing = CIFAR10_PREPROCESSING
    elif dataset == "imagefolder":
        preprocessing = imagefolder_transforms(cfg)[1]
    else:
        cpu_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=0))
        try:
            preprocessing = make_data(cpu_cfg, torch.device("cpu")).preprocessing
        except DataError as e:
            raise ConfigError(f"{path} was written before kiln recorded preprocessing, and the {dataset} data its "
                              f"mean and std come from cannot be read to recover them ({e})") from None
    return inference_record(cfg, in_channels, num_classes, preprocessing)
