"""MNIST and Fashion-MNIST from their original IDX files, held in memory as uint8 tensors on the device.

The IDX format (LeCun's): a 4-byte magic number whose third byte is the element type (0x08:
unsigned byte) and whose fourth is the number of dimensions (images: 2051 = 0x00000803, three
dimensions; labels: 2049 = 0x00000801, one), then each dimension as a big-endian uint32, then the
data. Files may be gzipped. The reader is strict: a wrong magic number, a truncated or overlong
file, or image and label counts that disagree is one line naming the file.

The four files keep their usual names (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each raw or ``.gz``), in ``--data-dir``
itself or in torchvision's layout below it (``DIR/FashionMNIST/raw/``, ``DIR/MNIST/raw/``).
The images stay uint8 on the training device; each batch is converted, normalised with the
training split's mean and std, and augmented there (:class:`~recipes.data.batches.TensorBatches`).
"""
from __future__ import annotations

import gzip
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from recipes.data.base import Data, DataError
from recipes.data.augment import random_crop_flip, with_erasing
from recipes.data.batches import TensorBatches, split_indices
from recipes.data.preprocess import Preprocessing

if TYPE_CHECKING:  # pragma: no cover
    from recipes.config import Config

__all__ = ["read_idx", "read_images_and_labels", "find_idx_files", "idx_data", "IMAGES_MAGIC", "LABELS_MAGIC",
           "IDX_FILES", "FASHION_MNIST_CLASSES", "FASHION_MNIST_DIR"]

IMAGES_MAGIC = 2051  #: 0x00000803: unsigned bytes, three dimensions (count, rows, columns)
LABELS_MAGIC = 2049  #: 0x00000801: unsigned bytes, one dimension (count)
#: split -> (images file, labels file), without ``.gz``.
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
#: Where Debian's ``dataset-fashion-mnist`` package puts the files.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
#: data.dataset -> (torchvision's folder name, how to get the files when they are missing).
_SETS = {
    "fashion-mnist": ("FashionMNIST", f"apt-get install dataset-fashion-mnist (into {FASHION_MNIST_DIR})"),
    "mnist": ("MNIST", "torchvision: python -c \"import torchvision; torchvision.datasets.MNIST('DIR', download=True)\""),
}


def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """The array in the IDX file at ``path`` (raw or gzipped), which must have the magic number ``magic``.

    Raises:
        DataError: the file cannot be read, has another magic number, or is truncated or overlong.

    Example:
        >>> import tempfile, struct
        >>> path = Path(tempfile.mkdtemp()) / "labels-idx1-ubyte"
        >>> _ = path.write_bytes(struct.pack(">II", LABELS_MAGIC, 3) + bytes([7, 0, 9]))
        >>> read_idx(path, LABELS_MAGIC).tolist()
        [7, 0, 9]
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if len(raw) < 4:
        raise DataError(f"{path} is not an IDX file: {len(raw)} bytes")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        kind = "image" if magic == IMAGES_MAGIC else "label"
        raise DataError(f"{path} is not an IDX {kind} file: magic number {found}, expected {magic}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated: its header ends after {len(raw)} of {header} bytes")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header != expected:
        what = "truncated" if len(raw) - header < expected else "longer than its header says"
        raise DataError(f"{path} is {what}: {len(raw) - header} bytes of data for shape {shape} ({expected} bytes)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def read_images_and_labels(images: str | Path, labels: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """An IDX image file and its label file: uint8 ``(N, rows, cols)`` and ``(N,)``, N checked to agree."""
    x, y = read_idx(images, IMAGES_MAGIC), read_idx(labels, LABELS_MAGIC)
    if len(x) != len(y):
        raise DataError(f"{images} holds {len(x)} images but {labels} holds {len(y)} labels")
    return x, y


def _candidates(data_dir: Path, dataset: str) -> list[Path]:
    folder = _SETS[dataset][0]
    return [data_dir, data_dir / folder / "raw", data_dir / folder]


def find_idx_files(data_dir: str | Path, dataset: str) -> dict[str, tuple[Path, Path]]:
    """``{"train": (images, labels), "test": (images, labels)}`` in the first folder that holds all four.

    Raises:
        DataError: no folder holds them; the line says where kiln looked and how to get them.
    """
    data_dir = Path(data_dir)
    for folder in _candidates(data_dir, dataset):
        found = {}
        for split, names in IDX_FILES.items():
            paths = []
            for name in names:
                path = next((p for p in (folder / name, folder / f"{name}.gz") if p.is_file()), None)
                if path is None:
                    break
                paths.append(path)
            if len(paths) == 2:
                found[split] = (paths[0], paths[1])
        if len(found) == 2:
            return found
    looked = ", ".join(str(p) for p in _candidates(data_dir, dataset))
    files = ", ".join(n for names in IDX_FILES.values() for n in names)
    raise DataError(f"no {dataset} IDX files in {looked} (kiln looks for {files}, raw or .gz); "
                    f"get them with: {_SETS[dataset][1]}")


def idx_data(cfg: "Config", device: torch.device) -> Data:
    """MNIST or Fashion-MNIST (``data.dataset``) as a :class:`Data`, held as uint8 on ``device``.

    Validation is the official test split, unless ``data.val_fraction`` > 0 holds out that share of
    the training split instead (tuning without looking at the test set). Training batches get a
    random crop (``data.augment`` crop: shifts of up to 2 pixels) and, with crop+flip, horizontal
    flips (for clothes, not for digits: a mirrored digit is another digit).
    """
    d = cfg.data
    if d.image_size != 28:
        raise DataError(f"{d.dataset} images are 28x28; data.image_size must be 28, not {d.image_size}")
    data_dir = d.data_dir or (FASHION_MNIST_DIR if d.dataset == "fashion-mnist" else "")
    if not data_dir:
        raise DataError(f"{d.dataset} needs --data-dir DIR (a folder with the four IDX files); get them with: "
                        f"{_SETS[d.dataset][1]}")
    files = find_idx_files(data_dir, d.dataset)
    x_train, y_train = read_images_and_labels(*files["train"])
    x_test, y_test = read_images_and_labels(*files["test"])
    for name, y in (("training", y_train), ("test", y_test)):
        if len(y) and int(y.max()) > 9:
            raise DataError(f"{d.dataset} {name} labels fall outside 0..9 (largest {int(y.max())})")
    x_train, y_train = torch.from_numpy(x_train.copy()).unsqueeze(1), torch.from_numpy(y_train.astype(np.int64))
    x_test, y_test = torch.from_numpy(x_test.copy()).unsqueeze(1), torch.from_numpy(y_test.astype(np.int64))
    if d.val_fraction > 0:  # hold out part of the training split; the test split stays unseen
        train_idx, val_idx = split_indices(len(x_train), d.val_fraction, cfg.train.seed)
        x_test, y_test = x_train[val_idx], y_train[val_idx]
        x_train, y_train = x_train[train_idx], y_train[train_idx]
    scaled = x_train.float().div_(255.0)
    preprocessing = Preprocessing(mode="L", size=28, mean=(float(scaled.mean()),), std=(float(scaled.std()),))
    prepare = preprocessing.from_uint8  # uint8 -> normalised float, on the device, per batch

    augment = None
    if d.augment != "none":
        flip = d.augment == "crop+flip"
        augment = lambda xb, g: random_crop_flip(xb, g, pad=2, flip=flip)  # noqa: E731
    augment = with_erasing(augment, d.erase)
    seed = cfg.train.seed
    train = TensorBatches(x_train.to(device), y_train.to(device), d.batch_size, shuffle=True, seed=seed,
                          augment=augment, prepare=prepare)
    val = TensorBatches(x_test.to(device), y_test.to(device), max(d.batch_size, 512), shuffle=False, prepare=prepare)
    names = list(FASHION_MNIST_CLASSES) if d.dataset == "fashion-mnist" else [str(i) for i in range(10)]
    return Data(train, val, 1, 10, names, preprocessing)
