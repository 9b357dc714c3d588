"""LossScaleMonitor: find an fp16 loss-scale collapse in the scaler's skips, counted on the device."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.engine.events import RemovableEventHandle

from callbacks.divergence_detector import DivergenceDetector, Fault
from callbacks.files import append_jsonl
from callbacks.tensor_norms import nonfinite_names
from engine.events import StepEvents

__all__ = ["LossScaleMonitor"]


class LossScaleMonitor:
    """Under fp16, tell the loss scaler's normal skips from a collapse: ``max_consecutive_skips`` skipped
    steps in a row once a scale has worked (the skips before that calibrate a too-high initial scale), or a
    scale below ``min_loss_scale``. Other skips are only counted (by ``callbacks.AMP``).

    Each step's skip and scale are folded into device tensors (skips in a row, the longest run of the window
    and where it ended, the lowest scale): no host read per step. A policy (``RollbackPolicy``) reads them at
    its checks through :meth:`sound` (one read) and asks :meth:`fault` for the diagnosis, which names what
    went non-finite first in the run of skips from the ``detector``'s record of those steps.

    Events: STARTED, OPTIMIZER_STEP_COMPLETED. Reads ``state.step_skipped``, ``state.loss_scale``. Writes
    ``state.metrics["scale_collapses"]``; appends "scale_collapse" records to ``events_path`` (rank 0).
    State across resume: the collapse count and whether the scale has worked.

    Args:
        detector: the run's :class:`DivergenceDetector` (its step history and diagnosis).
        max_consecutive_skips, min_loss_scale: what counts as a collapse.
        events_path: the events.jsonl to append to (None: write nothing).

    Example:
        >>> import torch, torch.nn.functional as F
        >>> from engine import create_trainer
        >>> from callbacks import AMP
        >>> model = torch.nn.Linear(4, 2)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> trainer = create_trainer(model, optimizer, F.cross_entropy, precision="fp16")
        >>> detector = DivergenceDetector(model, optimizer, mode="scaled")
        >>> monitor = LossScaleMonitor(detector, max_consecutive_skips=2)
        >>> for handler in (AMP(device="cpu", init_scale=2.0**40), detector, monitor):
        ...     _ = handler.attach(trainer)
        >>> _ = trainer.run([(torch.randn(8, 4), torch.randint(0, 2, (8,)))] * 3, max_epochs=1)
        >>> bool(monitor.sound(trainer))  # 2^40 overflows: skips while the scale comes down, not a collapse
        True
    """

    def __init__(self, detector: DivergenceDetector, *, max_consecutive_skips: int = 10, min_loss_scale: float = 1.0,
                 events_path: str | Path | None = None) -> None:
        if not isinstance(max_consecutive_skips, int) or max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips must be an integer >= 1, not {max_consecutive_skips!r}")
        if not min_loss_scale >= 0:
            raise ValueError(f"min_loss_scale must be >= 0, not {min_loss_scale}")
        self.detector, self.device = detector, detector.device
        self.max_consecutive_skips, self.min_loss_scale = max_consecutive_skips, min_loss_scale
        self.events_path = Path(events_path) if events_path is not None else None
        self.scale_collapses = 0  # kept across resume, with:
        self.scale_found = False  # the scaler has made a step; skips before it are its calibration
        self._reset()

    def attach(self, engine: Engine) -> list[RemovableEventHandle]:
        """Watch the scaler's skips on ``engine``; returns the handles."""
        self._publish(engine)
        return [engine.add_event_handler(Events.STARTED, self._on_started),
                engine.add_event_handler(StepEvents.OPTIMIZER_STEP_COMPLETED, self._on_step_completed)]

    def _on_started(self, engine: Engine) -> None:
        self._reset()
        self._publish(engine)  # the count a resumed run loaded

    def _reset(self) -> None:
        self._applied = torch.tensor(self.scale_found, device=self.device)  # an update has been made
        self.restored(0)

    def restored(self, iteration: int) -> None:
        """Start counting afresh at ``iteration`` (a run's start, or a policy's restore)."""
        self._begin_window(torch.zeros((), dtype=torch.long, device=self.device), iteration)
        self._skips_read, self._streak, self._collapsed = 0, (0, 0), False  # as the last check read them

    def _begin_window(self, run: torch.Tensor, iteration: int) -> None:
        """Start a window of skip accounting with the current run of skips (device tensors)."""
        self._run = run  # skips in a row now
        self._longest = run.clone()  # the longest run in the window, where it ended and whether the scale
        self._longest_end = torch.full((), iteration, dtype=torch.long, device=self.device)  # had worked before it
        self._longest_found = self._applied.clone()
        self._min_scale = torch.full((), math.inf, device=self.device)  # the lowest scale after a step

    def _on_step_completed(self, engine: Engine) -> None:
        """Count the scaler's skips in a row and keep the window's longest run, on the device."""
        s = engine.state
        skipped = torch.as_tensor(s.step_skipped, device=self.device)
        self._run = (self._run + 1) * skipped
        longer = self._run > self._longest
        self._longest = torch.where(longer, self._run, self._longest)
        self._longest_end = torch.where(longer, s.iteration, self._longest_end)
        self._longest_found = torch.where(longer, self._applied, self._longest_found)
        self._applied = self._applied | ~skipped
        self._min_scale = torch.minimum(self._min_scale, torch.as_tensor(s.loss_scale, device=self.device))

    @property
    def steady(self) -> bool:
        """Whether the last check found no run of skips going on (a snapshot taken then has a healthy scale)."""
        return self._skips_read == 0

    def sound(self, engine: Engine) -> torch.Tensor:
        """A check (one host read): whether the window since the last one holds no collapse, as a device bool."""
        run, longest, end, found, lowest = torch.stack([
            self._run.double(), self._longest.double(), self._longest_end.double(), self._longest_found.double(),
            self._min_scale.double()]).tolist()
        self._skips_read, self._streak = int(run), (int(longest), int(end))
        self._collapsed = longest > 0 and (lowest < self.min_loss_scale
                                           or (bool(found) and longest >= self.max_consecutive_skips))
        self._begin_window(self._run, engine.state.iteration)
        return torch.tensor(not self._collapsed, device=self.device)

    def fault(self, engine: Engine) -> Fault | None:
        """After :meth:`sound` said False: record the collapse and diagnose it (None: no collapse here)."""
        if not self._collapsed:
            return None
        s, d = engine.state, self.detector
        self.scale_collapses += 1
        skips, end = self._streak
        steps = [step for step in d.history.since(-1) if step.iteration <= end]
        start = steps[-min(skips, len(steps))] if steps else None  # the first step of the run of skips
        iteration = start.iteration if start else s.iteration
        scale_now = float(s.loss_scale)
        self._publish(engine)
        if self.events_path is not None and idist.get_rank() == 0:
            append_jsonl(self.events_path, {"event": "scale_collapse", "iteration": s.iteration, "epoch": s.epoch,
                                            "loss_scale": scale_now, "consecutive_skipped_steps": skips,
                                            "streak_started_at": iteration})
        params = nonfinite_names(d.params)
        grads = d.names_of(start.grads if start else None)
        name = params[0] if params else (grads[-1] if grads else None)
        loss_bad = start is not None and not math.isfinite(start.loss.item())
        first = (f"parameter {name}" if params else "loss" if loss_bad
                 else f"gradient of {name}" if grads else "loss scale")
        what = f"fp16 loss-scale collapse ({skips} skipped steps in a row; first non-finite: {first})"
        lr, scale = d.history.at(iteration) or (s.lr, scale_now)
        diag = d.diagnosis(engine, "loss_scale", iteration, name=name, first=first, what=what, lr=lr, loss_scale=scale,
                           loss_scale_now=scale_now, consecutive_skipped_steps=skips, nonfinite_parameters=params,
                           nonfinite_gradients=grads)
        return diag, f"the scaler already skipped {skips} updates in a row"

    def _publish(self, engine: Engine) -> None:
        engine.state.metrics["scale_collapses"] = self.scale_collapses

    def state_dict(self) -> dict[str, Any]:
        """The collapse count and whether the scale has worked (weights_only-safe)."""
        self.scale_found = self.scale_found or bool(self._applied)
        return {"scale_collapses": self.scale_collapses, "scale_found": self.scale_found}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.scale_collapses = int(state.get("scale_collapses", 0))
        self.scale_found = bool(state.get("scale_found", False))
