"""The ``kiln`` command line: a thin click layer over ``recipes``."""
from __future__ import annotations

import functools
import json
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click
import yaml

from recipes import RECIPES
from recipes.allocator import tune_malloc
from recipes.config import Config, ConfigError, apply_overrides, config_to_dict
from recipes.data import DataError
from recipes.launch import LAUNCHER_SIGNALS, exit_now_if_distributed, launch, under_torchrun
from recipes.recipe_files import load_recipe

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
    "data_dir": "data.data_dir", "download": "data.download", "model": "model.name", "weights": "model.weights",
    "image_size": "data.image_size", "val_fraction": "data.val_fraction", "num_workers": "data.num_workers",
    "ema": "train.ema_decay", "mixup": "train.mixup_alpha", "cutmix": "train.cutmix_alpha",
    "early_stop": "train.early_stop_patience", "accumulation_steps": "train.accumulation_steps",
    "channels_last": "train.channels_last", "compile": "train.compile",
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
    """RECIPE (a registered name or a .yaml/.yml recipe file) with ``--set`` overrides, then explicit options.

    Precedence, lowest first: the recipe, the recipe file, ``--set``, explicit options.
    """
    cfg = load_recipe(recipe)
    overrides = _parse_sets(sets)
    overrides.update({OPTION_KEYS[k]: v for k, v in options.items() if v is not None})
    return apply_overrides(cfg, overrides)


set_option = click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                          help="Override any config key, e.g. --set schedule.pct_start=0.3 (repeatable).")


class MaxLR(click.ParamType):
    """A positive number, or ``auto`` (run the LR range test and use its suggestion)."""

    name = "FLOAT|auto"

    def convert(self, value: object, param: object, ctx: object) -> float | str:
        """``"auto"``, or the value as a float (click reports anything else as a usage error)."""
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        try:
            return float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            self.fail(f"{value!r} is neither a number nor 'auto'", param, ctx)  # type: ignore[arg-type]


def _recipe_or_run(recipe: str, sets: tuple[str, ...], kind: str, **options: object) -> tuple[Config, Path]:
    """RECIPE's config (or the config.json of the run directory RECIPE) and where its outputs go by default."""
    import datetime as _dt
    import json

    from recipes.config import config_from_dict

    source = Path(recipe)
    if (source / "config.json").is_file():
        overrides = _parse_sets(sets)
        overrides.update({OPTION_KEYS[k]: v for k, v in options.items() if v is not None})
        return apply_overrides(config_from_dict(json.loads((source / "config.json").read_text())), overrides), source
    cfg = resolve_config(recipe, sets, **options)
    return cfg, Path("runs") / f"{cfg.name}-{kind}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


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
@click.option("--max-lr", type=MaxLR(), help="Peak LR of the one-cycle schedule, or `auto`: run the LR range "
              "test first and train at its suggestion (recorded in config.json and events.jsonl).")
@click.option("--weight-decay", type=float, help="AdamW decoupled weight decay.")
@click.option("--label-smoothing", type=float, help="Cross-entropy label smoothing, in [0, 1).")
@click.option("--clip-norm", type=float, help="Clip the total gradient norm to this (0: measure only).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), help="Autocast precision.")
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
@click.option("--on-nan", type=click.Choice(["skip", "rollback", "stop"]),
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
@click.option("--resume", "resume_from", type=click.Path(dir_okay=False),
              help="Continue the run of this last.pt (in its run directory) with this config.")
@click.option("--force", is_flag=True, help="With --resume: continue even if the config changes the run.")
@click.option("--nproc-per-node", type=click.IntRange(min=1), default=1, show_default=True,
              help="Data-parallel processes to spawn on this machine (ignite.distributed). --batch-size is per "
              "process: the global batch is N times larger, and the LR is not rescaled.")
@click.option("--backend", type=click.Choice(["gloo", "nccl"]), help="torch.distributed backend (default: nccl "
              "with CUDA, else gloo).")
@set_option
def train(recipe: str, out: str | None, quiet: bool, resume_from: str | None, force: bool, nproc_per_node: int,
          backend: str | None, sets: tuple[str, ...], **options: object) -> None:
    """Train RECIPE and write a run directory.

    \b
    Example:  kiln train digits --epochs 5 --max-lr 0.02 --out runs/d5
    Stop it with Ctrl-C or SIGTERM: it saves, and `kiln resume RUN_DIR` continues it.
    Exit status: 0 done, 2 bad input, 3 diverged (NaN/Inf or an exploding loss --on-nan could not fix),
    130 Ctrl-C.
    Several processes: --nproc-per-node N here, or under torchrun (see the README).
    """
    from recipes.run import make_run_dir, plan_resume

    auto_max_lr = options.get("max_lr") == "auto"
    if auto_max_lr:
        options["max_lr"] = None
    cfg = resolve_config(recipe, sets, **options)
    world_size = _world_size(nproc_per_node)
    if auto_max_lr and world_size > 1:
        raise ConfigError("--max-lr auto runs in one process: run `kiln lr-find` first and pass its --max-lr")
    if resume_from is not None:
        if out is not None:
            raise ConfigError("--resume continues in the checkpoint's own run directory; drop --out")
        if auto_max_lr:
            raise ConfigError("--max-lr auto chooses the LR of a new run; it cannot be used with --resume")
        plan_resume(resume_from, requested=cfg, force=force, world_size=world_size)
        job = functools.partial(_resume_job, resume_from, dict(requested=cfg, force=force, quiet=quiet))
        _launch(job, nproc_per_node, backend, Path(resume_from).parent.parent)
        return
    run_dir = make_run_dir(cfg, out)
    if not quiet and _is_rank_zero():
        parallel = f" in {world_size} processes (global batch {cfg.data.batch_size * world_size})" if world_size > 1 else ""
        click.echo(f"kiln: training {cfg.name} for {cfg.train.epochs} epochs{parallel} into {run_dir}")
    _launch(functools.partial(_train_job, cfg, run_dir, quiet, auto_max_lr), nproc_per_node, backend, run_dir)


def _train_job(cfg: Config, run_dir: Path, quiet: bool, auto_max_lr: bool) -> int:
    from recipes.run import train as run_training

    return _final_lines(run_training(cfg, run_dir, quiet=quiet, auto_max_lr=auto_max_lr))


def _resume_job(source: str, options: dict) -> int:
    from recipes.run import resume as resume_run

    return _final_lines(resume_run(source, **options))


def _world_size(nproc_per_node: int) -> int:
    return nproc_per_node if nproc_per_node > 1 else int(os.environ.get("WORLD_SIZE", "1")) if under_torchrun() else 1


def _is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _launch(job: functools.partial, nproc_per_node: int, backend: str | None, run_dir: Path) -> None:
    """Run ``job`` here, under torchrun, or in spawned processes; exit with the run's status."""
    if nproc_per_node <= 1:
        code = launch(job, backend=backend)
        exit_now_if_distributed(code or 0)
        if code:
            sys.exit(code)
        return
    try:
        launch(job, nproc_per_node=nproc_per_node, backend=backend)
    except Exception as e:  # a rank raised: torch.multiprocessing reports its traceback above
        click.echo(f"kiln: a training process failed: {str(e).strip().splitlines()[-1]}", err=True)
        sys.exit(1)
    status = json.loads((run_dir / "summary.json").read_text()).get("status")
    if status == "diverged":
        sys.exit(EXIT_DIVERGED)
    if status == "interrupted" and signal.SIGINT in LAUNCHER_SIGNALS:
        sys.exit(130)


@cli.command()
@click.argument("run_dir", type=click.Path())
@click.option("--epochs", type=int, help="Run to this many epochs in all (needs --new-schedule if it changes).")
@click.option("--new-schedule", is_flag=True, help="With --epochs: a second one-cycle over the added epochs.")
@click.option("--quiet", is_flag=True, help="No progress bar and no epoch lines; only the final lines.")
@click.option("--nproc-per-node", type=click.IntRange(min=1), default=1, show_default=True,
              help="Data-parallel processes: as many as the run was started with.")
@click.option("--backend", type=click.Choice(["gloo", "nccl"]), help="torch.distributed backend.")
def resume(run_dir: str, epochs: int | None, new_schedule: bool, quiet: bool, nproc_per_node: int,
           backend: str | None) -> None:
    """Continue the run in RUN_DIR from its checkpoints/last.pt, exactly where it stopped.

    \b
    Example:  kiln resume runs/d5
    """
    from recipes.run import plan_resume

    plan = plan_resume(run_dir, epochs=epochs, new_schedule=new_schedule, world_size=_world_size(nproc_per_node))
    if plan.finished:
        click.echo(f"{run_dir} has already finished ({plan.iteration // plan.epoch_length} of {plan.saved.train.epochs} "
                   "epochs); nothing to resume (use --epochs N --new-schedule to train further)")
        return
    if not quiet and _is_rank_zero():
        click.echo(f"kiln: resuming {run_dir} at iteration {plan.iteration}")
    job = functools.partial(_resume_job, run_dir, dict(epochs=epochs, new_schedule=new_schedule, quiet=quiet))
    _launch(job, nproc_per_node, backend, plan.last.parent.parent)


@cli.command("eval")
@click.argument("checkpoint", type=click.Path())
@click.option("--device", help="auto, cpu, cuda or cuda:N (default: the recipe's).")
@click.option("--batch-size", type=int, help="Images per evaluation batch.")
@click.option("--data-dir", type=click.Path(), help="Evaluate on the data set here instead of the recipe's.")
@click.option("--tta", is_flag=True, help="Test-time augmentation: average the logits of each image and its mirror.")
@click.option("--out", type=click.Path(file_okay=False),
              help="Folder for confusion_matrix.png (default: the checkpoint's run directory).")
def eval_(checkpoint: str, device: str | None, batch_size: int | None, data_dir: str | None, tta: bool,
          out: str | None) -> None:
    """Evaluate CHECKPOINT (last.pt or best-*.pt) on its recipe's validation data.

    Prints per-class accuracy, the confusion matrix, and last the loss, top-1 accuracy and top-5
    accuracy (5 classes or more); writes confusion_matrix.png.

    \b
    Example:  kiln eval runs/d5/checkpoints/last.pt --tta
    """
    from recipes.evaluation import eval_output_dir, format_evaluation, plot_confusion_matrix
    from recipes.run import evaluate_checkpoint

    result = evaluate_checkpoint(checkpoint, device=device, batch_size=batch_size, data_dir=data_dir, tta=tta)
    title = f"{result['recipe']}: confusion matrix ({result['samples']} images{', flip TTA' if tta else ''})"
    png = plot_confusion_matrix(result["confusion_matrix"], result["class_names"],
                                Path(out or eval_output_dir(checkpoint)) / "confusion_matrix.png", title=title)
    click.echo(format_evaluation({**result, "confusion_matrix_png": str(png)}, checkpoint))


@cli.command("lr-find")
@click.argument("recipe")
@click.option("--start-lr", type=float, default=1e-7, show_default=True, help="LR of the first iteration.")
@click.option("--end-lr", type=float, default=10.0, show_default=True, help="LR the exponential ramp ends at.")
@click.option("--num-iter", type=int, default=100, show_default=True, help="Iterations of the ramp (it stops "
              "earlier if the smoothed loss passes 5x its best).")
@click.option("--divide-by", type=float, default=3.0, show_default=True,
              help="Suggested max_lr = the LR at the lowest smoothed loss / this.")
@click.option("--out", type=click.Path(file_okay=False),
              help="Folder for lr_find.png and lr_find.json (default: runs/RECIPE-lr-find-TIMESTAMP, or RUN_DIR).")
@set_option
def lr_find(recipe: str, start_lr: float, end_lr: float, num_iter: int, divide_by: float, out: str | None,
            sets: tuple[str, ...]) -> None:
    """LR range test for RECIPE (or for the run in RUN_DIR): suggest one-cycle's max_lr, plot loss vs LR.

    \b
    The model, optimizer and data are RECIPE's; they are restored after the test, which trains on a
    throwaway trainer. Given a RUN_DIR, the results go into it and `kiln report RUN_DIR` compares the
    run's max_lr with the suggestion.
    Example:  kiln lr-find digits
    """
    from recipes.lr_find import find_lr, format_result, write_lr_find

    cfg, default_out = _recipe_or_run(recipe, sets, "lr-find")
    result = find_lr(cfg, start_lr=start_lr, end_lr=end_lr, num_iter=num_iter, divide_by=divide_by)
    json_path, png_path = write_lr_find(result, Path(out) if out else default_out, title=f"{cfg.name}: LR range test")
    click.echo(format_result(result, cfg.name))
    click.echo(f"wrote {png_path} and {json_path}")


@cli.command()
@click.argument("recipe")
@click.option("--epochs", type=int, help="Passes over the training data.")
@click.option("--batch-size", type=int, help="Images per batch.")
@click.option("--lr", type=float, help="LR the one-cycle starts from.")
@click.option("--max-lr", type=float, help="Peak LR of the one-cycle schedule.")
@click.option("--out", type=click.Path(file_okay=False),
              help="Folder for schedule.png and schedule.json (default: runs/RECIPE-schedule-TIMESTAMP).")
@set_option
def schedule(recipe: str, out: str | None, sets: tuple[str, ...], **options: object) -> None:
    """Plot RECIPE's one-cycle LR and beta1 over the optimizer steps, without training.

    \b
    Example:  kiln schedule digits --epochs 20 --max-lr 0.02
    """
    from recipes.schedule import format_schedule, schedule_series, write_schedule

    cfg, default_out = _recipe_or_run(recipe, sets, "schedule", **options)
    series = schedule_series(cfg)
    png_path, json_path = write_schedule(series, Path(out) if out else default_out)
    click.echo(format_schedule(series))
    click.echo(f"wrote {png_path} and {json_path}")


@cli.command()
@click.argument("recipe")
@click.option("--trials", type=int, required=True, help="Trials in the study (complete or pruned), shared by all workers.")
@click.option("--param", "params", multiple=True, metavar="KEY=SPEC", help="Search KEY (max_lr, weight_decay, "
              "label_smoothing, batch_size, or any section.key) over log:LOW:HIGH, LOW:HIGH, int:LOW:HIGH or "
              "choice:A,B,... (repeatable; default: max_lr, weight_decay, label_smoothing, batch_size around the recipe's).")
@click.option("--epochs", type=int, help="Epochs of every trial.")
@click.option("--max-lr", type=MaxLR(), help="A fixed max_lr, or `auto`: the LR range test, once per batch size.")
@click.option("--storage", help="Optuna storage URL (SQLAlchemy: sqlite:///f.db, postgresql://...; default: "
              "sqlite in --out). Workers on one storage and --study share the study.")
@click.option("--study", "study_name", help="Study name (default: the recipe's name).")
@click.option("--pruner", type=click.Choice(["median", "none"]), default="median", show_default=True,
              help="Stop trials whose per-epoch val_accuracy is below the median of earlier trials.")
@click.option("--out", type=click.Path(file_okay=False), help="Sweep directory (default: runs/RECIPE-sweep); "
              "re-running the same command continues its study.")
@click.option("--heartbeat", type=click.IntRange(min=1), default=10, hidden=True,
              help="Seconds between a worker's heartbeats; a trial silent for 3x this is marked failed.")
@set_option
def sweep(recipe: str, trials: int, params: tuple[str, ...], epochs: int | None, max_lr: object, storage: str | None,
          study_name: str | None, pruner: str, out: str | None, heartbeat: int, sets: tuple[str, ...]) -> None:
    """Search RECIPE's hyperparameters with Optuna (TPE, seeded; objective: best val_accuracy).

    \b
    Every trial is a kiln run in OUT/trials/NNN; weak trials are pruned after an epoch. At the end:
    a table, OUT/sweep.json, OUT/best.yaml (`kiln train OUT/best.yaml`), OUT/plots and OUT/sweep.html.
    Example:  kiln sweep digits --trials 12 --epochs 4
    Several workers: start `kiln sweep` with the same --storage URL and --study on each machine.
    """
    import optuna

    from recipes.sweep import SweepInterrupted, default_space, parse_param, run_sweep

    if trials < 1:
        raise ConfigError(f"--trials must be >= 1, not {trials}")
    auto = max_lr == "auto"
    cfg = resolve_config(recipe, sets, epochs=epochs, max_lr=None if auto else max_lr)
    fixed = _parse_sets(sets)
    fixed.update({OPTION_KEYS[k]: v for k, v in (("epochs", epochs), ("max_lr", None if auto else max_lr)) if v is not None})
    space = [parse_param(p, cfg) for p in params] or default_space(cfg, with_max_lr=not auto and max_lr is None)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        run_sweep(recipe, cfg, space, n_trials=trials, out=Path(out or f"runs/{cfg.name}-sweep"), storage=storage,
                  study_name=study_name, pruner=pruner, auto_max_lr=auto, fixed=fixed, heartbeat_interval=heartbeat)
    except SweepInterrupted as e:
        click.echo(f"kiln: {e}", err=True)
        sys.exit(130)


@cli.command()
@click.argument("run_dir", type=click.Path())
def report(run_dir: str) -> None:
    """Re-draw RUN_DIR/plots, recompute the findings and write RUN_DIR/report.html.

    \b
    Example:  kiln report runs/d5
    """
    from recipes.report import format_findings, write_report

    result = write_report(run_dir)
    click.echo(format_findings(result.findings))
    click.echo(f"plots: {', '.join(p.name for p in result.plots)} in {result.html_path.parent / 'plots'}")
    click.echo(f"report: {result.html_path}")


def _final_lines(run: Assembly) -> int:
    """Print the final lines of a run (rank 0 only); return its exit status: 0, 3 diverged, 130 Ctrl-C."""
    from callbacks.nan_diagnosis import format_diagnosis

    summary = run.handlers["summary"]
    s = run.trainer.state
    if run.status == "diverged":
        if run.writes:
            click.echo(f"kiln: {format_diagnosis(s.diverged)}", err=True)
            click.echo(f"run directory: {run.run_dir} (summary.json status \"diverged\"; details in events.jsonl)")
        return EXIT_DIVERGED
    if run.status == "interrupted":
        name = signal.Signals(run.stop_signal).name if run.stop_signal else "a stop"
        if run.writes:
            click.echo(f"stopped by {name} at iteration {s.iteration} (epoch {s.epoch}); checkpoint saved. "
                       f"Continue with: kiln resume {run.run_dir}")
            click.echo(f"run directory: {run.run_dir}")
        return 130 if run.stop_signal == signal.SIGINT else 0
    if not run.writes:
        return 0
    best = summary.best_val_accuracy
    final = summary.final_val_accuracy
    figures = f"best val_accuracy {best:.4f}, final {final:.4f}" if best is not None else "no validation"
    click.echo(f"done in {summary.wall_seconds:.1f}s: {figures} ({run.device}, {run.precision.name})")
    early_stop = run.handlers.get("early_stop")
    if early_stop is not None and early_stop.stopped_epoch is not None and s.iteration < s.max_epochs * s.epoch_length:
        click.echo(f"stopped early after epoch {early_stop.stopped_epoch} of {s.max_epochs}: no val_accuracy gain "
                   f"above {early_stop.min_delta:g} in {early_stop.patience} epoch{'s' if early_stop.patience > 1 else ''}")
    click.echo(f"run directory: {run.run_dir}")
    return 0


def main(argv: list[str] | None = None) -> None:
    """Entry point: bad input gets one line on stderr and exit status 2, never a traceback.

    First it tunes glibc malloc (:func:`recipes.allocator.tune_malloc`: freed buffers stay in the
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
    sys.exit(code or 0)


if __name__ == "__main__":  # pragma: no cover
    main()
