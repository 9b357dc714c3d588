"""Pretrained weights by name: torchvision's or timm's, their file in their own cache, their own preprocessing.

``--weights DEFAULT`` (or any weights name of the chosen torchvision model, e.g. ``IMAGENET1K_V1``, or the
full ``EfficientNet_B0_Weights.IMAGENET1K_V1``) resolves through ``torchvision.models.get_model_weights``.
The file is the one torchvision itself would use: ``torch.hub.get_dir()/checkpoints/<name in its URL>``
(``$TORCH_HOME/hub/checkpoints``). With a timm model (``--model timm:NAME``, the timm extra), ``DEFAULT`` or
one of its pretrained tags (``a1_in1k``, or the full ``resnet18.a1_in1k``) resolves through timm's
``pretrained_cfg``, and the file is the Hugging Face hub cache's (``model.safetensors`` of ``timm/NAME.TAG``,
``$HF_HUB_CACHE``). Naming weights is asking for them: a missing file is downloaded there, with a short
timeout; without it and without a network (or with ``HF_HUB_OFFLINE=1``), one line names the file and the
folder. An existing path always wins over a name, and a local state dict or kiln checkpoint loads as before.
"""
from __future__ import annotations

import hashlib
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from typing import TYPE_CHECKING

from recipes.config import ConfigError
from recipes.timm_models import import_timm, is_timm, timm_name

if TYPE_CHECKING:  # torch, torchvision and the preprocessing load only when weights are named
    from recipes.data.preprocess import Preprocessing

__all__ = ["NamedWeights", "TorchvisionWeights", "TimmWeights", "named_weights", "sha256_of", "weights_comment",
           "DOWNLOAD_TIMEOUT"]

#: Seconds a download may wait to connect (and between reads) before the run is refused.
DOWNLOAD_TIMEOUT = 10.0


@dataclass(frozen=True)
class NamedWeights:
    """Pretrained weights by name (:class:`TorchvisionWeights` or :class:`TimmWeights`): which they are, how many
    classes they have, how their inputs were made; where their file is and how it is fetched is each source's."""

    name: str  #: e.g. "EfficientNet_B0_Weights.IMAGENET1K_V1" (DEFAULT resolved), "resnet18.a1_in1k"
    num_classes: int  #: the classes its head was trained on
    crop: int  #: the weights' input size (a center crop of ``resize``)
    resize: int | None  #: the shorter side before the crop; None: the whole image resized to ``crop`` x ``crop``
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str  #: one of ``recipes.data.preprocess.INTERPOLATIONS``

    def cached(self) -> Path | None:
        """The file, when it is already in its cache (nothing is downloaded)."""
        raise NotImplementedError

    @property
    def location(self) -> str:
        """Where the file is or will be, in words (for ``kiln show`` while it is not there yet)."""
        raise NotImplementedError

    def fetch(self, timeout: float = DOWNLOAD_TIMEOUT) -> Path:
        """The file in its cache, downloaded there first if it is missing; ConfigError (one line naming the file
        and the folder) when it is missing and cannot be downloaded."""
        raise NotImplementedError

    def resize_at(self, image_size: int) -> int | None:
        """The shorter side before the center crop, for inputs of ``image_size``: the weights' resize-to-crop ratio."""
        return None if self.resize is None else round(image_size * self.resize / self.crop)

    def preprocessing(self, image_size: int) -> Preprocessing:
        """The weights' own evaluation transform at ``image_size``: their resize (:meth:`resize_at`),
        interpolation, mean and std (at the weights' own crop size, exactly their transforms).

        Example:
            >>> w = named_weights("efficientnet_b0", "DEFAULT")
            >>> w.preprocessing(224).describe()
            'RGB, shorter side to 256 (bicubic), center crop 224x224, mean (0.485, 0.456, 0.406) std (0.229, 0.224, 0.225)'
        """
        from recipes.data.preprocess import Preprocessing

        return Preprocessing(mode="RGB", size=image_size, mean=self.mean, std=self.std,
                             resize=self.resize_at(image_size), interpolation=self.interpolation)


@dataclass(frozen=True)
class TorchvisionWeights(NamedWeights):
    """One torchvision weights entry; its file is torch hub's."""

    url: str  #: where torchvision downloads it from

    @property
    def file_name(self) -> str:
        """The file name torchvision gives it in the cache (the last part of its URL)."""
        return os.path.basename(urlparse(self.url).path)

    @property
    def path(self) -> Path:
        """Where torchvision keeps it: ``torch.hub.get_dir()/checkpoints/<file_name>``."""
        import torch

        return Path(torch.hub.get_dir()) / "checkpoints" / self.file_name  # not a run directory's: torch hub's

    def cached(self) -> Path | None:
        """:attr:`path`, when the file is there."""
        return self.path if self.path.is_file() else None

    @property
    def location(self) -> str:
        """:attr:`path`."""
        return str(self.path)

    def fetch(self, timeout: float = DOWNLOAD_TIMEOUT) -> Path:
        """:attr:`path`, downloaded from :attr:`url` first if it is missing (see :meth:`NamedWeights.fetch`)."""
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
            raise ConfigError(f"--weights {self.name}: {self.file_name} is not in {path.parent} and could not be "
                              f"downloaded ({_reason(e)}); put the file there (from {self.url}) and run "
                              "again") from None
        finally:
            socket.setdefaulttimeout(previous)
        return path


@dataclass(frozen=True)
class TimmWeights(NamedWeights):
    """One timm pretrained tag (its ``pretrained_cfg``); its file is the Hugging Face hub cache's."""

    repo: str  #: the Hugging Face repo, e.g. "timm/resnet18.a1_in1k"
    files: tuple[str, ...]  #: the weights file names timm reads there, the preferred first ("model.safetensors")
    crop_pct: float  #: timm's crop fraction: the shorter side goes to floor(size / crop_pct)

    def resize_at(self, image_size: int) -> int | None:
        """As timm's ``create_transform`` does: floor(``image_size`` / crop_pct) (None when it squashes whole
        images to size: crop_pct 1)."""
        return None if self.resize is None else math.floor(image_size / self.crop_pct)

    def cached(self) -> Path | None:
        """The first of :attr:`files` in the hub cache (``$HF_HUB_CACHE/models--timm--NAME.TAG/snapshots/...``)."""
        from huggingface_hub import try_to_load_from_cache

        for file in self.files:
            found = try_to_load_from_cache(self.repo, file)
            if isinstance(found, str):
                return Path(found)
        return None

    @property
    def location(self) -> str:
        """The file in the repo and the cache folder."""
        return f"{self.files[0]} of {self.repo} in the Hugging Face cache {_hub_cache()}"

    def fetch(self, timeout: float = DOWNLOAD_TIMEOUT) -> Path:
        """The cached file, downloaded with ``huggingface_hub.hf_hub_download`` first if it is missing (not with
        ``HF_HUB_OFFLINE=1``; see :meth:`NamedWeights.fetch`)."""
        found = self.cached()
        if found is not None:
            return found
        from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"it has none of {', '.join(self.files)}"
        if not constants.HF_HUB_OFFLINE:
            for file in self.files:
                try:  # one try first: hf_hub_download retries a failed connection for half a minute
                    get_hf_file_metadata(hf_hub_url(self.repo, file), timeout=timeout)
                    return Path(hf_hub_download(self.repo, file, etag_timeout=timeout))
                except Exception as e:  # no network, a proxy, a refused or cut connection: all one line
                    if isinstance(e, EntryNotFoundError) and not isinstance(e, LocalEntryNotFoundError):
                        continue  # the repo has the next file instead
                    reason = _reason(e)
                    break
        raise ConfigError(f"--weights {self.name}: {self.files[0]} of the Hugging Face repo {self.repo} is not in "
                          f"the cache {_hub_cache()} and could not be downloaded ({reason}); fetch it there "
                          f"(hf download {self.repo} {self.files[0]}) and run again")


def named_weights(model: str, value: str) -> NamedWeights | None:
    """The pretrained weights ``value`` names for ``model``: torchvision's (:class:`TorchvisionWeights`) or, for
    ``timm:NAME``, timm's (:class:`TimmWeights`); None when ``value`` is empty or a path (a file that exists, or
    one written as a path: ``/``, ``.pt``, ``.pth``, ``.bin``, ``.safetensors``); ConfigError (one line listing
    the model's weights names) when it is neither."""
    if (not value or os.path.exists(value) or "/" in value or os.sep in value
            or value.endswith((".pt", ".pth", ".bin", ".safetensors"))):
        return None
    if is_timm(model):
        return _timm_weights(model, value)
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
    return TorchvisionWeights(name=f"{type(weights).__name__}.{weights.name}", url=weights.url,
                              num_classes=len(weights.meta["categories"]), crop=int(t.crop_size[0]),
                              resize=int(t.resize_size[0]), mean=tuple(t.mean), std=tuple(t.std), interpolation=mode)


def _timm_weights(model: str, value: str) -> TimmWeights:
    """``DEFAULT`` (the tag in ``timm:NAME.TAG``, else the architecture's default), a tag (``a1_in1k``) or a full
    name (``resnet18.a1_in1k``) of ``timm:NAME``, from timm's ``pretrained_cfg``."""
    from recipes.data.preprocess import INTERPOLATIONS

    try:
        timm = import_timm(model)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    name = timm_name(model)
    arch = timm.models.split_model_name_tag(name)[0]
    full = name if value == "DEFAULT" else value if value.startswith(f"{arch}.") else f"{arch}.{value}"
    tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{arch}.*")]
    if not tags:
        raise ConfigError(f"--weights {value}: no file of that name, and {model} has no pretrained weights to name "
                          f"(timm.list_pretrained() lists the models that do)")
    try:
        cfg = timm.models.get_pretrained_cfg(full, allow_unregistered=False)
    except RuntimeError:
        raise ConfigError(f"--weights {value}: no file of that name, and not a pretrained tag of {model} "
                          f"(its tags: DEFAULT, {', '.join(tags)})") from None
    label = f"{cfg.architecture}.{cfg.tag}"
    if not cfg.hf_hub_id:
        raise ConfigError(f"--weights {value}: timm has {label} at {cfg.url} only, not on the Hugging Face hub "
                          "where kiln looks for timm's weights")
    if cfg.interpolation not in INTERPOLATIONS:
        raise ConfigError(f"--weights {value}: timm's {label} resizes with {cfg.interpolation}, which kiln does "
                          "not apply")
    crop, crop_pct = int(cfg.input_size[-1]), cfg.crop_pct or 0.875  # timm's default crop_pct
    if cfg.crop_mode in (None, "center"):
        resize = math.floor(crop / crop_pct)
    elif cfg.crop_mode == "squash" and crop_pct == 1:
        resize = None  # the whole image to crop x crop
    else:
        raise ConfigError(f"--weights {value}: timm's {label} makes its inputs with crop_mode {cfg.crop_mode} "
                          f"(crop_pct {crop_pct}), which kiln does not apply")
    named = cfg.hf_hub_filename
    files = ((f"{named[:-4]}.safetensors", named) if named.endswith(".bin") else (named,)) if named else (
        "model.safetensors", "pytorch_model.bin")  # timm reads the first it finds
    return TimmWeights(name=label, num_classes=int(cfg.num_classes), crop=crop, resize=resize,
                       mean=tuple(cfg.mean), std=tuple(cfg.std), interpolation=cfg.interpolation,
                       repo=cfg.hf_hub_id, files=files, crop_pct=float(crop_pct))


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
    found = named.cached()
    where = f"{found} (there)" if found is not None else f"{named.location} (not there yet: the run downloads it)"
    lines = [f"# --weights {value}: {named.name}, file {where}"]
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


def _reason(e: BaseException) -> str:
    """Why a download failed, in a few words: the first line of the error (its ``reason``, for urllib's)."""
    text = str(getattr(e, "reason", None) or e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _hub_cache() -> str:
    """The Hugging Face hub cache folder (``$HF_HUB_CACHE``, ``~/.cache/huggingface/hub`` by default)."""
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE
