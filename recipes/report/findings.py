"""What kiln noticed about a run, and RUN_DIR/report.html: one self-contained page about it.

Everything here reads what the run already wrote (config.json, metrics.jsonl, steps.jsonl,
events.jsonl, summary.json, lr_find.json, checkpoints/), so ``kiln report RUN_DIR`` recomputes the
same plots and findings for any run, finished or not, and nothing is computed per iteration.

A finding names a condition, the evidence for it from the records, why it matters and the next
command to run. The checks: divergence or loss spikes; under fp16, the loss-scale trend and the
skipped-step rate; clipping active on most steps; a growing train/val gap (overfitting); a max_lr far
from the LR range test's suggestion.
"""
from __future__ import annotations

import base64
import html
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

from recipes.config import Config, ConfigError, config_from_dict, config_to_dict

__all__ = [
    "RunData", "Finding", "Report", "load_run", "find_issues", "write_report", "format_findings",
    "finish_run", "hparams", "CHECKS",
]

#: A loss this many times its recent level (and above half the chance-level loss) is a spike.
SPIKE_FACTOR = 2.0
#: Clipping is "active on most steps" above this share of the logged steps (overall and in the second half).
CLIP_SHARE = 0.5
#: Under fp16, a skipped-step rate above this is worth a look.
SKIP_RATE = 0.02
#: Overfitting: the final val loss this much above its best, at least OVERFIT_EPOCHS epochs after it.
OVERFIT_RISE = 0.2
OVERFIT_EPOCHS = 2
#: ... or a last-epoch train loss below this (nats, a memorised training set) and under 1/10 of the val loss.
MEMORISED_LOSS = 0.01
#: max_lr and the range test's suggestion further apart than this factor are "far".
LR_FAR = 4.0
#: Events that mean trouble with non-finite values (written by callbacks.NanGuard and friends).
TROUBLE_EVENTS = ("nan_skip", "rollback", "diverged", "scale_collapse", "non_finite")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a .jsonl file; unreadable lines (a crash mid-write) are skipped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _num(value: Any) -> float:
    """A float from a logged number; the strings "nan"/"inf" that loggers write for non-finite values too."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


@dataclass
class RunData:
    """The records of one run directory, read once."""

    run_dir: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    steps: list[dict[str, Any]]
    events: list[dict[str, Any]]
    summary: dict[str, Any] | None
    lr_find: dict[str, Any] | None  #: the range test tied to this run (lr_find.json or the lr_find event)
    checkpoints: list[Path] = field(default_factory=list)

    @property
    def recipe(self) -> str:
        """The recipe's name."""
        return str(self.config.get("name") or "RECIPE")

    @property
    def log_every(self) -> int:
        """Iterations between steps.jsonl lines."""
        return int(self.config.get("train", {}).get("log_every") or 10)

    @property
    def batches_per_epoch(self) -> int | None:
        """Training batches per epoch, as the run recorded it."""
        value = self.config.get("runtime", {}).get("batches_per_epoch")
        return int(value) if value else None

    @property
    def precision(self) -> str | None:
        """The precision the run resolved to (fp32, bf16, fp16)."""
        return self.config.get("runtime", {}).get("precision") or self.config.get("train", {}).get("precision")

    @property
    def skipped_steps(self) -> int | None:
        """Optimizer steps the fp16 scaler skipped, over the whole run (None when not fp16)."""
        counts = [m["skipped_steps"] for m in self.metrics if m.get("skipped_steps") is not None]
        if counts:
            return int(max(counts))
        if any(s.get("loss_scale") is not None for s in self.steps):
            return sum(1 for e in self.events if e.get("event") == "step_skipped") or None
        return None

    def planned_schedule(self) -> dict[str, list] | None:
        """The run's one-cycle LR at every optimizer step, keyed by iteration (None if unknown)."""
        from recipes.schedule import schedule_series

        try:
            cfg = config_from_dict(self.config)
            series = schedule_series(cfg, self.batches_per_epoch) if self.batches_per_epoch else None
        except (ConfigError, ValueError, TypeError, KeyError):
            return None
        if series is None:
            return None
        return {"iteration": series.iterations(), "lr": series.lr}


def load_run(run_dir: str | Path) -> RunData:
    """Read a run directory's records.

    Raises:
        ConfigError: the directory is missing, or holds neither metrics.jsonl nor steps.jsonl.
    """
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise ConfigError(f"no run directory at {run_dir}")
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a directory; pass a run directory (the --out of kiln train)")
    metrics = _read_jsonl(run_dir / "metrics.jsonl")
    steps = _read_jsonl(run_dir / "steps.jsonl")
    if not metrics and not steps:
        raise ConfigError(f"{run_dir} holds no metrics (metrics.jsonl, steps.jsonl): not a kiln run directory, "
                          "or the run stopped before it logged anything")
    config = _read_json(run_dir / "config.json") or {}
    events = _read_jsonl(run_dir / "events.jsonl")
    lr_find = _read_json(run_dir / "lr_find.json")
    if lr_find is None:
        lr_find = config.get("lr_find") or next((e for e in reversed(events) if e.get("event") == "lr_find"), None)
    checkpoints = sorted((run_dir / "checkpoints").glob("*.pt")) if (run_dir / "checkpoints").is_dir() else []
    return RunData(run_dir, config, metrics, steps, events, _read_json(run_dir / "summary.json"), lr_find, checkpoints)


# ---- findings ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Finding:
    """One thing kiln noticed: what, the evidence from the records, why it matters, what to run next."""

    kind: str  #: divergence | loss_spikes | fp16_loss_scale | clipping | overfitting | max_lr_vs_range_test
    title: str
    evidence: list[str]
    advice: str
    command: str

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data."""
        return {"kind": self.kind, "title": self.title, "evidence": self.evidence, "advice": self.advice,
                "command": self.command}


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def _command(run: RunData, changes: dict[str, Any], verb: str = "train") -> str:
    """``kiln train RECIPE ...`` reproducing the run's own overrides, with ``changes`` applied on top."""
    from recipes import RECIPES
    from recipes.cli import OPTION_KEYS

    name = run.recipe
    overrides: dict[str, Any] = {}
    base = RECIPES.get(name)
    if base is not None and run.config:
        base_dict = config_to_dict(base)
        for section, values in run.config.items():
            if isinstance(values, dict) and isinstance(base_dict.get(section), dict):
                for key, value in values.items():
                    if key in base_dict[section] and base_dict[section][key] != value:
                        overrides[f"{section}.{key}"] = value
    if (run.config.get("lr_find") or {}).get("max_lr") == "auto":
        overrides.pop("optim.lr", None)
        overrides["schedule.max_lr"] = "auto"
    overrides.pop("train.device", None)
    overrides.update(changes)
    flags = {v: k for k, v in OPTION_KEYS.items()}
    parts = [f"kiln {verb} {name}"]
    for key, value in overrides.items():
        if value is None:
            continue
        if key in flags:
            parts.append(f"--{flags[key].replace('_', '-')} {_fmt(value)}")
        else:
            parts.append(f"--set {key}={_fmt(value)}")
    return " ".join(parts)


def _chance_loss(run: RunData) -> float:
    """Cross-entropy of a uniform guess, ln(classes): the natural scale of a classifier's loss."""
    data = run.config.get("data", {})
    classes = 10 if data.get("dataset", "digits") == "digits" else int(data.get("num_classes") or 10)
    return math.log(max(classes, 2))


def _check_divergence(run: RunData) -> Finding | None:
    """Non-finite losses, NanGuard events, a 'diverged' status, a loss no better than chance, or spikes.

    A spike is a loss more than SPIKE_FACTOR x its recent level that also climbs back to at least half
    the chance-level loss ln(classes): training progress undone, not noise on a loss near zero.
    """
    evidence: list[str] = []
    hard = False
    chance = _chance_loss(run)
    summary = run.summary or {}
    if summary.get("status") == "diverged":
        hard = True
        diagnosis = summary.get("diagnosis")
        evidence.append("summary.json: status diverged" + (f" ({diagnosis})" if diagnosis else ""))
    bad_steps = [s["iteration"] for s in run.steps if s.get("loss") is not None and not math.isfinite(_num(s["loss"]))]
    if bad_steps:
        hard = True
        evidence.append(f"non-finite training loss at {len(bad_steps)} logged iteration(s), first at iteration {bad_steps[0]}")
    for key in ("train_loss", "val_loss"):
        bad = [m["epoch"] for m in run.metrics if m.get(key) is not None and not math.isfinite(_num(m[key]))]
        if bad:
            hard = True
            evidence.append(f"non-finite {key} in epoch(s) {', '.join(map(str, bad))}")
    trouble: dict[str, list[dict]] = {}
    for e in run.events:
        if e.get("event") in TROUBLE_EVENTS:
            trouble.setdefault(e["event"], []).append(e)
    for name, found in trouble.items():
        hard = True
        where = found[0].get("iteration")
        evidence.append(f"events.jsonl: {len(found)} {name} event(s)" + (f", first at iteration {where}" if where is not None else ""))

    floor = 0.5 * chance
    spikes = []
    steps = [(s["iteration"], _num(s["loss"]), s.get("lr")) for s in run.steps if s.get("loss") is not None]
    steps = [(it, v, lr) for it, v, lr in steps if math.isfinite(v)]
    for i in range(1, len(steps)):
        recent = statistics.median(v for _, v, _ in steps[max(0, i - 5):i])
        it, v, lr = steps[i]
        if v > SPIKE_FACTOR * recent and v > floor:
            spikes.append(f"iteration {it}: loss {v:.3g} = {v / recent:.1f}x the median of the logged values before it"
                          + (f" (lr {lr:.2g})" if isinstance(lr, (int, float)) else ""))
    for key, label in (("train_loss", "mean train loss"), ("val_loss", "val loss")):
        series = [(m["epoch"], _num(m[key])) for m in run.metrics if m.get(key) is not None]
        series = [(e, v) for e, v in series if math.isfinite(v)]
        for k, (epoch, value) in enumerate(series):
            best_before = min((v for _, v in series[:k]), default=None)
            if value > SPIKE_FACTOR * chance:
                spikes.append(f"epoch {epoch}: {label} {value:.3g} = {value / chance:.1f}x the loss of a uniform "
                              f"guess (ln classes = {chance:.3g}): confidently wrong")
            elif best_before and value > SPIKE_FACTOR * best_before and value > floor:
                spikes.append(f"epoch {epoch}: {label} {value:.3g} = {value / best_before:.1f}x its best so far ({best_before:.3g})")
    epochs = [_num(m["train_loss"]) for m in run.metrics if m.get("train_loss") is not None]
    if len(epochs) >= 2 and math.isfinite(epochs[-1]) and epochs[-1] >= 0.9 * chance:
        hard = True
        evidence.append(f"the model never learned or it collapsed: last epoch's train loss {epochs[-1]:.3g} is no "
                        f"better than a uniform guess ({chance:.3g})")
    evidence += spikes[:6] + ([f"... and {len(spikes) - 6} more"] if len(spikes) > 6 else [])
    if not hard and not spikes:
        return None
    max_lr = run.config.get("schedule", {}).get("max_lr")
    lr_note = f" (max_lr {max_lr:g})" if isinstance(max_lr, (int, float)) else ""
    command = _command(run, {"schedule.max_lr": "auto", "optim.lr": None})
    if hard:
        return Finding("divergence", "training diverged", evidence,
                       f"The loss blew up, went non-finite or never fell. The usual cause is a learning rate too "
                       f"high for the model{lr_note}: run the LR range test and train at its suggestion.", command)
    return Finding("loss_spikes", "loss spikes", evidence,
                   f"The loss jumped back up, undoing training progress{lr_note}. Spikes near the peak LR mean it "
                   "is at the edge of stability: lower max_lr, or let the LR range test choose it.", command)


def _scale(value: float) -> str:
    """A loss scale: ``65536``, or ``2^24`` for a large power of two."""
    if value > 0 and value >= 1e6 and math.log2(value).is_integer():
        return f"2^{int(math.log2(value))}"
    return f"{value:g}"


def _check_fp16(run: RunData) -> Finding | None:
    """Under fp16: the loss-scale trend and the share of optimizer steps the scaler skipped."""
    scales = [(s["iteration"], _num(s["loss_scale"])) for s in run.steps if s.get("loss_scale") is not None]
    if run.precision != "fp16" and not scales:
        return None
    t = run.config.get("train", {})
    init = float(t.get("init_scale") or 65536.0)
    growth = int(t.get("growth_interval") or 2000)
    accumulation = int(t.get("accumulation_steps") or 1)
    iterations = (run.summary or {}).get("iterations") or max((m.get("iteration", 0) for m in run.metrics), default=0)
    steps = max(1, math.ceil(iterations / accumulation)) if iterations else None
    skipped = run.skipped_steps or 0
    collapses = [e for e in run.events if e.get("event") == "scale_collapse"]
    if not steps:
        return None
    rate = skipped / steps
    final = scales[-1][1] if scales else None
    low = min((v for _, v in scales), default=None)
    collapsed = bool(collapses) or (final is not None and final < 1.0)
    if rate <= SKIP_RATE and not collapsed:
        return None
    evidence = [f"{skipped} of {steps} optimizer steps skipped ({100 * rate:.1f}%)"]
    if scales:
        evidence.append(f"loss scale: init {_scale(init)}, lowest {_scale(low)}, final {_scale(final)} "
                        f"(logged every {run.log_every} iterations)")
    per_epoch = []
    previous = 0
    for m in run.metrics:
        if m.get("skipped_steps") is not None:
            per_epoch.append((m["epoch"], int(m["skipped_steps"]) - previous))
            previous = int(m["skipped_steps"])
    if per_epoch:
        evidence.append("skips per epoch: " + ", ".join(f"{e}: {n}" for e, n in per_epoch))
    if collapses:
        evidence.append(f"events.jsonl: {len(collapses)} scale_collapse event(s)")
    early = per_epoch[0][1] if per_epoch else 0
    if collapsed:
        advice = ("The loss scale collapsed: the gradients overflow fp16 even unscaled, so loss scaling cannot help. "
                  "Train in bf16 (same range as fp32) or lower the LR.")
        command = _command(run, {"train.precision": "bf16"})
    elif per_epoch and early >= 0.8 * skipped:
        settled = final if final else init / 2 ** max(1, early)
        advice = (f"Most skips came at the start, while the scaler halved init_scale {_scale(init)} down to a scale "
                  f"the gradients fit ({_scale(settled)}): every skipped step is a lost update. Start the scale there.")
        command = _command(run, {"train.init_scale": float(settled)})
    else:
        advice = (f"The skips are spread over training: after every {growth} clean step{'s' if growth > 1 else ''} the scaler doubles the scale "
                  "and the next overflow skips a step. A longer growth_interval grows it less often "
                  "(or use bf16, which needs no scaling).")
        command = _command(run, {"train.growth_interval": growth * 4})
    return Finding("fp16_loss_scale", "fp16: many skipped steps" if not collapsed else "fp16: loss scale collapsed",
                   evidence, advice, command)


def _check_clipping(run: RunData) -> Finding | None:
    """Clipping active on most logged steps, and still on most of the second half of training.

    Large gradients early in training are what clipping is for; clipping that goes on once the LR is
    annealing means the threshold sits below the gradients' ordinary size (or the LR is too high).
    """
    clip = run.config.get("train", {}).get("clip_norm")
    if not clip:
        return None
    points = [(s["iteration"], _num(s["grad_norm"])) for s in run.steps if s.get("grad_norm") is not None]
    points = [(it, v) for it, v in points if math.isfinite(v)]
    if len(points) < 4:  # too few logged steps to call it "most"
        return None
    norms = [v for _, v in points]
    clipped = sum(v > clip for v in norms)
    half = points[len(points) // 2:]
    clipped_late = sum(v > clip for _, v in half)
    if clipped / len(norms) <= CLIP_SHARE or clipped_late / len(half) <= CLIP_SHARE:
        return None
    median = statistics.median(norms)
    p90 = sorted(norms)[min(len(norms) - 1, int(0.9 * len(norms)))]
    suggestion = float(f"{p90:.1g}") if p90 > 0 else clip * 10
    evidence = [f"the pre-clip gradient norm exceeded clip_norm={clip:g} on {clipped} of {len(norms)} logged steps "
                f"({100 * clipped / len(norms):.0f}%), and on {clipped_late} of the {len(half)} from iteration "
                f"{half[0][0]} on",
                f"median pre-clip norm {median:.3g} = {median / clip:.3g}x the threshold; 90th percentile {p90:.3g}"]
    advice = ("When clipping acts on most steps, every update is cut to the same length and the LR no longer sets the "
              "step size. Either the threshold is too low (set it near the 90th percentile of the norms, so it only "
              "catches outliers) or the LR is too high (norms grow with it).")
    return Finding("clipping", "gradient clipping active on most steps", evidence, advice,
                   _command(run, {"train.clip_norm": suggestion}))


def _check_overfitting(run: RunData) -> Finding | None:
    """A growing train/val gap: the val loss rising well above its best while the train loss keeps
    falling, or a memorised training set (train loss near zero, a small fraction of the val loss)."""
    rows = [(m["epoch"], _num(m["train_loss"]), _num(m["val_loss"])) for m in run.metrics
            if m.get("train_loss") is not None and m.get("val_loss") is not None]
    rows = [r for r in rows if math.isfinite(r[1]) and math.isfinite(r[2])]
    if len(rows) < OVERFIT_EPOCHS + 2:
        return None
    best = min(range(len(rows)), key=lambda i: rows[i][2])
    epoch_best, train_best, val_best = rows[best]
    epoch_last, train_last, val_last = rows[-1]
    rising = (epoch_last - epoch_best >= OVERFIT_EPOCHS and val_last >= (1 + OVERFIT_RISE) * val_best
              and train_last < train_best)
    memorised = train_last < MEMORISED_LOSS and train_last < 0.1 * val_last
    if not (rising or memorised):
        return None
    evidence = []
    if rising:
        evidence.append(f"val loss rose {100 * (val_last / val_best - 1):.0f}% from its best {val_best:.3g} "
                        f"(epoch {epoch_best}) to {val_last:.3g} (epoch {epoch_last}) while the train loss fell "
                        f"from {train_best:.3g} to {train_last:.3g}")
    if memorised:
        evidence.append(f"the training set is memorised: train loss {train_last:.2g} in the last epoch "
                        f"(under {MEMORISED_LOSS:g}), val loss {val_last:.3g}")
    early = rows[: max(1, len(rows) // 2)]
    closest = min(early, key=lambda r: r[2] / max(r[1], 1e-12))
    evidence.append(f"val/train loss ratio: {closest[2] / max(closest[1], 1e-12):.3g}x at epoch {closest[0]}, "
                    f"{val_last / max(train_last, 1e-12):.3g}x at epoch {epoch_last}")
    accuracies = [(m["epoch"], m["val_accuracy"]) for m in run.metrics if m.get("val_accuracy") is not None]
    if accuracies:
        top = max(accuracies, key=lambda a: a[1])
        evidence.append(f"val accuracy: best {top[1]:.4f} (epoch {top[0]}), final {accuracies[-1][1]:.4f}")
    t, d, o = run.config.get("train", {}), run.config.get("data", {}), run.config.get("optim", {})
    changes: dict[str, Any] = {}
    remedies = []
    if d.get("augment", "none") == "none":
        changes["data.augment"] = "crop"
        remedies.append("augmentation (random crops)")
    if (t.get("label_smoothing") or 0) < 0.1:
        changes["train.label_smoothing"] = 0.1
        remedies.append("label smoothing 0.1")
    weight_decay = float(o.get("weight_decay") or 0.0)
    changes["optim.weight_decay"] = float(f"{max(0.05, 5 * weight_decay):.2g}")
    remedies.append(f"more weight decay ({changes['optim.weight_decay']:g})")
    fewer = f"; or train fewer epochs (the val loss was lowest at epoch {epoch_best})" if rising else ""
    advice = ("The model fits the training set far better than held-out data, and the gap grows with training. "
              f"Regularise with {', '.join(remedies)}{fewer}.")
    return Finding("overfitting", "overfitting: the train/val gap is growing", evidence, advice, _command(run, changes))


def _check_max_lr(run: RunData) -> Finding | None:
    """The run's max_lr far (more than LR_FAR x) from the LR range test's suggestion."""
    found = run.lr_find or {}
    suggestion = found.get("suggestion")
    max_lr = run.config.get("schedule", {}).get("max_lr")
    if not isinstance(suggestion, (int, float)) or not isinstance(max_lr, (int, float)) or suggestion <= 0:
        return None
    ratio = max_lr / suggestion
    if 1 / LR_FAR <= ratio <= LR_FAR:
        return None
    evidence = [f"max_lr {max_lr:g} is {ratio:.3g}x the range test's suggestion {suggestion:.3g}",
                f"the range test's rule: {found.get('rule', 'n/a')}"]
    if ratio > 1:
        advice = ("A peak LR this far above where the range test's loss stopped improving risks spikes and "
                  "divergence in the warm-up; train at the suggestion.")
    else:
        advice = ("A peak LR this far below the range test's suggestion trains slower than it needs to; "
                  "try the suggestion.")
    return Finding("max_lr_vs_range_test", "max_lr is far from the LR range test's suggestion", evidence, advice,
                   _command(run, {"schedule.max_lr": float(f"{suggestion:.2g}"), "optim.lr": None}))


#: The checks, in the order findings are listed.
CHECKS: tuple[Callable[[RunData], Finding | None], ...] = (
    _check_divergence, _check_fp16, _check_clipping, _check_overfitting, _check_max_lr,
)


def find_issues(run: RunData) -> list[Finding]:
    """Every finding about ``run`` (an empty list for a clean run)."""
    return [f for f in (check(run) for check in CHECKS) if f is not None]


def format_findings(findings: list[Finding]) -> str:
    """The findings as console lines, each with evidence, why, and the next command."""
    if not findings:
        return ("kiln noticed nothing to fix (checked: divergence and loss spikes, fp16 loss scale, clipping, "
                "overfitting, max_lr vs the range test)")
    lines = [f"kiln noticed {len(findings)} thing{'s' if len(findings) > 1 else ''}:"]
    for f in findings:
        lines.append(f"  [{f.kind}] {f.title}")
        lines += [f"      - {e}" for e in f.evidence]
        lines.append(f"      why: {f.advice}")
        lines.append(f"      next: {f.command}")
    return "\n".join(lines)


# ---- report.html ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Report:
    """What :func:`write_report` produced."""

    run: RunData
    findings: list[Finding]
    html_path: Path
    plots: list[Path]


_CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
main{max-width:1060px;margin:0 auto;padding:24px}
h1{font-size:24px;margin:0 0 4px} h2{font-size:19px;margin:28px 0 10px;border-bottom:1px solid #d8dce3;padding-bottom:4px}
.sub{color:#5b6473;margin-bottom:16px} code,pre{font-family:"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:13px}
table{border-collapse:collapse;background:#fff} td,th{border:1px solid #d8dce3;padding:4px 10px;text-align:left;vertical-align:top}
th{background:#eef0f4} .cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:10px}
.card{background:#fff;border:1px solid #d8dce3;border-radius:6px;padding:10px 12px}
.card .k{color:#5b6473;font-size:12px;text-transform:uppercase;letter-spacing:.04em} .card .v{font-size:22px;font-weight:600}
.status-completed{color:#1a7f37} .status-diverged,.status-failed{color:#c62828} .status-interrupted,.status-running{color:#b26a00}
.finding{background:#fff8e6;border:1px solid #f0c36d;border-left:5px solid #e09b00;border-radius:6px;padding:10px 14px;margin:10px 0}
.finding h3{margin:0 0 6px;font-size:16px} .finding ul{margin:4px 0 6px 18px;padding:0}
.ok{background:#eaf7ee;border:1px solid #9fd5ad;border-radius:6px;padding:10px 14px}
.cmd{background:#1d2330;color:#e8ecf2;padding:6px 10px;border-radius:4px;display:block;overflow-x:auto}
figure{background:#fff;border:1px solid #d8dce3;border-radius:6px;margin:0 0 14px;padding:8px;text-align:center}
figure img{max-width:100%;height:auto} figcaption{color:#5b6473;font-size:13px}
pre{background:#fff;border:1px solid #d8dce3;padding:10px;overflow-x:auto}
"""


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
             ("max_lr", _e(_fmt(run.config.get("schedule", {}).get("max_lr", "?"))))]
    body = "".join(f'<div class="card"><div class="k">{_e(k)}</div><div class="v">{v}</div></div>' for k, v in cards)
    extra = ""
    if s.get("error") or s.get("diagnosis"):
        extra = f"<p><b>{_e('error' if s.get('error') else 'diagnosis')}:</b> <code>{_e(s.get('error') or s.get('diagnosis'))}</code></p>"
    return f'<section id="summary"><h2>Summary</h2><div class="cards">{body}</div>{extra}</section>'


def _findings_html(findings: list[Finding]) -> str:
    if not findings:
        return ('<section id="findings"><h2>Findings</h2><div class="ok">Nothing to fix: no divergence or loss spikes, '
                'no fp16 loss-scale trouble, clipping not dominant, no growing train/val gap, max_lr consistent with '
                'any range test.</div></section>')
    parts = []
    for f in findings:
        evidence = "".join(f"<li>{_e(e)}</li>" for e in f.evidence)
        parts.append(f'<div class="finding" data-kind="{_e(f.kind)}"><h3>{_e(f.title)}</h3><ul>{evidence}</ul>'
                     f"<p>{_e(f.advice)}</p><p><b>Next:</b></p><code class=\"cmd\">{_e(f.command)}</code></div>")
    return f'<section id="findings"><h2>Findings ({len(findings)})</h2>{"".join(parts)}</section>'


_CAPTIONS = {
    "lr.png": "Learning rate per iteration: the logged values over the planned one-cycle schedule.",
    "loss.png": "Training loss per iteration (raw and smoothed) and per epoch; validation loss per epoch.",
    "accuracy.png": "Validation accuracy after each epoch; the star marks the best.",
    "grad_norm.png": "Total gradient norm before clipping, with the clipping threshold.",
    "loss_scale.png": "fp16 loss scale over training; triangles mark skipped steps.",
    "lr_find.png": "LR range test: loss against the LR (log scale), with the suggested max_lr.",
}


def _plots_html(plots: list[Path]) -> str:
    figures = "".join(f"<figure>{_img(p, p.name)}<figcaption>{_e(p.name)}: {_e(_CAPTIONS.get(p.name, ''))}</figcaption></figure>"
                      for p in plots)
    return f'<section id="plots"><h2>Plots</h2>{figures}</section>'


def _lr_find_html(run: RunData) -> str:
    found = run.lr_find
    if not found:
        return ""
    png = run.run_dir / "lr_find.png"
    picture = f"<figure>{_img(png, 'lr_find.png')}<figcaption>{_e(_CAPTIONS['lr_find.png'])}</figcaption></figure>" if png.exists() else ""
    suggestion = found.get("suggestion")
    text = (f"<p>Suggested max_lr <b>{_e(_fmt(suggestion))}</b>; rule: {_e(found.get('rule', 'n/a'))}. "
            f"This run's max_lr: <b>{_e(_fmt(run.config.get('schedule', {}).get('max_lr', '?')))}</b>"
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
        text = "; ".join(f"{k}={_fmt(v)}" for k, v in details.items())
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
    last = run.run_dir / "checkpoints" / "last.pt"
    if last.exists():
        lines.append(f"<p>Resume point: <code>{_e(last.relative_to(run.run_dir))}</code> "
                     f"(<code>kiln resume {_e(run.run_dir)}</code>)</p>")
    return f'<section id="checkpoint"><h2>Best checkpoint</h2>{"".join(lines)}</section>'


def _config_html(run: RunData) -> str:
    rows = []
    for section, values in run.config.items():
        if isinstance(values, dict) and section not in ("lr_find",):
            for key, value in values.items():
                rows.append(f"<tr><td>{_e(section)}</td><td>{_e(key)}</td><td><code>{_e(_fmt(value))}</code></td></tr>")
        elif not isinstance(values, dict):
            rows.append(f"<tr><td></td><td>{_e(section)}</td><td><code>{_e(_fmt(values))}</code></td></tr>")
    table = "<table><tr><th>section</th><th>key</th><th>value</th></tr>" + "".join(rows) + "</table>"
    return f'<section id="config"><h2>Config</h2><p>From config.json (the resolved recipe).</p>{table}</section>'


def _page(run: RunData, findings: list[Finding], plots: list[Path]) -> str:
    status = (run.summary or {}).get("status", "unknown")
    title = f"kiln report: {run.recipe} ({status})"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><main>"
        f"<h1>{_e(title)}</h1><div class=\"sub\">run directory <code>{_e(run.run_dir)}</code></div>"
        + _summary_html(run) + _findings_html(findings) + _plots_html(plots) + _lr_find_html(run)
        + _events_html(run) + _checkpoint_html(run) + _config_html(run)
        + "</main></body></html>\n"
    )


def write_report(run_dir: str | Path) -> Report:
    """Draw RUN_DIR/plots/*.png, compute the findings and write RUN_DIR/report.html (images embedded).

    Raises:
        ConfigError: see :func:`load_run`.
    """
    from recipes.plots import plot_run

    run = load_run(run_dir)
    plots = plot_run(run, run.run_dir / "plots")
    findings = find_issues(run)
    html_path = run.run_dir / "report.html"
    tmp = html_path.with_name(".report.html.tmp")
    tmp.write_text(_page(run, findings, plots), encoding="utf-8")
    tmp.replace(html_path)
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
        print(f"kiln: could not write the report: {type(e).__name__}: {e}", file=out)
        return None
    print(format_findings(report.findings), file=out)
    print(f"report: {report.html_path}", file=out)
    return report


def hparams(cfg: Config) -> dict[str, bool | int | float | str]:
    """The config flattened to ``{"section.key": value}`` for TensorBoard's hparams (lists become text)."""
    flat: dict[str, bool | int | float | str] = {}
    for section, values in config_to_dict(cfg).items():
        if isinstance(values, dict):
            for key, value in values.items():
                flat[f"{section}.{key}"] = value if isinstance(value, (bool, int, float, str)) else _fmt(value)
    return flat
