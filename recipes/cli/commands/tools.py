"""The commands that search for settings: ``kiln lr-find`` and ``kiln sweep``."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from recipes.cli.folders import output_folder
from recipes.cli.options import config_option, config_options, overrides, recipe_argument, recipe_or_run, resolve_config, set_option
from recipes.config import ConfigError
from recipes.lr_rule import DEFAULT_END_LR, DEFAULT_MULTIPLIER, DEFAULT_NUM_ITER, DEFAULT_START_LR

__all__ = ["lr_find", "sweep"]


@click.command("lr-find")
@recipe_argument
@click.option("--start-lr", type=float, default=DEFAULT_START_LR, show_default=True, help="LR of the first iteration.")
@click.option("--end-lr", type=float, default=DEFAULT_END_LR, show_default=True, help="LR the exponential ramp ends at.")
@click.option("--num-iter", type=int, default=DEFAULT_NUM_ITER, show_default=True, help="Iterations of the ramp (it "
              "stops earlier if the loss passes 5x its best).")
@click.option("--multiplier", type=float, default=DEFAULT_MULTIPLIER, show_default=True,
              help="Suggested max_lr = this x the LR where the smoothed loss had made 90% of its fall to its lowest "
              "(calibrated on whole runs: docs/watch.md).")
@click.option("--out", type=click.Path(file_okay=False),
              help="Folder for lr_find.png and lr_find.json (default: runs/RECIPE-lr-find-TIMESTAMP, or RUN_DIR).")
@config_options("data_dir", "batch_size", "image_size", "num_workers", "model", "weights", "precision")
@set_option
def lr_find(recipe: str, start_lr: float, end_lr: float, num_iter: int, multiplier: float, out: str | None,
            sets: tuple[str, ...], **options: object) -> None:
    """LR range test for RECIPE (or for the run in RUN_DIR): suggest one-cycle's max_lr, plot loss vs LR.

    \b
    The model, optimizer and data are RECIPE's; they are restored after the test, which trains on a
    throwaway trainer. Given a RUN_DIR, the results go into it and `kiln report RUN_DIR` compares the
    run's max_lr with the suggestion.
    Example:  kiln lr-find digits
              kiln lr-find imagefolder --data-dir photos --model resnet18 --weights DEFAULT
    """
    from recipes.report.plots import plot_lr_find
    from recipes.run.rundir import RunDir
    from recipes.tools.holdout import tuning_split
    from recipes.tools.lr_find import find_lr, format_result, save_lr_find

    cfg, default_out = recipe_or_run(recipe, sets, "lr-find", **options)
    cfg, note = tuning_split(cfg, overrides(sets, options))
    if note:
        click.echo(note)
    with output_folder(Path(out) if out else default_out) as out_dir:
        result = find_lr(cfg, start_lr=start_lr, end_lr=end_lr, num_iter=num_iter, multiplier=multiplier)
        click.echo(format_result(result, cfg.name))  # before writing: a full disk loses no result
        json_path = save_lr_find(result, out_dir)
        png_path = plot_lr_find(result, RunDir(out_dir).lr_find_plot, title=f"{cfg.name}: LR range test")
    click.echo(f"wrote {png_path} and {json_path}")


@click.command()
@recipe_argument
@click.option("--trials", type=int, required=True, help="Trials in the study (complete or pruned), shared by all workers.")
@click.option("--param", "params", multiple=True, metavar="KEY=SPEC", help="Search KEY (max_lr, weight_decay, "
              "label_smoothing, batch_size, or any section.key) over log:LOW:HIGH, LOW:HIGH, int:LOW:HIGH or "
              "choice:A,B,... (repeatable; default: max_lr, weight_decay, label_smoothing, batch_size around the recipe's).")
@config_option("epochs", help="Epochs of every trial.")
@config_option("max_lr", help="A fixed max_lr for every trial, or `auto`: the LR range test, once per batch size.")
@click.option("--storage", help="Optuna storage URL (SQLAlchemy: sqlite:///f.db, postgresql://...; default: "
              "sqlite in --out). Workers on one storage and --study share the study.")
@click.option("--study", "study_name", help="Study name (default: the recipe's name).")
@click.option("--pruner", type=click.Choice(["median", "none"]), default="median", show_default=True,
              help="Stop trials whose per-epoch val_accuracy is below the median of earlier trials.")
@click.option("--out", type=click.Path(file_okay=False), help="Sweep directory (default: runs/RECIPE-sweep); "
              "re-running the same command continues its study.")
@click.option("--mlflow", metavar="URI", help="Mirror the sweep to this MLflow tracking server (default: "
              "$KILN_MLFLOW_URI): a parent run for the study, each trial's run nested under it.")
@click.option("--mlflow-experiment", metavar="NAME", help="The MLflow experiment (default: the recipe's name).")
@click.option("--heartbeat", type=click.IntRange(min=1), default=10, hidden=True,
              help="Seconds between a worker's heartbeats; a trial silent for 3x this is marked failed.")
@set_option
def sweep(recipe: str, trials: int, params: tuple[str, ...], epochs: int | None, max_lr: object, storage: str | None,
          study_name: str | None, pruner: str, out: str | None, mlflow: str | None, mlflow_experiment: str | None,
          heartbeat: int, sets: tuple[str, ...]) -> None:
    """Search RECIPE's hyperparameters with Optuna (TPE, seeded; objective: best val_accuracy).

    \b
    Every trial is a kiln run in OUT/trials/NNN; weak trials are pruned after an epoch. At the end:
    a table, OUT/sweep.json, OUT/best.yaml (`kiln train OUT/best.yaml`), OUT/plots and OUT/sweep.html.
    Example:  kiln sweep digits --trials 12 --epochs 4
    Several workers: start `kiln sweep` with the same --storage URL and --study on each machine.
    """
    import io

    import optuna

    from recipes.report import finish_run
    from recipes.report.sweep_page import draw_sweep
    from recipes.tools.holdout import tuning_split
    from recipes.tools.sweep import SweepInterrupted, default_space, parse_param, run_sweep
    from recipes.tools.sweep.stop import quiet_failed_trials
    from recipes.tracking import require_mlflow_client

    if trials < 1:
        raise ConfigError(f"--trials must be >= 1, not {trials}")
    auto = max_lr == "auto"
    cfg = resolve_config(recipe, sets, epochs=epochs, max_lr=None if auto else max_lr)
    fixed = overrides(sets, {"epochs": epochs, "max_lr": None if auto else max_lr})
    cfg, note = tuning_split(cfg, fixed)
    if note:
        click.echo(note)
        fixed["data.val_fraction"] = cfg.data.val_fraction  # every trial holds it out
    space = [parse_param(p, cfg) for p in params] or default_space(cfg, with_max_lr=not auto and max_lr is None)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    server = require_mlflow_client(mlflow or "")
    try:  # an OSError ends the sweep and reaches main, which says it in one line: Optuna's lines about it go
        with quiet_failed_trials(OSError), output_folder(Path(out or f"runs/{cfg.name}-sweep")) as sweep_dir:
            run_sweep(recipe, cfg, space, n_trials=trials, out=sweep_dir, storage=storage, study_name=study_name,
                      pruner=pruner, auto_max_lr=auto, fixed=fixed, heartbeat_interval=heartbeat,
                      finish=lambda run_dir: finish_run(run_dir, io.StringIO()),  # each trial's report, not printed
                      draw=draw_sweep,  # and the sweep's page
                      mlflow=(server, mlflow_experiment or cfg.name) if server is not None else None)
    except SweepInterrupted as e:  # SIGTERM or Ctrl-C: one line, and the shell's status for the signal
        click.echo(f"kiln: {e}", err=True)
        sys.exit(128 + e.signum)
