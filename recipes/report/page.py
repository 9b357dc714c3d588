"""RUN_DIR/report.html: one self-contained page about a run (plots embedded), and the end-of-run report."""
from __future__ import annotations

import base64
import html
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from callbacks.files import os_error_line, write_atomic, write_json_atomic
from recipes.report.html_style import STYLESHEET
from recipes.report.findings import Finding, find_issues, fmt, format_findings
from recipes.report.plots import plot_run
from recipes.report.rundata import RunData, load_run
from recipes.run.rundir import CHECKPOINT_PLOTS, LR_FIND_PLOT, RUN_PLOTS, RunDir

__all__ = ["Report", "finish_run", "write_report"]


@dataclass(frozen=True)
class Report:
    """What :func:`write_report` produced."""

    run: RunData
    findings: list[Finding]
    html_path: Path
    plots: list[Path]


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}">'


def _summary_html(run: RunData) -> str:
    s = run.summary or {}
    status = s.get("status", "unknown")

    def pct(v: Any) -> str:
        return f"{100 * v:.2f}%" if isinstance(v, (int, float)) else "n/a"

    cards = [("status", f'<span class="status-{_e(status)}">{_e(status)}</span>'),
             ("best val accuracy", pct(s.get("best_val_accuracy"))),
             ("final val accuracy", pct(s.get("final_val_accuracy"))),
             ("epochs", f"{s.get('epochs_completed', len(run.metrics))} / {run.config.get('train', {}).get('epochs', '?')}"),
             ("iterations", _e(s.get("iterations", "n/a"))),
             ("wall time", f"{s['wall_seconds']:.1f} s" if isinstance(s.get("wall_seconds"), (int, float)) else "n/a"),
             ("device / precision", _e(f"{run.config.get('runtime', {}).get('device', '?')} / {run.precision or '?'}")),
             ("max_lr", _e(fmt(run.config.get("schedule", {}).get("max_lr", "?"))))]
    body = "".join(f'<div class="card"><div class="k">{_e(k)}</div><div class="v">{v}</div></div>' for k, v in cards)
    runtime = run.config.get("runtime", {})
    extra = "".join(f"<p><b>{label}:</b> {_e(runtime[key])}</p>" for key, label in
                    (("what_trains", "what trains"), ("data_reading", "data")) if runtime.get(key))
    if s.get("error") or s.get("diagnosis"):
        extra += f"<p><b>{_e('error' if s.get('error') else 'diagnosis')}:</b> <code>{_e(s.get('error') or s.get('diagnosis'))}</code></p>"
    return f'<section id="summary"><h2>Summary</h2><div class="cards">{body}</div>{extra}</section>'


def _findings_html(findings: list[Finding]) -> str:
    if not findings:
        return ('<section id="findings"><h2>Findings</h2><div class="ok">Nothing to fix: no divergence or loss spikes, '
                'accuracy above chance, no flips on mirror-sensitive images, no fp16 loss-scale trouble, clipping not dominant, no growing train/val gap, max_lr consistent with '
                'any range test.</div></section>')
    parts = []
    for f in findings:
        evidence = "".join(f"<li>{_e(e)}</li>" for e in f.evidence)
        parts.append(f'<div class="finding" data-kind="{_e(f.kind)}"><h3>{_e(f.title)}</h3><ul>{evidence}</ul>'
                     f"<p>{_e(f.advice)}</p><p><b>Next:</b></p><code class=\"cmd\">{_e(f.command)}</code></div>")
    return f'<section id="findings"><h2>Findings ({len(findings)})</h2>{"".join(parts)}</section>'


_CAPTIONS = dict(zip((*RUN_PLOTS, LR_FIND_PLOT), (
    "Learning rate per iteration: the logged values over the planned one-cycle schedule.",
    "Training loss per iteration (raw and smoothed) and per epoch; validation loss per epoch.",
    "Validation accuracy after each epoch; the star marks the best.",
    "Total gradient norm before clipping, with the clipping threshold.",
    "fp16 loss scale over training; triangles mark skipped steps.",
    "LR range test: loss against the LR (log scale), with the suggested max_lr.",
), strict=True))


def _plots_html(plots: list[Path]) -> str:
    figures = "".join(f"<figure>{_img(p, p.name)}<figcaption>{_e(p.name)}: {_e(_CAPTIONS.get(p.name, ''))}</figcaption></figure>"
                      for p in plots)
    return f'<section id="plots"><h2>Plots</h2>{figures}</section>'


def _mistakes_html(run: RunData) -> str:
    """"What it gets wrong": the best checkpoint's highest-loss validation images, the most frequent
    confusions and the confusion matrix, from mistakes.json and its plots (``recipes.report.mistakes`` writes
    them after a run)."""
    record = run.mistakes
    if not record:
        return ""
    names, matrix = record["class_names"], record["confusion_matrix"]
    pairs = sorted(((matrix[t][p], names[t], names[p]) for t in range(len(names)) for p in range(len(names))
                    if t != p and matrix[t][p]), reverse=True)[:8]
    rows = "".join(f"<tr><td>{_e(t)}</td><td>{_e(p)}</td><td>{n}</td></tr>" for n, t, p in pairs)
    table = (f"<table><tr><th>true class</th><th>predicted as</th><th>images</th></tr>{rows}</table>" if pairs
             else "<p>No validation image is misclassified.</p>")
    accuracy = record.get("accuracy")
    captions = ("the highest-loss validation images: true -> predicted, the predicted class's probability and the "
                "image's loss; red: wrong", "rows: the true class; shade: the share of its images")
    plots = RunDir(run.run_dir).plots
    figures = "".join(f"<figure>{_img(plots / name, name)}<figcaption>{_e(caption)}</figcaption></figure>"
                      for name, caption in zip(CHECKPOINT_PLOTS, captions, strict=True) if (plots / name).exists())
    return (f'<section id="mistakes"><h2>What it gets wrong</h2><p>{_e(record["checkpoint"])} on the '
            f'{record["samples"]} validation images'
            + (f": accuracy {100 * accuracy:.2f}%" if accuracy is not None else "") + ". The most frequent confusions:</p>"
            + table + figures + "</section>")


def _lr_find_html(run: RunData) -> str:
    found = run.lr_find
    if not found:
        return ""
    png = RunDir(run.run_dir).lr_find_plot
    caption = _e(_CAPTIONS[png.name])
    picture = f"<figure>{_img(png, png.name)}<figcaption>{caption}</figcaption></figure>" if png.exists() else ""
    suggestion = found.get("suggestion")
    text = (f"<p>Suggested max_lr <b>{_e(fmt(suggestion))}</b>; rule: {_e(found.get('rule', 'n/a'))}. "
            f"This run's max_lr: <b>{_e(fmt(run.config.get('schedule', {}).get('max_lr', '?')))}</b>"
            f"{' (chosen by --max-lr auto)' if (run.config.get('lr_find') or {}).get('max_lr') == 'auto' else ''}.</p>")
    return f'<section id="lr-find"><h2>LR range test</h2>{text}{picture}</section>'


def _events_html(run: RunData) -> str:
    counts: dict[str, int] = {}
    for e in run.events:
        counts[str(e.get("event", "?"))] = counts.get(str(e.get("event", "?")), 0) + 1
    if not counts:
        return '<section id="events"><h2>Events</h2><p>No events recorded (no skips, rollbacks, interruptions).</p></section>'
    tally = ", ".join(f"{_e(k)}: {v}" for k, v in sorted(counts.items()))
    notable = [e for e in run.events if not (e.get("event") == "checkpoint" and e.get("kind") == "last")]
    rows = []
    for e in notable[:200]:
        details = {k: v for k, v in e.items() if k not in ("event", "iteration", "epoch", "time")}
        text = "; ".join(f"{k}={fmt(v)}" for k, v in details.items())
        rows.append(f"<tr><td>{_e(e.get('event'))}</td><td>{_e(e.get('epoch', ''))}</td><td>{_e(e.get('iteration', ''))}</td>"
                    f"<td>{_e(text[:300])}</td></tr>")
    more = f"<p>... {len(notable) - 200} more in events.jsonl</p>" if len(notable) > 200 else ""
    table = ("<table><tr><th>event</th><th>epoch</th><th>iteration</th><th>details</th></tr>" + "".join(rows) + "</table>"
             if rows else "")
    return (f'<section id="events"><h2>Events</h2><p>{tally} (routine saves of last.pt are counted, not listed)</p>'
            f"{table}{more}</section>")


def _checkpoint_html(run: RunData) -> str:
    best_files = [p for p in run.checkpoints if p.name.startswith("best")]
    best_event = next((e for e in reversed(run.events) if e.get("event") == "checkpoint" and e.get("kind") == "best"), None)
    scored = [(m.get("val_accuracy"), m["epoch"]) for m in run.metrics if m.get("val_accuracy") is not None]
    lines = []
    if scored:
        accuracy, epoch = max(scored, key=lambda t: (t[0], -t[1]))
        lines.append(f"<p>Best validation accuracy <b>{100 * accuracy:.2f}%</b> at epoch {epoch} (metrics.jsonl).</p>")
    if best_files:
        items = "".join(f"<li><code>{_e(p.relative_to(run.run_dir))}</code> ({p.stat().st_size / 1e6:.1f} MB)</li>"
                        for p in best_files)
        lines.append(f"<p>Best checkpoint{'s' if len(best_files) > 1 else ''}:</p><ul>{items}</ul>")
        lines.append(f"<p>Evaluate it: <code class=\"cmd\">kiln eval {_e(best_files[-1])}</code></p>")
    elif best_event:
        lines.append(f"<p>Best checkpoint (from events.jsonl): <code>{_e(best_event.get('file'))}</code></p>")
    else:
        lines.append("<p>No best checkpoint was written.</p>")
    last = RunDir(run.run_dir).last
    if last.exists():
        lines.append(f"<p>Resume point: <code>{_e(last.relative_to(run.run_dir))}</code> "
                     f"(<code>kiln resume {_e(run.run_dir)}</code>)</p>")
    return f'<section id="checkpoint"><h2>Best checkpoint</h2>{"".join(lines)}</section>'


def _config_html(run: RunData) -> str:
    rows = []
    for section, values in run.config.items():
        if isinstance(values, dict) and section not in ("lr_find",):
            for key, value in values.items():
                rows.append(f"<tr><td>{_e(section)}</td><td>{_e(key)}</td><td><code>{_e(fmt(value))}</code></td></tr>")
        elif not isinstance(values, dict):
            rows.append(f"<tr><td></td><td>{_e(section)}</td><td><code>{_e(fmt(values))}</code></td></tr>")
    table = "<table><tr><th>section</th><th>key</th><th>value</th></tr>" + "".join(rows) + "</table>"
    return f'<section id="config"><h2>Config</h2><p>From config.json (the resolved recipe).</p>{table}</section>'


def _page(run: RunData, findings: list[Finding], plots: list[Path]) -> str:
    status = (run.summary or {}).get("status", "unknown")
    title = f"kiln report: {run.recipe} ({status})"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{_e(title)}</title><style>{STYLESHEET}</style></head><body><main>"
        f"<h1>{_e(title)}</h1><div class=\"sub\">run directory <code>{_e(run.run_dir)}</code></div>"
        + _summary_html(run) + _findings_html(findings) + _mistakes_html(run) + _plots_html(plots)
        + _lr_find_html(run)
        + _events_html(run) + _checkpoint_html(run) + _config_html(run)
        + "</main></body></html>\n"
    )


def write_report(run_dir: str | Path) -> Report:
    """Draw RUN_DIR/plots/*.png, compute the findings and write RUN_DIR/report.html (images embedded) and
    RUN_DIR/findings.json (the findings as data: what an MLflow mirror sends).

    Raises:
        ConfigError: see :func:`load_run`.
    """
    run = load_run(run_dir)
    plots = plot_run(run, RunDir(run.run_dir).plots)
    findings = find_issues(run)
    html_path = RunDir(run.run_dir).report
    page = _page(run, findings, plots).encode("utf-8")
    write_atomic(html_path, lambda f: f.write(page))
    write_json_atomic(RunDir(run.run_dir).findings, {"findings": [f.to_dict() for f in findings]})
    return Report(run, findings, html_path, plots)


def finish_run(run_dir: str | Path, stream: TextIO | None = None) -> Report | None:
    """After a run: write plots and report.html and print the findings (rank 0 only); never raises (a
    report that cannot be written is a warning, not a reason to lose the run's exit status)."""
    import ignite.distributed as idist

    if idist.get_rank() != 0:  # one process writes the report of a distributed run
        return None
    out = stream or sys.stdout
    try:
        report = write_report(run_dir)
    except Exception as e:  # noqa: BLE001 - the run itself is done; the report is a bonus
        reason = os_error_line(e) if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
        print(f"kiln: could not write the report: {reason}", file=out)
        return None
    print(format_findings(report.findings), file=out)
    print(f"report: {report.html_path}", file=out)
    return report
