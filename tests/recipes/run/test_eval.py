"""Full evaluation: loss, top-1, top-5, per-class accuracy, the confusion matrix (text and PNG), flip TTA."""
from __future__ import annotations

import gzip
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from recipes import RECIPES
from recipes.config import apply_overrides
from recipes.data.idx import IDX_FILES, LABELS_MAGIC
from recipes.report.plots import plot_confusion_matrix
from recipes.run import evaluate_checkpoint, train
from recipes.run.evaluate import FlipTTA, evaluate, format_evaluation
from tests import runs
from tests.recipes.data.test_idx import idx_bytes, write_idx_set
from tests.recipes.data.test_imagefolder import CLASSES, write_image_folder

PNG = b"\x89PNG\r\n\x1a\n"


class Lopsided(nn.Module):
    """Logits from the left half of an image only: a horizontal flip changes them."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(3 * 4 * 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x[..., :2].flatten(1))


@pytest.fixture
def data():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(30, 3, 4, 4, generator=generator)
    y = torch.arange(30) % 6
    return [(x[:16], y[:16]), (x[16:], y[16:])]


def test_the_figures_match_a_direct_computation(data):
    torch.manual_seed(0)
    model = Lopsided(6).eval()
    result = evaluate(model, data, 6, device=torch.device("cpu"), precision="fp32")
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    with torch.no_grad():
        logits = model(x)
    predicted = logits.argmax(1)
    assert result["samples"] == 30
    assert result["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert result["accuracy"] == pytest.approx((predicted == y).float().mean().item())
    top5 = (logits.topk(5, dim=1).indices == y[:, None]).any(1).float().mean().item()
    assert result["top5"] == pytest.approx(top5)
    matrix = torch.zeros(6, 6, dtype=torch.long)
    for t, p in zip(y.tolist(), predicted.tolist()):
        matrix[t, p] += 1
    assert result["confusion_matrix"] == matrix.tolist()
    assert result["per_class_samples"] == [5] * 6
    assert result["per_class"] == pytest.approx([matrix[i, i].item() / 5 for i in range(6)])


def test_flip_tta_averages_the_logits_of_the_image_and_its_mirror(data):
    model = Lopsided(6).eval()
    x = data[0][0]
    with torch.no_grad():
        assert torch.allclose(FlipTTA(model)(x), (model(x) + model(x.flip(3))) / 2)
    plain = evaluate(model, data, 6, device=torch.device("cpu"), precision="fp32")
    tta = evaluate(model, data, 6, device=torch.device("cpu"), precision="fp32", tta=True)
    assert tta["tta"] and tta["loss"] != plain["loss"]


def test_no_top5_under_five_classes_and_a_class_without_samples_has_no_accuracy():
    model = Lopsided(3).eval()
    batch = [(torch.randn(4, 3, 4, 4), torch.tensor([0, 0, 1, 1]))]
    result = evaluate(model, batch, 3, device=torch.device("cpu"), precision="fp32")
    assert result["top5"] is None and result["per_class"][2] is None and result["per_class_samples"] == [2, 2, 0]


def _result(names, matrix):
    n = len(names)
    return {"class_names": names, "recipe": "r", "epoch": 2, "samples": sum(map(sum, matrix)), "tta": False,
            "per_class": [matrix[i][i] / max(1, sum(matrix[i])) for i in range(n)],
            "per_class_samples": [sum(row) for row in matrix], "confusion_matrix": matrix,
            "loss": 0.5, "accuracy": 0.75, "top5": None}


def test_the_text_ends_with_the_headline_figures_and_shows_the_matrix_with_class_names():
    text = format_evaluation(_result(["cat", "dog"], [[3, 1], [0, 4]]), "last.pt")
    lines = text.splitlines()
    assert lines[0] == "last.pt (r, epoch 2) on 8 validation images:"
    assert "  0 cat  0.7500  (4 images)" in lines and "  1 dog  1.0000  (4 images)" in lines
    header = lines.index("confusion matrix (rows: true class, columns: predicted class, by number):")
    assert [line.split() for line in lines[header + 1: header + 4]] == [["0", "1"], ["0", "cat", "3", "1"],
                                                                        ["1", "dog", "0", "4"]]
    assert lines[-1] == "  loss 0.5000  accuracy 0.7500"
    many = [f"c{i}" for i in range(30)]
    big = [[1 if i == j else 0 for j in range(30)] for i in range(30)]
    assert "30 classes, see the PNG" in format_evaluation(_result(many, big))


def test_the_confusion_matrix_png_has_the_class_names(tmp_path):
    path = plot_confusion_matrix([[3, 1], [0, 4]], ["cat", "dog"], tmp_path / "sub" / "cm.png", title="t")
    assert path.read_bytes()[:8] == PNG
    many = [f"class{i}" for i in range(30)]
    big = plot_confusion_matrix([[1 if i == j else 0 for j in range(30)] for i in range(30)], many, tmp_path / "big.png")
    assert big.read_bytes()[:8] == PNG


def test_evaluate_checkpoint_keeps_its_keys_and_adds_the_new_figures(tmp_path):
    cfg = apply_overrides(RECIPES["synthetic"], {"train.epochs": 1, "data.samples": 160, "data.image_size": 16,
                                                 "data.batch_size": 16, "model.channels": (4, 8)})
    with open(tmp_path / "log.txt", "w") as log:
        run = train(cfg, tmp_path / "run", quiet=True, stream=log)
    result = evaluate_checkpoint(run.run_dir / "checkpoints" / "last.pt", tta=True)
    for key in ("loss", "accuracy", "samples", "epoch", "recipe", "device"):
        assert key in result
    assert result["samples"] == 32 and result["epoch"] == 1 and result["recipe"] == "synthetic"
    assert result["class_names"] == [f"class{i}" for i in range(10)] and result["tta"]
    assert sum(map(sum, result["confusion_matrix"])) == 32 and result["top5"] >= result["accuracy"]


# ------------------------------------------------------------------ kiln eval --data-dir, as real processes

PER_CLASS = re.compile(r"^\s+(\d+) (\S+)\s+\S+\s+\((\d+) images?\)$")


def kiln(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return runs.kiln(*args, cwd=cwd, timeout=900)  # in the test's own folder, with this module's longer bound


def trained(tmp_path_factory, name: str, *args: str) -> Path:
    """``kiln train ARGS --quiet --no-report`` into a fresh run directory (only its checkpoints are used); its
    last.pt."""
    root = tmp_path_factory.mktemp(name)
    result = kiln("train", *args, "--quiet", "--no-report", "--out", str(root / "run"), cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]
    return root / "run" / "checkpoints" / "last.pt"


def images_per_class(stdout: str) -> dict[str, int]:
    """The per-class image counts ``kiln eval`` printed, by class name."""
    return {m[2]: int(m[3]) for m in (PER_CLASS.match(line) for line in stdout.splitlines()) if m}


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory) -> Path:
    return trained(tmp_path_factory, "digits", "digits", "--epochs", "1", "--set", "data.image_size=16")


@pytest.mark.slow
@pytest.mark.parametrize("data_dir", ["FOLDER", "/nonexistent"])
def test_eval_of_a_model_of_in_memory_data_refuses_a_data_dir(digits_checkpoint, tmp_path, data_dir):
    data_dir = str(tmp_path) if data_dir == "FOLDER" else data_dir
    result = kiln("eval", str(digits_checkpoint), "--data-dir", data_dir, cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (f"kiln: error: {digits_checkpoint} is a digits model: the digits data set is made in "
                             "memory and reads no files; --data-dir is for checkpoints of cifar10, imagefolder, "
                             "fashion-mnist, mnist\n")
    assert not (digits_checkpoint.parents[1] / "confusion_matrix.png").exists()


@pytest.fixture(scope="module")
def mnist(tmp_path_factory) -> tuple[Path, Path]:
    """An mnist checkpoint trained on IDX files with 16 test images, and the folder of those files."""
    data = write_idx_set(tmp_path_factory.mktemp("idx") / "data", train=64, test=16)
    checkpoint = trained(tmp_path_factory, "mnist", "mnist", "--data-dir", str(data), "--epochs", "2",
                         "--batch-size", "16", "--set", "model.channels=4,8")
    return checkpoint, data


@pytest.mark.slow
def test_eval_with_a_data_dir_evaluates_that_folders_test_files(mnist, tmp_path):
    checkpoint, _ = mnist
    other = write_idx_set(tmp_path / "other", train=64, test=40, seed=1)
    labels = other / (IDX_FILES["test"][1] + ".gz")
    labels.write_bytes(gzip.compress(idx_bytes(np.full(40, 3, dtype=np.uint8), LABELS_MAGIC)))  # all 40 are "3"
    own = kiln("eval", str(checkpoint), "--out", str(tmp_path), cwd=tmp_path)
    there = kiln("eval", str(checkpoint), "--data-dir", str(other), "--out", str(tmp_path), cwd=tmp_path)
    assert own.returncode == 0 and there.returncode == 0, there.stderr
    assert "on 16 validation images" in own.stdout.splitlines()[0]
    assert images_per_class(own.stdout) == {str(i): count for i, count in enumerate([2] * 6 + [1] * 4)}
    assert "on 40 validation images" in there.stdout.splitlines()[0]
    assert images_per_class(there.stdout) == {str(i): 40 if i == 3 else 0 for i in range(10)}
    class_3 = next(line for line in there.stdout.splitlines() if PER_CLASS.match(line) and line.split()[0] == "3")
    headline = there.stdout.splitlines()[-1].split()
    assert headline[2:4] == ["accuracy", class_3.split()[2]]  # one class there: its accuracy is the accuracy


@pytest.mark.slow
def test_eval_of_a_file_recipe_on_a_missing_folder_is_one_line(mnist, tmp_path):
    result = kiln("eval", str(mnist[0]), "--data-dir", "/nonexistent", cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "kiln: error: --data-dir /nonexistent: no such directory\n"


@pytest.mark.slow
def test_eval_with_an_image_folder_evaluates_its_val_folder_or_all_its_images(tmp_path_factory, tmp_path):
    folder = write_image_folder(tmp_path_factory.mktemp("images"), {"": 8})
    checkpoint = trained(tmp_path_factory, "imagefolder", "imagefolder", "--data-dir", str(folder), "--model",
                         "small_cnn", "--image-size", "16", "--num-workers", "0", "--epochs", "2", "--batch-size", "4")
    flat = write_image_folder(tmp_path / "flat", {"": 5})
    split = write_image_folder(tmp_path / "split", {"train": 4, "val": 3})
    for data_dir, count in ((flat, 5), (split, 3)):
        result = kiln("eval", str(checkpoint), "--data-dir", str(data_dir), "--out", str(tmp_path), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert f"on {3 * count} validation images" in result.stdout.splitlines()[0]
        assert images_per_class(result.stdout) == {name: count for name in CLASSES}
