"""A folder of images (``DIR/train/CLASS/*.png``, ``DIR/val/...``, or class folders split by a fraction): decoded
into memory when it fits ``data.memory_budget`` (``recipes.data.folder_in_memory``), else through a seeded DataLoader.
Every file is screened first (``recipes.data.screening``).

On the DataLoader path, a folder of images goes through a DataLoader with workers. Its batch order still comes from an
:class:`~recipes.data.batches.EpochBatchSampler` (a function of seed and epoch, resumable at any batch),
and each sample's random transform is seeded from (seed, epoch, sample index), not from worker state:
the batches are the same with 0 or N workers and after a resume at any batch.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from recipes.config import Config
from recipes.data.base import Data, DataError, usable_cpus
from recipes.data.batches import EpochBatchSampler, LoaderBatches, mix_seed, split_indices
from recipes.data.folder_in_memory import decoded_size, in_memory_batches, memory_budget
from recipes.data.preprocess import Preprocessing
from recipes.data.screening import screen_images
from recipes.pretrained import NamedWeights, named_weights

log = logging.getLogger("kiln")

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "imagefolder_preprocessing", "SeededSamples", "SampleEpochBatchSampler",
           "imagefolder_transforms", "imagefolder_data", "imagefolder_classes", "imagefolder_eval_data"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)  #: what torchvision's classification models are trained with
IMAGENET_STD = (0.229, 0.224, 0.225)


class SampleEpochBatchSampler(EpochBatchSampler):
    """An :class:`EpochBatchSampler` that yields ``(index, epoch)`` pairs, for :class:`SeededSamples`.

    The epoch travels with every index, so a worker process seeds each sample's transform from
    (seed, epoch, index) without knowing where the main process is.
    """

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, start = self.epoch, self.start_batch  # fixed now: the loader may pull batches ahead
        for _, idx in self.index_batches(epoch, start):
            yield [(i, epoch) for i in idx.tolist()]


class SeededSamples(torch.utils.data.Dataset):
    """Samples ``indices`` of ``dataset`` (``(PIL image, label)`` items) through ``transform``.

    With ``seed`` set, an item is asked for as ``(index, epoch)`` and the transform runs with torch's
    RNG seeded from (seed, epoch, index) (torchvision's transforms draw from it), inside
    ``torch.random.fork_rng`` so the caller's RNG is untouched: the same sample of the same epoch
    gets the same crop and flip in any process, with any number of workers. Without ``seed``, items
    are asked for by index and the transform must be deterministic (evaluation).

    Args:
        dataset: e.g. a torchvision ``ImageFolder`` without a transform.
        indices: which of its samples this data set holds.
        transform: PIL image -> tensor.
        seed: the run's seed, for random transforms; None for deterministic ones.
    """

    def __init__(self, dataset: Any, indices: Sequence[int], transform: Callable, seed: int | None = None) -> None:
        self.dataset, self.indices, self.transform, self.seed = dataset, list(indices), transform, seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        if self.seed is None:
            index = int(key[0]) if isinstance(key, tuple) else int(key)
            image, label = self.dataset[self.indices[index]]
            return self.transform(image), label
        if not isinstance(key, tuple):
            raise TypeError("a seeded SeededSamples is indexed by (index, epoch); use SampleEpochBatchSampler")
        index, epoch = int(key[0]), int(key[1])
        image, label = self.dataset[self.indices[index]]
        with torch.random.fork_rng(devices=[]):
            # the CPU generator alone: torch.manual_seed would also queue a lazy CUDA seeding, formatting stack
            # traces (about 1.4 ms an image here, a third of a resnet18 epoch at 32 px)
            torch.default_generator.manual_seed(mix_seed(self.seed, epoch, index))
            return self.transform(image), label


def imagefolder_preprocessing(image_size: int, weights: NamedWeights | None = None, channels: int = 3) -> Preprocessing:
    """An image folder's evaluation transform at ``image_size``: with named pretrained ``weights``, theirs (their
    resize ratio, interpolation, mean and std); else RGB (or, with ``channels`` 1, grayscale), shorter side to
    ``int(image_size * 1.14)``, a center crop, ImageNet's mean and std (what torchvision's classification models
    are trained with; their averages over the channels for grayscale)."""
    if weights is not None:
        if channels != 3:
            raise DataError(f"--weights {weights.name}: pretrained weights take RGB images; data.channels must be 3")
        return weights.preprocessing(image_size)
    if channels == 1:
        return Preprocessing(mode="L", size=image_size, mean=(sum(IMAGENET_MEAN) / 3,), std=(sum(IMAGENET_STD) / 3,),
                             resize=int(image_size * 1.14))
    return Preprocessing(mode="RGB", size=image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                         resize=int(image_size * 1.14))


def imagefolder_transforms(cfg: Config) -> tuple[Callable, Callable]:
    """``(train, eval)`` transforms at ``data.image_size`` for the DataLoader path: the standard ImageNet-style ones,
    or those of the named pretrained weights ``model.weights`` (``recipes.pretrained``).

    Train: RandomResizedCrop(image_size) (``augment`` crop or crop+flip), RandomHorizontalFlip
    (crop+flip), ToTensor, Normalize, with the evaluation transform's interpolation, mean and std (and, with
    ``data.channels`` 1, grayscale first); with ``augment`` none, the eval transform. Eval:
    :func:`imagefolder_preprocessing` (resize, center crop and normalize on the float image), the transform
    ``kiln predict`` and exported models document.
    """
    from torchvision import transforms as T

    d = cfg.data
    evaluation = imagefolder_preprocessing(d.image_size, named_weights(cfg.model.name, cfg.model.weights), d.channels)
    erase = [T.RandomErasing(p=d.erase)] if d.erase else []
    if d.augment == "none":
        return (T.Compose([evaluation, *erase]) if erase else evaluation), evaluation
    interpolation = T.InterpolationMode(evaluation.interpolation)
    train = [T.Grayscale()] if d.channels == 1 else []
    train += [T.RandomResizedCrop(d.image_size, interpolation=interpolation)]
    train += [T.RandomHorizontalFlip()] if d.augment == "crop+flip" else []
    return T.Compose(train + [T.ToTensor(), T.Normalize(evaluation.mean, evaluation.std), *erase]), evaluation


def _image_folder(root: Path, two_classes: bool = True) -> Any:
    """A torchvision ``ImageFolder`` of ``root``'s class folders; refused with one class if ``two_classes``."""
    from torchvision.datasets import ImageFolder

    if not root.is_dir():
        raise DataError(f"no image folder at {root}")
    try:
        dataset = ImageFolder(str(root))  # its loader converts every image to RGB (grayscale PNGs included)
    except (FileNotFoundError, OSError) as e:
        reason = str(e).strip().splitlines()[0]
        raise DataError(f"{root} holds no images in class folders ({reason})") from None
    if two_classes and len(dataset.classes) < 2:
        raise DataError(f"{root} holds one class folder ({dataset.classes[0]}/); a classifier needs at least two "
                        f"(ROOT/CLASS/*.png, one folder per class)")
    return dataset


def _folders(data_dir: str) -> tuple[Path, Path | None]:
    """The training folder and the validation folder (None: split the training folder)."""
    if not data_dir:
        raise DataError("imagefolder needs --data-dir DIR: a folder holding train/ and val/ class folders "
                        "(or class folders only, split by --val-fraction)")
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"no data directory at {root} (imagefolder wants DIR/train/CLASS/*.png and DIR/val/CLASS/*.png, "
                        "or DIR/CLASS/*.png split by --val-fraction)")
    if (root / "train").is_dir():
        return root / "train", (root / "val") if (root / "val").is_dir() else None
    return root, None


def imagefolder_classes(data_dir: str) -> list[str]:
    """The class names of an image folder: its train/ (or its own) sub-folder names, sorted (ImageFolder's order)."""
    from torchvision.datasets.folder import find_classes

    train_dir, _ = _folders(data_dir)
    try:
        return list(find_classes(str(train_dir))[0])
    except FileNotFoundError as e:
        raise DataError(f"{train_dir} holds no class folders ({str(e).strip().splitlines()[0]})") from None


def imagefolder_data(cfg: Config, device: torch.device) -> Data:
    """A folder of images as a :class:`Data` (``data.channels``: RGB, or grayscale), held in memory when it fits.

    ``data.data_dir`` holds ``train/`` and ``val/`` class folders, or ``train/`` only or class folders
    only, then split into train and val by ``data.val_fraction`` (seeded). Every file is opened and
    verified as an image first (``recipes.data.screening``): an unreadable one is refused, or skipped
    with a warning line when ``data.skip_bad_images`` says so.

    When the decoded images fit ``data.memory_budget``, they are decoded once and batched in memory
    (``recipes.data.folder_in_memory``); else each split is a DataLoader with ``data.num_workers``
    workers, its training order from a :class:`SampleEpochBatchSampler` and each sample's transform
    seeded from (seed, epoch, index), so batches do not depend on the workers. Either way a resume
    at any batch gives the same batches. ``Data.reading`` says which path it took.

    Raises:
        DataError: a missing or empty folder, fewer than two classes, val/ classes that differ from
            train/'s, or an unreadable image (unless ``data.skip_bad_images``).
    """
    d, seed = cfg.data, cfg.train.seed
    train_dir, val_dir = _folders(d.data_dir)
    train_set = _image_folder(train_dir)
    if val_dir is not None:
        val_set = _image_folder(val_dir, two_classes=False)  # it must have train/'s classes: that says more
        if val_set.classes != train_set.classes:
            raise DataError(f"{val_dir} has classes {val_set.classes}, {train_dir} has {train_set.classes}; "
                            "they must be the same folders")
        screen_images([train_set, val_set], d.skip_bad_images)
        train_idx, val_idx = list(range(len(train_set))), list(range(len(val_set)))
    else:
        if d.val_fraction <= 0:
            raise DataError(f"{d.data_dir} has no val/ folder: data.val_fraction must be > 0 to split one off")
        screen_images([train_set], d.skip_bad_images)
        if len(train_set) < 2:
            raise DataError(f"{train_dir} holds {len(train_set)} image; at least 2 are needed to split off a val set")
        val_set = train_set
        train_idx, val_idx = (t.tolist() for t in split_indices(len(train_set), d.val_fraction, seed))
    train_tf, evaluation = imagefolder_transforms(cfg)
    train_side = evaluation.resize or evaluation.size
    classes = list(train_set.classes)
    need = decoded_size(len(train_idx), len(val_idx), evaluation.channels, train_side, evaluation.size)
    budget = memory_budget(cfg)
    if need <= budget:
        train, val = in_memory_batches(cfg, train_set.samples, train_idx, val_set.samples, val_idx, evaluation,
                                       train_side, device)
        done = {"none": "", "crop": ": crops on whole batches", "crop+flip": ": crops and flips on whole batches"}
        how = (f"{len(train_idx) + len(val_idx):,} images decoded into memory ({_mb(need)} of a {_gb(budget)} "
               f"budget){done[d.augment]}")
        return Data(train, val, evaluation.channels, len(classes), classes, evaluation, how)
    train_sampler = SampleEpochBatchSampler(len(train_idx), d.batch_size, shuffle=True, seed=seed)
    args = _loader_args(cfg, device)
    train_loader = torch.utils.data.DataLoader(SeededSamples(train_set, train_idx, train_tf, seed=seed),
                                               batch_sampler=train_sampler, **args)
    how = (f"{len(train_idx) + len(val_idx):,} images read by a DataLoader with {args['num_workers']} workers "
           f"(decoded they would take {_mb(need)}, over data.memory_budget {_mb(budget)})")
    return Data(LoaderBatches(train_loader, seed=seed), _eval_batches(val_set, val_idx, cfg, device),
                evaluation.channels, len(classes), classes, evaluation, how)


def _gb(n: int) -> str:
    """Bytes as ``5.9 GB`` (a budget: one unit, whatever the machine has)."""
    return f"{n / (1 << 30):.1f} GB"


def _mb(n: int) -> str:
    """Bytes as ``0``, ``1 MB`` (at least, for a few bytes), ``25 MB`` or ``5.9 GB``."""
    if n == 0:
        return "0"
    return f"{n / (1 << 30):.1f} GB" if n >= 1 << 30 else f"{max(n, 1 << 20) / (1 << 20):.0f} MB"


def _loader_args(cfg: Config, device: torch.device) -> dict[str, Any]:
    """The DataLoader settings both splits share: ``data.num_workers`` workers (at most one per CPU this
    process may use: more only compete for the cores, and torch warns about it), pinned memory for CUDA."""
    workers = min(cfg.data.num_workers, usable_cpus())
    return {"num_workers": workers, "pin_memory": device.type == "cuda", "persistent_workers": workers > 0}


def _eval_batches(dataset: Any, indices: Sequence[int], cfg: Config, device: torch.device) -> LoaderBatches:
    """``indices`` of ``dataset`` in order, through the eval transform, in batches of at least 64."""
    _, eval_tf = imagefolder_transforms(cfg)
    sampler = EpochBatchSampler(len(indices), max(cfg.data.batch_size, 64), shuffle=False)
    return LoaderBatches(torch.utils.data.DataLoader(SeededSamples(dataset, indices, eval_tf), batch_sampler=sampler,
                                                     **_loader_args(cfg, device)))


def imagefolder_eval_data(cfg: Config, device: torch.device) -> Data:
    """What ``kiln eval --data-dir DIR`` evaluates in an image folder: DIR/val/ when DIR has one, else every image
    in it (DIR/train/ or DIR's own class folders), none held out. ``train`` is the same batches (nothing trains).

    Raises:
        DataError: a missing folder, fewer than two classes, or an unreadable image (unless
            ``data.skip_bad_images``).
    """
    train_dir, val_dir = _folders(cfg.data.data_dir)
    dataset = _image_folder(val_dir or train_dir)
    screen_images([dataset], cfg.data.skip_bad_images)
    batches = _eval_batches(dataset, range(len(dataset)), cfg, device)
    evaluation = imagefolder_transforms(cfg)[1]
    return Data(batches, batches, evaluation.channels, len(dataset.classes), list(dataset.classes), evaluation)
