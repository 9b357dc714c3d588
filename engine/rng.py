"""The run's random-number generators: the per-iteration seed, and RNGState, every global generator's state as a
weights_only-safe state dict."""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["RNGState", "iteration_seed", "seed_generators"]


class RNGState:
    """Save and restore the python, numpy, torch CPU and CUDA generators.

    kiln re-seeds torch before every iteration from (seed, iteration) and derives data order and
    augmentation from (seed, epoch, batch), so training does not depend on these states; they are
    kept so that user code drawing from the global generators resumes where it was. The state dict
    holds only tensors, ints, floats and lists (loadable with ``torch.load(weights_only=True)``).

    Example:
        >>> rng = RNGState()
        >>> state = rng.state_dict()
        >>> a = torch.rand(1); rng.load_state_dict(state); torch.equal(a, torch.rand(1))
        True
    """

    def state_dict(self) -> dict[str, Any]:
        """The current states of all global generators."""
        version, internal, gauss = random.getstate()
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state = {
            "python": {"version": version, "state": list(internal), "gauss": gauss},
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)},
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put every generator back in the state :meth:`state_dict` returned."""
        py = state["python"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
        n = state["numpy"]
        np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def seed_generators(seed: int, device: torch.device) -> None:
    """Seed the CPU generator and the training GPU's. torch.manual_seed does the same for every
    device but formats three stack traces for lazy seeding: about 200 us per call."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.default_generators[index].manual_seed(seed)


def iteration_seed(seed: int, iteration: int) -> int:
    """The torch seed of one iteration: a pure function of the run seed and the iteration number."""
    return (seed * 1_000_003 + iteration * 7919) % (2**63 - 1)
