"""The ``kiln`` command line: a thin click layer over ``recipes``."""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click
import yaml

from recipes import RECIPES, get_recipe
from recipes.config import Config, ConfigError, apply_overrides, config_to_dict
from recipes.data import DataError

if TYPE_CHECKING:
    from recipes.run import Assembly

__all__ = ["cli", "main", "EXIT_DIVERGED"]

#: Exit status of ``kiln train``/``kiln resume`` when NanGuard stopped the run as diverged (``--on-nan``).
EXIT_DIVERGED = 3

# CLI option -> config key; None means "not given", so the recipe's value stands.
OPTION_KEYS = {
    "epochs": "train.epochs", "batch_size": "data.batch_size", "lr": "optim.lr", "max_lr": "schedule.max_lr",
    "weight_decay": "optim.weight_decay", "label_smoothing": "train.label_smoothing", "clip_norm": "train.clip_norm",
    "precision": "train.precision", "device": "train.device", "seed": "train.seed", "on_nan": "train.on_nan",
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
@click.option("--on-nan", type=click.Choice(["skip", "rollback", "stop"]),
              help="On NaN/Inf or an fp16 loss-scale collapse: drop the update, roll back and lower the LR "
                   "(default), or stop (exit status 3).")
@click.option("--out", type=click.Path(file_okay=False), help="Run directory (default: runs/RECIPE-TIMESTAMP).")
@click.option("--quiet", is_flag=True, help="No progress bar and no epoch lines; only the final lines.")
@click.option("--resume", "resume_from", type=click.Path(dir_okay=False),
              help="Continue the run of this last.pt (in its run directory) with this config.")
@click.option("--force", is_flag=True, help="With --resume: continue even if the config changes the run.")
@set_option
def train(recipe: str, out: str | None, quiet: bool, resume_from: str | None, force: bool, sets: tuple[str, ...],
          **options: object) -> None:
    """Train RECIPE and write a run directory.

    \b
    Example:  kiln train digits --epochs 5 --max-lr 0.02 --out runs/d5
    Stop it with Ctrl-C or SIGTERM: it saves, and `kiln resume RUN_DIR` continues it.
    Exit status: 0 done, 2 bad input, 3 diverged (NaN/Inf that --on-nan could not fix), 130 Ctrl-C.
    """
    from recipes.run import make_run_dir, resume as resume_run, train as run_training

    cfg = resolve_config(recipe, sets, **options)
    if resume_from is not None:
        if out is not None:
            raise ConfigError("--resume continues in the checkpoint's own run directory; drop --out")
        _finish(resume_run(resume_from, requested=cfg, force=force, quiet=quiet), quiet)
        return
    run_dir = make_run_dir(cfg, out)
    if not quiet:
        click.echo(f"kiln: training {cfg.name} for {cfg.train.epochs} epochs into {run_dir}")
    _finish(run_training(cfg, run_dir, quiet=quiet), quiet)


@cli.command()
@click.argument("run_dir", type=click.Path())
@click.option("--epochs", type=int, help="Run to this many epochs in all (needs --new-schedule if it changes).")
@click.option("--new-schedule", is_flag=True, help="With --epochs: a second one-cycle over the added epochs.")
@click.option("--quiet", is_flag=True, help="No progress bar and no epoch lines; only the final lines.")
def resume(run_dir: str, epochs: int | None, new_schedule: bool, quiet: bool) -> None:
    """Continue the run in RUN_DIR from its checkpoints/last.pt, exactly where it stopped.

    \b
    Example:  kiln resume runs/d5
    """
    from recipes.run import resume as resume_run

    run = resume_run(run_dir, epochs=epochs, new_schedule=new_schedule, quiet=quiet)
    if run.status == "completed" and run.trainer.state.iteration == 0:
        click.echo(f"{run_dir} already completed its {run.config.train.epochs} epochs; nothing to resume "
                   "(use --epochs N --new-schedule to train further)")
        return
    if not quiet:
        click.echo(f"kiln: resumed {run.run_dir}")
    _finish(run, quiet)


@cli.command("eval")
@click.argument("checkpoint", type=click.Path())
@click.option("--device", help="auto, cpu, cuda or cuda:N (default: the recipe's).")
@click.option("--batch-size", type=int, help="Images per evaluation batch.")
def eval_(checkpoint: str, device: str | None, batch_size: int | None) -> None:
    """Evaluate CHECKPOINT (last.pt or best-*.pt) on its recipe's validation data.

    \b
    Example:  kiln eval runs/d5/checkpoints/last.pt
    """
    from recipes.run import evaluate_checkpoint

    result = evaluate_checkpoint(checkpoint, device=device, batch_size=batch_size)
    epoch = f", epoch {result['epoch']}" if result["epoch"] is not None else ""
    click.echo(f"{checkpoint} ({result['recipe']}{epoch}) on {result['samples']} validation images:")
    click.echo(f"  loss {result['loss']:.4f}  accuracy {result['accuracy']:.4f}")


def _finish(run: Assembly, quiet: bool) -> None:
    """The final lines of a run, and its exit status: 0, 3 when it diverged, or 130 when Ctrl-C stopped it."""
    import signal

    from callbacks.nan_guard import format_diagnosis

    summary = run.handlers["summary"]
    s = run.trainer.state
    if run.status == "diverged":
        click.echo(f"kiln: {format_diagnosis(s.diverged)}", err=True)
        click.echo(f"run directory: {run.run_dir} (summary.json status \"diverged\"; details in events.jsonl)")
        sys.exit(EXIT_DIVERGED)
    if run.status == "interrupted":
        name = signal.Signals(run.stop_signal).name if run.stop_signal else "a stop"
        click.echo(f"stopped by {name} at iteration {s.iteration} (epoch {s.epoch}); checkpoint saved. "
                   f"Continue with: kiln resume {run.run_dir}")
        click.echo(f"run directory: {run.run_dir}")
        sys.exit(130 if run.stop_signal == signal.SIGINT else 0)
    best = summary.best_val_accuracy
    final = summary.final_val_accuracy
    figures = f"best val_accuracy {best:.4f}, final {final:.4f}" if best is not None else "no validation"
    click.echo(f"done in {summary.wall_seconds:.1f}s: {figures} ({run.device}, {run.precision.name})")
    click.echo(f"run directory: {run.run_dir}")


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
