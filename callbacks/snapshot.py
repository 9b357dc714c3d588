"""NanGuard's last sound state: deep copies of some objects' state dicts, kept in memory and loaded back."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Collection, Mapping

import torch

__all__ = ["Snapshot", "clone"]


@dataclass(frozen=True)
class Snapshot:
    """The state dicts of ``objects`` (each with ``state_dict``/``load_state_dict``) at one iteration.

    ``lr_scale`` is the product of the LR factors rollbacks had applied when it was taken.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> snapshot = Snapshot.take({"model": model}, iteration=4, lr_scale=1.0)
        >>> _ = model.weight.data.fill_(float("nan"))
        >>> snapshot.restore({"model": model})
        >>> bool(model.weight.isfinite().all()), snapshot.iteration
        (True, 4)
    """

    iteration: int
    lr_scale: float
    state: dict[str, Any]  #: key of ``objects`` -> a deep copy of that object's state dict

    @classmethod
    def take(cls, objects: Mapping[str, Any], iteration: int, lr_scale: float) -> Snapshot:
        """Copy every object's ``state_dict()`` now; training on does not change the copy."""
        return cls(iteration, lr_scale, {key: clone(obj.state_dict()) for key, obj in objects.items()})

    def restore(self, objects: Mapping[str, Any]) -> None:
        """Load the saved state back into every object of ``objects`` (the mapping it was taken from)."""
        for key, obj in objects.items():
            obj.load_state_dict(clone(self.state[key]))  # a fresh copy: load_state_dict may alias

    def restore_tensors(self, key: str, named: list[tuple[str, torch.Tensor]], names: Collection[str]) -> None:
        """Copy back in place the tensors of ``named`` listed in ``names``, from the saved state dict of ``key``
        (e.g. a model's non-finite BatchNorm statistics); a name that state dict lacks is left as it is."""
        saved = self.state[key]
        with torch.no_grad():
            for name, tensor in named:
                if name in names and name in saved:
                    tensor.copy_(saved[name])


def clone(value: Any) -> Any:
    """A deep copy of a state dict: tensors cloned, containers rebuilt (keeping a state dict's metadata)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        out = type(value)((k, clone(v)) for k, v in value.items())
        if hasattr(value, "_metadata"):
            out._metadata = copy.deepcopy(value._metadata)
        return out
    if isinstance(value, (list, tuple)):
        return type(value)(clone(v) for v in value)
    if value is None or isinstance(value, (bool, int, float, str)):  # immutable: nothing to copy
        return value
    return copy.deepcopy(value)
