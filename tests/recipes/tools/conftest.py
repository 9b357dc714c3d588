"""Trained runs the predict and export tests share: a digits run with its validation images as PNG files,
and an image-folder run of torchvision's resnet18 (each trained once per session, with kiln's defaults but no
end-of-run report: those tests use the checkpoints only)."""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

from tests.recipes import kiln_in_process as kiln
from tests.recipes.data.test_imagefolder import write_image_folder

DOCS = Path(__file__).resolve().parents[3] / "docs"


def best_checkpoint(run_dir: Path) -> Path:
    """The run's best-*.pt."""
    (best,) = sorted((run_dir / "checkpoints").glob("best-*.pt"))
    return best


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> Path:
    """``kiln train digits --epochs 3`` (defaults otherwise: bf16 on a CPU with AMX, fp32 elsewhere)."""
    run_dir = tmp_path_factory.mktemp("digits") / "run"
    assert kiln("train", "digits", "--epochs", "3", "--quiet", "--no-report", "--out", str(run_dir)) == 0
    return run_dir


@pytest.fixture(scope="session")
def digits_val_images(tmp_path_factory) -> Path:
    """The digits recipe's validation images as the 8x8 8-bit PNG files they are: ``ROOT/LABEL/NNNN.png``,
    NNNN their position in the validation split (written by ``python docs/digits_as_png.py ROOT``, as the guides do)."""
    root = tmp_path_factory.mktemp("digits-val")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["digits_as_png.py", str(root)])
        runpy.run_path(str(DOCS / "digits_as_png.py"), run_name="__main__")
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
                "--num-workers", "0", "--epochs", "2", "--quiet", "--no-report", "--out", str(run_dir)) == 0
    return run_dir
