"""Pretrained weights by name: torchvision's weights API, the file in torch hub's cache, the weights' own preprocessing.

``--weights DEFAULT`` (or any weights name of the chosen torchvision model, e.g. ``IMAGENET1K_V1``, or the
full ``EfficientNet_B0_Weights.IMAGENET1K_V1``) resolves through ``torchvision.models.get_model_weights``.
The file is the one torchvision itself would use: ``torch.hub.get_dir()/checkpoints/<name in its URL>``
(``$TORCH_HOME/hub/checkpoints``). Naming weights is asking for them: a missing file is downloaded there,
with a short connect timeout; without it and without a network, one line names the file and the folder.
An existing path always wins over a name, and a local state dict or kiln checkpoint loads as before.
"""
from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from typing import TYPE_CHECKING

from recipes.config import ConfigError

if TYPE_CHECKING:  # torch, torchvision and the preprocessing load only when weights are named
    from recipes.data.preprocess import Preprocessing

__all__ = ["NamedWeights", "named_weights", "sha256_of", "weights_comment", "DOWNLOAD_TIMEOUT"]

#: Seconds a download may wait to connect (and between reads) before the run is refused.
DOWNLOAD_TIMEOUT = 10.0


@dataclass(frozen=True)
class NamedWeights:
    """One torchvision weights entry: where its file is, how many classes it has, how its inputs were made."""

    name: str  #: e.g. "EfficientNet_B0_Weights.IMAGENET1K_V1" (DEFAULT resolved)
    url: str  #: where torchvision downloads it from
    num_classes: int  #: the classes its head was trained on
    crop: int  #: the weights' input size (a center crop of ``resize``)
    resize: int  #: the shorter side before the crop
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str  #: one of ``recipes.data.preprocess.INTERPOLATIONS``

    @property
    def file_name(self) -> str:
        """The file name torchvision gives it in the cache (the last part of its URL)."""
        return os.path.basename(urlparse(self.url).path)

    @property
    def path(self) -> Path:
        """Where torchvision keeps it: ``torch.hub.get_dir()/checkpoints/<file_name>``."""
        import torch

        return Path(torch.hub.get_dir()) / "checkpoints" / self.file_name  # not a run directory's: torch hub's

    def preprocessing(self, image_size: int) -> Preprocessing:
        """The weights' own evaluation transform at ``image_size``: their resize-to-crop ratio, interpolation,
        mean and std (at the weights' own crop size, exactly their ``transforms()``).

        Example:
            >>> w = named_weights("efficientnet_b0", "DEFAULT")
            >>> w.preprocessing(224).describe()
            'RGB, shorter side to 256 (bicubic), center crop 224x224, mean (0.485, 0.456, 0.406) std (0.229, 0.224, 0.225)'
        """
        from recipes.data.preprocess import Preprocessing

        return Preprocessing(mode="RGB", size=image_size, mean=self.mean, std=self.std,
                             resize=round(image_size * self.resize / self.crop), interpolation=self.interpolation)

    def fetch(self, timeout: float = DOWNLOAD_TIMEOUT) -> Path:
        """The file in torch hub's cache, downloaded there first if it is missing; ConfigError (one line naming
        the file and the folder) when it is missing and cannot be downloaded."""
        path = self.path
        if path.is_file():
            return path
        import torch

        path.parent.mkdir(parents=True, exist_ok=True)
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(timeout)  # torch.hub's urlopen has no timeout of its own
        try:
            torch.hub.download_url_to_file(self.url, str(path), progress=False)
        except Exception as e:  # no network, a proxy, a refused or cut connection: all one line
            text = str(getattr(e, "reason", None) or e).strip()
            reason = text.splitlines()[0] if text else type(e).__name__
            raise ConfigError(f"--weights {self.name}: {self.file_name} is not in {path.parent} and could not be "
                              f"downloaded ({reason}); put the file there (from {self.url}) and run again") from None
        finally:
            socket.setdefaulttimeout(previous)
        return path


def named_weights(model: str, value: str) -> NamedWeights | None:
    """The torchvision weights ``value`` names for ``model``; None when ``value`` is empty or a path (a file that
    exists, or one written as a path: ``/``, ``.pt``, ``.pth``); ConfigError (one line listing the model's
    weights names) when it is neither."""
    if not value or os.path.exists(value) or "/" in value or os.sep in value or value.endswith((".pt", ".pth")):
        return None
    from torchvision.models import get_model_weights, get_weight

    from recipes.data.preprocess import INTERPOLATIONS

    try:
        enum = get_model_weights(model)
    except ValueError:
        raise ConfigError(f"--weights {value}: no file of that name, and {model} has no pretrained weights to "
                          f"name (torchvision's models do: resnet18, efficientnet_b0, ...)") from None
    names = list(enum.__members__)
    try:
        weights = enum[value] if value in names else get_weight(value)
    except (KeyError, ValueError, AttributeError):
        weights = None
    if weights is None or type(weights) is not enum:
        raise ConfigError(f"--weights {value}: no file of that name, and not a weights name of {model} "
                          f"(its names: {', '.join(names)})")
    t = weights.transforms()
    mode = getattr(t.interpolation, "value", str(t.interpolation)).lower()
    if mode not in INTERPOLATIONS:
        raise ConfigError(f"--weights {value}: its transforms resize with {mode}, which kiln does not apply")
    return NamedWeights(name=f"{type(weights).__name__}.{weights.name}", url=weights.url,
                        num_classes=len(weights.meta["categories"]), crop=int(t.crop_size[0]),
                        resize=int(t.resize_size[0]), mean=tuple(t.mean), std=tuple(t.std), interpolation=mode)


def weights_comment(model: str, value: str, image_size: int, applies: bool = True) -> str | None:
    """What ``kiln show`` adds about named weights, as YAML comments: which they are, where their file is (or
    will be downloaded to), and (``applies``: an image folder) the input preprocessing they bring. None for a
    file or no weights; a value that is neither a file nor a name says why in one comment.

    Example:
        >>> weights_comment("small_cnn", "", 32) is None
        True
    """
    try:
        named = named_weights(model, value)
    except ConfigError as e:
        return f"# {e}"
    if named is None:
        return None
    where = "there" if named.path.is_file() else "not there yet: the run downloads it"
    lines = [f"# --weights {value}: {named.name}, file {named.path} ({where})"]
    if applies:
        lines.append(f"# inputs made as the weights were trained: {named.preprocessing(image_size).describe()}")
    return "\n".join(lines)


def sha256_of(path: str | Path) -> str:
    """The file's SHA-256, hex (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
