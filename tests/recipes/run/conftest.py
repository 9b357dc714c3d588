"""The multi-process run that test_distributed.py and test_two_nodes.py both compare against, made once per session."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.runs import kiln, shared_run

#: The digits recipe small: 16x16 images, a record every iteration, a checkpoint every 3, no end-of-run report.
SMALL = ["--set", "data.image_size=16", "--set", "train.log_every=1", "--set", "checkpoint.every_iterations=3",
         "--quiet", "--no-report"]


def summary(run_dir: Path) -> dict:
    """The run's summary.json."""
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="session")
def two_process_run(tmp_path_factory) -> Path:
    """digits, 4 epochs, 2 processes of 32 images: a global batch of 64, like the 1-process recipe. Read-only."""
    def train(run_dir: Path) -> None:
        done = kiln("train", "digits", "--epochs", "4", "--batch-size", "32", "--nproc-per-node", "2", *SMALL,
                    "--out", run_dir)
        assert done.returncode == 0, done.stderr[-2000:]

    return shared_run(tmp_path_factory, "two-process-digits", train)
