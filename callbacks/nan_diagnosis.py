"""NanGuard's diagnosis of a divergence: which cause ranks first, the record, and how it is worded.

A diagnosis is the plain dict :func:`build_diagnosis` makes (and events.jsonl keeps): ``what``,
``iteration``, ``epoch``, ``cause`` (parameter, buffer, input, loss, gradient, loss_explosion,
loss_scale, other_rank), ``parameter``, ``lr``, ``peak_lr``, ``loss_scale``, ``grad_norm_history``,
``hint``, and the policy's ``action`` and ``why``. These are plain functions of values and dicts;
NanGuard gathers the values.
"""
from __future__ import annotations

from typing import Any

__all__ = ["POLICIES", "rank_cause", "build_diagnosis", "hint", "spread", "summarize_diagnosis", "format_diagnosis",
           "log_line"]

#: What NanGuard may do about a non-finite step (``guard.on_nan``). Here, in a module without torch, so the
#: config and the command line can name them without loading it.
POLICIES = ("skip", "rollback", "stop")

#: What went non-finite first, in words, for each cause that names one.
_FIRST = {"parameter": "parameter {}", "buffer": "buffer {}", "input": "input batch", "loss": "loss",
          "gradient": "gradient of {}"}


def rank_cause(nonfinite_parameters: list[str], input_bad: bool, loss_bad: bool,
               nonfinite_gradients: list[str]) -> tuple[str, str | None]:
    """The cause of a non-finite step and the parameter it names: ``(cause, name)``.

    Ranked parameter > input > loss > gradient: each one makes everything after it non-finite, so the
    earliest in that chain is the cause. Among gradients it names the last parameter of the model,
    whose gradient backward computed first.

    Example:
        >>> rank_cause([], False, False, ["0.weight", "3.weight"])
        ('gradient', '3.weight')
        >>> rank_cause(["1.bias"], True, True, ["1.bias"]), rank_cause([], True, True, [])
        (('parameter', '1.bias'), ('input', None))
    """
    if nonfinite_parameters:
        return "parameter", nonfinite_parameters[0]
    if input_bad:
        return "input", None
    if loss_bad:
        return "loss", None
    return "gradient", nonfinite_gradients[-1] if nonfinite_gradients else None


def build_diagnosis(cause: str, iteration: int, *, epoch: int, detected_at: int, lr: float, peak_lr: float,
                    loss_scale: float | None, grad_norm_history: list[dict[str, Any]], name: str | None = None,
                    first: str | None = None, what: str | None = None, **extra: Any) -> dict[str, Any]:
    """The record of one event: what went wrong first, where, with which LR, scale and grad norms, and a hint.

    ``first`` (what went non-finite first, in words) defaults to the wording of ``cause`` and ``name``,
    and ``what`` (the headline) to "non-finite <first>"; ``extra`` fields follow the standard ones.

    Example:
        >>> d = build_diagnosis("input", 7, epoch=1, detected_at=8, lr=0.1, peak_lr=0.1, loss_scale=None,
        ...                     grad_norm_history=[], nonfinite_parameters=[])
        >>> d["what"], list(d)[-2:]
        ('non-finite input batch', ['nonfinite_parameters', 'hint'])
    """
    if first is None and cause in _FIRST:
        first = _FIRST[cause].format(name)
    diag: dict[str, Any] = {
        "iteration": iteration, "epoch": epoch, "detected_at": detected_at, "cause": cause,
        "what": what or f"non-finite {first}", "first_nonfinite": first, "parameter": name,
        "lr": lr, "peak_lr": peak_lr, "loss_scale": loss_scale, "grad_norm_history": grad_norm_history, **extra,
    }
    diag["hint"] = hint(diag)
    return diag


def spread(history: list[dict[str, Any]]) -> str:
    """``; the grad norm ranged from a to b over the last n steps`` when it varied by more than 100x."""
    finite = [h["grad_norm"] for h in history if isinstance(h["grad_norm"], float) and h["grad_norm"] > 0]
    if len(finite) < 2 or max(finite) < 100 * min(finite):
        return ""
    return f"; the grad norm ranged from {min(finite):.3g} to {max(finite):.3g} over the last {len(history)} steps"


def hint(d: dict[str, Any]) -> str:
    """A plain-language next step for a diagnosis."""
    name, it, cause = d.get("parameter"), d["iteration"], d["cause"]
    spread_note = spread(d["grad_norm_history"])
    lr_advice = f"max_lr {d['peak_lr']:.3g} is high for this model: lower --max-lr, or run `kiln lr-find` to pick one"
    if cause == "input":
        return f"the input batch at iteration {it} holds NaN/Inf: check the data and its normalisation"
    if cause == "other_rank":
        return "another process of this data-parallel run found the divergence; its own values were sound"
    if cause == "buffer":
        return (f"buffer {name} (normalisation statistics) is non-finite: activations overflowed because the weights "
                f"grew too large{spread_note} ({lr_advice}), or a batch with NaN/Inf went through the model")
    if cause == "parameter":
        return (f"parameter {name} became non-finite: an update overflowed (lr {d['lr']:.3g}) or code outside the "
                f"optimizer wrote into the weights{spread_note}; if it is the LR, {lr_advice}")
    if cause == "loss_explosion":
        return f"the loss grew to {d['max_loss'] / d['first_loss']:.3g}x its first value{spread_note}: {lr_advice}"
    if cause == "loss_scale":
        return (f"the fp16 loss scale collapsed ({d.get('consecutive_skipped_steps')} skipped steps in a row, scale "
                f"{d.get('loss_scale_now'):g}), first in the {d['first_nonfinite']}: the gradients overflow at any "
                f"scale; {lr_advice}, or train in bf16 or fp32 (--precision)")
    if cause == "gradient" and len(d.get("nonfinite_gradients") or []) == 1 and not spread_note:
        return (f"only the gradient of {name} is non-finite while the loss is finite: look for an unstable operation "
                "in that layer's backward (sqrt, log, pow, or a division near 0)")
    what = "the loss" if cause == "loss" else "the backward pass"
    return f"{what} overflowed with finite weights and inputs{spread_note}: {lr_advice}"


def summarize_diagnosis(d: dict[str, Any]) -> str:
    """One line: what went wrong, where, and what was done (summary.json's "diagnosis").

    Example:
        >>> summarize_diagnosis({"what": "non-finite loss", "iteration": 7, "epoch": 1, "why": "policy stop"})
        'training diverged: non-finite loss at iteration 7 (epoch 1); stopped (policy stop)'
    """
    return f"training diverged: {d['what']} at iteration {d['iteration']} (epoch {d['epoch']}); stopped ({d['why']})"


def format_diagnosis(d: dict[str, Any]) -> str:
    """A diagnosis as a few lines for a person (the CLI prints it once when a run diverged).

    Example:
        >>> print(format_diagnosis({"what": "non-finite loss", "iteration": 7, "epoch": 1, "lr": 0.5,
        ...     "peak_lr": 0.5, "loss_scale": None, "grad_norm_history": [{"iteration": 6, "grad_norm": 3.0}],
        ...     "why": "policy stop", "restored_iteration": 5, "hint": "lower the LR"}))
        training diverged: non-finite loss at iteration 7 (epoch 1)
          lr 0.5 (peak 0.5)
          grad norm at iterations 6-6: 3
          stopped (policy stop); weights restored to those of iteration 5
          hint: lower the LR
    """
    seen = f", last seen sound at iteration {d['finite_at']}" if d.get("finite_at") is not None else ""
    lines = [f"training diverged: {d['what']} at iteration {d['iteration']} (epoch {d['epoch']}{seen})"]
    scale = f", loss scale {d['loss_scale']:g}" if d.get("loss_scale") is not None else ""
    lines.append(f"  lr {d['lr']:.3g} (peak {d['peak_lr']:.3g}){scale}")
    history = d.get("grad_norm_history") or []
    if history:
        values = " ".join(f"{h['grad_norm']:.3g}" if isinstance(h["grad_norm"], float) else str(h["grad_norm"])
                          for h in history)
        lines.append(f"  grad norm at iterations {history[0]['iteration']}-{history[-1]['iteration']}: {values}")
    restored = d.get("restored_iteration")
    restored = f"; weights restored to those of iteration {restored}" if restored is not None else ""
    lines.append(f"  stopped ({d['why']}){restored}")
    lines.append(f"  hint: {d['hint']}")
    return "\n".join(lines)


def log_line(record: dict[str, Any], *, nan_skips: int, lr_scale: float) -> str | None:
    """The log line for an events.jsonl ``record`` of NanGuard's (None for events it does not log).

    Example:
        >>> log_line({"event": "nan_skip", "what": "non-finite loss", "iteration": 7, "epoch": 1},
        ...          nan_skips=2, lr_scale=1.0)
        'non-finite loss at iteration 7 (epoch 1): update skipped (2 so far)'
    """
    where = f"iteration {record['iteration']} (epoch {record['epoch']})"
    event = record["event"]
    if event == "nan_skip":
        return f"{record['what']} at {where}: update skipped ({nan_skips} so far)"
    if event == "rollback":
        return (f"{record['what']} at {where}: rolled back to iteration {record.get('restored_iteration')}, "
                f"LR x{lr_scale:g} (peak now {record['peak_lr_after']:.3g}); hint: {record['hint']}")
    if event == "diverged":
        return summarize_diagnosis(record)
    return None
