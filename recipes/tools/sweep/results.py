"""What a sweep leaves: the trials ranked, the table, ``best.yaml`` (a recipe file of the best trial) and
``sweep.json``. The page (plots and ``sweep.html``) is the report wing's: ``run_sweep(draw=...)``."""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import optuna
import yaml
from optuna.trial import TrialState

from callbacks.files import write_atomic, write_json_atomic
from recipes.config import Config, flatten_config
from recipes.recipe_files import is_recipe_file, load_recipe
from recipes.run.rundir import PLOTS

__all__ = ["SweepResult", "format_table", "format_value", "short_key", "trial_rows", "write_results"]


@dataclass
class SweepResult:
    """What a worker leaves: the study, its ranked trials and table, and the files written (``plots`` and
    ``html_path`` by the page, when one is drawn)."""

    study: optuna.Study
    out: Path
    rows: list[dict[str, Any]]
    table: str
    best_yaml: Path | None
    json_path: Path
    plots: list[Path] = field(default_factory=list)
    html_path: Path | None = None


def short_key(key: str) -> str:
    """``section.key`` without its section: what the table and the trial lines show."""
    return key.split(".", 1)[1]


def format_value(value: Any) -> str:
    """A parameter or an accuracy as the table shows it ("-" for none)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if 1e-2 <= abs(value) < 10 or value == 0 else f"{value:.3g}"
    return str(value)


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """Every trial but surplus ones and stopped ones another resumed: ranked completed trials first (best first),
    then pruned ones, then the rest."""
    rows = []
    trials = study.get_trials(deepcopy=False)
    resumed = {t.user_attrs.get("resumes") for t in trials}  # a stopped trial counts once: as the one resuming it
    for t in trials:
        if t.user_attrs.get("surplus") or (t.state == TrialState.FAIL and t.number in resumed):
            continue
        best = t.user_attrs.get("best_val_accuracy")
        if best is None and t.intermediate_values:
            best = max(t.intermediate_values.values())
        rows.append({"number": t.number, "state": t.state.name.lower(), "params": dict(t.params),
                     "best_val_accuracy": best, "epochs_run": t.user_attrs.get("epochs_run"),
                     "pruned": t.state == TrialState.PRUNED, "run_dir": t.user_attrs.get("run_dir"),
                     "value": t.value})
    order = {"complete": 0, "pruned": 1}
    rows.sort(key=lambda r: (order.get(r["state"], 2), -(r["best_val_accuracy"] or 0.0), r["number"]))
    rank = 0
    for r in rows:
        r["rank"] = (rank := rank + 1) if r["state"] in order else None
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """The results table: rank, trial, params, best accuracy, epochs run, pruned or not."""
    keys = list(dict.fromkeys(k for r in rows for k in r["params"]))
    head = ["rank", "trial"] + [short_key(k) for k in keys] + ["best_acc", "epochs", "pruned"]
    body = [[str(r["rank"] or "-"), f"{r['number']:03d}"] + [format_value(r["params"].get(k)) for k in keys]
            + [format_value(r["best_val_accuracy"]), format_value(r["epochs_run"]),
               "yes" if r["pruned"] else ("no" if r["state"] == "complete" else r["state"])] for r in rows]
    widths = [max(len(row[i]) for row in [head] + body) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in [head] + body)


def _write_best_yaml(study: optuna.Study, recipe: str, base: Config, path: Path) -> Path | None:
    """A recipe file: ``base: RECIPE`` and every key where the best trial's config differs from RECIPE's."""
    try:
        best = study.best_trial
    except ValueError:  # no completed trial yet
        return None
    if "config" not in best.user_attrs:
        return None
    recipe_cfg = flatten_config(load_recipe(recipe))
    changes = {k: v for k, v in best.user_attrs["config"].items() if recipe_cfg.get(k) != v}
    if recipe_cfg.get("data.val_fraction") == 0 and "data.val_fraction" in changes:
        changes.pop("data.val_fraction")  # tuned on a hold-out (recipes.tools.holdout); the final run reports on the test split
    source = str(Path(recipe).resolve()) if is_recipe_file(recipe) else recipe
    doc = {"base": source, "name": f"{base.name}-sweep-best",
           "description": f"kiln sweep {study.study_name}: trial {best.number}, best val_accuracy {best.value:.4f}",
           **changes}
    text = yaml.safe_dump(doc, sort_keys=False).encode()
    write_atomic(path, lambda f: f.write(text))
    return path


def write_results(study: optuna.Study, recipe: str, base: Config, out: Path, *, n_trials: int | None = None,
                  stream: TextIO | None = None, draw: Callable[[SweepResult], Any] | None = None) -> SweepResult:
    """The table (printed), DIR/best.yaml, the page (``draw(result)``: DIR/plots/*.png and DIR/sweep.html) and
    DIR/sweep.json."""
    rows = trial_rows(study)
    result = SweepResult(study, out, rows, format_table(rows), _write_best_yaml(study, recipe, base, out / "best.yaml"),
                         out / "sweep.json")
    if draw is not None:
        draw(result)
    best_row = next((r for r in rows if r["state"] == "complete"), None)
    write_json_atomic(result.json_path, {
        "study": study.study_name, "recipe": recipe, "direction": "maximize", "objective": "best val_accuracy",
        "n_trials": n_trials, "space": study.user_attrs.get("kiln", {}).get("space"),
        "fixed": study.user_attrs.get("kiln", {}).get("fixed"),
        "best": best_row, "best_yaml": str(result.best_yaml) if result.best_yaml else None,
        "trials": rows, "plots": [str(p) for p in result.plots],
    })
    stream = stream or sys.stdout
    print(result.table, file=stream)
    page = f"{result.html_path} (the trials, linked to their reports, and the plots), " if result.html_path else ""
    print(f"written: {page}{result.json_path}", file=stream)
    if result.best_yaml is not None:
        print(f"best: {result.best_yaml}; train it with: kiln train {result.best_yaml}", file=stream)
    if result.plots:
        print(f"plots: {out / PLOTS} ({', '.join(p.name for p in result.plots)})", file=stream)
    return result
