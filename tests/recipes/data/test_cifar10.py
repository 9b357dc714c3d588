"""The cifar10 recipe: torchvision's on-disk CIFAR-10 format, ResNet-9, and a run through the CLI with `kiln eval`."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from recipes import RECIPES
from recipes.config import apply_overrides
from recipes.data import DataError
from recipes.data.cifar10 import CIFAR10_CLASSES, cifar10_data, load_cifar10
from recipes.models import build_model, resnet9
from recipes.run.checkpoints import load_checkpoint
from tests.recipes import kiln_in_process as kiln

TRAIN_PER_BATCH, TEST_IMAGES = 8, 20


def write_cifar10(root: Path, per_batch: int = TRAIN_PER_BATCH, test_images: int = TEST_IMAGES) -> Path:
    """A tiny CIFAR-10 in the real format: root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}.

    Each batch is a pickled dict with bytes keys, ``b"data"`` a uint8 (N, 3072) array (the red plane,
    then green, then blue, row-major) and ``b"labels"`` a list of ints, as in the files torchvision
    downloads. The images are class-coloured noise, so a network can learn them.
    """
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def batch(n: int, seed: int, label: bytes) -> dict:
        rng = np.random.default_rng(seed)
        labels = rng.integers(0, 10, n)
        data = (labels[:, None] * 20 + rng.integers(0, 40, (n, 3072))).astype(np.uint8)
        return {b"batch_label": label, b"labels": labels.tolist(), b"data": data,
                b"filenames": [b"img_%d.png" % i for i in range(n)]}

    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch(per_batch, i, b"training batch %d of 5" % i), f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(batch(test_images, 99, b"testing batch 1 of 1"), f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"num_cases_per_batch": per_batch, b"label_names": [n.encode() for n in CIFAR10_CLASSES],
                     b"num_vis": 3072}, f)
    return root


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory) -> Path:
    return write_cifar10(tmp_path_factory.mktemp("cifar"))


def test_the_pickle_batches_are_read_into_uint8_tensors_in_channel_plane_order(cifar_dir):
    x_train, y_train, x_test, y_test, classes = load_cifar10(cifar_dir)
    assert x_train.shape == (5 * TRAIN_PER_BATCH, 3, 32, 32) and x_train.dtype == torch.uint8
    assert x_test.shape == (TEST_IMAGES, 3, 32, 32) and y_test.dtype == torch.long
    with open(cifar_dir / "cifar-10-batches-py" / "data_batch_2", "rb") as f:
        raw = pickle.load(f)
    first = TRAIN_PER_BATCH  # data_batch_2's first image follows data_batch_1's
    assert x_train[first, 0, 0, 0] == raw[b"data"][0, 0]
    assert x_train[first, 1, 0, 0] == raw[b"data"][0, 1024]  # green plane
    assert x_train[first, 0, 1, 0] == raw[b"data"][0, 32]  # second row
    assert y_train[first] == raw[b"labels"][0]
    assert classes == list(CIFAR10_CLASSES)
    # pointing at cifar-10-batches-py itself works too
    assert torch.equal(load_cifar10(cifar_dir / "cifar-10-batches-py")[2], x_test)


def test_batches_live_on_the_device_normalised_and_augmented_by_position(cifar_dir):
    cfg = apply_overrides(RECIPES["cifar10"], {"data.data_dir": str(cifar_dir), "data.batch_size": 16})
    data = cifar10_data(cfg, torch.device("cpu"))
    train, val, in_channels, num_classes = data.train, data.val, data.in_channels, data.num_classes
    assert (in_channels, num_classes, len(train), len(val.x)) == (3, 10, 3, TEST_IMAGES)
    assert abs(float(val.x.mean())) < 1.0 and val.x.dtype == torch.float32
    train.set_position(1)
    epoch1 = list(train)
    train.set_position(1)
    again = list(train)
    train.set_position(1, start_batch=1)
    tail = list(train)
    train.set_position(2)
    epoch2 = list(train)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(epoch1, again))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(epoch1[1:], tail))
    assert not torch.equal(epoch1[0][0], epoch2[0][0])
    # crop+flip changed the training images: the same samples unaugmented differ
    unaugmented = apply_overrides(cfg, {"data.augment": "none"})
    plain = cifar10_data(unaugmented, torch.device("cpu")).train
    plain.set_position(1)
    assert not torch.equal(next(iter(plain))[0], epoch1[0][0])


def test_a_missing_data_set_names_where_kiln_looked_and_how_to_get_it(tmp_path):
    with pytest.raises(DataError) as info:
        load_cifar10(tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert f"kiln train cifar10 --data-dir {tmp_path} --download" in message


def test_a_failed_download_is_one_line(tmp_path, monkeypatch):
    import torchvision

    # a port nothing listens on: the downloader fails at once, without a network
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    with pytest.raises(DataError, match="could not download CIFAR-10") as info:
        load_cifar10(tmp_path / "data", download=True)
    assert "\n" not in str(info.value)


def test_resnet9_is_the_dawnbench_network():
    model = resnet9(num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(6.57e6, rel=0.01)
    model.eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert build_model("resnet9", 1, 4, 16, ()).eval()(torch.randn(1, 1, 16, 16)).shape == (1, 4)


@pytest.fixture(scope="module")
def cifar_run(cifar_dir, tmp_path_factory) -> Path:
    """``kiln train cifar10`` for one epoch on the tiny data set (no end-of-run report: nothing here reads it)."""
    run_dir = tmp_path_factory.mktemp("cifar-run") / "run"
    assert kiln("train", "cifar10", "--data-dir", str(cifar_dir), "--epochs", "1", "--batch-size", "16", "--quiet",
                "--no-report", "--out", str(run_dir)) == 0
    return run_dir


def test_a_run_records_the_recipe_and_the_class_names(cifar_run):
    config = json.loads((cifar_run / "config.json").read_text())
    assert config["model"]["name"] == "resnet9" and config["data"]["augment"] == "crop+flip"
    assert config["runtime"]["class_names"] == list(CIFAR10_CLASSES)
    assert config["runtime"]["val_samples"] == TEST_IMAGES
    for checkpoint in (cifar_run / "checkpoints").glob("*.pt"):
        assert load_checkpoint(checkpoint)[0]["kiln"]["class_names"] == list(CIFAR10_CLASSES)


def test_eval_prints_the_figures_and_writes_the_confusion_matrix(cifar_run, tmp_path, capsys):
    last = str(cifar_run / "checkpoints" / "last.pt")
    capsys.readouterr()
    assert kiln("eval", last, "--out", str(tmp_path / "eval")) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert f"on {TEST_IMAGES} validation images" in lines[0]
    for i, name in enumerate(CIFAR10_CLASSES):
        assert any(line.split()[:2] == [str(i), name] for line in lines), name
    assert "confusion matrix (rows: true class" in out
    figures = lines[-1].split()
    assert figures[0] == "loss" and figures[2] == "accuracy" and figures[4] == "top-5"
    assert 0.0 <= float(figures[3]) <= float(figures[5]) <= 1.0
    summary = json.loads((cifar_run / "summary.json").read_text())
    assert float(figures[3]) == pytest.approx(summary["final_val_accuracy"], abs=5e-5)
    assert (tmp_path / "eval" / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert kiln("eval", last, "--tta") == 0  # by default the PNG goes into the run directory
    assert "with flip TTA" in capsys.readouterr().out
    assert (cifar_run / "confusion_matrix.png").is_file()
