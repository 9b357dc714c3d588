"""Trained runs the predict and export tests share: a digits run with its validation images as PNG files,
and an image-folder run of torchvision's resnet18 (each trained once per session, with kiln's defaults)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from recipes import get_recipe
from recipes.data import split_indices
from recipes.data.builtin import digits_tensors
from tests.recipes import kiln_in_process as kiln
from tests.recipes.data.test_imagefolder import write_image_folder


def best_checkpoint(run_dir: Path) -> Path:
    """The run's best-*.pt."""
    (best,) = sorted((run_dir / "checkpoints").glob("best-*.pt"))
    return best


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> Path:
    """``kiln train digits --epochs 3`` (defaults otherwise: bf16 on a CPU with AMX, fp32 elsewhere)."""
    run_dir = tmp_path_factory.mktemp("digits") / "run"
    assert kiln("train", "digits", "--epochs", "3", "--quiet", "--out", str(run_dir)) == 0
    return run_dir


@pytest.fixture(scope="session")
def digits_val_images(tmp_path_factory) -> Path:
    """The digits recipe's validation images as the 8x8 8-bit PNG files they are: ``ROOT/LABEL/NNNN.png``,
    NNNN their position in the validation split."""
    root = tmp_path_factory.mktemp("digits-val")
    cfg = get_recipe("digits")
    x, y = digits_tensors(8)
    _, val_idx = split_indices(len(x), cfg.data.val_fraction, cfg.train.seed)
    for n, i in enumerate(val_idx.tolist()):
        folder = root / str(int(y[i]))
        folder.mkdir(exist_ok=True)
        Image.fromarray((x[i, 0] * 255).round().to(torch.uint8).numpy(), mode="L").save(folder / f"{n:04d}.png")
    return root


@pytest.fixture(scope="session")
def shapes_folder(tmp_path_factory) -> Path:
    """Three classes of 40x48 PNG files (grayscale and RGB mixed) in train/ and val/ class folders."""
    return write_image_folder(tmp_path_factory.mktemp("shapes"), {"train": 12, "val": 4}, size=(40, 48))


@pytest.fixture(scope="session")
def shapes_run(tmp_path_factory, shapes_folder) -> Path:
    """``kiln train imagefolder --model resnet18 --image-size 32`` on :func:`shapes_folder`, 2 epochs."""
    run_dir = tmp_path_factory.mktemp("shapes-run") / "run"
    assert kiln("train", "imagefolder", "--data-dir", str(shapes_folder), "--model", "resnet18", "--image-size", "32",
                "--num-workers", "0", "--epochs", "2", "--quiet", "--out", str(run_dir)) == 0
    return run_dir
