"""The ``kiln`` command line: the commands (``commands/``, by group), what ``train``/``resume`` run in each process
(``jobs``), the entry point (``entry``), the launcher (``launch``) and the allocator tuning (``allocator``).

Importing this package is cheap: ``cli`` and ``main`` load ``recipes.cli.commands`` on first
use, so the entry point can set the process up before the heavy imports.
"""
from __future__ import annotations

from typing import Any

__all__ = ["cli", "main"]


def __getattr__(name: str) -> Any:  # PEP 562: `from recipes.cli import main` loads the commands then
    if name in __all__:
        from recipes.cli import commands

        return getattr(commands, name)
    raise AttributeError(f"module 'recipes.cli' has no attribute {name!r}")
