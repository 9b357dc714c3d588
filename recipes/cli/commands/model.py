"""The commands that use a trained model: ``kiln predict`` and ``kiln export``."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from recipes.cli.folders import output_folder
from recipes.config import ConfigError, DataError

__all__ = ["export", "predict"]


@click.command()
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


@click.command()
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
    with output_folder(target.parent, "--out" if out is not None else "the checkpoint's folder"):
        try:
            result = export_checkpoint(checkpoint, fmt, target, dynamic_batch=dynamic_batch, check_batch=check_batch)
        except ExportFailed as e:
            click.echo(f"kiln: error: {e}", err=True)
            sys.exit(1)
    if result.note:
        click.echo(f"kiln: {result.note}", err=True)
    click.echo(format_export(result))
