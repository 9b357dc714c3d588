"""What every benchmark records about where it ran, and how it keeps its results (``results/*.json``)."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

__all__ = ["cpu_model", "save_result"]

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or what platform knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def save_result(name: str, result: dict) -> Path:
    """``results/TIMESTAMP-cpu-NAME.json`` holding ``result`` plus the CPU, core count and date; prints its path."""
    data = {**result, "cpu": cpu_model(), "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M")}
    path = RESULTS / f"{time.strftime('%Y%m%d-%H%M%S')}-cpu-{name}.json"
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {path}")
    return path
