"""The ``kiln`` command group and its entry point; the commands live by group beside this file: ``run``
(train, resume), ``inspect`` (recipes, show, schedule, report, eval), ``model`` (predict, export) and
``tools`` (lr-find, sweep), ``tracking`` (mlflow-sync). Each parses, calls the wing that does the work and prints; no training logic.

The heavy wings (``recipes.run``, ``recipes.tools``, ``recipes.report``) are imported inside the
commands that need them, so ``kiln recipes`` or ``kiln --help`` never loads them.
"""
from __future__ import annotations

import os
import sys

import click

from callbacks.files import os_error_line
from recipes.cli.allocator import tune_malloc
from recipes.cli.commands.inspect import eval_, recipes, report, schedule, show
from recipes.cli.commands.model import export, predict
from recipes.cli.commands.run import resume, train
from recipes.cli.commands.tools import lr_find, sweep
from recipes.cli.commands.tracking import mlflow_sync
from recipes.config import ConfigError, DataError

__all__ = ["cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="kiln", message="kiln %(version)s")
def cli() -> None:
    """kiln: train convolutional networks with the modern recipe (AdamW, one-cycle LR, label smoothing,
    mixed precision, clipping), and get a run directory with metrics, TensorBoard files and a summary.

    \b
    Start with:  kiln recipes
                 kiln train digits
    """


for _command in (recipes, show, train, resume, eval_, predict, export, lr_find, schedule, sweep, report, mlflow_sync):
    cli.add_command(_command)


def main(argv: list[str] | None = None) -> None:
    """Entry point: bad input gets one line on stderr and exit status 2, never a traceback; so does an
    OS error (a full or read-only disk, a denied permission, a name too long), with its cause and path
    and exit status 1: ``kiln: error: no space left on device: runs/d/checkpoints/last.pt``.

    First it tunes glibc malloc (:func:`recipes.cli.allocator.tune_malloc`: freed buffers stay in the
    process, so CPU training steps stop page-faulting), unless the environment sets ``KILN_MALLOC=default``.
    """
    if os.environ.get("KILN_MALLOC", "").strip().lower() != "default":
        tune_malloc()
    try:
        code = cli.main(args=argv, prog_name="kiln", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("kiln: aborted", err=True)
        sys.exit(130)
    except click.exceptions.NoArgsIsHelpError as e:
        click.echo(e.format_message())
        sys.exit(0)
    except click.ClickException as e:
        click.echo(f"kiln: error: {e.format_message()}", err=True)
        sys.exit(2)
    except (ConfigError, DataError) as e:
        click.echo(f"kiln: error: {e}", err=True)
        sys.exit(2)
    except OSError as e:  # a file could not be written (or read) after the checks: a full or read-only disk...
        notes = "".join(f"; {note}" for note in getattr(e, "__notes__", ()))
        click.echo(f"kiln: error: {os_error_line(e)}{notes}", err=True)
        sys.exit(1)
    sys.exit(code or 0)


if __name__ == "__main__":  # pragma: no cover
    main()
