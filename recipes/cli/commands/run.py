"""``kiln train`` and ``kiln resume``: parse, lock the run directory, hand the run to ``recipes.cli.jobs``."""
from __future__ import annotations

import functools
from pathlib import Path

import click

from recipes.cli.options import SectionedCommand, config_options, recipe_argument, resolve_config, set_option
from recipes.config import OPTION_KEYS, ConfigError
from recipes.words import plural

__all__ = ["TRAIN_SECTIONS", "resume", "train"]

#: ``kiln train --help``, in sections that each fit a screen.
TRAIN_SECTIONS = {
    "Data": ("data_dir", "download", "batch_size", "image_size", "val_fraction", "num_workers"),
    "Model": ("model", "weights"),
    "Optimisation": ("epochs", "weight_decay", "label_smoothing", "clip_norm", "accumulation_steps", "ema",
                     "mixup", "cutmix", "early_stop"),
    "Schedule (one-cycle)": ("lr", "max_lr"),
    "Precision and speed": ("precision", "device", "channels_last", "compile"),
    "Divergence guard": ("on_nan",),
    "Run directory and checkpoints": ("out", "resume_from", "force", "seed", "quiet", "report"),
    "Several processes": ("nproc_per_node", "backend"),
    "MLflow tracking server (docs/mlflow.md)": ("mlflow", "mlflow_experiment", "mlflow_required", "mlflow_log_model"),
    "Any config key, and help": ("sets", "help"),
}


@click.command(cls=SectionedCommand, sections=TRAIN_SECTIONS)
@recipe_argument
@config_options(*OPTION_KEYS)  # a flag for every key OPTION_KEYS names, declared with the key
@click.option("--out", type=click.Path(file_okay=False), help="Run directory (default: runs/RECIPE-TIMESTAMP).")
@click.option("--quiet", is_flag=True, help="No progress bar and no epoch lines; only the final lines.")
@click.option("--no-report", "report", flag_value=False, default=True, help="Skip the end-of-run report (the "
              "mistakes pass, plots/, report.html, the findings), as a batch job that compares runs later may; "
              "`kiln report RUN_DIR` draws it at any time.")
@click.option("--resume", "resume_from", type=click.Path(dir_okay=False),
              help="Continue the run of this last.pt (in its run directory) with this config.")
@click.option("--force", is_flag=True, help="With --resume: continue even if the config changes the run. With "
              "--out: start over a run there that stopped before its first checkpoint.")
@click.option("--nproc-per-node", type=click.IntRange(min=1), default=1, show_default=True,
              help="Data-parallel processes to spawn on this machine (ignite.distributed). --batch-size is per "
              "process: the global batch is N times larger, and the LR is not rescaled.")
@click.option("--backend", type=click.Choice(["gloo", "nccl"]), help="torch.distributed backend (default: nccl "
              "with CUDA, else gloo).")
@set_option
def train(recipe: str, out: str | None, quiet: bool, report: bool, resume_from: str | None, force: bool,
          nproc_per_node: int, backend: str | None, sets: tuple[str, ...], **options: object) -> None:
    """Train RECIPE and write a run directory.

    \b
    Example:  kiln train digits --epochs 5 --max-lr 0.02 --out runs/d5
    Stop it with Ctrl-C or SIGTERM: it saves, and `kiln resume RUN_DIR` continues it.
    Exit status: 0 done, 2 bad input, 3 diverged (NaN/Inf or an exploding loss --on-nan could not fix),
    1 an OS error during the run (one line: a full or read-only disk, and the file), 130 Ctrl-C.
    Several processes: --nproc-per-node N here, or under torchrun (see docs/distributed.md).
    """
    from recipes.cli import jobs
    from recipes.run import make_run_dir, plan_resume
    from recipes.run.lock import discarded_on_failure
    from recipes.tracking import require_mlflow_client

    auto_max_lr = options.get("max_lr") == "auto"
    if auto_max_lr:
        options["max_lr"] = None
    cfg = resolve_config(recipe, sets, **options)
    require_mlflow_client(cfg.tracking.mlflow_uri)
    world_size = jobs.world_size(nproc_per_node)
    if auto_max_lr and world_size > 1:
        raise ConfigError("--max-lr auto runs in one process: run `kiln lr-find` first and pass its --max-lr")
    if resume_from is not None:
        if out is not None:
            raise ConfigError("--resume continues in the checkpoint's own run directory; drop --out")
        if auto_max_lr:
            raise ConfigError("--max-lr auto chooses the LR of a new run; it cannot be used with --resume")
        jobs.take_for_resume(resume_from)
        plan_resume(resume_from, requested=cfg, force=force, world_size=world_size)
        job = functools.partial(jobs.resume_job, resume_from, dict(requested=cfg, force=force, quiet=quiet),
                                report=report, mlflow=cfg.tracking.mlflow_uri or None)
        jobs.run_job(job, nproc_per_node, backend, Path(resume_from).parent.parent)
        return
    run_dir = make_run_dir(cfg, out, force=force, writes=jobs.is_rank_zero())  # locked, before any data loads
    if not quiet and jobs.is_rank_zero():
        parallel = f" in {world_size} processes (global batch {cfg.data.batch_size * world_size})" if world_size > 1 else ""
        click.echo(f"kiln: training {cfg.name} for {plural(cfg.train.epochs, 'epoch')}{parallel} into {run_dir}")
    with discarded_on_failure(run_dir):  # bad data or options found later leave no run directory behind
        jobs.run_job(functools.partial(jobs.train_job, cfg, run_dir, quiet, auto_max_lr, report), nproc_per_node,
                     backend, run_dir)


@click.command()
@click.argument("run_dir", type=click.Path())
@click.option("--epochs", type=int, help="Run to this many epochs in all (needs --new-schedule if it changes).")
@click.option("--new-schedule", is_flag=True, help="With --epochs: a second one-cycle over the added epochs.")
@click.option("--quiet", is_flag=True, help="No progress bar and no epoch lines; only the final lines.")
@click.option("--no-report", "report", flag_value=False, default=True, help="Skip the end-of-run report (the "
              "mistakes pass, plots/, report.html, the findings), as a batch job that compares runs later may; "
              "`kiln report RUN_DIR` draws it at any time.")
@click.option("--nproc-per-node", type=click.IntRange(min=1), default=1, show_default=True,
              help="Data-parallel processes: as many as the run was started with.")
@click.option("--backend", type=click.Choice(["gloo", "nccl"]), help="torch.distributed backend.")
@click.option("--mlflow", metavar="URI", help="Mirror the run to this MLflow tracking server (default: the run's "
              "own --mlflow, else $KILN_MLFLOW_URI, else the server it was last mirrored to, whose MLflow run it "
              "continues).")
def resume(run_dir: str, epochs: int | None, new_schedule: bool, quiet: bool, report: bool, nproc_per_node: int,
           backend: str | None, mlflow: str | None) -> None:
    """Continue the run in RUN_DIR from its checkpoints/last.pt, exactly where it stopped.

    \b
    Example:  kiln resume runs/d5
    """
    from recipes.cli import jobs
    from recipes.run import plan_resume
    from recipes.tracking import require_mlflow_client

    require_mlflow_client(mlflow or "", run_dir)
    jobs.take_for_resume(run_dir)
    plan = plan_resume(run_dir, epochs=epochs, new_schedule=new_schedule, world_size=jobs.world_size(nproc_per_node))
    if plan.finished:
        click.echo(f"{run_dir} has already finished ({plan.iteration // plan.epoch_length} of "
                   f"{plural(plan.saved.train.epochs, 'epoch')}); nothing to resume (use --epochs N --new-schedule to "
                   "train further)")
        return
    if not quiet and jobs.is_rank_zero():
        click.echo(f"kiln: resuming {run_dir} at iteration {plan.iteration}")
    job = functools.partial(jobs.resume_job, run_dir, dict(epochs=epochs, new_schedule=new_schedule, quiet=quiet),
                            report=report, mlflow=mlflow)
    jobs.run_job(job, nproc_per_node, backend, plan.last.parent.parent)
