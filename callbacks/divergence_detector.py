"""DivergenceDetector: remember each optimizer step on the device, and find what went non-finite or exploded."""
from __future__ import annotations

import math
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.engine.events import RemovableEventHandle

from callbacks.nan_diagnosis import build_diagnosis, rank_cause
from callbacks.step_history import Step, StepHistory
from callbacks.tensor_norms import nonfinite_names, norms, step_grad_norms
from engine.amp_protocol import drops_on_device
from engine.events import StepEvents

__all__ = ["DivergenceDetector", "MODES"]

#: immediate: one host read a step (a bad update is found before it is applied); deferred: none, the
#: checks read a window of steps at once; scaled: fp16, where the loss scaler drops bad updates itself.
MODES = ("immediate", "deferred", "scaled")

Fault = tuple[dict[str, Any], "str | None"]  # a diagnosis, and why dropping one update would not repair it


class DivergenceDetector:
    """Find divergence: a non-finite (NaN/Inf, or beyond ~1e19) loss, input, gradient, weight or float buffer,
    or a loss above ``max_loss_ratio`` x the run's first loss. It observes; a policy acts.

    Each optimizer step is recorded at BEFORE_OPTIMIZER_STEP, by reference: its loss, gradient norms in true
    scale before clipping (shared with ``GradClip``, whichever runs first), and in deferred mode its input
    sum and, when the update will reach the weights, their norms. A policy (``RollbackPolicy``) asks
    :meth:`sound` at its checks (device work only) and, when the answer is False, :meth:`fault` for the
    diagnosis of the first bad step since the last check. In immediate mode (fp32/bf16 and policy skip) it
    reads one flag a step, and :meth:`step_fault` diagnoses a bad step before its update. In deferred mode
    with a fused optimizer the step's verdict goes to the step as ``state.drop_update``, so a bad update
    never reaches the weights (``engine.amp_protocol``).

    Events: STARTED (forgets the last run's steps), BEFORE_OPTIMIZER_STEP. Reads ``state.loss``,
    ``state.batch``, ``state.lr``, ``state.loss_scale``, ``state.batch_losses``. Writes ``state.grad_norms``
    (shared) and, deferred with a fused optimizer, ``state.drop_update``.
    State across resume: the run's first loss (the reference of ``max_loss_ratio``).

    Args:
        model, optimizer: what it watches (the optimizer's ``max_lr`` goes into a diagnosis).
        mode: one of :data:`MODES`.
        max_loss_ratio: a loss above this multiple of the run's first loss is divergence (None: off).
        history: grad-norm entries in a diagnosis.
        check_every: optimizer steps between the policy's checks (how many steps it must remember).

    Example:
        >>> import torch, torch.nn.functional as F
        >>> from engine import create_trainer
        >>> model = torch.nn.Linear(4, 2)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> detector = DivergenceDetector(model, optimizer)
        >>> trainer = create_trainer(model, optimizer, F.cross_entropy)
        >>> handles = detector.attach(trainer)
        >>> x = torch.randn(8, 4); x[0, 0] = float("nan")
        >>> _ = trainer.run([(x, torch.randint(0, 2, (8,)))], max_epochs=1)
        >>> bool(detector.sound(trainer, since=0)), detector.fault(trainer, since=0, finite_at=0)[0]["cause"]
        (False, 'input')
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, mode: str = "deferred",
                 max_loss_ratio: float | None = 100.0, history: int = 16, check_every: int = 20) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        if max_loss_ratio is not None and not max_loss_ratio > 1:
            raise ValueError(f"max_loss_ratio must be > 1 or None, not {max_loss_ratio}")
        for name, value in (("history", history), ("check_every", check_every)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, not {value!r}")
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self._params = [p for _, p in self.params]
        self._key = tuple(id(p) for p in self._params)  # shares the step's gradient norms with GradClip
        self.buffers = [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
        self.model, self.optimizer, self.mode = model, optimizer, mode
        self.max_loss_ratio, self.history_length, self.check_every = max_loss_ratio, history, check_every
        self.device = self._params[0].device
        self.first_loss: float | None = None  # kept across resume
        # deferred, fused: the optimizer drops a bad update on the device; the check then sees (and names)
        # the weights that were bad before it. Otherwise the update is applied: keep the weights' norms
        self._drops = mode == "deferred" and drops_on_device(optimizer)
        self._reset()

    def attach(self, engine: Engine) -> list[RemovableEventHandle]:
        """Record the optimizer steps of ``engine``; returns the handles."""
        return [engine.add_event_handler(Events.STARTED, self._on_started),
                engine.add_event_handler(StepEvents.BEFORE_OPTIMIZER_STEP, self._on_before_step)]

    def _on_started(self, engine: Engine) -> None:
        self._reset()

    def _reset(self) -> None:  # the last run's steps go; the first loss stays
        self._zero = torch.zeros((), device=self.device)
        self._loss_max = self._zero  # the largest finite loss of the window the last check read (device)
        self._loss_ref = None if self.first_loss is None else torch.tensor(self.first_loss, device=self.device)
        self.history = StepHistory(self.history_length + self.check_every + 1)
        self._found = torch.zeros((), device=self.device)  # deferred, fused: 1.0 drops this step's update
        self._stepped_at, self._bad, self._window = -1, None, ([], [], None)

    def _on_before_step(self, engine: Engine) -> None:
        """Record the step (device work only); immediate mode: read one flag, the step's soundness."""
        s = engine.state
        self._stepped_at = s.iteration
        grads, total = step_grad_norms(s, self._params, self._key)
        inputs, params = self._zero, None
        if self.mode == "deferred":
            x = s.batch[0] if isinstance(s.batch, (list, tuple)) else s.batch
            if isinstance(x, torch.Tensor) and x.is_floating_point() and x.device == self.device:
                inputs = x.sum(dtype=torch.float32)
            if not self._drops:  # the bad update will reach the weights: keep what they were before it
                params = norms(self._params)
        step = Step(s.iteration, s.lr, s.loss_scale, s.loss, inputs, grads, total, params)
        self.history.record(step)
        if self._drops:
            torch.mul(total, 0.0, out=self._found).ne_(0.0)  # 0 * NaN/Inf is NaN: 1.0, else 0.0 (a bad loss
            s.drop_update = self._found  # with finite gradients, which a loss can make, is found by the check)
        self._bad = None
        if self.mode == "immediate" and not math.isfinite((s.loss + total).item()):  # the one read a step
            self._bad = step

    def step_fault(self, engine: Engine) -> Fault | None:
        """Immediate mode, at BEFORE_OPTIMIZER_STEP after this handler: the diagnosis of this step if it is bad."""
        if self._stepped_at != engine.state.iteration:
            raise RuntimeError("attach the DivergenceDetector before the policy that asks it about a step")
        if self._bad is None:
            return None
        diag = self._diagnose_step(engine, self._bad)
        return diag, "skipping cannot repair weights" if diag["cause"] == "parameter" else None

    def sound(self, engine: Engine, since: int) -> torch.Tensor:
        """Whether every step after iteration ``since`` and the weights now are sound, as a device bool."""
        s = engine.state
        window = self.history.since(since)
        losses = s.batch_losses[-(s.iteration - since):] if s.iteration > since else []
        if self._loss_ref is None and losses:
            self._loss_ref = losses[0]  # the run's first loss: the reference of max_loss_ratio
        loss_values = torch.stack(losses) if losses else None
        self._loss_max = loss_values.nan_to_num(0.0, 0.0, 0.0).max() if losses else self._zero
        bad_step = self._window_bad(window, loss_values) if self.mode == "deferred" else None
        self._window = (window, losses, bad_step)
        return self.finite(bad_step) & ~self._exploded()

    def fault(self, engine: Engine, since: int, finite_at: int) -> Fault:
        """After :meth:`sound` said False: what went wrong first (``finite_at``: when the state was last sound)."""
        s = engine.state
        window, losses, bad_step = self._window
        if bad_step is not None and not math.isfinite(bad_step.item()):
            return self._diagnose_window(engine, window, losses, since), "the update was already applied"
        params, buffers = nonfinite_names(self.params), nonfinite_names(self.buffers)
        if params or buffers:
            cause, name = ("parameter", params[0]) if params else ("buffer", buffers[0])
            diag = self.diagnosis(engine, cause, s.iteration, name=name, nonfinite_parameters=params,
                                  nonfinite_buffers=buffers, finite_at=finite_at)
            return diag, "skipping cannot repair weights"
        if not bool(self._exploded()):  # data parallel: another rank found the divergence
            diag = self.diagnosis(engine, "other_rank", s.iteration, what="divergence on another rank",
                                  finite_at=finite_at)
            return diag, "the other ranks roll back"
        top, ref = self._loss_max.item(), self._loss_ref.item()
        what = f"exploding loss {top:.3g} ({top / ref:.3g}x the first loss {ref:.3g})"
        diag = self.diagnosis(engine, "loss_explosion", s.iteration, finite_at=finite_at, max_loss=top,
                              first_loss=ref, what=what)
        return diag, "the weights that made it are already in place"

    def finite(self, extra: torch.Tensor | None = None) -> torch.Tensor:
        """Whether every weight and float buffer (and ``extra``, a 0-dim sum) is finite, as one device bool."""
        total = norms(self._params + [b for _, b in self.buffers]).sum()
        return torch.isfinite(total if extra is None else total + extra)

    def _exploded(self) -> torch.Tensor:
        if self.max_loss_ratio is None or self._loss_ref is None:
            return torch.zeros((), dtype=torch.bool, device=self.device)
        return self._loss_max > self.max_loss_ratio * self._loss_ref  # False while the reference is NaN

    def _window_bad(self, window: list[Step], losses: torch.Tensor | None) -> torch.Tensor:
        """The sum of every loss, input sum, gradient norm (and, without drops, weight norm) of the window:
        NaN/Inf when one of them was (device)."""
        values = [step.total for step in window] + [step.inputs for step in window]
        values += [step.params.sum() for step in window if step.params is not None]
        total = torch.stack(values).sum() if values else self._zero
        return total + losses.sum() if losses is not None else total

    def _diagnose_step(self, engine: Engine, step: Step) -> dict[str, Any]:
        """Immediate mode, before the update: the weights are still the ones the forward pass used."""
        s = engine.state
        params = nonfinite_names(self.params)
        batch = s.batch if isinstance(s.batch, (list, tuple)) else [s.batch]
        input_bad = any(isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())
                        for t in batch)
        grads = self.names_of(step.grads)
        cause, name = rank_cause(params, input_bad, not math.isfinite(step.loss.item()), grads)
        return self.diagnosis(engine, cause, s.iteration, name=name, nonfinite_parameters=params,
                              nonfinite_gradients=grads)

    def _diagnose_window(self, engine: Engine, window: list[Step], losses: list[torch.Tensor],
                         since: int) -> dict[str, Any]:
        """Deferred mode, at a check: the first bad step since the last check, and its cause. The weights bad
        before it are the ones bad now when the optimizer dropped the bad updates, else the recorded norms."""
        s = engine.state
        loss_values = torch.stack(losses).tolist() if losses else []
        first_loss_at = next((s.iteration - len(losses) + 1 + i for i, v in enumerate(loss_values)
                              if not math.isfinite(v)), None)
        step_values = torch.stack([torch.stack([st.total, st.inputs, st.params.sum() if st.params is not None
                                                else self._zero]) for st in window]).tolist() if window else []
        first_step = next((st for st, v in zip(window, step_values) if not all(map(math.isfinite, v))), None)
        candidates = [it for it in (first_loss_at, first_step.iteration if first_step else None) if it is not None]
        iteration = min(candidates) if candidates else since + 1
        step = next((st for st in window if st.iteration >= iteration), None)  # its grads carry the fault
        if self._drops or step is None or step.params is None:
            params = nonfinite_names(self.params)
        else:
            params = self.names_of(step.params)
        grads = self.names_of(step.grads if step else None)
        input_bad = step is not None and step.iteration == iteration and not math.isfinite(float(step.inputs))
        loss_bad = first_loss_at is not None and first_loss_at == iteration
        cause, name = rank_cause(params, input_bad, loss_bad, grads)
        return self.diagnosis(engine, cause, iteration, name=name, nonfinite_parameters=params,
                              nonfinite_gradients=grads)

    def diagnosis(self, engine: Engine, cause: str, iteration: int, **fields: Any) -> dict[str, Any]:
        """The diagnosis of a fault first seen at ``iteration``, with the LR, loss scale and grad norms of that step."""
        s = engine.state
        lr, scale = self.history.at(iteration) or (s.lr, s.loss_scale)
        fields.setdefault("lr", lr)
        fields.setdefault("loss_scale", float(scale) if scale is not None else None)
        epoch = (iteration - 1) // s.epoch_length + 1 if s.epoch_length else s.epoch
        return build_diagnosis(cause, iteration, epoch=epoch, detected_at=s.iteration, peak_lr=self.peak_lr(),
                               grad_norm_history=self.history.grad_norms(iteration, self.history_length), **fields)

    def names_of(self, values: torch.Tensor | None) -> list[str]:
        """The parameters whose entry in ``values`` (one per parameter: norms) is NaN/Inf."""
        if values is None:
            return []
        return [n for (n, _), v in zip(self.params, values.tolist()) if not math.isfinite(v)]

    def peak_lr(self) -> float:
        """The highest LR the schedule reaches (``max_lr`` of the param groups, else their LR)."""
        return max(float(g.get("max_lr", g["lr"])) for g in self.optimizer.param_groups)

    def state_dict(self) -> dict[str, Any]:
        """The run's first loss (weights_only-safe)."""
        if self.first_loss is None and self._loss_ref is not None:
            self.first_loss = float(self._loss_ref)
        return {"first_loss": self.first_loss}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        first = state.get("first_loss")
        self.first_loss = float(first) if first is not None else None
        self._loss_ref = None if self.first_loss is None else torch.tensor(self.first_loss, device=self.device)
