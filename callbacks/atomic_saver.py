"""AtomicDiskSaver: ignite's checkpoint files written atomically, and never with NaN or Inf in them."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import ignite.distributed as idist
import torch
from ignite.handlers.checkpoint import BaseSaveHandler

from callbacks.files import write_atomic

__all__ = ["AtomicDiskSaver", "NonFiniteCheckpointError"]


class NonFiniteCheckpointError(ValueError):
    """A checkpoint holding NaN or Inf was refused; the previous file is kept."""


def _float_leaves(tree: Any, path: str = "") -> Any:
    """``(path, tensor)`` for every floating-point tensor in a nested dict/list of a checkpoint."""
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point():
            yield path or "<tensor>", tree
        return
    if isinstance(tree, Mapping):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return
    for key, value in items:
        yield from _float_leaves(value, f"{path}.{key}" if path else str(key))


def _first_non_finite(tree: Any) -> str | None:
    """The path of the first tensor in ``tree`` holding NaN or Inf, or None.

    One host read per device for a sound checkpoint (not one per tensor: on a GPU each read is a sync);
    the per-tensor reads happen only to name the culprit.
    """
    leaves = list(_float_leaves(tree))
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for _, tensor in leaves:
        by_device.setdefault(tensor.device, []).append(torch.isfinite(tensor).all())
    if all(bool(torch.stack(flags).all()) for flags in by_device.values()):
        return None
    return next((path for path, tensor in leaves if not bool(torch.isfinite(tensor).all())), None)


def _save_to(checkpoint: Mapping, f: BinaryIO) -> None:
    """``torch.save`` into ``f``, failing with the OSError itself when writing fails.

    torch reports a failed write (a full disk) as ``RuntimeError: ... unexpected pos N vs M`` raised
    while handling the OSError; the OSError is the cause a person can act on. (Saving into a buffer
    first would raise it plainly, but costs a copy of the checkpoint in memory and ~1.5x the time.)
    """
    try:
        torch.save(checkpoint, f)
    except RuntimeError as e:
        if isinstance(e.__context__, OSError):
            raise e.__context__ from None
        raise


class AtomicDiskSaver(BaseSaveHandler):
    """An ignite save handler that never leaves a half-written or missing checkpoint behind.

    Each file is written to a temporary file in the same folder, flushed and fsynced, renamed over
    the target, and the folder is fsynced. ignite's ``Checkpoint`` asks to remove the file it
    replaces *before* writing the new one (ignite #1986); here removals wait until the next write
    has completed. A checkpoint holding a non-finite float tensor is refused.

    Args:
        dirname: the folder (created).
        save_on_rank: under data parallelism, the one rank that writes.
    """

    def __init__(self, dirname: str | Path, save_on_rank: int = 0) -> None:
        self.dirname = Path(dirname)
        self.save_on_rank = save_on_rank
        self._pending_removals: list[str] = []
        if idist.get_rank() == save_on_rank:
            self.dirname.mkdir(parents=True, exist_ok=True)
            for stale in self.dirname.glob(".*.tmp"):  # left by a process killed mid-write
                stale.unlink(missing_ok=True)

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        bad = _first_non_finite(checkpoint)
        if bad is not None:
            raise NonFiniteCheckpointError(f"not saving {filename}: {bad} holds NaN or Inf")
        if idist.get_rank() != self.save_on_rank:  # every rank builds the same state; one writes it
            self._pending_removals = []
            return
        write_atomic(self.dirname / filename, lambda f: _save_to(checkpoint, f))
        for old in self._pending_removals:
            if old != filename:
                (self.dirname / old).unlink(missing_ok=True)
        self._pending_removals = []

    def remove(self, filename: str) -> None:
        """Remove ``filename`` once the next checkpoint is safely on disk."""
        self._pending_removals.append(filename)
