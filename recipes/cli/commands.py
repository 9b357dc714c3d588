"""The ``kiln`` commands: parse, call the wing that does the work, print. No training logic here.

The heavy wings (``recipes.run``, ``recipes.tools``, ``recipes.report``) are imported inside the
commands that need them, so ``kiln recipes`` or ``kiln --help`` never loads them.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import click
import yaml

from callbacks.files import os_error_line
from callbacks.nan_diagnosis import POLICIES
from engine.precision_names import PRECISIONS
from recipes import RECIPES
from recipes.cli.allocator import tune_malloc
from recipes.cli.options import (
    MaxLR,
    SectionedCommand,
    overrides,
    recipe_argument,
    recipe_or_run,
    resolve_config,
    set_option,
)
from recipes.config import ConfigError, DataError, config_docs, config_to_dict
from recipes.words import plural

__all__ = ["TRAIN_SECTIONS", "cli", "main"]

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
@recipe_argument
@set_option
@click.option("--explain", is_flag=True, help="Say what each key means, as a YAML comment beside it.")
def show(recipe: str, sets: tuple[str, ...], explain: bool) -> None:
    """Print the resolved config of RECIPE (YAML), with any --set overrides applied.

    With a line `base: RECIPE` added, the output is a recipe file: edit it and run `kiln train FILE.yaml`.
    """
    cfg = resolve_config(recipe, sets)
    data = config_to_dict(cfg)
    click.echo(_explained_yaml(data, config_docs()) if explain else yaml.safe_dump(data, sort_keys=False).rstrip())


def _explained_yaml(data: dict, docs: dict[str, str]) -> str:
    """``data`` as YAML, one key a line, each followed by ``# its meaning`` from ``docs`` (by dotted key)."""
    def line(key: str, value: object, indent: str, path: str) -> tuple[str, str]:
        text = yaml.safe_dump({key: value}, sort_keys=False, default_flow_style=True, width=10**9).strip()
        return indent + text[1:-1], docs.get(path, "")  # flow style wraps the mapping in {}

    rows: list[tuple[str, str]] = []
    for key, value in data.items():
        if isinstance(value, dict):
            rows.append((f"{key}:", ""))
            rows += [line(k, v, "  ", f"{key}.{k}") for k, v in value.items()]
        else:
            rows.append(line(key, value, "", key))
    width = max(len(text) for text, doc in rows if doc)
    return "\n".join(f"{text:<{width}}  # {doc}" if doc else text for text, doc in rows)


@cli.command(cls=SectionedCommand, sections=TRAIN_SECTIONS)
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


@cli.command()
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


@cli.command("eval")
@click.argument("checkpoint", type=click.Path())
@click.option("--device", help="auto, cpu, cuda or cuda:N (default: auto, CUDA when there is one).")
@click.option("--batch-size", type=int, help="Images per evaluation batch.")
@click.option("--data-dir", type=click.Path(), help="Evaluate the data set here instead: its test files, or an "
              "image folder's val/ (else all its images). Not for digits or synthetic.")
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
    from recipes.report.plots import plot_confusion_matrix
    from recipes.run.evaluate import eval_output_dir, evaluate_checkpoint, format_evaluation
    from recipes.run.rundir import RunDir

    with _output_folder(Path(out) if out is not None else None) as folder:
        result = evaluate_checkpoint(checkpoint, device=device, batch_size=batch_size, data_dir=data_dir, tta=tta)
        if folder is None:  # the default place: the checkpoint's run directory, which may be someone else's
            folder = _writable_or_none(eval_output_dir(checkpoint))
        title = f"{result['recipe']}: confusion matrix ({result['samples']} images{', flip TTA' if tta else ''})"
        png = None
        try:  # the figures are printed even if the picture cannot be written (a full disk): then one line, exit 1
            if folder is not None:
                png = plot_confusion_matrix(result["confusion_matrix"], result["class_names"],
                                            RunDir(folder).eval_confusion, title=title)
        finally:
            click.echo(format_evaluation({**result, "confusion_matrix_png": str(png) if png else None}, checkpoint))


@cli.command()
@click.argument("checkpoint", type=click.Path())
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@click.option("--top-k", type=click.IntRange(min=1), help="Classes per input (default: 3, or fewer if the model "
              "has fewer).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True, help="Images per forward pass.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True,
              help="table: aligned columns; json: one array of objects; csv: input,label,class_1,p_1,...")
@click.option("--out", type=click.Path(dir_okay=False), help="Write the predictions to this file (atomically) "
              "instead of stdout.")
@click.option("--device", help="auto, cpu, cuda or cuda:N (default: auto, CUDA when there is one).")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), help="Autocast precision (default: the "
              "one the checkpoint was validated in; fp32 matches an fp32 exported file).")
@click.option("--tta", is_flag=True, help="Test-time augmentation: average the logits of each image and its mirror.")
@click.option("--workers", type=click.IntRange(min=0), help="DataLoader processes decoding the images "
              "(default: min(4, CPU cores); 0: in this process).")
def predict(checkpoint: str, inputs: tuple[str, ...], top_k: int | None, batch_size: int, fmt: str, out: str | None,
            device: str | None, precision: str | None, tta: bool, workers: int | None) -> None:
    """Classify images with CHECKPOINT (best-*.pt or last.pt): one row per input with its top classes.

    \b
    INPUT: image files (any mode and size: converted as validation did), folders (searched
    recursively for .png, .jpg, ... files), IDX image files (*-images-idx3-ubyte[.gz]) or CIFAR
    batch files (data_batch_N, test_batch). Inputs in a folder named like a class, IDX files with
    their labels file beside them and CIFAR batches are labelled: the last line on stderr is then
    the top-1 accuracy.
    Example:  kiln predict runs/d5/checkpoints/best-*.pt photos/ --format csv --out predictions.csv
    Exit status: 0 all read, 1 some inputs skipped (one line each on stderr), 2 none could be read
    or a bad checkpoint.
    """
    from recipes.run import load
    from recipes.tools.predict import find_inputs, format_rows, predict as classify, top1_accuracy, write_rows

    if out is not None and Path(out).is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file name")
    trained = load(checkpoint, device=device, precision=precision)
    if top_k is not None and top_k > len(trained.class_names):
        raise ConfigError(f"--top-k {top_k}: {checkpoint} has {len(trained.class_names)} classes")
    found = find_inputs(inputs, trained.class_names)
    for line in found.warnings:
        click.echo(f"kiln: warning: {line}", err=True)
    for path, why in found.skipped:
        click.echo(f"kiln: skipped {path}: {why}", err=True)
    if not found.inputs:
        raise DataError(f"no input could be read ({len(found.skipped)} skipped)")
    rows, failed = classify(trained, found, top_k=top_k, batch_size=batch_size, workers=workers, tta=tta)
    for name, why in failed:
        click.echo(f"kiln: skipped {name}: {why}", err=True)
    if not rows:
        raise DataError(f"no input could be read ({len(found.skipped) + len(failed)} skipped)")
    text = format_rows(rows, fmt)
    if out is None:
        click.echo(text)
    else:
        write_rows(text, out)
        click.echo(f"kiln: wrote {len(rows)} prediction{'s' * (len(rows) != 1)} to {out}", err=True)
    correct, labelled = top1_accuracy(rows)
    if labelled:
        click.echo(f"top-1 accuracy {correct / labelled:.4f} on {labelled} labelled input{'s' * (labelled != 1)}",
                   err=True)
    if found.skipped or failed:
        sys.exit(1)


@cli.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["torchscript", "exported", "onnx"]),
              help="torchscript: torch.jit.trace (.ts; TorchScript is deprecated in PyTorch but LibTorch and older "
              "runtimes load it). exported: torch.export (.pt2, the format PyTorch is moving to). onnx: the dynamo "
              "ONNX exporter (.onnx; needs pip install 'kiln[onnx]'). Default: from --out's suffix.")
@click.option("--out", type=click.Path(), help="File to write, or a folder for the default name (default: beside "
              "CHECKPOINT, same name, suffix .ts, .pt2 or .onnx).")
@click.option("--dynamic-batch", is_flag=True, help="The file takes batches of any size (.pt2, .onnx). Without it, "
              ".pt2 and .onnx files take batches of exactly 1 and refuse others; a traced .ts takes any batch size "
              "either way, but only batches of 1 are checked and promised.")
@click.option("--check-batch", type=click.IntRange(min=1), default=64, show_default=True, metavar="N",
              help="Validation images the check runs through the eager and the exported model.")
def export(checkpoint: str, fmt: str | None, out: str | None, dynamic_batch: bool, check_batch: int) -> None:
    """Export CHECKPOINT's model for use without kiln: TorchScript, torch.export or ONNX, fp32 on the CPU.

    \b
    The file carries kiln.json (class names, preprocessing, input size; an ONNX metadata property
    `kiln`); docs/use-the-model.md shows how to use it with torch (or onnxruntime) alone. Before writing, the
    exported model, loaded back, must give the same top-1 as eager on N validation images and logits
    within 1e-4 * max(1, max |logit|).
    Example:  kiln export runs/d5/checkpoints/best-epoch5-val_accuracy=0.9944.pt --format onnx --dynamic-batch
    Exit status: 0 written, 1 the export failed or did not match (nothing written), 2 bad input.
    """
    from recipes.tools.export import (
        ExportFailed,
        default_output,
        export_checkpoint,
        format_export,
        require_onnx,
        resolve_format,
    )

    fmt = resolve_format(fmt, out)
    if fmt == "onnx":
        require_onnx()
    target = default_output(checkpoint, fmt, out)
    with _output_folder(target.parent, "--out" if out is not None else "the checkpoint's folder"):
        try:
            result = export_checkpoint(checkpoint, fmt, target, dynamic_batch=dynamic_batch, check_batch=check_batch)
        except ExportFailed as e:
            click.echo(f"kiln: error: {e}", err=True)
            sys.exit(1)
    if result.note:
        click.echo(f"kiln: {result.note}", err=True)
    click.echo(format_export(result))


@cli.command("lr-find")
@recipe_argument
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
    from recipes.report.plots import plot_lr_find
    from recipes.run.rundir import RunDir
    from recipes.tools.lr_find import find_lr, format_result, save_lr_find

    cfg, default_out = recipe_or_run(recipe, sets, "lr-find")
    with _output_folder(Path(out) if out else default_out) as out_dir:
        result = find_lr(cfg, start_lr=start_lr, end_lr=end_lr, num_iter=num_iter, divide_by=divide_by)
        click.echo(format_result(result, cfg.name))  # before writing: a full disk loses no result
        json_path = save_lr_find(result, out_dir)
        png_path = plot_lr_find(result, RunDir(out_dir).lr_find_plot, title=f"{cfg.name}: LR range test")
    click.echo(f"wrote {png_path} and {json_path}")


@cli.command()
@recipe_argument
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
    from recipes.report.plots import plot_schedule
    from recipes.run.rundir import RunDir
    from recipes.tools.schedule import format_schedule, save_schedule, schedule_series

    cfg, default_out = recipe_or_run(recipe, sets, "schedule", **options)
    with _output_folder(Path(out) if out else default_out) as out_dir:
        series = schedule_series(cfg)
        click.echo(format_schedule(series))
        json_path = save_schedule(series, out_dir)
        png_path = plot_schedule(series, RunDir(out_dir).schedule_plot)
    click.echo(f"wrote {png_path} and {json_path}")


@cli.command()
@recipe_argument
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
    import io

    import optuna

    from recipes.report import finish_run
    from recipes.tools.sweep import (
        SweepInterrupted,
        default_space,
        parse_param,
        run_sweep,
    )

    if trials < 1:
        raise ConfigError(f"--trials must be >= 1, not {trials}")
    auto = max_lr == "auto"
    cfg = resolve_config(recipe, sets, epochs=epochs, max_lr=None if auto else max_lr)
    fixed = overrides(sets, {"epochs": epochs, "max_lr": None if auto else max_lr})
    space = [parse_param(p, cfg) for p in params] or default_space(cfg, with_max_lr=not auto and max_lr is None)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("optuna.study._optimize").addFilter(_QuietOSErrorTrials())
    try:
        with _output_folder(Path(out or f"runs/{cfg.name}-sweep")) as sweep_dir:
            run_sweep(recipe, cfg, space, n_trials=trials, out=sweep_dir, storage=storage, study_name=study_name,
                      pruner=pruner, auto_max_lr=auto, fixed=fixed, heartbeat_interval=heartbeat,
                      finish=lambda run_dir: finish_run(run_dir, io.StringIO()))  # each trial's report, not printed
    except SweepInterrupted as e:
        click.echo(f"kiln: {e}", err=True)
        sys.exit(130)


@cli.command()
@click.argument("run_dir", type=click.Path())
def report(run_dir: str) -> None:
    """Re-draw RUN_DIR/plots, recompute the findings and write RUN_DIR/report.html (with what the best
    checkpoint gets wrong, measured again if the checkpoint is newer than mistakes.json).

    \b
    Example:  kiln report runs/d5
    """
    from recipes.report import format_findings, write_report
    from recipes.report.mistakes import measure_mistakes
    from recipes.run import RunLock
    from recipes.run.rundir import RunDir

    RunLock.take(run_dir, create=False)  # no other kiln process writes the run meanwhile
    measure_mistakes(run_dir)
    result = write_report(run_dir)
    if result.run.summary_note:
        click.echo(f"kiln: {result.run.summary_note}", err=True)
    click.echo(format_findings(result.findings))
    click.echo(f"plots: {', '.join(p.name for p in result.plots)} in {RunDir(run_dir).plots}")
    click.echo(f"report: {result.html_path}")


@contextlib.contextmanager
def _output_folder(folder: Path | None, option: str = "--out") -> Iterator[Path | None]:
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


def _writable_or_none(folder: Path) -> Path | None:
    """``folder`` if a file can be made in it, else None with one line on stderr saying why."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        click.echo(f"kiln: not writing confusion_matrix.png: {os_error_line(e, folder)} (pick a folder with --out)",
                   err=True)
        return None
    return folder


class _QuietOSErrorTrials(logging.Filter):
    """Drop optuna's two lines about a trial that failed with an OSError (its traceback, then its value):
    the OSError ends the sweep and reaches :func:`main`, which says it in one line."""

    def __init__(self) -> None:
        super().__init__()
        self.trials: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether to keep ``record`` ("Trial N failed ...")."""
        trial = record.getMessage().split(" failed", 1)[0]
        if record.exc_info and isinstance(record.exc_info[1], OSError):
            self.trials.add(trial)
            return False
        return trial not in self.trials


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
