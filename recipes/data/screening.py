"""Screening an image folder before anything trains: every file opened and verified as an image, an unreadable
one refused in one line, or skipped with a warning (``data.skip_bad_images``); and why PIL refused a file."""
from __future__ import annotations

import logging
import os
from typing import Any, Iterable, Sequence

import torch

from recipes.data.base import DataError

log = logging.getLogger("kiln")

__all__ = ["unreadable_images", "why_unreadable", "screen_images"]


#: How many unreadable files a refusal or a warning names before it counts the rest.
_NAMED_BAD_FILES = 3


def unreadable_images(paths: Iterable[str]) -> list[tuple[str, str]]:
    """``(path, reason)`` for each of ``paths`` that PIL cannot open and verify as an image.

    ``Image.open`` reads the header and ``verify()`` checks the file's structure (a PNG's chunks and
    their checksums) without decoding the pixels: 10,000 to 30,000 small PNG files a second on one core.
    """
    from PIL import Image

    bad = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as e:  # noqa: BLE001 - whatever PIL raises, the file is not an image kiln can read
            bad.append((path, why_unreadable(path, e)))
    return bad


def why_unreadable(path: str, error: Exception) -> str:
    """A few words on why PIL refused ``path``: an empty file, not an image, permission denied, a damaged image."""
    from PIL import UnidentifiedImageError

    if isinstance(error, UnidentifiedImageError):
        try:
            return "an empty file" if os.stat(path).st_size == 0 else "not an image"
        except OSError:
            return "not an image"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror.lower()
    text = str(error).strip().splitlines()
    return f"a damaged image: {text[0] if text else type(error).__name__}"


def _named(bad: Sequence[tuple[str, str]], start: int = 0) -> str:
    """``bad[start:]`` as ``PATH (reason), ... and N more``, naming the first few."""
    shown = bad[start:start + _NAMED_BAD_FILES]
    more = len(bad) - start - len(shown)
    return ", ".join(f"{path} ({why})" for path, why in shown) + (f" and {more} more" if more else "")


def screen_images(datasets: Sequence[Any], skip: bool) -> None:
    """Refuse (DataError) unless every image of ``datasets`` opens; with ``skip``, drop the bad ones with a warning.

    Runs before anything is trained or written, so a bad file is one line, not a DataLoader worker's traceback.
    """
    bad = [entry for dataset in datasets for entry in unreadable_images(path for path, _ in dataset.samples)]
    if not bad:
        return
    if not skip:
        path, why = bad[0]
        n = len(bad) - 1
        others = f", nor {'is' if n == 1 else 'are'} {n} other file{'s' * (n > 1)} ({_named(bad, 1)})" if n else ""
        raise DataError(f"{path} is not a readable image ({why}){others}; remove {'them' if others else 'it'}, "
                        "or skip unreadable files with --set data.skip_bad_images=true")
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:  # one line, not one per rank
        log.warning("kiln: warning: skipping %d unreadable image file%s (data.skip_bad_images): %s", len(bad),
                    "" if len(bad) == 1 else "s", _named(bad))
    dropped = {path for path, _ in bad}
    for dataset in datasets:
        dataset.samples = [(path, label) for path, label in dataset.samples if path not in dropped]
        dataset.imgs, dataset.targets = dataset.samples, [label for _, label in dataset.samples]
        empty = sorted(set(dataset.classes) - {dataset.classes[label] for label in dataset.targets})
        if empty:
            raise DataError(f"{dataset.root} has no readable images left in {', '.join(empty)} after skipping "
                            "the unreadable files")
