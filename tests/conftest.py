"""Tiny shared fixtures: a 2-conv CNN on random 3x16x16 tensors, a few batches of it, the digits tensors."""
from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn

from recipes.data import TensorBatches
from tests.mlflow_server import HTTP_ENV as MLFLOW_HTTP_ENV
from tests.services import serve

NUM_CLASSES = 3
IMAGE_SHAPE = (3, 16, 16)

#: The models here are tiny, the suite runs a worker per core (pytest-xdist), and it may share its cores with
#: other work: one intra-op thread avoids OpenMP oversubscription, which made steps 10-50x slower on a busy
#: 2-core machine. Every process a test starts inherits the same setting through these environment variables.
SINGLE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
os.environ.update(SINGLE_THREAD_ENV)
os.environ.update(MLFLOW_HTTP_ENV)  # an MLflow outage costs a test seconds (tests/mlflow_server.py)
os.environ.pop("KILN_MLFLOW_URI", None)  # a server named in the shell would make every test run mirror to it
torch.set_num_threads(1)

#: tests/data holds files other code wrote (a script there ran on an older kiln): data, not tests.
collect_ignore_glob = ["data/*"]


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A real small file system of ``size`` (e.g. "3m") mounted at ``path`` (made here) for the block, then
    lazily unmounted. Mounting needs root (CI runs as root); elsewhere the test is skipped with the reason."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                             check=False)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip() or 'needs root'})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


class TinyCNN(nn.Sequential):
    """Two 3x3 convolutions, global average pooling and a linear head (no batch norm unless asked)."""

    def __init__(self, dropout: float = 0.0, batch_norm: bool = False) -> None:
        layers: list[nn.Module] = [nn.Conv2d(3, 4, 3, padding=1)]
        if batch_norm:
            layers.append(nn.BatchNorm2d(4))
        layers += [nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1, stride=2), nn.ReLU(),
                   nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(6, NUM_CLASSES))
        super().__init__(*layers)


@pytest.fixture
def make_model() -> Callable[..., nn.Module]:
    """``make_model(seed=0, dropout=0.0, batch_norm=False)``: the same initial weights for the same seed."""

    def make(seed: int = 0, dropout: float = 0.0, batch_norm: bool = False) -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return TinyCNN(dropout=dropout, batch_norm=batch_norm)

    return make


def random_batches(count: int = 4, batch_size: int = 8, seed: int = 0, last_size: int | None = None):
    generator = torch.Generator().manual_seed(seed)
    sizes = [batch_size] * count
    if last_size is not None:
        sizes[-1] = last_size
    return [
        (torch.randn(n, *IMAGE_SHAPE, generator=generator), torch.randint(0, NUM_CLASSES, (n,), generator=generator))
        for n in sizes
    ]


@pytest.fixture
def make_batches() -> Callable[..., list]:
    """``make_batches(count=4, batch_size=8, seed=0, last_size=None)``: a plain list of ``(x, y)`` batches."""
    return random_batches


@pytest.fixture
def batches() -> list:
    """Four batches of eight random 3x16x16 images with labels in [0, 3)."""
    return random_batches()


@pytest.fixture
def tensor_batches() -> TensorBatches:
    """30 random 3x16x16 images in shuffled batches of 8 (the last one has 6): 4 batches per epoch."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(30, *IMAGE_SHAPE, generator=generator)
    y = torch.randint(0, NUM_CLASSES, (30,), generator=generator)
    return TensorBatches(x, y, batch_size=8, seed=5)


@pytest.fixture(scope="session")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as (N, 1, 16, 16) floats in [0, 1] and (N,) labels."""
    from recipes.data import digits_tensors

    return digits_tensors(image_size=16)


def pytest_collection_modifyitems(config, items):
    """The modules with the most end-to-end (``slow``) tests first, so that pytest-xdist hands the long ones out
    early and the short ones even out the end; and tests marked ``gpu`` skipped where there is no CUDA device."""
    slow: dict[str, int] = {}
    for item in items:
        slow[item.nodeid.split("::")[0]] = slow.get(item.nodeid.split("::")[0], 0) + ("slow" in item.keywords)
    items.sort(key=lambda item: -slow[item.nodeid.split("::")[0]])
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server for the session (``tests/postgres.py``); skipped where none can be started."""
    from tests.postgres import start_or_skip

    yield from serve(start_or_skip)


@pytest.fixture(scope="session")
def mlflow_server():
    """A real MLflow tracking server for the session (``tests/mlflow_server.py``); skipped where none can be started."""
    from tests.mlflow_server import start_or_skip

    yield from serve(start_or_skip)


@pytest.fixture(scope="session")
def fast_digits_run(tmp_path_factory) -> Path:
    """``kiln train digits`` with ``tests.runs.FAST`` (2 epochs at 16x16, a record every iteration), run to the end
    once per session for every worker: the uninterrupted run that stopped-and-resumed ones must equal. Read-only."""
    from tests.runs import FAST, kiln, shared_run

    def train(run_dir: Path) -> None:
        done = kiln("train", "digits", *FAST, "--out", run_dir)
        assert done.returncode == 0, done.stderr

    return shared_run(tmp_path_factory, "fast-digits", train)
