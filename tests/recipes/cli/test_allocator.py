"""The malloc tuning: large freed buffers stay in the process, and the ``kiln`` CLI applies it unless told not to.

Each check runs in a fresh interpreter, because the settings are process-wide; it asks glibc
(``mallinfo2``) whether a 24 MiB allocation got its own mapping, which is what the tuning prevents.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

ROOT = Path(__file__).resolve().parents[3]

# Prints whether a 24 MiB malloc is served by its own mmap (glibc's default) or from the heap (tuned).
PROBE = """
import ctypes
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks "
                                              "fordblks keepcost").split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
before = libc.mallinfo2().hblkhd
block = libc.malloc(24 * 1024 * 1024)
mapped = libc.mallinfo2().hblkhd - before >= 24 * 1024 * 1024
libc.free(block)
print("mapped" if mapped else "heap")
"""


def _run(code: str, **env: str) -> list[str]:
    environ = {k: v for k, v in os.environ.items() if k != "KILN_MALLOC" and not k.startswith("MALLOC_")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env={**environ, **env}, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_glibc_maps_large_buffers_by_default():
    assert _run(PROBE) == ["mapped"]


def test_tune_malloc_keeps_large_buffers_in_the_heap_even_after_torch_is_imported():
    code = "import torch\nfrom recipes.cli.allocator import tune_malloc\nprint(tune_malloc())\n" + PROBE
    assert _run(code) == ["True", "heap"]


def _cli_then_probe() -> str:
    return ("from recipes.cli import main\ntry:\n    main(['recipes'])\nexcept SystemExit as e:\n"
            "    assert not e.code, e.code\n" + PROBE)


def test_the_kiln_cli_tunes_malloc_at_start_up():
    assert _run(_cli_then_probe())[-1] == "heap"


def test_kiln_malloc_default_leaves_glibc_as_it_is():
    assert _run(_cli_then_probe(), KILN_MALLOC="default")[-1] == "mapped"
