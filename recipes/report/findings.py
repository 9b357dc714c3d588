"""What kiln noticed about a run: the findings, computed from what the run already wrote.

Nothing is computed per iteration: ``kiln report RUN_DIR`` recomputes the same findings for any run,
finished or not.

A finding names a condition, the evidence for it from the records, why it matters and the next
command to run. The checks: divergence or loss spikes; a validation accuracy no better than chance;
horizontal flips on images whose mirrors show other classes (from the flip probe in mistakes.json, the
one end-of-run measurement); under fp16, the loss-scale trend and the skipped-step rate; clipping so tight
AdamW's eps shrinks its steps; a growing train/val gap (overfitting); a max_lr far from the range test's.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Callable

from recipes import RECIPES
from recipes.config import OPTION_KEYS, config_to_dict
from recipes.report.flip_probe import flips_hurt, trained_with_flips
from recipes.report.rundata import RunData
from recipes.report.rundata import to_number as _num
from recipes.words import plural

__all__ = ["Finding", "find_issues", "format_findings", "CHECKS", "fmt"]

#: A loss this many times its recent level (and above half the chance-level loss) is a spike.
SPIKE_FACTOR = 2.0
#: Clipping is "active on most steps" above this share of the logged steps (overall and in the second half).
CLIP_SHARE = 0.5
#: ... and it shrinks AdamW's steps when they fall below this fraction of their size (see _check_clipping).
CLIP_STEP_LEFT = 0.5
#: Under fp16, a skipped-step rate above this is worth a look.
SKIP_RATE = 0.02
#: Overfitting: the final val loss this much above its best, at least OVERFIT_EPOCHS epochs after it.
OVERFIT_RISE = 0.2
OVERFIT_EPOCHS = 2
#: ... or a last-epoch train loss below this (nats, a memorised training set) and under 1/10 of the val loss.
MEMORISED_LOSS = 0.01
#: A best val_accuracy at most this many times 1/classes is "at chance".
CHANCE_MARGIN = 1.1
#: ... and a run of fewer training iterations than this is called too short to learn.
SHORT_RUN = 100
#: max_lr and the range test's suggestion further apart than this factor are "far".
LR_FAR = 4.0
#: Events that mean trouble with non-finite values (written by callbacks.NanGuard and friends).
TROUBLE_EVENTS = ("nan_skip", "rollback", "diverged", "scale_collapse", "non_finite")


@dataclass(frozen=True)
class Finding:
    """One thing kiln noticed: what, the evidence from the records, why it matters, what to run next."""

    kind: str  #: divergence | loss_spikes | chance | fp16_loss_scale | clipping | overfitting | max_lr_vs_range_test
    title: str
    evidence: list[str]
    advice: str
    command: str

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data."""
        return {"kind": self.kind, "title": self.title, "evidence": self.evidence, "advice": self.advice,
                "command": self.command}


def fmt(value: Any) -> str:
    """A config or record value as the CLI takes it: ``true``, ``0.01``, ``32,64,128``."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def _command(run: RunData, changes: dict[str, Any], verb: str = "train") -> str:
    """``kiln train RECIPE ...`` reproducing the run's own overrides, with ``changes`` applied on top."""
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
    if base is not None and base.finetune.freeze_epochs == -1 and _auto_freeze(run) == overrides.get(
            "finetune.freeze_epochs"):
        overrides.pop("finetune.freeze_epochs")  # what "auto" chose: the same command chooses it again
    if (run.config.get("lr_find") or {}).get("max_lr") == "auto":
        overrides.pop("optim.lr", None)
        overrides["schedule.max_lr"] = "auto"
    overrides.pop("train.device", None)
    if str(overrides.get("data.memory_budget", "")).startswith("auto:"):
        overrides.pop("data.memory_budget")  # what "auto" was on this machine: the same command decides again
    overrides.update(changes)
    flags = {v: k for k, v in OPTION_KEYS.items()}
    parts = [f"kiln {verb} {name}"]
    for key, value in overrides.items():
        if value is None:
            continue
        if key in flags:
            parts.append(f"--{flags[key].replace('_', '-')} {fmt(value)}")
        else:
            parts.append(f"--set {key}={fmt(value)}")
    return " ".join(parts)


def _auto_freeze(run: RunData) -> int | None:
    """The ``finetune.freeze_epochs`` that "auto" gives the run (from the weights it started from), if it has a config."""
    from recipes.config import ConfigError, apply_overrides, config_from_dict
    from recipes.run.parts import resolve_freeze_epochs

    try:
        cfg = apply_overrides(config_from_dict(run.config), {"finetune.freeze_epochs": -1})
    except ConfigError:  # a config kiln cannot read back: no command to shorten
        return None
    started = run.config.get("runtime", {}).get("initial_weights") or {}
    return resolve_freeze_epochs(cfg, bool(started.get("head_replaced"))).finetune.freeze_epochs


def _chance_loss(run: RunData) -> float:
    """Cross-entropy of a uniform guess, ln(classes): the natural scale of a classifier's loss."""
    return math.log(max(_classes(run) or 10, 2))


def _check_divergence(run: RunData) -> Finding | None:
    """Non-finite losses, NanGuard events, a 'diverged' status, a loss no better than chance, or spikes.

    A spike is a loss more than SPIKE_FACTOR x its recent level that also climbs back to at least half
    the chance-level loss ln(classes), and that the next logged loss has not recovered from (it is still
    above that recent level): training progress undone, not noise on a loss near zero, nor one hard batch
    (the default digits run in fp32 logs one at 2.0x that is gone ten iterations later).
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
        recovered = i + 1 < len(steps) and steps[i + 1][1] <= recent
        if v > SPIKE_FACTOR * recent and v > floor and not recovered:
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
        advice = (f"The skips are spread over training: after every {plural(growth, 'clean step')} the scaler doubles the scale "
                  "and the next overflow skips a step. A longer growth_interval grows it less often "
                  "(or use bf16, which needs no scaling).")
        command = _command(run, {"train.growth_interval": growth * 4})
    return Finding("fp16_loss_scale", "fp16: many skipped steps" if not collapsed else "fp16: loss scale collapsed",
                   evidence, advice, command)


def _check_clipping(run: RunData) -> Finding | None:
    """Clipping so tight that it shrinks AdamW's steps, on most logged steps and still in the second half.

    AdamW divides each gradient by its running RMS, so clipping on most steps leaves the step's size to the LR.
    It does not undo ``eps``: a gradient clipped to ``clip_norm`` has an RMS per parameter of about
    ``clip_norm / sqrt(parameters)``, and near ``eps`` the step shrinks by ``rms / (rms + eps)``.
    """
    clip = run.config.get("train", {}).get("clip_norm")
    parameters, eps = run.config.get("runtime", {}).get("parameters"), run.config.get("optim", {}).get("eps", 1e-8)
    if not clip or not parameters:
        return None
    rms = clip / math.sqrt(parameters)
    left = rms / (rms + eps)
    if left >= CLIP_STEP_LEFT:  # the usual case, known from config.json alone: no need to read the steps
        return None
    points = [(s["iteration"], _num(s["grad_norm"])) for s in run.steps if s.get("grad_norm") is not None]
    points = [(it, v) for it, v in points if math.isfinite(v)]
    if len(points) < 4:  # too few logged steps to call it "most"
        return None
    norms = [v for _, v in points]
    clipped, half = sum(v > clip for v in norms), points[len(points) // 2:]
    clipped_late = sum(v > clip for _, v in half)
    if clipped / len(norms) <= CLIP_SHARE or clipped_late / len(half) <= CLIP_SHARE:
        return None
    median = statistics.median(norms)
    suggestion = float(f"{100 * eps * math.sqrt(parameters):.1g}")  # steps within 1% of their size
    evidence = [f"the pre-clip gradient norm exceeded clip_norm={clip:g} on {clipped} of {len(norms)} logged steps "
                f"({100 * clipped / len(norms):.0f}%), and on {clipped_late} of the {len(half)} from iteration "
                f"{half[0][0]} on; median pre-clip norm {median:.3g}",
                f"clipped to {clip:g} over {parameters:,} parameters, a gradient's RMS is about {rms:.2g}, "
                f"against AdamW's eps {eps:g}: its steps are cut to about {100 * left:.0f}% of the LR's"]
    advice = ("AdamW's step is the gradient over its running RMS plus eps; clipped this hard, eps dominates and the steps "
              "shrink, as if the LR were lower. Clip where the clipped gradients stay well above eps (0: measure only).")
    return Finding("clipping", "gradient clipping shrinks AdamW's steps", evidence, advice, _command(run, {"train.clip_norm": suggestion}))


def _check_overfitting(run: RunData) -> Finding | None:
    """A growing train/val gap: the val loss rising well above its best while the train loss keeps
    falling and the val accuracy gains nothing on that epoch's, or a memorised training set (train loss near
    zero, a small fraction of the val loss). A val loss that rises while the accuracy still climbs is a few
    errors made more confidently, not a worse model: stopping at the lowest val loss would cost accuracy."""
    rows = [(m["epoch"], _num(m["train_loss"]), _num(m["val_loss"])) for m in run.metrics
            if m.get("train_loss") is not None and m.get("val_loss") is not None]
    rows = [r for r in rows if math.isfinite(r[1]) and math.isfinite(r[2])]
    if len(rows) < OVERFIT_EPOCHS + 2:
        return None
    best = min(range(len(rows)), key=lambda i: rows[i][2])
    epoch_best, train_best, val_best = rows[best]
    epoch_last, train_last, val_last = rows[-1]
    accuracy = {m["epoch"]: _num(m["val_accuracy"]) for m in run.metrics if m.get("val_accuracy") is not None}
    still_gaining = accuracy.get(epoch_last, -math.inf) > accuracy.get(epoch_best, math.inf)
    rising = (epoch_last - epoch_best >= OVERFIT_EPOCHS and val_last >= (1 + OVERFIT_RISE) * val_best
              and train_last < train_best and not still_gaining)
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


def _classes(run: RunData) -> int | None:
    """How many classes the run trained on (its recorded class names, else the config's count)."""
    names = run.config.get("runtime", {}).get("class_names")
    if names:
        return len(names)
    count = run.config.get("data", {}).get("num_classes")
    return int(count) if count else None


def _check_chance(run: RunData) -> Finding | None:
    """The best validation accuracy no better than a uniform guess (1 / classes, with CHANCE_MARGIN)."""
    classes = _classes(run)
    accuracies = [_num(m["val_accuracy"]) for m in run.metrics if m.get("val_accuracy") is not None]
    accuracies = [a for a in accuracies if math.isfinite(a)]
    if not classes or classes < 2 or not accuracies:
        return None
    chance, best = 1.0 / classes, max(accuracies)
    if best > CHANCE_MARGIN * chance:
        return None
    epochs = len(accuracies)
    evidence = [f"best val_accuracy {best:.3f} over {plural(epochs, 'validated epoch')}, with "
                f"{classes} classes: a uniform guess scores {chance:.3f}"]
    changes: dict[str, Any] = {"schedule.max_lr": "auto", "optim.lr": None}
    iterations = max((m.get("iteration") or 0 for m in run.metrics), default=0)
    if iterations and iterations < SHORT_RUN:
        evidence.append(f"only {plural(iterations, 'training iteration')}: too short to learn")
        changes["train.epochs"] = max(10, int(run.config.get("train", {}).get("epochs") or 1))
    return Finding("chance", "validation accuracy at chance level", evidence,
                   "Nothing the model learned carries over to the validation images. If the run was this short, "
                   "train longer; otherwise check that the labels match the images and that the validation "
                   "split comes from the same data, then let the LR range test pick max_lr.", _command(run, changes))


def _check_flip(run: RunData) -> Finding | None:
    """Trained with horizontal flips on data whose mirrored images show other classes (digits, letters): the
    flip probe of mistakes.json (``recipes.report.flip_probe``) says so."""
    probe = (run.mistakes or {}).get("flip_probe")
    if not trained_with_flips(run.config.get("data", {}).get("augment")) or not flips_hurt(probe):
        return None
    evidence = [f"data.augment={run.config['data']['augment']}: half the training images are mirrored",
                f"a nearest-neighbour probe without flips classifies {probe['samples']} validation images at "
                f"{probe['accuracy']:.3f}, their mirror images at {probe['flipped_accuracy']:.3f} (a uniform guess "
                f"{probe['chance']:.3f}): a mirrored image looks like another class"]
    return Finding("flip", "horizontal flips change what these images show", evidence,
                   "Flipping teaches the model that an image and its mirror are the same class; here they are not "
                   "(as with digits and letters), so the model must learn two shapes for each class and confuses "
                   "the ones whose mirror looks like another. Train without flips.",
                   _command(run, {"data.augment": "crop"}))


#: The checks, in the order findings are listed.
CHECKS: tuple[Callable[[RunData], Finding | None], ...] = (
    _check_divergence, _check_chance, _check_flip, _check_fp16, _check_clipping, _check_overfitting, _check_max_lr,
)


def find_issues(run: RunData) -> list[Finding]:
    """Every finding about ``run`` (an empty list for a clean run)."""
    return [f for f in (check(run) for check in CHECKS) if f is not None]


def format_findings(findings: list[Finding]) -> str:
    """The findings as console lines, each with evidence, why, and the next command."""
    if not findings:
        return ("kiln noticed nothing to fix (checked: divergence and loss spikes, accuracy vs chance, flips on "
                "mirror-sensitive images, fp16 loss scale, clipping, overfitting, max_lr vs the range test)")
    lines = [f"kiln noticed {plural(len(findings), 'thing')}:"]
    for f in findings:
        lines.append(f"  [{f.kind}] {f.title}")
        lines += [f"      - {e}" for e in f.evidence]
        lines.append(f"      why: {f.advice}")
        lines.append(f"      next: {f.command}")
    return "\n".join(lines)
