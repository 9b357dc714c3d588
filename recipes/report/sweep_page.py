"""A sweep's page: the Optuna plots (optimization history, importances, per-epoch accuracies, accuracy vs
max_lr and label smoothing) as PNGs in ``DIR/plots`` and ``DIR/sweep.html``, styled as report.html is."""
from __future__ import annotations

import base64
import html
import os
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from callbacks.files import write_atomic
from recipes.report.html_style import STYLESHEET
from recipes.run.rundir import PLOTS, RunDir
from recipes.tools.sweep.results import SweepResult, format_value, short_key

__all__ = ["draw_sweep"]


def draw_sweep(result: SweepResult) -> None:
    """Draw ``result``'s plots and sweep.html into its directory; sets ``result.plots`` and ``result.html_path``."""
    space_keys = list(dict.fromkeys(k for r in result.rows for k in r["params"]))
    result.plots = _plots(result.study, result.out, space_keys)
    result.html_path = result.out / "sweep.html"
    page = _html(result.study, result.rows, result.out, result.plots, result.best_yaml).encode()
    write_atomic(result.html_path, lambda f: f.write(page))


def _plots(study: optuna.Study, out: Path, space_keys: list[str]) -> list[Path]:
    """Optimization history, parameter importances and accuracy vs max_lr / label smoothing, as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    plots_dir = out / PLOTS  # where a run directory keeps its plots
    plots_dir.mkdir(parents=True, exist_ok=True)
    wanted: list[tuple[str, Any]] = [("optimization_history", lambda: ovm.plot_optimization_history(study)),
                                     ("param_importances", lambda: ovm.plot_param_importances(study)),
                                     ("intermediate_values", lambda: ovm.plot_intermediate_values(study)),
                                     ("parallel_coordinate", lambda: ovm.plot_parallel_coordinate(study))]
    for key in ("schedule.max_lr", "train.label_smoothing"):
        if key in space_keys:
            wanted.append((f"accuracy_vs_{short_key(key)}", lambda key=key: ovm.plot_slice(study, params=[key])))
    written = []
    completed = sum(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False))
    for name, draw in wanted:
        if completed < (2 if name in ("param_importances", "parallel_coordinate") else 1):
            continue
        if name == "intermediate_values" and not any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optuna's ExperimentalWarning for its matplotlib plots
            try:
                ax = draw()
            except (ValueError, RuntimeError, ZeroDivisionError):  # e.g. importances of a parameter that never varied
                plt.close("all")
                continue
        first = ax.flat[0] if hasattr(ax, "flat") else ax
        if name == "intermediate_values":
            first.set_xlabel("epoch")
            first.set_ylabel("val_accuracy (each trial)")
        elif name not in ("param_importances", "parallel_coordinate"):
            first.set_ylabel("best val_accuracy")
        if name.startswith("accuracy_vs_"):
            first.set_title(f"{study.study_name}: best val_accuracy vs {name[len('accuracy_vs_'):]}")
        fig = first.figure
        fig.set_size_inches(7, 4.5)
        fig.tight_layout()
        path = plots_dir / f"{name}.png"
        try:
            write_atomic(path, lambda f, fig=fig: fig.savefig(f, format="png", dpi=100))
        finally:
            plt.close(fig)
        written.append(path)
    return written


def _html(study: optuna.Study, rows: list[dict[str, Any]], out: Path, plots: list[Path], best_yaml: Path | None) -> str:
    """sweep.html: the trials (each linked to its run's report.html), best.yaml and the plots, styled as
    report.html is."""
    e = html.escape
    keys = list(dict.fromkeys(k for r in rows for k in r["params"]))
    head = "".join(f"<th>{e(h)}</th>" for h in ["rank", "trial", *keys, "best val_accuracy", "epochs", "state", "report"])
    body = []
    for r in rows:
        run_dir = Path(r["run_dir"]) if r.get("run_dir") else None
        report = RunDir(run_dir).report if run_dir is not None else None
        link = (f'<a href="{e(os.path.relpath(report, out))}">report</a>' if report is not None and report.exists()
                else "")
        cells = [r["rank"] or "-", f"{r['number']:03d}", *[format_value(r["params"].get(k)) for k in keys],
                 format_value(r["best_val_accuracy"]), format_value(r["epochs_run"]),
                 "pruned" if r["pruned"] else r["state"]]
        body.append("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in cells) + f"<td>{link}</td></tr>")
    imgs = "\n".join(f'<figure><img src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode("ascii")}" '
                     f'alt="{e(p.stem)}"><figcaption>{e(p.stem.replace("_", " "))}</figcaption></figure>' for p in plots)
    best = f"<pre>{e(best_yaml.read_text())}</pre>" if best_yaml else "<p>no completed trial yet</p>"
    train = f'<code class="cmd">kiln train {e(str(best_yaml))}</code>' if best_yaml else ""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>kiln sweep {e(study.study_name)}</title>"
            f"<style>{STYLESHEET}</style></head><body><main><h1>kiln sweep: {e(study.study_name)}</h1>"
            f"<div class='sub'>{len(rows)} trials, objective: best val_accuracy (maximised)</div>"
            f"<h2>Trials</h2><table><tr>{head}</tr>{''.join(body)}</table>"
            f"<h2>best.yaml</h2>{best}{train}<h2>Plots</h2>{imgs}</main></body></html>")
