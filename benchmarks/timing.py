"""IterationClock: when each training iteration ended, taken without a host sync (CUDA events on a GPU).

Shared by every variant of the benchmark (the plain loop imports it too, and nothing else from kiln),
so the limit, plain and kiln figures are measured the same way.
"""
from __future__ import annotations

import statistics
import time

import torch

__all__ = ["IterationClock"]


class IterationClock:
    """Marks the start of each epoch and the end of each iteration; intervals are read after training.

    On the CPU a mark is ``time.perf_counter()`` and ``time.process_time()`` (the CPU time of all the
    process's threads: unlike wall time it does not grow while a busy machine runs someone else, so
    single-threaded figures stay comparable under load). On CUDA it is a recorded ``torch.cuda.Event``,
    which does not wait for the GPU, so timing does not add the host sync the benchmark looks for;
    the events are read once, after the run. An iteration's time is the interval between two marks in
    the same epoch: data, step and every per-iteration handler, but not the epoch-end validation.

    Args:
        device: where training runs.
        warmup: iterations at the start of the run left out of the statistics (allocator and
            oneDNN/cuDNN warm-up, compilation).
    """

    def __init__(self, device: torch.device | str, warmup: int = 5) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.warmup = warmup
        self.epochs: list[list] = []

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter(), time.process_time()

    def start_epoch(self) -> None:
        """Call when an epoch's first batch is about to be fetched."""
        self.epochs.append([self._mark()])

    def tick(self) -> None:
        """Call when an iteration (step and its handlers) has completed."""
        self.epochs[-1].append(self._mark())

    def _seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1000.0 if self.cuda else b[0] - a[0]

    def summary(self) -> dict:
        """``iter_ms`` (median iteration), ``iter_ms_mean``, ``iter_cpu_ms`` (median CPU time of an
        iteration, all threads; None on CUDA), ``iterations`` timed, ``train_seconds`` (all epochs)."""
        if self.cuda:
            torch.cuda.synchronize()
        intervals: list[float] = []
        cpu: list[float] = []
        train_seconds = 0.0
        seen = 0
        for marks in self.epochs:
            if len(marks) < 2:
                continue
            train_seconds += self._seconds(marks[0], marks[-1])
            for a, b in zip(marks[1:-1], marks[2:]):  # the epoch's first iteration also holds its set-up
                seen += 1
                if seen > self.warmup:
                    intervals.append(self._seconds(a, b))
                    if not self.cuda:
                        cpu.append(b[1] - a[1])
        return {
            "iter_ms": round(statistics.median(intervals) * 1e3, 3) if intervals else None,
            "iter_ms_mean": round(statistics.fmean(intervals) * 1e3, 3) if intervals else None,
            "iter_cpu_ms": round(statistics.median(cpu) * 1e3, 3) if cpu else None,
            "iterations": len(intervals),
            "train_seconds": round(train_seconds, 3),
        }
