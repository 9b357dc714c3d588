"""The imagefolder recipe: folders of PNG files, seeded per-sample transforms with workers, torchvision models, --weights."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from recipes import RECIPES
from recipes.run.checkpoints import load_checkpoint
from recipes.config import ConfigError, apply_overrides
from recipes.data import DataError
from recipes.data.imagefolder import imagefolder_data
from recipes.report import find_issues, load_run
from tests.recipes import kiln_in_process as kiln

CLASSES = ["circle", "square", "triangle"]


def write_image_folder(root: Path, per_class: dict[str, int], size: tuple[int, int] = (20, 24)) -> Path:
    """PNG files in class folders: ``root/SPLIT/CLASS/N.png``; odd files are grayscale, even ones RGB."""
    rng = np.random.default_rng(0)
    for split, count in per_class.items():
        for c, name in enumerate(CLASSES):
            folder = root / split / name if split else root / name
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                gray = (rng.integers(0, 60, size) + 90 * c).astype(np.uint8)
                image = Image.fromarray(gray, mode="L")
                (image if k % 2 else image.convert("RGB")).save(folder / f"{k}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images"), {"train": 6, "val": 2})


def config(data_dir: Path, **overrides):
    return apply_overrides(RECIPES["imagefolder"], {"data.data_dir": str(data_dir), "data.image_size": 16,
                                                    "data.batch_size": 4, "data.num_workers": 0, **overrides})


def epoch(data, number: int, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    data.set_position(number, start)
    return list(data)


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


def test_batches_are_a_function_of_seed_and_epoch_whatever_the_workers(folder):
    loader = {"data.memory_budget": "0"}  # the DataLoader path (tests/recipes/data/test_folder_in_memory.py: memory)
    data0 = imagefolder_data(config(folder, **loader), torch.device("cpu"))
    train0, val0, channels, classes = data0.train, data0.val, data0.in_channels, data0.num_classes
    train2 = imagefolder_data(config(folder, **{"data.num_workers": 2}, **loader), torch.device("cpu")).train
    assert (channels, classes, len(train0), len(val0)) == (3, 3, 5, 1)
    first = epoch(train0, 1)
    assert first[0][0].shape == (4, 3, 16, 16)
    assert same(first, epoch(train0, 1))  # two passes over the same epoch
    assert same(first, epoch(train2, 1))  # two workers: the same crops, flips and order
    assert same(first[2:], epoch(train2, 1, start=2))  # starting at batch 2 = the tail of a full pass
    assert same(first[3:], epoch(train0, 1, start=3))
    assert not same(first, epoch(train0, 2))  # another epoch: another order and other crops
    assert not torch.equal(first[0][0], epoch(imagefolder_data(config(folder, **{"train.seed": 1}, **loader),
                                                               torch.device("cpu")).train, 1)[0][0])


def test_one_folder_is_split_by_val_fraction(tmp_path):
    write_image_folder(tmp_path, {"": 10})
    data = imagefolder_data(config(tmp_path, **{"data.val_fraction": 0.2}), torch.device("cpu"))
    train, val, classes = data.train, data.val, data.num_classes
    assert classes == 3
    assert (train.sampler.n, val.sampler.n) == (24, 6)
    x, y = next(iter(val))
    assert x.shape[1:] == (3, 16, 16) and set(y.tolist()) <= {0, 1, 2}


def _nowhere(root: Path) -> Path:
    return root / "nowhere"


def _empty(root: Path) -> Path:
    (root / "empty" / "cls").mkdir(parents=True)
    return root / "empty"


def _val_with_other_classes(root: Path) -> Path:
    write_image_folder(root / "mismatch", {"train": 1})
    write_image_folder(root / "mismatch" / "val" / "other", {"": 1})  # val/other/{circle,square,triangle}
    return root / "mismatch"


@pytest.mark.parametrize("make, message", [
    (_nowhere, "no data directory at"), (_empty, "holds no images"), (_val_with_other_classes, "must be the same folders"),
])
def test_bad_folders_are_one_line_data_errors(tmp_path, make, message):
    with pytest.raises(DataError, match=message) as info:
        imagefolder_data(config(make(tmp_path)), torch.device("cpu"))
    assert "\n" not in str(info.value)


def test_an_unknown_model_gets_a_did_you_mean():
    with pytest.raises(ConfigError, match="did you mean 'mobilenet_v3_small'"):
        apply_overrides(RECIPES["imagefolder"], {"model.name": "mobilenetv3_small"})


@pytest.fixture(scope="module")
def run(folder, tmp_path_factory) -> Path:
    """``kiln train imagefolder --model resnet18`` for one epoch, from a local weights file with 10 classes."""
    root = tmp_path_factory.mktemp("if-run")
    weights = root / "resnet18-10.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), weights)
    assert kiln("train", "imagefolder", "--data-dir", str(folder), "--model", "resnet18", "--image-size", "32",
                "--batch-size", "6", "--num-workers", "0", "--epochs", "1", "--weights", str(weights),
                "--quiet", "--out", str(root / "run")) == 0
    return root / "run"


def test_a_run_keeps_the_class_names_and_says_which_weights_it_loaded(run):
    config_json = json.loads((run / "config.json").read_text())
    assert config_json["runtime"]["class_names"] == CLASSES
    assert config_json["model"]["name"] == "resnet18"
    checkpoint, cfg = load_checkpoint(run / "checkpoints" / "last.pt")
    assert checkpoint["kiln"]["class_names"] == CLASSES and cfg.model.weights.endswith("resnet18-10.pth")
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    note = next(e["note"] for e in events if e["event"] == "weights")
    assert "except the classifier fc (10 classes in the file, 3 here" in note


def test_eval_prints_per_class_accuracy_with_class_names(run, capsys):
    capsys.readouterr()
    assert kiln("eval", str(run / "checkpoints" / "last.pt"), "--tta") == 0
    lines = capsys.readouterr().out.splitlines()
    assert "on 6 validation images with flip TTA" in lines[0]
    for i, name in enumerate(CLASSES):
        assert any(line.split()[:2] == [str(i), name] for line in lines)
    assert lines[-1].split()[0::2] == ["loss", "accuracy"]  # no top-5 with 3 classes
    assert (run / "confusion_matrix.png").is_file()


def test_eval_on_a_folder_with_other_classes_is_refused(run, tmp_path, capsys):
    other = tmp_path / "other"
    for name in ("cat", "dog", "eel"):
        write_image_folder(other / "train" / name, {"": 1})
    assert kiln("eval", str(run / "checkpoints" / "last.pt"), "--data-dir", str(other)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was trained on ['circle', 'square', 'triangle']" in err


def test_weights_that_do_not_fit_are_one_line(folder, tmp_path, capsys):
    wrong = tmp_path / "mobilenet.pth"
    torch.save(torchvision.models.mobilenet_v3_small(num_classes=3).state_dict(), wrong)
    not_weights = tmp_path / "notes.pth"
    not_weights.write_text("not a torch file")
    for path, message in ((wrong, "does not fit this model"), (not_weights, "is not a weights file"),
                          (tmp_path / "missing.pth", "no weights file at")):
        assert kiln("train", "imagefolder", "--data-dir", str(folder), "--weights", str(path), "--num-workers", "0",
                    "--out", str(tmp_path / "run")) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("kiln: error: --weights:") and message in err, err
        assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_digits_as_png_files_train_resnet18_to_90_percent(tmp_path):
    """The acceptance run: scikit-learn's 1797 digits written as 8x8 grayscale PNGs, resnet18 from scratch.

    Trained as the flip finding advises for digits (a mirrored digit is another shape): crops, no flips.
    Measured on a loaded 2-core Xeon, 5 epochs at image size 32: 0.969 in fp32, 0.981 in bf16 (4 epochs:
    0.94). With the recipe's default crop+flip it takes 8 epochs to reach 0.93; docs/watch.md shows the flip
    finding on these same images (tests/test_docs_examples.py runs it).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        (tmp_path / "digits" / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255 / 16).round().astype(np.uint8), mode="L").save(
            tmp_path / "digits" / str(label) / f"{i:04d}.png")
    start = time.monotonic()
    assert kiln("train", "imagefolder", "--data-dir", str(tmp_path / "digits"), "--model", "resnet18", "--image-size",
                "32", "--num-workers", "0", "--epochs", "5", "--set", "data.augment=crop", "--quiet",
                "--out", str(tmp_path / "run")) == 0
    seconds = time.monotonic() - start
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["final_val_accuracy"] >= 0.90, summary
    assert seconds < 600, seconds
    # trained without flips, the end-of-run pass finds nothing to say about them
    assert "flip" not in {f.kind for f in find_issues(load_run(tmp_path / "run"))}
