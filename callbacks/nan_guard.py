"""NanGuard: the divergence guard kiln's runs use, composed of a detector, an fp16 scale monitor and a policy."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from ignite.engine import Engine
from ignite.engine.events import RemovableEventHandle

from callbacks.divergence_detector import DivergenceDetector
from callbacks.loss_scale_monitor import LossScaleMonitor
from callbacks.nan_diagnosis import POLICIES
from callbacks.rollback_policy import RollbackPolicy

__all__ = ["NanGuard", "POLICIES"]


class NanGuard:
    """Watch a run for divergence and act on it: drop the update, roll back and lower the LR, or stop.

    Three handlers, each readable on its own, built and attached in the order they need:

    - :class:`~callbacks.divergence_detector.DivergenceDetector` finds a non-finite loss, input, gradient,
      weight or buffer, or a loss above ``max_loss_ratio`` x the first one, and diagnoses it;
    - :class:`~callbacks.loss_scale_monitor.LossScaleMonitor` (fp16 only) finds a loss-scale collapse;
    - :class:`~callbacks.rollback_policy.RollbackPolicy` checks every ``check_every`` optimizer steps and at
      epoch ends, keeps a snapshot of the last sound state, and skips, rolls back or stops.

    How it looks depends on the precision and policy: under fp32/bf16 with ``skip`` the detector reads one
    flag before each optimizer step, so the bad update is never applied; otherwise nothing is read until a
    check, and a fused optimizer (kiln's AdamW) drops a bad update on the device. Under fp16 the loss scaler
    drops bad updates itself and the monitor tells its normal skips from a collapse.

    Events, reads and writes: those of the three. State across resume: one dict, as before the split
    (counters, recent skips, the LR factor so far, the first loss, whether the fp16 scale has worked).

    Args:
        model, optimizer: the network and its optimizer.
        to_snapshot, schedule, policy, check_every, max_skips, skip_window, lr_factor, max_rollbacks:
            the policy's (:class:`RollbackPolicy`).
        scaler: the fp16 loss scaler the trainer steps with (``AMP(...).scaler``), or None for fp32 and
            bf16. It must be the trainer's ``state.scaler`` (ValueError at STARTED otherwise).
        max_consecutive_skips, min_loss_scale: the monitor's: what counts as an fp16 collapse.
        max_loss_ratio, history: the detector's.
        events_path: the events.jsonl to append to (None: write nothing).

    Example:
        >>> import torch, torch.nn.functional as F
        >>> from engine import create_trainer
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> trainer = create_trainer(model, opt, F.cross_entropy)
        >>> guard = NanGuard(model, opt, policy="skip")
        >>> handles = guard.attach(trainer)
        >>> x = torch.randn(8, 4); x[0, 0] = float("nan")
        >>> trainer.run([(x, torch.randint(0, 2, (8,)))], max_epochs=1).metrics["nan_skips"]
        1
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        to_snapshot: Mapping[str, Any] | None = None,
        schedule: Any = None,
        scaler: torch.amp.GradScaler | None = None,
        policy: str = "rollback",
        check_every: int = 20,
        max_skips: int = 3,
        skip_window: int = 100,
        lr_factor: float = 0.5,
        max_rollbacks: int = 3,
        max_consecutive_skips: int = 10,
        min_loss_scale: float = 1.0,
        max_loss_ratio: float | None = 100.0,
        history: int = 16,
        events_path: str | Path | None = None,
    ) -> None:
        mode = "scaled" if scaler is not None else "immediate" if policy == "skip" else "deferred"
        self.detector = DivergenceDetector(model, optimizer, mode=mode, max_loss_ratio=max_loss_ratio,
                                           history=history, check_every=check_every)
        monitor = LossScaleMonitor(self.detector, max_consecutive_skips=max_consecutive_skips,
                                   min_loss_scale=min_loss_scale, events_path=events_path)  # checks them too
        self.monitor = monitor if scaler is not None else None
        self.policy = RollbackPolicy(
            self.detector, monitor=self.monitor, to_snapshot=to_snapshot, schedule=schedule, scaler=scaler,
            policy=policy, check_every=check_every, max_skips=max_skips, skip_window=skip_window,
            lr_factor=lr_factor, max_rollbacks=max_rollbacks, events_path=events_path)
        self.to_snapshot = self.policy.to_snapshot

    def attach(self, engine: Engine) -> list[RemovableEventHandle]:
        """Guard ``engine`` (a trainer from ``engine.create_trainer``); returns the handles."""
        handles = self.detector.attach(engine) + self.policy.attach(engine)  # the detector first: it records
        return handles + (self.monitor.attach(engine) if self.monitor is not None else [])  # what the policy reads

    @property
    def nan_skips(self) -> int:
        """Updates dropped so far."""
        return self.policy.nan_skips

    @property
    def rollbacks(self) -> int:
        """Rollbacks so far."""
        return self.policy.rollbacks

    @property
    def lr_scale(self) -> float:
        """The product of the LR factors rollbacks applied."""
        return self.policy.lr_scale

    @property
    def scale_collapses(self) -> int:
        """fp16 loss-scale collapses so far."""
        return self.monitor.scale_collapses if self.monitor is not None else 0

    @property
    def first_loss(self) -> float | None:
        """The run's first loss, the reference of ``max_loss_ratio`` (None before the first check)."""
        return self.detector.state_dict()["first_loss"]

    def state_dict(self) -> dict[str, Any]:
        """The three handlers' state in one weights_only-safe dict (the keys checkpoints have always had)."""
        policy = self.policy.state_dict()
        scale = self.monitor.state_dict() if self.monitor is not None else {"scale_collapses": 0, "scale_found": False}
        return {"nan_skips": policy["nan_skips"], "rollbacks": policy["rollbacks"],
                "scale_collapses": scale["scale_collapses"], "lr_scale": policy["lr_scale"],
                "recent_skips": policy["recent_skips"], **self.detector.state_dict(),
                "scale_found": scale["scale_found"]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.policy.load_state_dict(state)
        self.detector.load_state_dict(state)
        if self.monitor is not None:
            self.monitor.load_state_dict(state)
