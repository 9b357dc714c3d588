"""An image folder that fits ``data.memory_budget`` is decoded once and trained from memory: the same validation
inputs as the DataLoader path and ``kiln predict`` (exactly), batches a function of (seed, epoch, batch), grayscale
with ``data.channels=1``, and a run killed mid-epoch resumes bit-identically."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from recipes.data.imagefolder import imagefolder_data
from tests.recipes.data.test_imagefolder import config, epoch, folder, same, write_image_folder  # noqa: F401
from tests.runs import FAST, assert_same_run, final_state, kiln, start, wait_for_iteration

CPU = torch.device("cpu")


def _val_paths(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "val").rglob("*.png"), key=lambda p: (p.parent.name, int(p.stem)))


def test_a_folder_that_fits_is_decoded_once_and_validates_on_what_predict_sees(folder):  # noqa: F811
    data = imagefolder_data(config(folder), CPU)
    assert data.reading.startswith("24 images decoded into memory"), data.reading
    assert data.train.x.dtype == torch.uint8 and data.train.x.shape[1:] == (3, 18, 18)  # kept at the resize side
    x_val = torch.cat([x for x, _ in data.val])
    predicted = torch.stack([data.preprocessing(Image.open(path)) for path in _val_paths(folder)])
    assert torch.equal(x_val, predicted)  # exactly what kiln predict makes of the files

    loader = imagefolder_data(config(folder, **{"data.memory_budget": "0"}), CPU)
    assert loader.reading.startswith("24 images read by a DataLoader with 0 workers"), loader.reading
    assert loader.reading.endswith("over data.memory_budget 0)"), loader.reading
    assert torch.equal(torch.cat([x for x, _ in loader.val]), x_val)
    assert [y for _, y in loader.val][0].tolist() == [y for _, y in data.val][0].tolist()


def test_training_batches_are_cropped_on_whole_batches_and_resume_at_any_batch(folder):  # noqa: F811
    train = imagefolder_data(config(folder), CPU).train
    first = epoch(train, 1)
    assert [tuple(x.shape) for x, _ in first] == [(4, 3, 16, 16)] * 4 + [(2, 3, 16, 16)]
    assert same(first, epoch(train, 1)) and same(first[2:], epoch(train, 1, start=2))
    assert not same(first, epoch(train, 2))
    again = imagefolder_data(config(folder), CPU).train  # decoded again: the same bytes, the same batches
    assert same(first, epoch(again, 1))
    plain = imagefolder_data(config(folder, **{"data.augment": "none"}), CPU)
    x, _ = next(iter(plain.train))
    assert x.shape == (4, 3, 16, 16)


def test_channels_1_reads_the_folder_as_grayscale_on_either_path(folder):  # noqa: F811
    for budget in ("auto", "0"):
        data = imagefolder_data(config(folder, **{"data.channels": 1, "data.memory_budget": budget}), CPU)
        assert data.in_channels == 1 and data.preprocessing.mode == "L"
        assert next(iter(data.train))[0].shape == (4, 1, 16, 16) and next(iter(data.val))[0].shape[1] == 1


def test_a_memory_budget_that_is_not_a_size_is_one_line(folder):  # noqa: F811
    from recipes.config import ConfigError

    with pytest.raises(ConfigError, match="data.memory_budget must be auto or a size such as 512MB"):
        config(folder, **{"data.memory_budget": "lots"})


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory) -> Path:
    """scikit-learn's 1797 digits as 8x8 grayscale PNG files in class folders."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digit-pngs")
    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        (root / str(label)).mkdir(exist_ok=True)
        Image.fromarray((image * 255 / 16).round().astype(np.uint8), mode="L").save(root / str(label) / f"{i:04d}.png")
    return root


def _train(data_dir: Path, run_dir: Path) -> list[str]:
    return ["train", "imagefolder", "--data-dir", str(data_dir), "--model", "small_cnn", "--batch-size", "64",
            "--set", "data.channels=1", "--set", "data.augment=crop", *FAST, "--out", str(run_dir)]


@pytest.mark.slow
def test_a_run_from_memory_killed_mid_epoch_resumes_bit_identically(tmp_path, digits_folder):
    reference = tmp_path / "reference"
    done = kiln(*_train(digits_folder, reference))
    assert done.returncode == 0, done.stderr
    config_json = json.loads((reference / "config.json").read_text())
    assert config_json["data"]["memory_budget"].startswith("auto:")  # made concrete for the resume
    for signal_number, stop_at in ((signal.SIGTERM, 10), (signal.SIGKILL, 30)):
        run_dir = tmp_path / f"run-{stop_at}"
        proc = start(*_train(digits_folder, run_dir))
        wait_for_iteration(run_dir, stop_at, proc)
        proc.send_signal(signal_number)
        proc.communicate(timeout=120)
        assert final_state(run_dir)["trainer"]["iteration"] < 46  # stopped before the end
        resumed = kiln("resume", str(run_dir), "--quiet", "--no-report")
        assert resumed.returncode == 0, resumed.stderr
        assert_same_run(run_dir, reference)
