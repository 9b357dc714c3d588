"""``kiln train`` and ``kiln resume``: parse, lock the run directory, hand the run to ``recipes.cli.jobs``."""
from __future__ import annotations

import functools
from pathlib import Path

import click

from callbacks.nan_diagnosis import POLICIES
from engine.precision_names import PRECISIONS
from recipes.cli.options import MaxLR, SectionedCommand, recipe_argument, resolve_config, set_option
from recipes.config import ConfigError
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
    "Any config key, and help": ("sets", "help"),
}


@click.command(cls=SectionedCommand, sections=TRAIN_SECTIONS)
@recipe_argument
@click.option("--epochs", type=int, help="Passes over the training data.")
@click.option("--batch-size", type=int, help="Images per batch.")
@click.option("--lr", type=float, help="LR the one-cycle starts from (AdamW).")
@click.option("--max-lr", type=MaxLR(), help="Peak LR of the one-cycle schedule, or `auto`: run the LR range "
              "test first and train at its suggestion (recorded in config.json and events.jsonl).")
@click.option("--weight-decay", type=float, help="AdamW decoupled weight decay.")
@click.option("--label-smoothing", type=float, help="Cross-entropy label smoothing, in [0, 1).")
@click.option("--clip-norm", type=float, help="Clip the total gradient norm to this (0: measure only).")
@click.option("--precision", type=click.Choice(PRECISIONS), help="Autocast precision (auto: bf16 on a GPU or a CPU with AMX, else fp32 on the CPU).")
@click.option("--device", help="auto, cpu, cuda or cuda:N.")
@click.option("--seed", type=int, help="Seed of the split, init, batch order and per-step randomness.")
@click.option("--data-dir", type=click.Path(), help="Where the data set lives (cifar10: the folder holding "
              "cifar-10-batches-py/; imagefolder: train/ and val/ class folders).")
@click.option("--download", is_flag=True, default=None, help="cifar10: fetch the data set into --data-dir with "
              "torchvision's downloader if it is missing (needs a network).")
@click.option("--model", help="Network: small_cnn, resnet9, resnet18_32, or a torchvision classification model "
              "(resnet18, mobilenet_v3_small, efficientnet_b0, convnext_tiny, ...).")
@click.option("--weights", type=click.Path(dir_okay=False), help="Initial weights from this local file (a state "
              "dict; loaded with weights_only; nothing is downloaded).")
@click.option("--image-size", type=int, help="Images are resized/cropped to this side.")
@click.option("--val-fraction", type=float, help="Share held out for validation when the data has no val split.")
@click.option("--num-workers", type=int, help="DataLoader worker processes (image folders).")
@click.option("--on-nan", type=click.Choice(POLICIES),
              help="On NaN/Inf, an exploding loss or an fp16 loss-scale collapse: drop the update, roll back "
                   "and lower the LR (default), or stop (exit status 3).")
@click.option("--ema", type=float, metavar="DECAY", help="Keep an EMA of the weights with this decay (e.g. 0.999); "
              "validation, best-* checkpoints and `kiln eval` use it. 0: off.")
@click.option("--mixup", type=float, metavar="ALPHA", help="MixUp training batches, Beta(ALPHA, ALPHA) (e.g. 0.2). 0: off.")
@click.option("--cutmix", type=float, metavar="ALPHA", help="CutMix training batches, Beta(ALPHA, ALPHA) (e.g. 1.0). "
              "With --mixup too, each batch gets one of them. 0: off.")
@click.option("--early-stop", type=int, metavar="PATIENCE", help="Stop after PATIENCE epochs without a val_accuracy "
              "gain (min gain: --set train.early_stop_min_delta=D). 0: off.")
@click.option("--accumulation-steps", type=int, metavar="K", help="Batches per optimizer step (gradient accumulation).")
@click.option("--channels-last/--no-channels-last", default=None, help="Train and evaluate in the channels_last "
              "(NHWC) memory format (the default: faster convolutions and pooling, on CPUs too).")
@click.option("--compile", is_flag=True, default=None, help="torch.compile the training forward (backend: --set "
              "train.compile_backend=NAME); falls back to eager with a warning if compiling fails.")
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

    auto_max_lr = options.get("max_lr") == "auto"
    if auto_max_lr:
        options["max_lr"] = None
    cfg = resolve_config(recipe, sets, **options)
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
                                report=report)
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
def resume(run_dir: str, epochs: int | None, new_schedule: bool, quiet: bool, report: bool, nproc_per_node: int,
           backend: str | None) -> None:
    """Continue the run in RUN_DIR from its checkpoints/last.pt, exactly where it stopped.

    \b
    Example:  kiln resume runs/d5
    """
    from recipes.cli import jobs
    from recipes.run import plan_resume

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
                            report=report)
    jobs.run_job(job, nproc_per_node, backend, plan.last.parent.parent)
