"""AMP: owns the fp16 loss scaler (a real ``torch.amp.GradScaler``) and counts the steps it skips."""
from __future__ import annotations

from typing import Any

import torch
from ignite.engine import Engine
from ignite.engine.events import RemovableEventHandle

from engine.events import StepEvents

__all__ = ["AMP"]


class AMP:
    """Loss scaling for fp16 training; a no-op for fp32 and bf16, which do not need it.

    ``attach`` installs the scaler as ``engine.state.scaler``; the training step then scales the loss
    before backward, unscales the gradients right after BACKWARD_COMPLETED (so BEFORE_OPTIMIZER_STEP
    sees true-scale gradients), lets ``scaler.step`` skip an update whose gradients hold inf/NaN, and
    records ``state.step_skipped`` and ``state.loss_scale``. Ordering lives in the step; this handler
    owns the scaler's settings and state.

    Events: OPTIMIZER_STEP_COMPLETED (counts skipped steps on the device: no host read per step). Reads
    ``state.precision``, ``state.step_skipped``; writes ``state.scaler``, ``state.loss_scale`` and
    ``state.skipped_steps`` (0-dim tensors on the scaler's device).
    State: the scaler's scale and growth tracker and the skip count, kept across resume.

    Args:
        device: "cpu" or "cuda": where the scaler's tensors live.
        init_scale: the first loss scale.
        growth_interval: steps without inf/NaN after which the scale doubles.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> from engine import create_trainer
        >>> from callbacks import AMP
        >>> model = torch.nn.Linear(4, 2)
        >>> trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
        ...                          F.cross_entropy, precision="fp16")
        >>> handles = AMP(device="cpu").attach(trainer)
        >>> float(trainer.state.loss_scale)
        65536.0
    """

    def __init__(self, device: str = "cpu", init_scale: float = 2.0**16, growth_interval: int = 2000) -> None:
        if init_scale <= 0:
            raise ValueError(f"init_scale must be > 0, not {init_scale}")
        if growth_interval < 1:
            raise ValueError(f"growth_interval must be >= 1, not {growth_interval}")
        self.device = torch.device(device)
        self.scaler = torch.amp.GradScaler(self.device.type, init_scale=init_scale, growth_interval=growth_interval)
        self.skipped_steps = 0

    def attach(self, engine: Engine) -> list[RemovableEventHandle]:
        """Install the scaler on ``engine`` when its precision needs one; returns the handles."""
        precision = getattr(engine.state, "precision", None)
        if precision is None or not precision.needs_scaler:
            return []
        engine.state.scaler = self.scaler
        engine.state.loss_scale = torch.full((), self.scaler.get_scale(), device=self.device)
        engine.state.skipped_steps = self.skipped_steps
        return [engine.add_event_handler(StepEvents.OPTIMIZER_STEP_COMPLETED, self)]

    def __call__(self, engine: Engine) -> None:
        # step_skipped is the scaler's device flag: adding it keeps the count on the device (no host read)
        self.skipped_steps = self.skipped_steps + engine.state.step_skipped
        engine.state.skipped_steps = self.skipped_steps

    def state_dict(self) -> dict[str, Any]:
        """The scaler's state and the skip count (weights_only-safe)."""
        return {"scaler": self.scaler.state_dict(), "skipped_steps": int(self.skipped_steps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
