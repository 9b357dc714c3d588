"""Preprocessing: the documented torchvision steps, and the very transform each data set validates with."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from recipes import get_recipe
from recipes.config import apply_overrides
from recipes.data import load, split_indices
from recipes.data.cifar10 import CIFAR10_PREPROCESSING
from recipes.data.digits import digits_tensors
from recipes.data.imagefolder import imagefolder_preprocessing
from recipes.data.preprocess import Preprocessing
from tests.recipes.data.test_imagefolder import write_image_folder


def torchvision_steps(p: Preprocessing, image: Image.Image) -> torch.Tensor:
    """The steps as docs/use-the-model.md documents them, in torchvision's own functions."""
    x = TF.to_tensor(image.convert(p.mode))
    if p.resize is None:
        x = TF.resize(x, [p.size, p.size], antialias=True)
    else:
        x = TF.center_crop(TF.resize(x, p.resize, antialias=True), p.size)
    return TF.normalize(x, p.mean, p.std)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "I;16"])
@pytest.mark.parametrize("hw", [(8, 8), (50, 70), (70, 50), (300, 200)])
def test_the_steps_are_torchvisions_on_any_image(mode, hw):
    rng = np.random.default_rng(hw[0])
    image = Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)).convert(mode)
    for p in (Preprocessing("L", 32, (0.3,), (0.4,)), imagefolder_preprocessing(32), CIFAR10_PREPROCESSING):
        ours = p(image)
        assert ours.shape == (p.channels, p.size, p.size)
        assert torch.equal(ours, torchvision_steps(p, image)), (p, mode, hw)


def test_the_record_round_trips_and_a_bad_one_is_refused():
    p = imagefolder_preprocessing(64)
    assert Preprocessing.from_dict(p.to_dict()) == p and p.resize == 72
    assert "shorter side to 72, center crop 64x64" in p.describe()
    with pytest.raises(ValueError, match="mean"):
        Preprocessing.from_dict({"mode": "RGB", "size": 32, "std": [1, 1, 1]})
    with pytest.raises(ValueError, match="3 channel"):
        Preprocessing("RGB", 32, (0.5,), (0.5,))


def test_digits_validate_on_their_8_bit_images_through_the_preprocessing():
    cfg = get_recipe("digits")
    data = load(cfg, torch.device("cpu"))
    x8, _ = digits_tensors(8)
    _, val_idx = split_indices(len(x8), cfg.data.val_fraction, cfg.train.seed)
    first = val_idx[:20].tolist()
    images = [Image.fromarray((x8[i, 0] * 255).round().to(torch.uint8).numpy(), mode="L") for i in first]
    assert torch.equal(torch.stack([data.preprocessing(im) for im in images]), data.val.x[:20])


def test_an_image_folders_validation_inputs_are_its_preprocessing(tmp_path):
    root = write_image_folder(tmp_path, {"train": 2, "val": 2}, size=(30, 41))
    cfg = apply_overrides(get_recipe("imagefolder"), {"data.data_dir": str(root), "data.image_size": 16,
                                                      "data.num_workers": 0})
    data = load(cfg, torch.device("cpu"))
    x, _ = next(iter(data.val))
    files = sorted((root / "val").rglob("*.png"))
    assert torch.equal(x, torch.stack([data.preprocessing(Image.open(f)) for f in files]))


def test_cifar10_and_idx_validation_inputs_are_their_preprocessing(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (6, 3072), dtype=np.uint8), "labels": list(range(6))}, f)
    data = load(apply_overrides(get_recipe("cifar10"), {"data.data_dir": str(tmp_path)}), torch.device("cpu"))
    with open(folder / "test_batch", "rb") as f:
        raw = pickle.load(f)["data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    assert torch.equal(data.val.x, torch.stack([data.preprocessing(Image.fromarray(a)) for a in raw]))

    idx = _write_idx(tmp_path / "mnist", rng)
    data = load(apply_overrides(get_recipe("mnist"), {"data.data_dir": str(idx), "data.val_fraction": 0.0}),
                torch.device("cpu"))
    x, _ = next(iter(data.val))
    images = np.load(idx / "test.npy")
    assert torch.equal(x, torch.stack([data.preprocessing(Image.fromarray(a, mode="L")) for a in images]))


def _write_idx(folder: Path, rng) -> Path:
    """The four MNIST IDX files (6 training, 4 test images), and the test images as test.npy."""
    folder.mkdir()
    for prefix, n in (("train", 6), ("t10k", 4)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(
            np.array([2051, n, 28, 28], dtype=">i4").tobytes() + images.tobytes())
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(
            np.array([2049, n], dtype=">i4").tobytes() + (np.arange(n) % 10).astype(np.uint8).tobytes())
        if prefix == "t10k":
            np.save(folder / "test.npy", images)
    return folder
