"""Host reads per training iteration (issue 17): a real ``kiln train digits`` assembly reads device values
only at the logging iterations, NanGuard's check iterations and epoch ends, in every precision.

A host read (``loss.item()``, ``bool(t)``, ...) waits for the device: on a GPU, one per step serialises the
host and the GPU. They are counted on the CPU with a ``torch.overrides.TorchFunctionMode`` around the
trainer's run, which sees every torch call made from Python (kiln's, ignite's, torch's own Python code).

What counts as a read (:data:`READS`): ``item``, ``__bool__``, ``__float__``, ``__int__``, ``__index__``,
``__complex__``, ``tolist``, ``numpy``, ``__array__``, ``cpu``, ``__format__`` and ``__repr__`` (they read
the values), ``__contains__``, ``is_nonzero``, ``equal`` and ``allclose`` (they return a Python bool), and
the ops whose output size depends on the values (``nonzero``, ``argwhere``, ``masked_select``, ``unique``,
one-argument ``where``, indexing with a boolean mask). Not counted: ``.to(...)``/``copy_`` towards the
CPU, which on a CPU-only run cannot be told apart from moving a batch to the training device (the
GPU check, ``benchmarks/gpu_check.sh``, catches those with ``torch.cuda.set_sync_debug_mode``).

A read is charged to the iteration the trainer is in when it happens (``trainer.state.iteration``, which
ignite advances just before ITERATION_STARTED), so reads by ITERATION_COMPLETED handlers and by the
epoch-end validation count for that iteration, and the reads at STARTED for iteration 0. (Reading the
counter at the read, rather than recording it in a handler of our own on ITERATION_STARTED, does not
depend on where that handler would sit among the trainer's other ITERATION_STARTED handlers.)

The progress bar reads the loss at most every ``refresh_seconds`` of wall time, whatever the iteration
(``callbacks.Progress``): those reads are checked against that bound, not against the iterations (its
epoch line reads at epoch ends, as every epoch-end record does).

The model is the digits recipe's small CNN cut to one block at the images' own 8x8 (``model.channels=4
data.image_size=8``): fp16 convolutions have no fast kernels on most CPUs (the recipe's full model takes
~15 s a step in fp16 here), and the reads do not depend on the model's size.
"""
from __future__ import annotations

import collections
import io
import time
import traceback
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from torch.overrides import TorchFunctionMode

from recipes import get_recipe
from recipes.config import apply_overrides
from recipes.run import build, execute, write_config

ROOT = Path(__file__).resolve().parents[2]
KILN_PACKAGES = ("engine", "callbacks", "recipes")

#: Tensor methods and torch functions that hand device values to Python (a device sync on a GPU).
READS = frozenset({
    "item", "__bool__", "__float__", "__int__", "__index__", "__complex__", "tolist", "numpy", "__array__", "cpu",
    "__format__", "__repr__", "__contains__", "is_nonzero", "equal", "allclose",
    "nonzero", "argwhere", "masked_select", "unique", "_unique2", "unique_consecutive",
})
#: Indexing ops that read the values when an index is a boolean mask.
MASK_INDEXING = frozenset({"__getitem__", "__setitem__", "index_put", "index_put_"})

LOG_EVERY, CHECK_EVERY, EPOCHS = 10, 15, 2  # distinct, so a check read never hides behind a log read




class Read(NamedTuple):
    """One host read: the trainer's iteration, the op, and the kiln lines on the stack (innermost first)."""

    iteration: int
    op: str
    kiln_frames: tuple[str, ...]

    @property
    def caller(self) -> str:
        """The innermost kiln line and the nearest one in another file that led to it, e.g.
        ``engine/records.py:19 to_float < callbacks/metrics_log.py:57 write_step``."""
        if not self.kiln_frames:
            return "(no kiln frame)"
        first = self.kiln_frames[0]
        outer = next((f for f in self.kiln_frames[1:] if f.split(":")[0] != first.split(":")[0]), None)
        return f"{first} < {outer}" if outer else first

    def made_in(self, function: str) -> bool:
        """Whether ``function`` (e.g. ``"write_step"``) is on the read's kiln stack."""
        return any(f.endswith(f" {function}") for f in self.kiln_frames)


def _is_mask(index: Any) -> bool:
    if isinstance(index, torch.Tensor):
        return index.dtype == torch.bool
    if isinstance(index, (tuple, list)):
        return any(_is_mask(i) for i in index)
    return False


def _is_read(name: str, args: tuple, kwargs: dict) -> bool:
    if name in READS:
        return True
    if name == "where":
        return len(args) + len(kwargs) == 1
    return name in MASK_INDEXING and len(args) > 1 and _is_mask(args[1])


def _kiln_frames() -> tuple[str, ...]:
    frames = []
    for frame in reversed(traceback.extract_stack()):  # innermost first (this module is under tests/: left out)
        try:
            relative = Path(frame.filename).resolve().relative_to(ROOT)
        except ValueError:
            continue
        if relative.parts[0] in KILN_PACKAGES:
            frames.append(f"{relative.as_posix()}:{frame.lineno} {frame.name}")
    return tuple(frames)


class HostReads(TorchFunctionMode):
    """Records every host read made while active, charged to ``trainer.state.iteration`` at that moment."""

    def __init__(self, trainer: Any) -> None:
        super().__init__()
        self.trainer = trainer
        self.reads: list[Read] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if _is_read(name, args, kwargs):
            self.reads.append(Read(self.trainer.state.iteration, name, _kiln_frames()))
        return func(*args, **kwargs)


class CountedRun(NamedTuple):
    """A finished run's host reads, split into the progress bar's (time-based) and the others."""

    reads: list[Read]
    bar_reads: list[Read]
    seconds: float
    refresh_seconds: float
    epoch_length: int
    status: str


def _train_counting_reads(tmp_path: Path, precision: str, on_nan: str, **overrides: Any) -> CountedRun:
    """``kiln train digits`` (2 epochs, one-block CNN at 8x8) assembled by ``build`` as the CLI does, its
    training run under :class:`HostReads`."""
    cfg = apply_overrides(get_recipe("digits"), {
        "train.epochs": EPOCHS, "train.device": "cpu", "train.precision": precision, "guard.on_nan": on_nan,
        "train.log_every": LOG_EVERY, "guard.check_every": CHECK_EVERY,
        "data.image_size": 8, "model.channels": (4,), **overrides})
    run = build(cfg, tmp_path / "run", quiet=False, stream=io.StringIO())  # quiet=False: the bar, as `kiln train`
    write_config(run)
    counter = HostReads(run.trainer)
    started = time.monotonic()
    with counter:
        execute(run)
    seconds = time.monotonic() - started
    bar, others = [], []
    for r in counter.reads:
        (bar if r.made_in("_read_values") else others).append(r)  # the epoch line reads at epoch ends: others
    return CountedRun(others, bar, seconds, run.handlers["progress"].refresh_seconds, len(run.train_data), run.status)


def _allowed(iteration: int, epoch_length: int) -> bool:
    """The start (0), the logging and check iterations, and epoch ends (optimizer step == iteration here)."""
    return iteration == 0 or iteration % LOG_EVERY == 0 or iteration % CHECK_EVERY == 0 or iteration % epoch_length == 0


def _describe(reads: list[Read]) -> str:
    by_caller: dict[tuple[str, str], list[int]] = collections.defaultdict(list)
    for r in reads:
        by_caller[(r.caller, r.op)].append(r.iteration)
    return "; ".join(f"{op} at {caller} in iterations {sorted(set(its))[:8]}{'...' if len(set(its)) > 8 else ''} "
                     f"({len(its)} reads)" for (caller, op), its in sorted(by_caller.items(), key=lambda kv: -len(kv[1])))


def _check_the_counter_sees_reads(run: CountedRun) -> None:
    """The step lines and NanGuard's check read where expected: the counter sees them, charged to their iteration."""
    assert run.status == "completed"
    assert run.epoch_length == 23 and run.epoch_length % LOG_EVERY and run.epoch_length % CHECK_EVERY
    assert any(r.iteration == LOG_EVERY and r.made_in("write_step") for r in run.reads), _describe(run.reads)
    assert any(r.iteration == CHECK_EVERY and r.made_in("_on_iteration_completed") for r in run.reads), _describe(run.reads)
    assert len(run.bar_reads) <= 1 + run.seconds / run.refresh_seconds, _describe(run.bar_reads)


@pytest.mark.parametrize("on_nan", ["rollback", "stop"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_no_host_read_between_logging_and_check_iterations(tmp_path, precision, on_nan):
    run = _train_counting_reads(tmp_path, precision, on_nan)
    _check_the_counter_sees_reads(run)
    stray = [r for r in run.reads if not _allowed(r.iteration, run.epoch_length)]
    assert not stray, f"host reads outside the logging/check iterations and epoch ends: {_describe(stray)}"


def test_fp16_with_an_ema_reads_no_more(tmp_path):
    """The EMA weighs a step the scaler skipped by the device flag instead of reading it."""
    run = _train_counting_reads(tmp_path, "fp16", "rollback", **{"train.ema_decay": 0.99})
    _check_the_counter_sees_reads(run)
    stray = [r for r in run.reads if not _allowed(r.iteration, run.epoch_length)]
    assert not stray, f"host reads outside the logging/check iterations and epoch ends: {_describe(stray)}"


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_skip_reads_one_flag_per_step_under_fp32_and_bf16_only(tmp_path, precision):
    """``guard.on_nan=skip`` must decide before the update: under fp32/bf16 NanGuard reads one flag per
    optimizer step (and nothing else does); under fp16 the scaler decides on the device, so no read."""
    run = _train_counting_reads(tmp_path, precision, "skip")
    _check_the_counter_sees_reads(run)
    stray = [r for r in run.reads if not _allowed(r.iteration, run.epoch_length)]
    if precision == "fp16":
        assert not stray, f"host reads outside the logging/check iterations and epoch ends: {_describe(stray)}"
        return
    per_iteration = collections.Counter(r.iteration for r in stray)
    quiet_iterations = [i for i in range(1, EPOCHS * run.epoch_length + 1) if not _allowed(i, run.epoch_length)]
    assert sorted(per_iteration) == quiet_iterations and set(per_iteration.values()) == {1}, _describe(stray)
    assert all(r.kiln_frames[0].startswith("callbacks/divergence_detector.py:") and r.made_in("_on_before_step")
               for r in stray), _describe(stray)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_logging_iteration_reads_its_step_line_once_for_every_logger(tmp_path, precision):
    """steps.jsonl and TensorBoard log the same line: its loss, batch accuracy, grad norm (and fp16's loss scale
    and skip flag) come to the host in one read, once per logging iteration."""
    run = _train_counting_reads(tmp_path, precision, "rollback")
    by_iteration = collections.Counter(r.iteration for r in run.reads if r.made_in("step_record"))
    logged = [i for i in range(LOG_EVERY, EPOCHS * run.epoch_length + 1, LOG_EVERY)]
    assert sorted(by_iteration) == logged and set(by_iteration.values()) == {1}, _describe(run.reads)
