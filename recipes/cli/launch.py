"""Running a kiln job in one process, in N spawned processes, or under torchrun, through ignite.distributed."""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import sys
from typing import Any, Callable

import ignite.distributed as idist
import torch

__all__ = ["exit_now_if_distributed", "launch", "under_torchrun", "default_backend", "free_port", "LAUNCHER_SIGNALS"]


def under_torchrun() -> bool:
    """Whether this process was started by torchrun (or another launcher setting the torch env vars)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ


def default_backend() -> str:
    """nccl where CUDA is available, else gloo."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def free_port() -> int:
    """A TCP port free on this machine now (ignite's default, 2222, collides between concurrent jobs)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quiet_ignite() -> None:
    # ignite.distributed logs every spawn and wrap at INFO; kiln prints its own lines
    for name in ("ignite.distributed.launcher.Parallel", "ignite.distributed.auto.auto_model",
                 "ignite.distributed.auto.auto_dataloader"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _worker(local_rank: int, job: Callable[[], Any], nproc: int) -> None:
    _quiet_ignite()
    # Share the machine's cores between the ranks instead of every rank using all of them.
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // nproc))
    job()
    idist.barrier()  # every rank is done with the process group
    _exit_now(0)


def _exit_now(code: int) -> None:
    """End the process without interpreter teardown: gloo's threads make it abort there (SIGABRT,
    "terminate called without an active exception") in about one run in five. Every file is
    already written and closed by now."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def launch(job: Callable[[], Any], *, nproc_per_node: int = 1, backend: str | None = None) -> Any:
    """Run ``job()`` in every process of a data-parallel group and return rank 0's result when in-process.

    - ``nproc_per_node > 1``: spawn that many processes with ``idist.Parallel`` on a free port; a
      SIGTERM or SIGINT to this launcher is passed on to them (they stop together and save); a
      Ctrl-C in a terminal reaches them directly. Returns None: the job reports through its run directory.
    - under torchrun: join torchrun's process group and run ``job()`` here.
    - otherwise: run ``job()`` in this process, without a process group.

    ``job`` must be picklable (a module-level function or a ``functools.partial`` of one).
    """
    _quiet_ignite()
    if nproc_per_node > 1:
        previous = {sig: signal.signal(sig, _pass_on_to_children) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            with idist.Parallel(backend=backend or default_backend(), nproc_per_node=nproc_per_node,
                                master_port=free_port()) as parallel:
                parallel.run(_worker, job, nproc_per_node)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return None
    if under_torchrun():
        result = []
        with idist.Parallel(backend=backend or default_backend()) as parallel:
            parallel.run(lambda local_rank: result.append(job()))
            idist.barrier()
        return result[0] if result else None
    return job()


LAUNCHER_SIGNALS: list[int] = []


def _in_terminal_foreground() -> bool:
    try:
        return os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp()
    except OSError:
        return False


def _pass_on_to_children(signum: int, frame: Any) -> None:
    """Pass a signal on to the ranks, except a Ctrl-C that the terminal already sent to all of them."""
    LAUNCHER_SIGNALS.append(signum)
    if signum == signal.SIGTERM or not _in_terminal_foreground():
        for child in multiprocessing.active_children():
            if child.pid is not None:
                os.kill(child.pid, signal.SIGTERM)


def exit_now_if_distributed(code: int) -> None:
    """Under torchrun, end the process at once with ``code`` (see :func:`_exit_now`); else return."""
    if under_torchrun():
        _exit_now(code)
