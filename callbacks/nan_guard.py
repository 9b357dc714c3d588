"""NanGuard: catch NaN/Inf, an exploding loss and fp16 loss-scale collapse; skip the update, roll back or stop."""
from __future__ import annotations

import collections
import logging
import math
from pathlib import Path
from typing import Any, Mapping

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.engine.events import RemovableEventHandle

from callbacks.files import append_jsonl
from callbacks._snapshot import Snapshot
from callbacks._step_history import Step, StepHistory
from callbacks._tensors import nonfinite_names, norms, step_grad_norms
from callbacks.nan_diagnosis import POLICIES, build_diagnosis, log_line, rank_cause
from engine.events import StepEvents
from engine.events import is_epoch_end

__all__ = ["NanGuard", "POLICIES"]

log = logging.getLogger("kiln")


class NanGuard:
    """Watch a run for divergence and act on it: drop the update, roll back and lower the LR, or stop.

    Divergence: a non-finite (NaN/Inf, or beyond ~1e19) loss, input, gradient, weight or float buffer;
    a loss above ``max_loss_ratio`` x the run's first loss; under fp16, a loss-scale collapse
    (``max_consecutive_skips`` skips in a row once a scale has worked, or a scale below
    ``min_loss_scale``; other skips are only counted). Gradients are measured at BEFORE_OPTIMIZER_STEP
    in true scale, before clipping (the per-parameter norms are shared with ``GradClip``, whichever runs
    first), so the diagnosis (:mod:`callbacks.nan_diagnosis`) names the right parameter whatever the
    attach order.

    When it looks: under fp32/bf16 with ``skip`` it reads one flag before each optimizer step, so the
    bad update is never applied. Otherwise the step never waits for the device: each step's loss,
    input sum and gradient norms stay there (by reference: no copies) until the check every
    ``check_every`` optimizer steps and at each epoch's end, which reads them and the weights' finiteness
    at once, and snapshots the state when it is sound; a restore undoes the updates made since. Under
    fp32/bf16 with a fused optimizer (kiln's AdamW) the step's verdict is also handed to the optimizer
    as GradScaler does (``found_inf``), so a bad update never reaches the weights and the check names a
    parameter that was already bad; other optimizers apply it, and the step keeps its weights' norms
    instead. Under fp16, skips in a row are counted on the device and a collapse is found at the check.

    Policies: ``skip`` drops the update (``state.skip_step``; non-finite BatchNorm statistics come back
    from the snapshot), and rolls back instead past ``max_skips`` skips in ``skip_window`` optimizer
    steps or when one dropped update cannot help (bad weights, an exploded loss, a scale collapse).
    ``rollback`` restores the snapshot of ``to_snapshot`` and multiplies the rest of the LR schedule by
    ``lr_factor``; past ``max_rollbacks`` it stops. ``stop`` restores the snapshot, sets
    ``state.diverged`` to the diagnosis and terminates the run.

    Events: STARTED, BEFORE_OPTIMIZER_STEP, OPTIMIZER_STEP_COMPLETED (fp16), ITERATION_COMPLETED (the
    checks, after every step handler). Reads ``state.loss``, ``state.batch_losses``, ``state.batch``,
    ``state.lr``, ``state.step_skipped``, ``state.loss_scale`` (and ``state.scaler``, only to refuse a
    scaler that is not its own). Writes ``state.grad_norms`` (shared), ``state.skip_step``,
    ``state.diverged``, ``state.metrics["nan_skips"|"rollbacks"|"scale_collapses"]`` and, on restore,
    the ``to_snapshot`` objects and ``state.loss_scale``. Appends "nan_skip", "rollback",
    "scale_collapse" and "diverged" records to ``events_path`` (rank 0; with several ranks the checks
    agree through an all-reduce, so all act alike). State across resume: the counters, recent skips,
    the LR factor so far, the first loss and whether the fp16 scale has worked; the snapshot is in
    memory only, so a resumed run rolls back to the state it loaded or a later one.

    Args:
        model: the network whose parameters and buffers it checks.
        optimizer: its optimizer.
        to_snapshot: objects with state_dict/load_state_dict restored on rollback; must include the
            model. Default: the model, the optimizer and ``schedule``.
        schedule: an LR schedule with ``scale_lr(factor)`` (``OneCycle``); without one the param
            groups' LR is scaled.
        scaler: the fp16 loss scaler the trainer steps with (``AMP(...).scaler``), or None for fp32 and
            bf16. It must be the trainer's ``state.scaler`` (ValueError at STARTED otherwise): under
            fp16 its skips are normal, not NaN steps. Put it in ``to_snapshot`` to restore its scale.
        policy: "skip", "rollback" or "stop".
        check_every: optimizer steps between weight checks, flag reads and snapshots.
        max_skips, skip_window: skip rolls back instead past ``max_skips`` skips in the window.
        lr_factor: what a rollback multiplies the LR schedule by.
        max_rollbacks: rollbacks allowed before the run stops.
        max_consecutive_skips, min_loss_scale: what counts as an fp16 loss-scale collapse.
        max_loss_ratio: a loss above this multiple of the run's first loss is divergence (None: off).
        history: grad-norm entries in a diagnosis.
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
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, not {policy!r}")
        for name, value, low in (("check_every", check_every, 1), ("max_skips", max_skips, 1),
                                 ("skip_window", skip_window, 1), ("max_rollbacks", max_rollbacks, 0),
                                 ("max_consecutive_skips", max_consecutive_skips, 1), ("history", history, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, not {value!r}")
        if not 0 < lr_factor <= 1:
            raise ValueError(f"lr_factor must be in (0, 1], not {lr_factor}")
        if not min_loss_scale >= 0:
            raise ValueError(f"min_loss_scale must be >= 0, not {min_loss_scale}")
        if max_loss_ratio is not None and not max_loss_ratio > 1:
            raise ValueError(f"max_loss_ratio must be > 1 or None, not {max_loss_ratio}")
        if schedule is not None and not callable(getattr(schedule, "scale_lr", None)):
            raise TypeError("schedule must have a scale_lr(factor) method (e.g. callbacks.OneCycle)")
        if scaler is not None and not callable(getattr(scaler, "get_scale", None)):
            raise TypeError("scaler must be a torch.amp.GradScaler (e.g. callbacks.AMP(...).scaler) or None")
        if to_snapshot is None:
            to_snapshot = {"model": model, "optimizer": optimizer, **({"schedule": schedule} if schedule else {})}
        for key, obj in to_snapshot.items():
            if not (callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))):
                raise TypeError(f"to_snapshot[{key!r}] has no state_dict/load_state_dict")
        model_key = next((key for key, obj in to_snapshot.items() if obj is model), None)
        if model_key is None:
            raise ValueError("to_snapshot must include the model")
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self._params = [p for _, p in self.params]
        self._key = tuple(id(p) for p in self._params)  # shares the step's gradient norms with GradClip
        self.buffers = [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
        self.model, self.optimizer, self.schedule, self.scaler = model, optimizer, schedule, scaler
        self.to_snapshot = dict(to_snapshot)
        self._model_key = model_key  # where the snapshot keeps the model's buffers
        self.policy, self.check_every = policy, check_every
        self.max_skips, self.skip_window = max_skips, skip_window
        self.lr_factor, self.max_rollbacks = lr_factor, max_rollbacks
        self.max_consecutive_skips, self.min_loss_scale = max_consecutive_skips, min_loss_scale
        self.max_loss_ratio, self.history = max_loss_ratio, history
        self.events_path = Path(events_path) if events_path is not None else None
        self.device = self.params[0][1].device
        # kept across resume
        self.nan_skips = self.rollbacks = self.scale_collapses = 0
        self.lr_scale = 1.0  # the product of the factors rollbacks applied
        self.first_loss: float | None = None  # the reference of max_loss_ratio
        self.scale_found = False  # fp16: the scaler has made a step; skips before it are its calibration
        self._recent_skips: collections.deque[int] = collections.deque()
        self._scaled = scaler is not None  # fp16: watch the scaler's skips and scale
        self._deferred = not self._scaled and policy != "skip"  # skip must decide before the update
        # deferred: a fused optimizer takes GradScaler's found_inf, so a bad update is kept out of the
        # weights on the device, and the check still sees (and names) the weights that were bad before it
        self._drops = self._deferred and bool(getattr(optimizer, "_step_supports_amp_scaling", False))
        self._reset_run()

    # ---- wiring -------------------------------------------------------------------------------
    def attach(self, engine: Engine) -> list[RemovableEventHandle]:
        """Guard ``engine`` (a trainer from ``engine.create_trainer``); returns the handles."""
        engine.state.diverged = None
        self._publish(engine)
        handlers = [(Events.STARTED, self._on_started), (StepEvents.BEFORE_OPTIMIZER_STEP, self._on_before_step)]
        if self._scaled:
            handlers.append((StepEvents.OPTIMIZER_STEP_COMPLETED, self._on_step_completed))
        handlers.append((Events.ITERATION_COMPLETED, self._on_iteration_completed))
        return [engine.add_event_handler(event, handler) for event, handler in handlers]

    def _reset_run(self) -> None:
        """Forget the last run's per-step values: the step history, the fp16 counters, the snapshot."""
        self._zero = torch.zeros((), device=self.device)
        self._world_size = idist.get_world_size()  # data parallel: the checks agree through an all-reduce
        self._loss_max = self._zero  # the largest finite loss of the window the last check read (device)
        self._loss_ref = None if self.first_loss is None else torch.tensor(self.first_loss, device=self.device)
        self._history = StepHistory(self.history + self.check_every + 1)
        self._found = torch.zeros((), device=self.device)  # deferred, fused: 1.0 drops this step's update
        self._applied = torch.tensor(self.scale_found, device=self.device)  # fp16: an update has been made
        self._reset_streaks(torch.zeros((), dtype=torch.long, device=self.device), 0)
        self._skips_read, self._streak = 0, (0, 0)  # as the last check read them: skips in a row, (longest, end)
        self._stepped_at = -1
        self._checked_at = 0  # the iteration of the last check (or of the start)
        self._snapshot: Snapshot | None = None
        self._finite_at = 0  # the last iteration at which the state was known sound

    def _reset_streaks(self, run: torch.Tensor, iteration: int) -> None:
        """fp16: start a window of skip accounting with the current run of skips (device tensors)."""
        self._run = run  # skips in a row now
        self._longest = run.clone()  # the longest run in the window, where it ended and whether the scale
        self._longest_end = torch.full((), iteration, dtype=torch.long, device=self.device)  # had worked before it
        self._longest_found = self._applied.clone()
        self._min_scale = torch.full((), math.inf, device=self.device)  # the lowest scale after a step

    def _on_started(self, engine: Engine) -> None:
        """Check the scaler, reset the per-run values and snapshot the starting state if it is sound."""
        s = engine.state
        if s.scaler is not self.scaler:  # its skips and scale would be misread as divergence, or missed
            raise ValueError("NanGuard's scaler must be the one the trainer steps with: pass scaler=AMP(...).scaler "
                             "under fp16 and no scaler under fp32 or bf16")
        self._reset_run()
        self._checked_at = s.iteration
        s.diverged = None
        if bool(self._finite_tensor()):
            self._take_snapshot(engine)
        else:
            log.warning("kiln: the model's weights are non-finite before training starts; nothing to roll back to")
        self._publish(engine)

    # ---- per step: device work only, except skip's one read before the update -----------------
    def _on_before_step(self, engine: Engine) -> None:
        """Record the step (device work only); fp32/bf16 with skip: read one flag and drop a bad update.

        The gradients are the true-scale ones, before clipping: the per-parameter norms are measured once
        per step by whichever of NanGuard and GradClip runs first (``step_grad_norms``). Deferred with a
        fused optimizer, the step's verdict goes to it as ``found_inf`` (1 when the loss or a gradient is
        non-finite), so a bad update never reaches the weights.
        """
        s = engine.state
        self._stepped_at = s.iteration
        grads, total = step_grad_norms(s, self._params, self._key)
        inputs, params = self._zero, None
        if self._deferred:
            x = s.batch[0] if isinstance(s.batch, (list, tuple)) else s.batch
            if isinstance(x, torch.Tensor) and x.is_floating_point() and x.device == self.device:
                inputs = x.sum(dtype=torch.float32)
            if not self._drops:  # the bad update will reach the weights: keep what they were before it
                params = norms(self._params)
        step = Step(s.iteration, s.lr, s.loss_scale, s.loss, inputs, grads, total, params)
        self._history.record(step)
        if self._drops:
            torch.mul(total, 0.0, out=self._found).ne_(0.0)  # 0 * NaN/Inf is NaN: 1.0, else 0.0 (a bad loss
            # with finite gradients, which a loss can make, is applied and found by the check)
            self.optimizer.found_inf = self._found
        if self._scaled or self._deferred or math.isfinite((s.loss + total).item()):  # skip: the one read a step
            return
        s.skip_step = True
        diag = self._diagnose_step(engine, step)
        self._act(engine, diag, cannot_skip="skipping cannot repair weights" if diag["cause"] == "parameter" else None)

    def _on_step_completed(self, engine: Engine) -> None:
        """fp16: count the scaler's skips in a row and keep the window's longest run, on the device."""
        s = engine.state
        skipped = torch.as_tensor(s.step_skipped, device=self.device)
        self._run = (self._run + 1) * skipped
        longer = self._run > self._longest
        self._longest = torch.where(longer, self._run, self._longest)
        self._longest_end = torch.where(longer, s.iteration, self._longest_end)
        self._longest_found = torch.where(longer, self._applied, self._longest_found)
        self._applied = self._applied | ~skipped
        self._min_scale = torch.minimum(self._min_scale, torch.as_tensor(s.loss_scale, device=self.device))

    # ---- the check ----------------------------------------------------------------------------
    def _on_iteration_completed(self, engine: Engine) -> None:
        """The check (every ``check_every`` optimizer steps, epoch ends): snapshot if sound, else diagnose and act."""
        s = engine.state
        if self._drops:
            self.optimizer.__dict__.pop("found_inf", None)  # only the trainer's own step may use it
        due = self._stepped_at == s.iteration and s.optimizer_step % self.check_every == 0
        if not (due or is_epoch_end(s)) or s.diverged is not None:  # epoch end: before validation sees the weights
            return
        window = self._history.since(self._checked_at)
        losses = s.batch_losses[-(s.iteration - self._checked_at):] if s.iteration > self._checked_at else []
        if self._loss_ref is None and losses:
            self._loss_ref = losses[0]  # the run's first loss: the reference of max_loss_ratio
        loss_values = torch.stack(losses) if losses else None
        self._loss_max = loss_values.nan_to_num(0.0, 0.0, 0.0).max() if losses else self._zero
        bad_step = self._window_bad(window, loss_values) if self._deferred else None
        sound = self._finite_tensor(bad_step) & ~self._exploded()
        collapsed = False
        if self._scaled:
            run, longest, end, found, lowest = torch.stack([
                self._run.double(), self._longest.double(), self._longest_end.double(), self._longest_found.double(),
                self._min_scale.double()]).tolist()
            self._skips_read, self._streak = int(run), (int(longest), int(end))
            collapsed = longest > 0 and (lowest < self.min_loss_scale or (found and longest >= self.max_consecutive_skips))
            self._reset_streaks(self._run, s.iteration)
            sound = sound & torch.tensor(not collapsed, device=self.device)
        if self._world_size > 1:  # every rank acts alike, or none does
            sound = idist.all_reduce(sound.to(torch.int32), op="MIN").bool()
        checked_from, self._checked_at = self._checked_at, s.iteration
        if bool(sound):  # the host read every check_every steps
            if self._skips_read == 0:  # not in a run of fp16 skips: the scale is healthy
                self._take_snapshot(engine)
            return
        if self._scaled and collapsed:
            self._on_collapse(engine)
            return
        if bad_step is not None and not math.isfinite(bad_step.item()):
            self._act(engine, self._diagnose_deferred(engine, window, losses, checked_from),
                      cannot_skip=f"the policy is {self.policy}")
            return
        params, buffers = nonfinite_names(self.params), nonfinite_names(self.buffers)
        if params or buffers:
            cause, name = ("parameter", params[0]) if params else ("buffer", buffers[0])
            diag = self._diagnosis(engine, cause, s.iteration, name=name, nonfinite_parameters=params,
                                   nonfinite_buffers=buffers, finite_at=self._finite_at)
            self._act(engine, diag, cannot_skip="skipping cannot repair weights")
            return
        if not bool(self._exploded()):  # data parallel: another rank found the divergence
            diag = self._diagnosis(engine, "other_rank", s.iteration, what="divergence on another rank",
                                   finite_at=self._finite_at)
            self._act(engine, diag, cannot_skip="the other ranks roll back")
            return
        top, ref = self._loss_max.item(), self._loss_ref.item()
        what = f"exploding loss {top:.3g} ({top / ref:.3g}x the first loss {ref:.3g})"
        diag = self._diagnosis(engine, "loss_explosion", s.iteration, finite_at=self._finite_at, max_loss=top,
                               first_loss=ref, what=what)
        self._act(engine, diag, cannot_skip="the weights that made it are already in place")

    def _window_bad(self, window: list[Step], losses: torch.Tensor | None) -> torch.Tensor:
        """Deferred: the sum of every loss, input sum, gradient norm (and, without drops, weight norm) since the
        last check: NaN/Inf when one of them was (device)."""
        values = [step.total for step in window] + [step.inputs for step in window]
        values += [step.params.sum() for step in window if step.params is not None]
        total = torch.stack(values).sum() if values else self._zero
        return total + losses.sum() if losses is not None else total

    def _on_collapse(self, engine: Engine) -> None:
        """fp16: record the collapse, name what first went non-finite in the run of skips, and act."""
        s = engine.state
        self.scale_collapses += 1
        skips, end = self._streak
        steps = [step for step in self._history.since(-1) if step.iteration <= end]
        start = steps[-min(skips, len(steps))] if steps else None  # the first step of the run of skips
        iteration = start.iteration if start else s.iteration
        scale_now = float(s.loss_scale)
        self._event(engine, "scale_collapse", {"iteration": s.iteration, "epoch": s.epoch, "loss_scale": scale_now,
                                               "consecutive_skipped_steps": skips, "streak_started_at": iteration})
        params = nonfinite_names(self.params)
        grads = self._names_of(start.grads if start else None)
        name = params[0] if params else (grads[-1] if grads else None)
        loss_bad = start is not None and not math.isfinite(start.loss.item())
        first = (f"parameter {name}" if params else "loss" if loss_bad
                 else f"gradient of {name}" if grads else "loss scale")
        what = f"fp16 loss-scale collapse ({skips} skipped steps in a row; first non-finite: {first})"
        lr, scale = self._history.at(iteration) or (s.lr, scale_now)
        diag = self._diagnosis(engine, "loss_scale", iteration, name=name, first=first, what=what,
                               lr=lr, loss_scale=scale, loss_scale_now=scale_now,
                               consecutive_skipped_steps=skips, nonfinite_parameters=params,
                               nonfinite_gradients=grads)
        self._act(engine, diag, cannot_skip=f"the scaler already skipped {skips} updates in a row")

    # ---- diagnosis ----------------------------------------------------------------------------
    def _diagnose_step(self, engine: Engine, step: Step) -> dict[str, Any]:
        """fp32/bf16 before the optimizer step: the weights are still the ones the forward pass used."""
        s = engine.state
        params = nonfinite_names(self.params)
        grads = self._names_of(step.grads)
        batch = s.batch if isinstance(s.batch, (list, tuple)) else [s.batch]
        input_bad = any(isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())
                        for t in batch)
        cause, name = rank_cause(params, input_bad, not math.isfinite(step.loss.item()), grads)
        return self._diagnosis(engine, cause, s.iteration, name=name, nonfinite_parameters=params,
                               nonfinite_gradients=grads)

    def _diagnose_deferred(self, engine: Engine, window: list[Step], losses: list[torch.Tensor],
                           checked_from: int) -> dict[str, Any]:
        """fp32/bf16 rollback and stop, at a check: find the first bad step since the last check, and its cause.

        The weights bad before it are the ones bad now when the optimizer dropped the bad updates
        (``found_inf``), else the norms the step recorded.
        """
        s = engine.state
        loss_values = torch.stack(losses).tolist() if losses else []
        first_loss_at = next((s.iteration - len(losses) + 1 + i for i, v in enumerate(loss_values)
                              if not math.isfinite(v)), None)
        step_values = torch.stack([torch.stack([st.total, st.inputs, st.params.sum() if st.params is not None
                                                else self._zero]) for st in window]).tolist() if window else []
        first_step = next((st for st, v in zip(window, step_values) if not all(map(math.isfinite, v))), None)
        candidates = [it for it in (first_loss_at, first_step.iteration if first_step else None) if it is not None]
        iteration = min(candidates) if candidates else checked_from + 1
        step = next((st for st in window if st.iteration >= iteration), None)  # its grads carry the fault
        if self._drops or step is None or step.params is None:
            params = nonfinite_names(self.params)
        else:
            params = self._names_of(step.params)
        grads = self._names_of(step.grads if step else None)
        input_bad = step is not None and step.iteration == iteration and not math.isfinite(float(step.inputs))
        loss_bad = first_loss_at is not None and first_loss_at == iteration
        cause, name = rank_cause(params, input_bad, loss_bad, grads)
        return self._diagnosis(engine, cause, iteration, name=name, nonfinite_parameters=params,
                               nonfinite_gradients=grads)

    def _diagnosis(self, engine: Engine, cause: str, iteration: int, **fields: Any) -> dict[str, Any]:
        """The diagnosis of a fault first seen at ``iteration``, with the LR, loss scale and grad norms of that step."""
        s = engine.state
        lr, scale = self._history.at(iteration) or (s.lr, s.loss_scale)
        fields.setdefault("lr", lr)
        fields.setdefault("loss_scale", float(scale) if scale is not None else None)
        epoch = (iteration - 1) // s.epoch_length + 1 if s.epoch_length else s.epoch
        return build_diagnosis(cause, iteration, epoch=epoch, detected_at=s.iteration, peak_lr=self._peak_lr(),
                               grad_norm_history=self._history.grad_norms(iteration, self.history), **fields)

    def _names_of(self, values: torch.Tensor | None) -> list[str]:
        """The parameters whose entry in ``values`` (one per parameter: norms) is NaN/Inf."""
        if values is None:
            return []
        return [n for (n, _), v in zip(self.params, values.tolist()) if not math.isfinite(v)]

    def _peak_lr(self) -> float:
        return max(float(g.get("max_lr", g["lr"])) for g in self.optimizer.param_groups)

    # ---- policies -----------------------------------------------------------------------------
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
        if action == "rollback" and self._snapshot is None:
            action, why = "stop", "no sound state to roll back to"
        diag.update(policy=self.policy, action=action, why=why)
        s.skip_step = True
        if action == "skip":
            self.nan_skips += 1
            self._recent_skips.append(s.optimizer_step)
            diag["restored_buffers"] = self._restore_buffers()
            self._event(engine, "nan_skip", diag)
            return
        if self._snapshot is not None:
            self._restore(engine)
            diag["restored_iteration"] = self._snapshot.iteration
        if action == "rollback":
            self.rollbacks += 1
            target = self.lr_scale * self.lr_factor
            self._scale_lr(target / self._snapshot.lr_scale)
            self.lr_scale = target
            diag.update(lr_scale=self.lr_scale, peak_lr_after=self._peak_lr())
            self._event(engine, "rollback", diag)
            return
        s.diverged = diag
        self._event(engine, "diverged", diag)
        engine.terminate()

    def _restore(self, engine: Engine) -> None:
        """Load the snapshot back and forget the bad steps seen since."""
        self._snapshot.restore(self.to_snapshot)
        if self.scaler is not None:  # restored with to_snapshot["scaler"], if it is there
            engine.state.loss_scale = torch.full((), self.scaler.get_scale(), device=self.device)
        self._finite_at = engine.state.iteration
        self._recent_skips.clear()
        self._reset_streaks(torch.zeros_like(self._run), engine.state.iteration)
        self._skips_read = 0
        self._checked_at, self._loss_max = engine.state.iteration, self._zero

    def _restore_buffers(self) -> list[str]:
        """Skip: put back non-finite float buffers (BatchNorm statistics a bad batch went through)."""
        bad = nonfinite_names(self.buffers)
        if bad and self._snapshot is not None:
            self._snapshot.restore_tensors(self._model_key, self.buffers, bad)
        return bad

    def _scale_lr(self, factor: float) -> None:
        if self.schedule is not None:
            self.schedule.scale_lr(factor)
        else:
            for group in self.optimizer.param_groups:
                group["lr"] = group["lr"] * factor

    def _finite_tensor(self, extra: torch.Tensor | None = None) -> torch.Tensor:
        """Whether every weight and float buffer (and ``extra``, a 0-dim sum) is finite, as one device bool."""
        total = norms(self._params + [b for _, b in self.buffers]).sum()
        return torch.isfinite(total if extra is None else total + extra)

    def _exploded(self) -> torch.Tensor:
        if self.max_loss_ratio is None or self._loss_ref is None:
            return torch.zeros((), dtype=torch.bool, device=self.device)
        return self._loss_max > self.max_loss_ratio * self._loss_ref  # False while the reference is NaN

    def _take_snapshot(self, engine: Engine) -> None:
        self._finite_at = engine.state.iteration
        self._snapshot = Snapshot.take(self.to_snapshot, engine.state.iteration, self.lr_scale)

    # ---- output -------------------------------------------------------------------------------
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
        metrics = engine.state.metrics
        metrics["nan_skips"] = self.nan_skips
        metrics["rollbacks"] = self.rollbacks
        if self._scaled:
            metrics["scale_collapses"] = self.scale_collapses

    # ---- resume -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Counters, recent skips, the LR factor so far and the first loss (weights_only-safe)."""
        if self.first_loss is None and self._loss_ref is not None:
            self.first_loss = float(self._loss_ref)
        self.scale_found = self.scale_found or bool(self._applied)
        return {"nan_skips": self.nan_skips, "rollbacks": self.rollbacks, "scale_collapses": self.scale_collapses,
                "lr_scale": self.lr_scale, "recent_skips": list(self._recent_skips), "first_loss": self.first_loss,
                "scale_found": self.scale_found}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.nan_skips = int(state.get("nan_skips", 0))
        self.rollbacks = int(state.get("rollbacks", 0))
        self.scale_collapses = int(state.get("scale_collapses", 0))
        self.lr_scale = float(state.get("lr_scale", 1.0))
        self._recent_skips = collections.deque(int(step) for step in state.get("recent_skips", []))
        self.scale_found = bool(state.get("scale_found", False))
        first = state.get("first_loss")
        self.first_loss = float(first) if first is not None else None
        self._loss_ref = None if self.first_loss is None else torch.tensor(self.first_loss, device=self.device)
