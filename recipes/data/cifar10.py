"""CIFAR-10, read from torchvision's on-disk format and held in memory as tensors.

The python-pickle batches of ``cifar-10-batches-py/`` (``data_batch_1..5`` and ``test_batch``) are read
into uint8 tensors once, normalised on the training device, and batched by index slicing with batched
crop+flip augmentation there (:class:`~recipes.data.batches.TensorBatches`).
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recipes.config import Config
from recipes.data.base import Data, DataError
from recipes.data.augment import random_crop_flip, with_erasing
from recipes.data.batches import TensorBatches
from recipes.data.preprocess import Preprocessing

__all__ = ["CIFAR10_CLASSES", "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR10_PREPROCESSING", "load_cifar10",
           "read_cifar_batch", "cifar10_data"]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  #: per-channel mean of the CIFAR-10 training images, in [0, 1]
CIFAR10_STD = (0.2470, 0.2435, 0.2616)  #: per-channel standard deviation of the same

_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = "test_batch"


def _cifar_folder(data_dir: Path) -> Path:
    """DATA_DIR/cifar-10-batches-py, or DATA_DIR itself when it is that folder."""
    if (data_dir / _CIFAR_TEST).is_file() and not (data_dir / _CIFAR_FOLDER).is_dir():
        return data_dir
    return data_dir / _CIFAR_FOLDER


def _missing_cifar(data_dir: Path) -> list[str]:
    folder = _cifar_folder(data_dir)
    return [name for name in (*_CIFAR_TRAIN, _CIFAR_TEST) if not (folder / name).is_file()]


def _get(entry: dict, key: str) -> Any:
    """A key of a CIFAR pickle: ``str`` when loaded with latin1 from the real files, ``bytes`` if pickled by Python 3."""
    if key in entry:
        return entry[key]
    return entry.get(key.encode())


def read_cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One CIFAR batch file (torchvision's python pickle): uint8 images ``(N, 3, 32, 32)`` and int64 labels.

    Raises:
        DataError: the file is not a CIFAR batch (one line with the reason).
    """
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")  # the format is a pickle: torchvision reads it the same way
        data, labels = _get(entry, "data"), _get(entry, "labels")
        if labels is None:
            labels = _get(entry, "fine_labels")
        x = np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32)
        y = np.asarray(labels, dtype=np.int64)
    except (OSError, EOFError, pickle.UnpicklingError, TypeError, ValueError, AttributeError) as e:
        raise DataError(f"{path} is not a CIFAR-10 batch ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if len(x) != len(y):
        raise DataError(f"{path} holds {len(x)} images but {len(y)} labels")
    return torch.from_numpy(x.copy()), torch.from_numpy(y)


def _cifar_class_names(folder: Path) -> list[str]:
    meta = folder / "batches.meta"
    if meta.is_file():
        try:
            with open(meta, "rb") as f:
                names = _get(pickle.load(f, encoding="latin1"), "label_names")
            if names is not None and len(names) == len(CIFAR10_CLASSES):
                return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        except (OSError, EOFError, pickle.UnpicklingError, TypeError, ValueError, AttributeError):
            pass  # the names are a nicety; the standard ones follow
    return list(CIFAR10_CLASSES)


def _download_cifar10(data_dir: Path) -> None:
    import torchvision

    try:
        torchvision.datasets.CIFAR10(root=str(data_dir), train=True, download=True)
    except Exception as e:  # no network, a proxy, a full disk: the user needs the reason, not a traceback
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"could not download CIFAR-10 into {data_dir} ({reason}); without a network, put "
                        f"torchvision's {_CIFAR_FOLDER}/ folder there by hand") from None


def load_cifar10(data_dir: str | Path, download: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                         torch.Tensor, list[str]]:
    """CIFAR-10 from torchvision's format under ``data_dir``: ``(x_train, y_train, x_test, y_test, class names)``.

    Images are uint8 ``(N, 3, 32, 32)``; labels int64. ``data_dir`` is the folder holding
    ``cifar-10-batches-py/`` (what torchvision's ``root`` is) or that folder itself. With ``download``,
    a missing data set is fetched with torchvision's downloader first.

    Raises:
        DataError: the files are missing (the line says where kiln looked and how to get them), a
            download failed, or a file is not a CIFAR-10 batch.
    """
    data_dir = Path(data_dir)
    if _missing_cifar(data_dir) and download:
        _download_cifar10(data_dir)
    missing = _missing_cifar(data_dir)
    if missing:
        folder = _cifar_folder(data_dir)
        what = "no CIFAR-10 files" if len(missing) == 6 else f"CIFAR-10 files missing ({', '.join(missing)})"
        raise DataError(f"{what} in {folder} (kiln looks for data_batch_1..5 and test_batch there); get them with: "
                        f"kiln train cifar10 --data-dir {data_dir} --download")
    folder = _cifar_folder(data_dir)
    train = [read_cifar_batch(folder / name) for name in _CIFAR_TRAIN]
    x_test, y_test = read_cifar_batch(folder / _CIFAR_TEST)
    x_train = torch.cat([x for x, _ in train])
    y_train = torch.cat([y for _, y in train])
    classes = _cifar_class_names(folder)
    for name, y in (("training", y_train), ("test", y_test)):
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(classes)):
            raise DataError(f"CIFAR-10 {name} labels in {folder} fall outside 0..{len(classes) - 1}")
    return x_train, y_train, x_test, y_test, classes


#: CIFAR-10's 32x32 RGB images, normalised with the training set's per-channel statistics.
CIFAR10_PREPROCESSING = Preprocessing(mode="RGB", size=32, mean=CIFAR10_MEAN, std=CIFAR10_STD)


def cifar10_data(cfg: Config, device: torch.device) -> Data:
    """CIFAR-10 on ``device`` as a :class:`Data`; val is the test batch.

    The uint8 images go to the device once and are normalised there; training batches get the
    batched random crop (4-pixel zero padding after normalisation) and horizontal flip when
    ``data.augment`` asks for them, seeded by batch position.
    """
    d = cfg.data
    if d.image_size != 32:
        raise DataError(f"CIFAR-10 images are 32x32; data.image_size must be 32, not {d.image_size}")
    if not d.data_dir:
        raise DataError("cifar10 needs --data-dir DIR (the folder holding cifar-10-batches-py/); get the data set "
                        "with: kiln train cifar10 --data-dir DIR --download")
    x_train, y_train, x_test, y_test, classes = load_cifar10(d.data_dir, d.download)
    x_train = CIFAR10_PREPROCESSING.from_uint8(x_train.to(device))
    x_test = CIFAR10_PREPROCESSING.from_uint8(x_test.to(device))
    augment = None
    if d.augment != "none":
        flip = d.augment == "crop+flip"
        augment = lambda xb, g: random_crop_flip(xb, g, pad=4, flip=flip)  # noqa: E731
    augment = with_erasing(augment, d.erase)
    seed = cfg.train.seed
    train = TensorBatches(x_train, y_train.to(device), d.batch_size, shuffle=True, seed=seed, augment=augment)
    val = TensorBatches(x_test, y_test.to(device), max(d.batch_size, 512), shuffle=False)
    return Data(train, val, 3, len(classes), classes, CIFAR10_PREPROCESSING)
