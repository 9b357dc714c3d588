"""The ``kiln`` command line: a thin click layer over ``recipes``."""
from __future__ import annotations

import sys

import click
import yaml

from recipes import RECIPES, get_recipe
from recipes.config import Config, ConfigError, apply_overrides, config_to_dict
from recipes.data import DataError

__all__ = ["cli", "main"]

# CLI option -> config key; None means "not given", so the recipe's value stands.
OPTION_KEYS = {
    "epochs": "train.epochs", "batch_size": "data.batch_size", "lr": "optim.lr", "max_lr": "schedule.max_lr",
    "weight_decay": "optim.weight_decay", "label_smoothing": "train.label_smoothing", "clip_norm": "train.clip_norm",
    "precision": "train.precision", "device": "train.device", "seed": "train.seed",
}


def _parse_sets(pairs: tuple[str, ...]) -> dict[str, str]:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set takes key=value, not {pair!r}")
        overrides[key.strip()] = value.strip()
    return overrides


def resolve_config(recipe: str, sets: tuple[str, ...] = (), **options: object) -> Config:
    """The recipe with ``--set`` overrides, then explicit options (options win)."""
    cfg = get_recipe(recipe)
    overrides = _parse_sets(sets)
    overrides.update({OPTION_KEYS[k]: v for k, v in options.items() if v is not None})
    return apply_overrides(cfg, overrides)


set_option = click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                          help="Override any config key, e.g. --set schedule.pct_start=0.3 (repeatable).")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="kiln", message="kiln %(version)s")
def cli() -> None:
    """kiln: train convolutional networks with the modern recipe (AdamW, one-cycle LR, label smoothing,
    mixed precision, clipping), and get a run directory with metrics, TensorBoard files and a summary.

    \b
    Start with:  kiln recipes
                 kiln train digits
    """


@cli.command()
def recipes() -> None:
    """List the recipes, one line each."""
    width = max(len(n) for n in RECIPES)
    for name, cfg in RECIPES.items():
        click.echo(f"{name:<{width}}  {cfg.description}")


@cli.command()
@click.argument("recipe")
@set_option
def show(recipe: str, sets: tuple[str, ...]) -> None:
    """Print the resolved config of RECIPE (YAML), with any --set overrides applied."""
    cfg = resolve_config(recipe, sets)
    click.echo(yaml.safe_dump(config_to_dict(cfg), sort_keys=False).rstrip())


@cli.command()
@click.argument("recipe")
@click.option("--epochs", type=int, help="Passes over the training data.")
@click.option("--batch-size", type=int, help="Images per batch.")
@click.option("--lr", type=float, help="LR the one-cycle starts from (AdamW).")
@click.option("--max-lr", type=float, help="Peak LR of the one-cycle schedule.")
@click.option("--weight-decay", type=float, help="AdamW decoupled weight decay.")
@click.option("--label-smoothing", type=float, help="Cross-entropy label smoothing, in [0, 1).")
@click.option("--clip-norm", type=float, help="Clip the total gradient norm to this (0: measure only).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), help="Autocast precision.")
@click.option("--device", help="auto, cpu, cuda or cuda:N.")
@click.option("--seed", type=int, help="Seed of the split, init, batch order and per-step randomness.")
@click.option("--out", type=click.Path(file_okay=False), help="Run directory (default: runs/RECIPE-TIMESTAMP).")
@click.option("--quiet", is_flag=True, help="No progress bar and no epoch lines; only the final lines.")
@set_option
def train(recipe: str, out: str | None, quiet: bool, sets: tuple[str, ...], **options: object) -> None:
    """Train RECIPE and write a run directory.

    \b
    Example:  kiln train digits --epochs 5 --max-lr 0.02 --out runs/d5
    """
    from recipes.run import make_run_dir, train as run_training

    cfg = resolve_config(recipe, sets, **options)
    run_dir = make_run_dir(cfg, out)
    if not quiet:
        click.echo(f"kiln: training {cfg.name} for {cfg.train.epochs} epochs into {run_dir}")
    try:
        run = run_training(cfg, run_dir, quiet=quiet)
    except KeyboardInterrupt:
        click.echo(f"interrupted; run directory: {run_dir}", err=True)
        sys.exit(130)
    summary = run.handlers["summary"]
    best = summary.best_val_accuracy
    click.echo(f"done in {summary.wall_seconds:.1f}s: best val_accuracy {best:.4f}, "
               f"final {summary.final_val_accuracy:.4f} ({run.device}, {run.precision.name})")
    click.echo(f"run directory: {run_dir}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: bad input gets one line on stderr and exit status 2, never a traceback."""
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
    sys.exit(code or 0)


if __name__ == "__main__":  # pragma: no cover
    main()
