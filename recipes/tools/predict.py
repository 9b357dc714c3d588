"""Classify images with a trained checkpoint: what ``kiln predict`` reads, the predictions, their formats.

Inputs (:func:`find_inputs`) are image files (any format PIL reads), folders searched recursively for
files with torchvision's image extensions, IDX image files (``*-images-idx3-ubyte[.gz]``, rows named
``FILE[i]``) and CIFAR batch files (``data_batch_N``, ``test_batch``). A label is known for an image in
a folder named like one of the model's classes, for an IDX file with its ``*-labels-idx1-ubyte[.gz]``
beside it, and for a CIFAR batch. Every file is screened first (PIL's open and verify, the IDX and
pickle readers), so a bad one is one line and skipped, never a DataLoader worker's traceback.

:func:`predict` decodes and preprocesses in a DataLoader with workers, through the checkpoint's own
:class:`~recipes.data.preprocess.Preprocessing` (exactly what validation fed the model; records of
IDX and CIFAR files go through a PIL image too, so a colour batch given to a grayscale model is
converted as PIL converts), and runs the model through :meth:`~recipes.run.inference.Trained.logits`.

Example:
    >>> from recipes.run import load                                         # doctest: +SKIP
    >>> trained = load("runs/d5/checkpoints/last.pt")                        # doctest: +SKIP
    >>> found = find_inputs(["photos/"], trained.class_names)                # doctest: +SKIP
    >>> rows, failed = predict(trained, found)                               # doctest: +SKIP
    >>> print(format_rows(rows, "table"))                                    # doctest: +SKIP
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from callbacks.files import write_atomic
from recipes.data import DataError
from recipes.data.cifar10 import read_cifar_batch
from recipes.data.idx import IMAGES_MAGIC, LABELS_MAGIC, read_idx
from recipes.data.screening import unreadable_images
from recipes.data.preprocess import Preprocessing
from recipes.run.evaluate import FlipTTA
from recipes.run.inference import Trained

__all__ = ["Input", "Inputs", "Prediction", "find_inputs", "predict", "format_rows", "write_rows", "top1_accuracy",
           "default_workers", "FORMATS", "DEFAULT_BATCH_SIZE"]

FORMATS = ("table", "json", "csv")
DEFAULT_BATCH_SIZE = 256
_IDX_IMAGES = re.compile(r"images-idx3-ubyte(\.gz)?$")
_CIFAR_BATCH = re.compile(r"(data_batch_\d+|test_batch)$")
_KNOWN_FORMATS = ("an image PIL reads, an IDX images file (*-images-idx3-ubyte[.gz]) or a CIFAR batch "
                  "(data_batch_N, test_batch)")


@dataclass(frozen=True)
class Input:
    """One image to classify: ``name`` as printed (the path, or ``FILE[i]`` for a record of an IDX or CIFAR file)."""

    name: str
    path: str
    index: int | None = None  #: the record in the array file ``path``; None: ``path`` is an image file
    label: int | None = None  #: the true class (an index into the model's classes), when known


@dataclass
class Inputs:
    """What :func:`find_inputs` found: ``inputs`` in order, the arrays of IDX/CIFAR files, and what it skipped."""

    inputs: list[Input] = field(default_factory=list)
    records: dict[str, np.ndarray] = field(default_factory=dict)  #: path -> uint8 images, N x H x W or N x 3 x H x W
    skipped: list[tuple[str, str]] = field(default_factory=list)  #: (path, reason)
    warnings: list[str] = field(default_factory=list)  #: e.g. a labels file that could not be used


@dataclass(frozen=True)
class Prediction:
    """One row of output: the input, its true class when known, and the top-k ``(class, index, probability)``."""

    input: str
    label: str | None
    top: list[tuple[str, int, float]]

    def to_dict(self) -> dict[str, Any]:
        """``{"input", "label" (only when known), "predictions": [{"class", "index", "probability"}]}``."""
        row: dict[str, Any] = {"input": self.input}
        if self.label is not None:
            row["label"] = self.label
        row["predictions"] = [{"class": c, "index": i, "probability": p} for c, i, p in self.top]
        return row

    @property
    def correct(self) -> bool | None:
        """Whether the top class is the label (None without a label)."""
        return None if self.label is None else self.top[0][0] == self.label


def default_workers() -> int:
    """DataLoader workers ``kiln predict`` decodes with by default: min(4, CPU cores)."""
    return min(4, os.cpu_count() or 1)


# ------------------------------------------------------------------------------------------------ inputs

def find_inputs(paths: Iterable[str | Path], class_names: Sequence[str]) -> Inputs:
    """The images in ``paths`` (files, folders, IDX and CIFAR batch files), in order; bad ones skipped with a reason.

    Folders are searched recursively, in sorted order, for files with torchvision's image extensions
    (other files there are ignored). A file given by name is an image by its extension, an IDX or
    CIFAR batch file by its name, or else an image if PIL can read it. Image files are opened and
    verified by PIL here (fast: nothing is decoded), so a damaged one is named up front.

    Args:
        paths: what the user gave.
        class_names: the model's classes; an image in a folder of that name has that label.
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    found = Inputs()
    classes = {name: i for i, name in enumerate(class_names)}
    for given in paths:
        path = Path(given)
        if not path.exists():
            found.skipped.append((str(given), "no such file or directory"))
        elif path.is_dir():
            files = sorted(str(p) for p in path.rglob("*") if p.is_file() and has_file_allowed_extension(p.name, IMG_EXTENSIONS))
            if not files:
                found.skipped.append((str(given), f"no image files in it ({', '.join(IMG_EXTENSIONS)})"))
            _add_images(found, files, classes)
        elif _IDX_IMAGES.search(path.name) or _CIFAR_BATCH.fullmatch(path.name):
            _add_records(found, str(given), len(class_names))
        elif has_file_allowed_extension(path.name, IMG_EXTENSIONS) or not unreadable_images([str(given)]):
            _add_images(found, [str(given)], classes)
        else:
            found.skipped.append((str(given), f"unknown format: not {_KNOWN_FORMATS}"))
    return found


def _add_images(found: Inputs, files: Sequence[str], classes: dict[str, int]) -> None:
    """Image files into ``found``, labelled by their folder's name; those PIL cannot open and verify skipped."""
    bad = dict(unreadable_images(files))
    found.skipped += [(p, bad[p]) for p in files if p in bad]
    found.inputs += [Input(p, p, label=classes.get(Path(p).parent.name)) for p in files if p not in bad]


def _add_records(found: Inputs, path: str, num_classes: int) -> None:
    """An IDX image file (with its labels file when one is beside it) or a CIFAR batch, into ``found``."""
    try:
        if _IDX_IMAGES.search(Path(path).name):
            array, labels = read_idx(path, IMAGES_MAGIC), _idx_labels(path, found)
        else:
            x, y = read_cifar_batch(Path(path))
            array, labels = x.numpy(), y.numpy()
    except DataError as e:
        found.skipped.append((path, _reason(str(e), path)))
        return
    if labels is not None and len(labels) != len(array):
        found.warnings.append(f"{path}: its {len(labels)} labels are not used: it holds {len(array)} images")
        labels = None
    found.records[path] = array
    for i in range(len(array)):
        label = int(labels[i]) if labels is not None and 0 <= int(labels[i]) < num_classes else None
        found.inputs.append(Input(f"{path}[{i}]", path, index=i, label=label))


def _idx_labels(images: str, found: Inputs) -> np.ndarray | None:
    """The labels file beside an IDX image file (``-images-idx3-`` -> ``-labels-idx1-``, raw or .gz), if any."""
    stem = _IDX_IMAGES.sub("labels-idx1-ubyte", images)
    labels = next((p for p in (stem, stem + ".gz") if Path(p).is_file()), None)
    if labels is None:
        return None
    try:
        return read_idx(labels, LABELS_MAGIC)
    except DataError as e:
        found.warnings.append(f"{labels} is not used: {_reason(str(e), labels)}")
        return None


def _reason(message: str, path: str) -> str:
    """A reader's one-line error without the path it starts with (the skip line names the path already)."""
    return message[len(path):].lstrip(" :") if message.startswith(path) else message


# ------------------------------------------------------------------------------------------- predicting

class _Decoded(torch.utils.data.Dataset):
    """Item ``i`` of ``inputs`` as ``(i, preprocessed image, None)``, or ``(i, None, reason)`` if it cannot be decoded.

    A decode error is returned, not raised: a file damaged past what PIL's verify sees (pixel data
    cut short) is skipped like any other bad input instead of stopping a DataLoader worker.
    """

    def __init__(self, inputs: Sequence[Input], records: dict[str, np.ndarray], preprocess: Preprocessing) -> None:
        self.inputs, self.records, self.preprocess = inputs, records, preprocess

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        from PIL import Image

        item = self.inputs[i]
        try:
            if item.index is None:
                with Image.open(item.path) as image:
                    return i, self.preprocess(image), None
            array = self.records[item.path][item.index]
            image = Image.fromarray(array if array.ndim == 2 else np.ascontiguousarray(array.transpose(1, 2, 0)))
            return i, self.preprocess(image), None
        except Exception as e:  # noqa: BLE001 - whatever PIL raises, this input cannot be read
            text = str(e).strip().splitlines()
            return i, None, f"cannot decode it: {text[0] if text else type(e).__name__}"


def _collate(samples: list[tuple[int, torch.Tensor | None, str | None]]) -> tuple[list[int], torch.Tensor | None,
                                                                                 list[tuple[int, str]]]:
    """A batch: the indices of the decoded inputs, their images stacked, and ``(index, reason)`` of the failed."""
    good = [(i, x) for i, x, _ in samples if x is not None]
    failed = [(i, why) for i, x, why in samples if x is None]
    return [i for i, _ in good], torch.stack([x for _, x in good]) if good else None, failed


def predict(trained: Trained, found: Inputs, *, top_k: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
            workers: int | None = None, tta: bool = False, progress: bool = True
            ) -> tuple[list[Prediction], list[tuple[str, str]]]:
    """Classify ``found.inputs`` with ``trained``: rows in input order, and ``(name, reason)`` of inputs that failed to decode.

    Each row's classes are in decreasing probability; equal probabilities rank the lower class index
    first, as ``argmax`` does, so the top class is the one ``kiln eval`` counts.

    Args:
        trained: from :func:`recipes.run.load` (its device, precision and memory format are used).
        found: from :func:`find_inputs`.
        top_k: classes per row (default: min(3, classes)).
        batch_size: images per forward pass.
        workers: DataLoader worker processes decoding and preprocessing (default: :func:`default_workers`; 0: none).
        tta: average the logits of each image and its horizontal mirror (as ``kiln eval --tta``).
        progress: a tqdm bar on stderr, counting images (tqdm leaves it out when stderr is not a terminal).

    Raises:
        ValueError: ``top_k`` outside 1..classes, or ``batch_size`` < 1.
    """
    names = trained.class_names
    top_k = min(3, len(names)) if top_k is None else top_k
    if not 1 <= top_k <= len(names):
        raise ValueError(f"--top-k must be 1..{len(names)} (the model's classes), not {top_k}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, not {batch_size}")
    workers = default_workers() if workers is None else workers
    batches = -(-len(found.inputs) // batch_size)
    loader = torch.utils.data.DataLoader(_Decoded(found.inputs, found.records, trained.preprocess),
                                         batch_size=batch_size, num_workers=min(workers, batches),
                                         collate_fn=_collate, pin_memory=trained.device.type == "cuda")
    runner = dataclasses.replace(trained, model=FlipTTA(trained.model)) if tta else trained
    rows: list[Prediction] = []
    failed: list[tuple[str, str]] = []
    with tqdm(total=len(found.inputs), unit="image", disable=None if progress else True, leave=False) as bar:
        for indices, images, bad in loader:
            failed += [(found.inputs[i].name, why) for i, why in bad]
            if images is not None:
                # A stable sort, not topk: equal probabilities (frequent in bf16) rank the lower class first,
                # as argmax (kiln eval's accuracy) does; topk's order among ties changes with k.
                probabilities, classes = torch.softmax(runner.logits(images), dim=1).sort(dim=1, descending=True,
                                                                                          stable=True)
                probabilities, classes = probabilities[:, :top_k], classes[:, :top_k]
                for i, ps, cs in zip(indices, probabilities.tolist(), classes.tolist()):
                    label = found.inputs[i].label
                    rows.append(Prediction(found.inputs[i].name, None if label is None else names[label],
                                           [(names[c], c, p) for c, p in zip(cs, ps)]))
            bar.update(len(indices) + len(bad))
    return rows, failed


def top1_accuracy(rows: Iterable[Prediction]) -> tuple[int, int]:
    """``(correct, labelled)``: how many labelled rows have their label as the top class, and how many are labelled."""
    marks = [row.correct for row in rows if row.correct is not None]
    return sum(marks), len(marks)


# --------------------------------------------------------------------------------------------- output

def format_rows(rows: Sequence[Prediction], fmt: str = "table", width: int | None = None) -> str:
    """The rows as ``table`` (aligned, fitted to ``width``: default the terminal's), ``json`` or ``csv`` text.

    json: one array of :meth:`Prediction.to_dict` objects, one per line. csv: a header ``input,label,class_1,p_1,...``,
    then a line per row (label empty when unknown).

    Example:
        >>> row = Prediction("pets/cat/1.png", "cat", [("cat", 0, 0.875), ("dog", 1, 0.125)])
        >>> print(format_rows([row], "csv"))
        input,label,class_1,p_1,class_2,p_2
        pets/cat/1.png,cat,cat,0.875,dog,0.125
        >>> print(format_rows([row], "table", width=80))
        input           label  top-1       top-2
        pets/cat/1.png  cat    cat 0.8750  dog 0.1250
    """
    if fmt == "json":
        return "[\n" + ",\n".join(json.dumps(row.to_dict()) for row in rows) + "\n]" if rows else "[]"
    if fmt == "csv":
        return _csv(rows)
    if fmt == "table":
        return _table(rows, width or shutil.get_terminal_size().columns)
    raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")


def _csv(rows: Sequence[Prediction]) -> str:
    k = max((len(row.top) for row in rows), default=0)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["input", "label"] + [f"{name}_{n}" for n in range(1, k + 1) for name in ("class", "p")])
    for row in rows:
        writer.writerow([row.input, row.label or ""] + [value for c, _, p in row.top for value in (c, f"{p:.6g}")])
    return out.getvalue().rstrip("\n")


def _table(rows: Sequence[Prediction], width: int) -> str:
    """Columns ``input  [label]  top-1  top-2 ...``, each prediction ``CLASS 0.9876``; long inputs shortened from the left."""
    k = max((len(row.top) for row in rows), default=0)
    labelled = any(row.label is not None for row in rows)
    short = lambda name: name if len(name) <= 16 else name[:15] + "~"  # noqa: E731
    cells = [[f"{short(c)} {p:.4f}" for c, _, p in row.top] for row in rows]
    cell = max([len(c) for row in cells for c in row] + [5])
    label = max([len(short(row.label or "")) for row in rows] + [5]) if labelled else 0
    rest = (label + 2 if labelled else 0) + k * (cell + 2)
    name = max(5, min(max((len(row.input) for row in rows), default=5), width - rest))
    fit = lambda text: text if len(text) <= name else "~" + text[len(text) - name + 1:]  # noqa: E731
    header = [f"{'input':<{name}}"] + ([f"{'label':<{label}}"] if labelled else []) + \
             [f"{f'top-{n}':<{cell}}" for n in range(1, k + 1)]
    lines = ["  ".join(header).rstrip()]
    for row, predictions in zip(rows, cells):
        parts = [f"{fit(row.input):<{name}}"] + ([f"{short(row.label or '-'):<{label}}"] if labelled else [])
        lines.append("  ".join(parts + [f"{c:<{cell}}" for c in predictions]).rstrip())
    return "\n".join(lines)


def write_rows(text: str, path: str | Path) -> None:
    """``text`` (and a newline) into ``path``: atomically for a file, straight through for a device or pipe (/dev/null)."""
    data = (text + "\n").encode()
    try:
        special = not stat.S_ISREG(os.stat(path).st_mode)
    except FileNotFoundError:
        special = False
    if special:
        with open(path, "wb") as f:
            f.write(data)
        return
    write_atomic(path, lambda f: f.write(data))
