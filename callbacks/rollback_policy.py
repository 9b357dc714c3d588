"""RollbackPolicy: keep a sound snapshot, and act on divergence: drop the update, roll back and cut the LR, or stop."""
from __future__ import annotations

import collections
import logging
from pathlib import Path
from typing import Any, Mapping

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.engine.events import RemovableEventHandle

from callbacks.divergence_detector import DivergenceDetector
from callbacks.files import append_jsonl
from callbacks.loss_scale_monitor import LossScaleMonitor
from callbacks.nan_diagnosis import POLICIES, log_line
from callbacks.snapshot import Snapshot
from callbacks.tensor_norms import nonfinite_names
from engine.events import StepEvents, is_epoch_end

__all__ = ["RollbackPolicy"]

log = logging.getLogger("kiln")


class RollbackPolicy:
    """Check the run every ``check_every`` optimizer steps and at each epoch's end: snapshot it while it is sound,
    act on what the ``detector`` (and, under fp16, the ``monitor``) found when it is not. A check asks both (device
    work, then one read; with several ranks they agree through an all-reduce, so all act alike); no snapshot is
    taken during a run of fp16 skips. In the detector's immediate mode it also acts before a bad update.

    Policies: ``skip`` drops the update (``state.skip_step``; non-finite BatchNorm statistics come back
    from the snapshot), and rolls back instead past ``max_skips`` skips in ``skip_window`` optimizer steps
    or when one dropped update cannot help (bad weights, an exploded loss, a scale collapse). ``rollback``
    restores the snapshot and multiplies the rest of the LR schedule by ``lr_factor``; past
    ``max_rollbacks`` it stops. ``stop`` restores the snapshot, sets ``state.diverged`` to the diagnosis
    and terminates the run.

    Events: STARTED, BEFORE_OPTIMIZER_STEP (immediate mode), ITERATION_COMPLETED (attach it after the
    detector and the step's other handlers). Reads ``state.scaler`` (to refuse one that is not its own),
    ``state.accumulating``, ``state.optimizer_step``. Writes ``state.skip_step``, ``state.diverged``,
    ``state.metrics["nan_skips"|"rollbacks"]`` and, on restore, the ``to_snapshot`` objects and
    ``state.loss_scale``. Appends "nan_skip", "rollback" and "diverged" records to ``events_path`` and logs
    a line for each (rank 0). State across resume: the counters, recent skips and the LR factor so far; the
    snapshot is in memory only, so a resumed run rolls back to the state it loaded or a later one.

    Args:
        detector: the run's :class:`DivergenceDetector` (its model and optimizer are the ones restored).
        monitor: the run's :class:`LossScaleMonitor` under fp16, else None.
        to_snapshot: objects (state_dict/load_state_dict) restored on rollback, the model among them; default:
            the model, the optimizer and ``schedule`` (with ``scale_lr(factor)``, e.g. ``OneCycle``; else the
            param groups' LR is scaled).
        schedule: see ``to_snapshot``.
        scaler: the trainer's fp16 loss scaler (``AMP(...).scaler``), or None for fp32 and bf16; put it in
            ``to_snapshot`` to restore its scale.
        policy: "skip", "rollback" or "stop".
        check_every: optimizer steps between checks (and snapshots).
        max_skips, skip_window: skip rolls back instead past ``max_skips`` skips in the window.
        lr_factor: what a rollback multiplies the LR schedule by.
        max_rollbacks: rollbacks allowed before the run stops.
        events_path: the events.jsonl to append to (None: write nothing).

    Example:
        >>> import torch, torch.nn.functional as F
        >>> from engine import create_trainer
        >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
        >>> x[0, 0] = float("nan")  # a bad input batch
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = torch.optim.AdamW(model.parameters(), fused=True)  # drops a flagged update on the device
        >>> detector = DivergenceDetector(model, opt, check_every=1)
        >>> policy = RollbackPolicy(detector, policy="stop", check_every=1)
        >>> trainer = create_trainer(model, opt, F.cross_entropy)
        >>> handles = detector.attach(trainer) + policy.attach(trainer)
        >>> trainer.run([(x, y)], max_epochs=1).diverged["cause"], bool(model.weight.isfinite().all())
        ('input', True)
    """

    def __init__(self, detector: DivergenceDetector, *, monitor: LossScaleMonitor | None = None,
                 to_snapshot: Mapping[str, Any] | None = None, schedule: Any = None,
                 scaler: torch.amp.GradScaler | None = None, policy: str = "rollback", check_every: int = 20,
                 max_skips: int = 3, skip_window: int = 100, lr_factor: float = 0.5, max_rollbacks: int = 3,
                 events_path: str | Path | None = None) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, not {policy!r}")
        for name, value, low in (("check_every", check_every, 1), ("max_skips", max_skips, 1),
                                 ("skip_window", skip_window, 1), ("max_rollbacks", max_rollbacks, 0)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, not {value!r}")
        if not 0 < lr_factor <= 1:
            raise ValueError(f"lr_factor must be in (0, 1], not {lr_factor}")
        if schedule is not None and not callable(getattr(schedule, "scale_lr", None)):
            raise TypeError("schedule must have a scale_lr(factor) method (e.g. callbacks.OneCycle)")
        if scaler is not None and not callable(getattr(scaler, "get_scale", None)):
            raise TypeError("scaler must be a torch.amp.GradScaler (e.g. callbacks.AMP(...).scaler) or None")
        model, optimizer = detector.model, detector.optimizer
        if to_snapshot is None:
            to_snapshot = {"model": model, "optimizer": optimizer, **({"schedule": schedule} if schedule else {})}
        for key, obj in to_snapshot.items():
            if not (callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))):
                raise TypeError(f"to_snapshot[{key!r}] has no state_dict/load_state_dict")
        self._model_key = next((key for key, obj in to_snapshot.items() if obj is model), None)
        if self._model_key is None:  # where the snapshot keeps the model's buffers
            raise ValueError("to_snapshot must include the model")
        self.detector, self.monitor, self.to_snapshot = detector, monitor, dict(to_snapshot)
        self.optimizer, self.schedule, self.scaler = optimizer, schedule, scaler
        self.policy, self.check_every, self.max_skips, self.skip_window = policy, check_every, max_skips, skip_window
        self.lr_factor, self.max_rollbacks = lr_factor, max_rollbacks
        self.events_path = Path(events_path) if events_path is not None else None
        self.nan_skips = self.rollbacks = 0  # kept across resume, with:
        self.lr_scale = 1.0  # the product of the factors rollbacks applied
        self._recent_skips: collections.deque[int] = collections.deque()
        self.snapshot: Snapshot | None = None
        self._finite_at = self._checked_at = 0  # the iterations of the last sound state, and of the last check

    def attach(self, engine: Engine) -> list[RemovableEventHandle]:
        """Check and act on ``engine`` (after the detector is attached); returns the handles."""
        engine.state.diverged = None
        self._publish(engine)
        handlers = [(Events.STARTED, self._on_started), (Events.ITERATION_COMPLETED, self._on_iteration_completed)]
        if self.detector.mode == "immediate":
            handlers.insert(1, (StepEvents.BEFORE_OPTIMIZER_STEP, self._on_before_step))
        return [engine.add_event_handler(event, handler) for event, handler in handlers]

    def _on_started(self, engine: Engine) -> None:
        """Refuse a scaler that is not the trainer's; snapshot the starting state if it is sound."""
        s = engine.state
        if s.scaler is not self.scaler:  # its skips and scale would be misread as divergence, or missed
            raise ValueError("NanGuard's scaler must be the one the trainer steps with: pass scaler=AMP(...).scaler "
                             "under fp16 and no scaler under fp32 or bf16")
        self._world_size = idist.get_world_size()  # data parallel: the checks agree through an all-reduce
        self.snapshot, self._finite_at, self._checked_at = None, 0, s.iteration
        s.diverged = None
        if bool(self.detector.finite()):
            self._take_snapshot(engine)
        else:
            log.warning("kiln: the model's weights are non-finite before training starts; nothing to roll back to")
        self._publish(engine)

    def _on_before_step(self, engine: Engine) -> None:
        """Immediate mode: drop a bad update before it is applied, and act."""
        fault = self.detector.step_fault(engine)
        if fault is not None:
            engine.state.skip_step = True
            self._act(engine, *fault)

    def _on_iteration_completed(self, engine: Engine) -> None:
        """The check (every ``check_every`` optimizer steps, epoch ends): snapshot if sound, else act."""
        s = engine.state
        due = not s.accumulating and s.optimizer_step % self.check_every == 0
        if not (due or is_epoch_end(s)) or s.diverged is not None:  # epoch end: before validation sees the weights
            return
        since, self._checked_at = self._checked_at, s.iteration
        sound = self.detector.sound(engine, since)
        if self.monitor is not None:
            sound = sound & self.monitor.sound(engine)
        if self._world_size > 1:  # every rank acts alike, or none does
            sound = idist.all_reduce(sound.to(torch.int32), op="MIN").bool()
        if bool(sound):  # the host read every check_every steps
            if self.monitor is None or self.monitor.steady:  # not in a run of fp16 skips: the scale is healthy
                self._take_snapshot(engine)
            return
        fault = self.monitor.fault(engine) if self.monitor is not None else None
        self._act(engine, *(fault or self.detector.fault(engine, since, self._finite_at)))

    def _act(self, engine: Engine, diag: dict[str, Any], cannot_skip: str | None) -> None:
        """Apply the policy; ``cannot_skip`` says why dropping this step's update would not be enough."""
        s = engine.state
        action, why = self.policy, f"policy {self.policy}"
        if action == "skip":
            while self._recent_skips and self._recent_skips[0] <= s.optimizer_step - self.skip_window:
                self._recent_skips.popleft()
            if cannot_skip:
                action, why = "rollback", f"policy skip, but {cannot_skip}"
            elif len(self._recent_skips) >= self.max_skips:
                skips = len(self._recent_skips)
                action, why = "rollback", f"policy skip, and {skips} skips within {self.skip_window} steps"
        if action == "rollback" and self.rollbacks >= self.max_rollbacks:
            action, why = "stop", f"{self.rollbacks} rollbacks already (max_rollbacks {self.max_rollbacks})"
        if action == "rollback" and self.snapshot is None:
            action, why = "stop", "no sound state to roll back to"
        diag.update(policy=self.policy, action=action, why=why)
        s.skip_step = True
        if action == "skip":
            self.nan_skips += 1
            self._recent_skips.append(s.optimizer_step)
            diag["restored_buffers"] = self._restore_buffers()
            self._event(engine, "nan_skip", diag)
            return
        if self.snapshot is not None:
            self._restore(engine)
            diag["restored_iteration"] = self.snapshot.iteration
        if action == "rollback":
            self.rollbacks += 1
            target = self.lr_scale * self.lr_factor
            self._scale_lr(target / self.snapshot.lr_scale)
            self.lr_scale = target
            diag.update(lr_scale=self.lr_scale, peak_lr_after=self.detector.peak_lr())
            self._event(engine, "rollback", diag)
            return
        s.diverged = diag
        self._event(engine, "diverged", diag)
        engine.terminate()

    def _restore(self, engine: Engine) -> None:
        """Load the snapshot back and forget the bad steps seen since."""
        self.snapshot.restore(self.to_snapshot)
        if self.scaler is not None:  # restored with to_snapshot["scaler"], if it is there
            engine.state.loss_scale = torch.full((), self.scaler.get_scale(), device=self.detector.device)
        self._finite_at = self._checked_at = engine.state.iteration
        self._recent_skips.clear()
        if self.monitor is not None:
            self.monitor.restored(engine.state.iteration)

    def _restore_buffers(self) -> list[str]:
        """Skip: put back non-finite float buffers (BatchNorm statistics a bad batch went through)."""
        bad = nonfinite_names(self.detector.buffers)
        if bad and self.snapshot is not None:
            self.snapshot.restore_tensors(self._model_key, self.detector.buffers, bad)
        return bad

    def _scale_lr(self, factor: float) -> None:
        if self.schedule is not None:
            self.schedule.scale_lr(factor)
        else:
            for group in self.optimizer.param_groups:
                group["lr"] = group["lr"] * factor

    def _take_snapshot(self, engine: Engine) -> None:
        self._finite_at = engine.state.iteration
        self.snapshot = Snapshot.take(self.to_snapshot, engine.state.iteration, self.lr_scale)

    def _event(self, engine: Engine, event: str, record: dict[str, Any]) -> None:
        """Publish the counters; on rank 0 append ``record`` to events.jsonl and log one line."""
        record = {"event": event, **record}
        self._publish(engine)
        if idist.get_rank() != 0:
            return
        if self.events_path is not None:
            append_jsonl(self.events_path, record)
        line = log_line(record, nan_skips=self.nan_skips, lr_scale=self.lr_scale)
        if line is not None:  # extra: a caller that reports the event itself can filter the line by kind
            log.warning("kiln: %s", line, extra={"kiln_event": event})

    def _publish(self, engine: Engine) -> None:
        engine.state.metrics["nan_skips"] = self.nan_skips
        engine.state.metrics["rollbacks"] = self.rollbacks

    def state_dict(self) -> dict[str, Any]:
        """The counters, recent skips and the LR factor so far (weights_only-safe)."""
        return {"nan_skips": self.nan_skips, "rollbacks": self.rollbacks, "lr_scale": self.lr_scale,
                "recent_skips": list(self._recent_skips)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.nan_skips = int(state.get("nan_skips", 0))
        self.rollbacks = int(state.get("rollbacks", 0))
        self.lr_scale = float(state.get("lr_scale", 1.0))
        self._recent_skips = collections.deque(int(step) for step in state.get("recent_skips", []))
