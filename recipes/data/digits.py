"""scikit-learn's bundled 8x8 digits (1797 images, no download), held in memory.

Above :func:`digits_data` this module imports nothing of kiln (only torch and numpy), so a benchmark's
plain training loop can load it as a file and train on exactly kiln's data.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # pragma: no cover
    from recipes.config import Config
    from recipes.data.base import Data

__all__ = ["DIGITS_CLASSES", "digits_tensors", "digits_data"]

DIGITS_CLASSES = tuple(str(i) for i in range(10))


def digits_tensors(image_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 digits (1797 images, no download) as 8-bit images, upsampled to ``image_size``, in [0, 1].

    The CSV that scikit-learn ships is read directly: importing ``sklearn.datasets`` costs 0.7 s.
    """
    import importlib.util

    import numpy as np

    spec = importlib.util.find_spec("sklearn")
    csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if csv is not None and csv.exists():
        table = np.loadtxt(csv, delimiter=",", dtype=np.float32)
        images, target = table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    else:  # a scikit-learn that keeps the file elsewhere
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:  # pragma: no cover - a declared dependency
            from recipes.data.base import DataError

            raise DataError("the digits data set comes with scikit-learn: pip install scikit-learn") from e
        digits = load_digits()
        images, target = digits.images.astype(np.float32), digits.target
    # As 8-bit grayscale images, what a PNG of them holds (0..16 -> 0..255): `kiln predict` on such files sees
    # exactly the validation inputs. Upsampled as torchvision's resize does a float image (bilinear, antialiased).
    x = torch.from_numpy(images).unsqueeze(1).mul(255.0 / 16.0).round().div(255.0)
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    return x, torch.from_numpy(target).long()


def digits_data(cfg: "Config", device: torch.device) -> "Data":
    """The digits data set of ``cfg`` as a :class:`~recipes.data.base.Data` (through
    :func:`~recipes.data.tensors.tensor_data`)."""
    from recipes.data.tensors import tensor_data  # here: the module stays loadable as a plain file

    x, y = digits_tensors(cfg.data.image_size)
    return tensor_data(x, y, list(DIGITS_CLASSES), cfg, device)
