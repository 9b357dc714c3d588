"""CompiledForward: a model's training forward through ``torch.compile``, falling back to eager if that fails."""
from __future__ import annotations

import logging
from typing import Any

import torch

__all__ = ["CompiledForward"]

log = logging.getLogger("kiln")


def _not_cuda_home_notice(record: logging.LogRecord) -> bool:
    """Drop torch's "No CUDA runtime is found, using CUDA_HOME=..." (a CUDA build of torch, with CUDA_HOME
    set, on a machine without a GPU): inductor logs it when it compiles C++ for the CPU, which needs no CUDA."""
    return not record.getMessage().startswith("No CUDA runtime is found")


class CompiledForward(torch.nn.Module):
    """Run ``module`` through ``torch.compile(module, backend=backend)``; on failure, run it eagerly.

    The trainer gets this wrapper; checkpoints, the optimizer and the evaluator keep ``module``
    itself, so state-dict keys stay the model's own (a compiled module would prefix them with
    ``_orig_mod.``). ``torch.compile`` fails either at once (an unknown backend) or at the first call
    (or a later recompilation for a new input shape), e.g. when inductor finds no C++ compiler. Either
    way one warning line says why, and from then on the forward runs eagerly. A failure while
    compiling the backward graph (inside ``loss.backward()``) is not caught here.

    Args:
        module: the network.
        backend: a ``torch.compile`` backend name ("inductor", "aot_eager", ...) or callable.

    Example:
        >>> import torch
        >>> forward = CompiledForward(torch.nn.Linear(2, 2), backend="no_such_backend")  # warns, on stderr
        >>> forward.compiled, forward(torch.ones(1, 2)).shape
        (False, torch.Size([1, 2]))
    """

    def __init__(self, module: torch.nn.Module, backend: Any = "inductor") -> None:
        super().__init__()
        self.module = module
        self.backend = backend
        if not torch.cuda.is_available():
            torch_logger = logging.getLogger("torch.utils.cpp_extension")
            if _not_cuda_home_notice not in torch_logger.filters:
                torch_logger.addFilter(_not_cuda_home_notice)
        try:
            compiled: Any = torch.compile(module, backend=backend)
        except Exception as e:  # noqa: BLE001 - any failure to compile means: run eagerly
            compiled = self._fall_back(e)
        self.__dict__["_compiled"] = compiled  # not a submodule: state_dict() stays module's

    @property
    def compiled(self) -> bool:
        """Whether the forward still goes through the compiled module."""
        return self.__dict__["_compiled"] is not None

    def _fall_back(self, error: BaseException) -> None:
        reason = " ".join(str(error).split())  # torch's messages span lines: keep the warning on one
        log.warning("kiln: torch.compile failed (%s: %s); training without it", type(error).__name__,
                    reason if len(reason) <= 200 else reason[:197] + "...")
        self.__dict__["_compiled"] = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        compiled = self.__dict__["_compiled"]
        if compiled is not None:
            try:
                return compiled(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - a model error proper is raised again by the eager call
                self._fall_back(e)
        return self.module(*args, **kwargs)
