"""kiln's recipes: configs, data, models, the run assembly and the CLI.

Importing the package is cheap: ``RECIPES`` (and the torch, ignite and recipe modules behind it)
loads on first use, so the ``kiln`` entry point (``recipes.cli.entry``) can set up the process before
the heavy imports.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from recipes.config import Config

__all__ = ["RECIPES", "get_recipe"]


@functools.cache
def _registry() -> dict[str, "Config"]:
    """Every named recipe, by name (built once). A plain dict: grep it, no registration side effects."""
    from recipes import cifar10, digits, fashion_mnist, imagefolder, mnist, synthetic

    return {
        "digits": digits.CONFIG,
        "fashion-mnist": fashion_mnist.CONFIG,
        "mnist": mnist.CONFIG,
        "synthetic": synthetic.CONFIG,
        "cifar10": cifar10.CONFIG,
        "imagefolder": imagefolder.CONFIG,
    }


def __getattr__(name: str) -> Any:  # PEP 562: `from recipes import RECIPES` builds it on first use
    if name == "RECIPES":
        return _registry()
    raise AttributeError(f"module 'recipes' has no attribute {name!r}")


def get_recipe(name: str) -> "Config":
    """The recipe called ``name``.

    Raises:
        ConfigError: no such recipe (the message lists the known ones).
    """
    from recipes.config import ConfigError

    try:
        return _registry()[name]
    except KeyError:
        raise ConfigError(f"unknown recipe {name!r}; known recipes: {', '.join(sorted(_registry()))}") from None
