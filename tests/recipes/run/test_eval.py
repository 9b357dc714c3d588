"""Full evaluation: loss, top-1, top-5, per-class accuracy, the confusion matrix (text and PNG), flip TTA."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from recipes import RECIPES
from recipes.config import apply_overrides
from recipes.report.plots import plot_confusion_matrix
from recipes.run.evaluate import FlipTTA, evaluate, format_evaluation
from recipes.run import evaluate_checkpoint, train

PNG = b"\x89PNG\r\n\x1a\n"


class Lopsided(nn.Module):
    """Logits from the left half of an image only: a horizontal flip changes them."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(3 * 4 * 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
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
    run = train(cfg, tmp_path / "run", quiet=True, stream=open(tmp_path / "log.txt", "w"))
    result = evaluate_checkpoint(run.run_dir / "checkpoints" / "last.pt", tta=True)
    for key in ("loss", "accuracy", "samples", "epoch", "recipe", "device"):
        assert key in result
    assert result["samples"] == 32 and result["epoch"] == 1 and result["recipe"] == "synthetic"
    assert result["class_names"] == [f"class{i}" for i in range(10)] and result["tta"]
    assert sum(map(sum, result["confusion_matrix"])) == 32 and result["top5"] >= result["accuracy"]
