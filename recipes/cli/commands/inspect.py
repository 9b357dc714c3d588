"""The commands that read a recipe or a run without training: ``kiln recipes``, ``show``, ``schedule``,
``report`` and ``eval``."""
from __future__ import annotations

from pathlib import Path

import click
import yaml

from recipes import RECIPES
from recipes.cli.folders import output_folder, writable_or_none
from recipes.cli.options import config_option, config_options, recipe_argument, recipe_or_run, resolve_config, set_option
from recipes.config import config_docs, config_to_dict

__all__ = ["eval_", "recipes", "report", "schedule", "show"]


@click.command()
def recipes() -> None:
    """List the recipes, one line each."""
    width = max(len(n) for n in RECIPES)
    for name, cfg in RECIPES.items():
        click.echo(f"{name:<{width}}  {cfg.description}")


@click.command()
@recipe_argument
@set_option
@click.option("--explain", is_flag=True, help="Say what each key means, as a YAML comment beside it.")
def show(recipe: str, sets: tuple[str, ...], explain: bool) -> None:
    """Print the resolved config of RECIPE (YAML), with any --set overrides applied.

    With a line `base: RECIPE` added, the output is a recipe file: edit it and run `kiln train FILE.yaml`.
    """
    from recipes.pretrained import weights_comment

    cfg = resolve_config(recipe, sets)
    data = config_to_dict(cfg)
    click.echo(_explained_yaml(data, config_docs()) if explain else yaml.safe_dump(data, sort_keys=False).rstrip())
    comment = weights_comment(cfg.model.name, cfg.model.weights, cfg.data.image_size,
                              applies=cfg.data.dataset == "imagefolder")
    if comment is not None:  # comments: the output stays a recipe file's body
        click.echo(comment)


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


@click.command()
@recipe_argument
@config_options("epochs", "batch_size", "lr")
@config_option("max_lr", type=float, help="Peak LR of the one-cycle schedule.")  # a number here: no range test
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
    with output_folder(Path(out) if out else default_out) as out_dir:
        series = schedule_series(cfg)
        click.echo(format_schedule(series))
        json_path = save_schedule(series, out_dir)
        png_path = plot_schedule(series, RunDir(out_dir).schedule_plot)
    click.echo(f"wrote {png_path} and {json_path}")


@click.command()
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


@click.command("eval")
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

    with output_folder(Path(out) if out is not None else None) as folder:
        result = evaluate_checkpoint(checkpoint, device=device, batch_size=batch_size, data_dir=data_dir, tta=tta)
        if folder is None:  # the default place: the checkpoint's run directory, which may be someone else's
            folder = writable_or_none(eval_output_dir(checkpoint))
        title = f"{result['recipe']}: confusion matrix ({result['samples']} images{', flip TTA' if tta else ''})"
        png = None
        try:  # the figures are printed even if the picture cannot be written (a full disk): then one line, exit 1
            if folder is not None:
                png = plot_confusion_matrix(result["confusion_matrix"], result["class_names"],
                                            RunDir(folder).eval_confusion, title=title)
        finally:
            click.echo(format_evaluation({**result, "confusion_matrix_png": str(png) if png else None}, checkpoint))
