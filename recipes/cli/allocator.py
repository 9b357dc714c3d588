"""``tune_malloc``: keep freed large buffers inside the process, so CPU training steps stop paying page faults.

With its default settings glibc serves every allocation above its mmap threshold (128 KiB, raised
dynamically up to 32 MiB) with a fresh ``mmap`` and returns it to the system on ``free``, and trims
the top of the heap once more than 128 KiB there is free. A CPU training step allocates and frees
the same activation and gradient buffers (megabytes each) every iteration, so each step maps them
again and touches every page anew: page faults, zeroed pages and ``munmap`` TLB shootdowns that cost
a small CNN about 20% of its step time. Raising both thresholds makes freed buffers go back to
malloc's free lists, where the next step finds them.

The settings are process-wide, so kiln's library code never changes them: only the ``kiln`` command
line calls :func:`tune_malloc`, at start-up (``KILN_MALLOC=default`` turns it off). They take effect
for allocations made after the call, so calling it after ``import torch`` is enough.
"""
from __future__ import annotations

import ctypes
import platform

__all__ = ["tune_malloc", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

# <malloc.h> parameter numbers
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: Allocations at least this large still get their own mapping. glibc refuses anything above
#: HEAP_MAX_SIZE / 2, which is 32 MiB on 64-bit systems.
MMAP_THRESHOLD = 32 * 1024 * 1024

#: Free memory at the top of the heap that glibc keeps before it gives any back.
TRIM_THRESHOLD = 1024 * 1024 * 1024


def tune_malloc(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Raise glibc's mmap and trim thresholds (``mallopt``); returns whether both settings applied.

    A no-op returning False where the C library is not glibc (macOS, Windows, musl).

    Args:
        mmap_threshold: bytes from which an allocation is mapped on its own (at most 32 MiB on 64-bit).
        trim_threshold: free bytes at the top of the heap before glibc returns memory to the system.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # pragma: no cover - a static or unusual libc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mmap first: while the dynamic mmap threshold is on, glibc also moves the trim threshold
    applied = mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
    return mallopt(_M_TRIM_THRESHOLD, int(min(trim_threshold, 2**31 - 1))) == 1 and applied
