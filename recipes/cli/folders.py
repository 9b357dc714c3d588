"""The folders a command writes its outputs into: checked before the work starts, so that a read-only or
full file system is one line and exit status 2, not a traceback once the work is done."""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import click

from callbacks.files import os_error_line
from recipes.config import ConfigError

__all__ = ["output_folder", "writable_or_none"]


@contextlib.contextmanager
def output_folder(folder: Path | None, option: str = "--out") -> Iterator[Path | None]:
    """``folder`` for a command's outputs, created and checked to take a new file before the work starts:
    a read-only or full file system, a denied permission or a name too long is one line and exit status 2
    then, not a traceback once the work is done. Removed again if the command fails before writing in it."""
    if folder is None:
        yield None
        return
    created = not os.path.lexists(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except FileExistsError:
        raise ConfigError(f"{option} {folder} is a file, not a folder") from None
    except OSError as e:
        raise ConfigError(f"cannot write {option} {folder}: {(e.strerror or str(e)).lower()}") from None
    try:
        yield folder
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if still empty
        raise


def writable_or_none(folder: Path) -> Path | None:
    """``folder`` if a file can be made in it, else None with one line on stderr saying why."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        click.echo(f"kiln: not writing confusion_matrix.png: {os_error_line(e, folder)} (pick a folder with --out)",
                   err=True)
        return None
    return folder
