"""Image folders are screened before training: an unreadable file or a single class is one line, exit 2, nothing
written; ``data.skip_bad_images`` skips the unreadable files with one warning line and trains on."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from recipes.data import DataError
from recipes.data.imagefolder import imagefolder_data
from recipes.data.screening import unreadable_images
from tests.recipes.data.test_imagefolder import config, write_image_folder
from tests.runs import kiln

#: The end-of-run report stays on: the one run that trains checks its whole stderr (one warning line, not one
#: more from the report's pass over the data).
QUICK = ["--model", "small_cnn", "--image-size", "16", "--num-workers", "0", "--epochs", "2", "--batch-size", "4",
         "--quiet"]


def kiln_train(data_dir: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """``kiln train imagefolder`` on ``data_dir`` as a real process, small and quick (in the test's own folder,
    with this module's longer bound than tests.runs' default)."""
    return kiln("train", "imagefolder", "--data-dir", data_dir, *QUICK, *extra, "--out", out, cwd=out.parent,
                timeout=900)


def _empty_png(folder: Path) -> Path:
    path = folder / "circle" / "zero.png"
    path.write_bytes(b"")
    return path


def _text_png(folder: Path) -> Path:
    path = folder / "square" / "x.png"
    path.write_text("this is not a picture\n")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("spoil, reason", [(_empty_png, "(an empty file)"), (_text_png, "(not an image)")])
def test_an_unreadable_file_is_one_line_naming_it_and_nothing_is_written(tmp_path, spoil, reason):
    folder = write_image_folder(tmp_path / "images", {"": 8})
    bad = spoil(folder)
    out = tmp_path / "run"
    result = kiln_train(folder, out)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"kiln: error: {bad} is not a readable image {reason}")
    assert "--set data.skip_bad_images=true" in result.stderr
    assert not out.exists()


@pytest.mark.slow
def test_one_class_is_one_line_and_nothing_is_written(tmp_path):
    folder = write_image_folder(tmp_path / "images", {"": 8})
    for name in ("square", "triangle"):
        for path in (folder / name).iterdir():
            path.unlink()
        (folder / name).rmdir()
    out = tmp_path / "run"
    result = kiln_train(folder, out)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1, result.stderr
    assert "holds one class folder (circle/); a classifier needs at least two" in result.stderr
    assert not out.exists()


@pytest.mark.slow
def test_skip_bad_images_warns_in_one_line_and_trains_on_the_rest(tmp_path):
    folder = write_image_folder(tmp_path / "images", {"": 8})
    empty, text = _empty_png(folder), _text_png(folder)
    out = tmp_path / "run"
    result = kiln_train(folder, out, "--set", "data.skip_bad_images=true")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr.splitlines() == [
        (f"kiln: warning: skipping 2 unreadable image files (data.skip_bad_images): {empty} (an empty file), "
         f"{text} (not an image)")]
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
    runtime = json.loads((out / "config.json").read_text())["runtime"]
    assert runtime["val_samples"] == 5  # a fifth of the 24 readable images; the 2 bad ones are not counted


def test_several_bad_files_are_counted_in_the_one_line(tmp_path):
    folder = write_image_folder(tmp_path / "images", {"train": 3, "val": 2})
    for i in range(4):
        (folder / "train" / "circle" / f"bad{i}.png").write_bytes(b"")
    (folder / "val" / "square" / "bad.png").write_text("no")
    with pytest.raises(DataError) as info:
        imagefolder_data(config(folder), torch.device("cpu"))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{folder / 'train' / 'circle' / 'bad0.png'} is not a readable image (an empty file), "
                              "nor are 4 other files (")
    assert message.count(".png (") == 3 and "and 1 more)" in message  # the first, three more named, one counted


def test_skipping_every_image_of_a_class_is_refused(tmp_path):
    folder = write_image_folder(tmp_path / "images", {"": 3})
    for path in (folder / "triangle").glob("*.png"):
        path.unlink()
    (folder / "triangle" / "x.png").write_text("no")
    with pytest.raises(DataError, match=r"no readable images left in triangle"):
        imagefolder_data(config(folder, **{"data.skip_bad_images": True}), torch.device("cpu"))


def test_a_truncated_png_is_caught_by_the_scan(tmp_path):
    folder = write_image_folder(tmp_path / "images", {"": 1})
    whole = folder / "circle" / "0.png"
    cut = folder / "circle" / "cut.png"
    cut.write_bytes(whole.read_bytes()[: len(whole.read_bytes()) // 2])
    assert [path for path, _ in unreadable_images([str(whole), str(cut)])] == [str(cut)]

