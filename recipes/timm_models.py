"""timm's models (the optional extra ``kiln[timm]``): ``--model timm:NAME``, e.g. ``timm:convnext_nano``.

This module owns the ``timm:`` prefix, the one-line refusals (timm not installed, a name timm does not know) and
building the model. It imports neither torch nor timm until a timm name is used: ``recipes.config`` checks model
names with it. Errors are ValueErrors of one line; the config and the run turn them into ConfigErrors.
"""
from __future__ import annotations

import difflib
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

__all__ = ["PREFIX", "is_timm", "timm_name", "import_timm", "check_timm_name", "timm_model"]

#: ``--model`` names that start with this are timm's (the rest is timm's name, with or without a pretrained tag).
PREFIX = "timm:"


def is_timm(model: str) -> bool:
    """Whether ``model`` names a timm model (``timm:NAME``).

    Example:
        >>> is_timm("timm:resnet18"), is_timm("resnet18")
        (True, False)
    """
    return model.startswith(PREFIX)


def timm_name(model: str) -> str:
    """timm's own name in ``timm:NAME``: ``NAME``."""
    return model[len(PREFIX):]


def import_timm(model: str) -> ModuleType:
    """The ``timm`` package; a ValueError naming the extra when it is not installed."""
    try:
        import timm
    except ImportError:
        raise ValueError(f"model {model} needs the timm extra: pip install 'kiln[timm]'") from None
    return timm


def check_timm_name(model: str) -> None:
    """A ValueError (one line, with timm's closest name) unless timm has the architecture ``timm:NAME`` names and,
    when NAME carries a pretrained tag (``resnet18.a1_in1k``), that tag."""
    timm = import_timm(model)
    name = timm_name(model)
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=1)
        hint = f"did you mean {PREFIX}{close[0]}? " if close else ""
        raise ValueError(f"unknown timm model {name!r}; {hint}(timm.list_models() lists its "
                         f"{len(timm.list_models())} names)")
    if "." in name:
        try:
            timm.models.get_pretrained_cfg(name)
        except RuntimeError as e:
            raise ValueError(f"model {model}: {e}") from None


def timm_model(model: str, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """``timm.create_model(NAME, pretrained=False, num_classes=..., in_chans=...)``: random weights, nothing
    downloaded; a model whose pretrained config says it takes one input size (ViTs) is built for ``image_size``."""
    timm = import_timm(model)
    name = timm_name(model)
    kwargs: dict = {}
    cfg = timm.models.get_pretrained_cfg(name)  # None for an architecture without pretrained weights
    if cfg is not None and cfg.fixed_input_size:
        kwargs["img_size"] = image_size
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs)
    except Exception as e:  # timm's own refusal (an argument this architecture lacks, a size it cannot take)
        text = str(e).strip()
        raise ValueError(f"timm could not build {name}: {text.splitlines()[0] if text else type(e).__name__}") from None
