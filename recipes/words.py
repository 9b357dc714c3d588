"""Words in kiln's output lines."""
from __future__ import annotations

__all__ = ["plural"]


def plural(count: int, noun: str) -> str:
    """``count`` and ``noun``, with an s unless there is one: ``plural(1, "epoch")`` is "1 epoch".

    Example:
        >>> plural(1, "epoch"), plural(3, "epoch")
        ('1 epoch', '3 epochs')
    """
    return f"{count} {noun}{'' if count == 1 else 's'}"
