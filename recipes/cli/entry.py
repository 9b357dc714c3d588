"""The ``kiln`` command's entry point: the process settings that must come before the heavy imports.

Python's cyclic garbage collector runs a full collection each time the number of live container
objects grows by a quarter. Importing torch, torch._dynamo (AdamW imports it), ignite and
matplotlib creates about 400 000 objects that all live until the process ends, so start-up pays
six full collections that find nothing (about 0.3 s on a 2-core machine), and the interpreter's
final collections at exit walk them all again (about 0.5 s). A training run's own garbage is
small and short-lived. So the command line, and only the command line (kiln's library code never
touches the collector, so a notebook or a test process keeps Python's defaults):

- turns the collector off while it imports, then moves everything alive into the permanent
  generation (``gc.freeze``) and turns it back on: later collections never walk those objects.
  A command that trains, evaluates or draws imports torch, ignite and the wings (``recipes.cli.jobs``)
  in that window; the others (``kiln show``, ``kiln recipes``, ``--help``) import none of them and
  answer in ~0.1 s;
- freezes again when the command is done, so the interpreter's exit skips the final walk
  (objects are still released and closed as usual; only cycles among them are left to the OS).

``KILN_GC=default`` leaves the collector alone (for comparing, or if a leak is suspected).
Then, unless ``KILN_MALLOC=default``, :func:`recipes.cli.commands.main` tunes glibc malloc.
"""
from __future__ import annotations

import gc
import os
import sys

__all__ = ["LIGHT_COMMANDS", "main", "tuned_gc"]

#: Commands that read configs only: they never import torch.
LIGHT_COMMANDS = frozenset({"show", "recipes"})


def tuned_gc() -> bool:
    """Whether the collector settings above apply (``KILN_GC`` is not ``default``)."""
    return os.environ.get("KILN_GC", "").strip().lower() != "default"


def main(argv: list[str] | None = None) -> None:
    """Run the ``kiln`` command line (``recipes.cli.commands.main``) with the collector settings above."""
    tuned = tuned_gc()
    if tuned:
        gc.disable()
    try:
        from recipes.cli.commands import main as cli_main

        if _imports_torch(sys.argv[1:] if argv is None else argv):
            import recipes.cli.jobs  # noqa: F401 - torch, ignite and the wings, before the freeze
    finally:
        if tuned:
            gc.freeze()
            gc.enable()
    try:
        cli_main(argv)
    finally:
        if tuned:
            gc.freeze()


def _imports_torch(args: list[str]) -> bool:
    """Whether the command in ``args`` trains, evaluates or draws (not ``--help``, not a light command)."""
    command = next((a for a in args if not a.startswith("-")), None)
    return command is not None and command not in LIGHT_COMMANDS and not {"--help", "-h"} & set(args)
