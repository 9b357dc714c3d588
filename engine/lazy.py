"""``lazy_exports``: a package's public names, each imported from its module when first used (PEP 562).

``callbacks`` and ``engine`` export this way, so importing one light module of theirs (``callbacks.files``,
``engine.precision_names``) does not load torch and ignite, and ``kiln --help`` starts in a fraction of a second.
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, modules: Mapping[str, str],
                 public: Sequence[str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level ``__getattr__`` and ``__dir__`` of ``package``: ``modules`` maps each public name
    to the submodule that defines it; a name is imported on first use and kept in the package.

        >>> getattr_, dir_ = lazy_exports("engine", {"Precision": "precision"}, ["Precision"])
        >>> getattr_("Precision").__name__, "Precision" in dir_()
        ('Precision', True)
    """

    def __getattr__(name: str) -> Any:
        if name not in modules:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{modules[name]}"), name)
        vars(sys.modules[package])[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *public})

    return __getattr__, __dir__
