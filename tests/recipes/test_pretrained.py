"""Pretrained weights by name (``--weights IMAGENET1K_V1``): found where torchvision keeps them, offline, with the
weights' own preprocessing; a missing file is one line naming the file and the folder.

The weights file is one this test makes (a seeded efficientnet_b0 with 1000 classes) and places in a temporary
``TORCH_HOME`` under the exact name torchvision's weights API expects. EfficientNet-B0's weights are made with
bicubic resizing and a 256 -> 224 resize and crop, not kiln's bilinear 1.14 ratio: the run must apply theirs.
No download is possible: HTTPS goes to a closed local port.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import torchvision

from recipes.config import ConfigError
from recipes.data.preprocess import Preprocessing
from recipes.pretrained import named_weights
from recipes.run import evaluate_checkpoint, load
from tests.recipes import kiln_in_process as kiln
from tests.recipes.data.test_imagefolder import write_image_folder
from tests.recipes.tools.test_export import KILN_PACKAGES, SNIPPETS, hidden_python, kiln_predict_top1, run_kiln

NO_NETWORK = {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    for key, value in NO_NETWORK.items():
        monkeypatch.setenv(key, value)
    return home


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images"), {"train": 6, "val": 2}, size=(40, 48))


@pytest.fixture(scope="module")
def pretrained_run(folder, tmp_path_factory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """``kiln train imagefolder --model efficientnet_b0 --weights IMAGENET1K_V1``, offline, from a file this test
    placed where torchvision keeps it: the run directory, the weights file and the weights."""
    root = tmp_path_factory.mktemp("pretrained")
    path = root / "torch-home" / "hub" / "checkpoints" / "efficientnet_b0_rwightman-7f5810bc.pth"
    path.parent.mkdir(parents=True)
    with torch.random.fork_rng():
        torch.manual_seed(123)  # a known pattern, unlike any random start kiln would make
        made = torchvision.models.efficientnet_b0(num_classes=1000).state_dict()
    torch.save(made, path)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(root / "torch-home"))
        for key, value in NO_NETWORK.items():
            patch.setenv(key, value)
        assert named_weights("efficientnet_b0", "IMAGENET1K_V1").path == path  # torchvision's name and folder
        assert kiln("train", "imagefolder", "--data-dir", str(folder), "--model", "efficientnet_b0", "--weights",
                    "IMAGENET1K_V1", "--image-size", "32", "--batch-size", "6", "--num-workers", "0", "--epochs",
                    "1", "--quiet", "--no-report", "--out", str(root / "run")) == 0
    return root / "run", path, made


def test_named_weights_load_offline_from_torch_hub_cache_with_their_own_preprocessing(pretrained_run):
    run, path, made = pretrained_run
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    runtime = json.loads((run / "config.json").read_text())["runtime"]
    assert runtime["initial_weights"] == {"name": "EfficientNet_B0_Weights.IMAGENET1K_V1", "file": str(path),
                                          "sha256": sha256, "head_replaced": True}
    assert runtime["preprocessing"] == {"mode": "RGB", "size": 32, "mean": [0.485, 0.456, 0.406],
                                        "std": [0.229, 0.224, 0.225], "resize": 37, "interpolation": "bicubic"}
    trained = load(run / "checkpoints" / "last.pt")  # what predict and export use: the weights' preprocessing
    assert trained.preprocess == Preprocessing.from_dict(runtime["preprocessing"])
    assert trained.record["initial_weights"]["sha256"] == sha256
    stem = "features.0.0.weight"  # one epoch of three small steps moves it little from the file's values
    moved = (trained.model.state_dict()[stem] - made[stem]).abs().max()
    assert moved < 0.1 * (made[stem] - torchvision.models.efficientnet_b0().state_dict()[stem]).abs().max()
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    note = next(e["note"] for e in events if e["event"] == "weights")
    assert note.startswith(f"loaded weights EfficientNet_B0_Weights.IMAGENET1K_V1 from {path} except the classifier")


def test_predict_and_an_export_reproduce_eval_with_the_weights_preprocessing(pretrained_run, folder, tmp_path):
    """No flag: the checkpoint's record carries the bicubic resize, the ratio, mean and std to predict and to the
    exported file, whose torch-only loader (docs/load_without_kiln.py) applies them with kiln hidden."""
    run, _, _ = pretrained_run
    last = run / "checkpoints" / "last.pt"
    images = sorted((folder / "val").rglob("*.png"))
    code, out, err = run_kiln("predict", str(last), str(folder / "val"), "--format", "json", "--workers", "0")
    assert code == 0, err
    rows, result = json.loads(out), evaluate_checkpoint(last)  # both in the precision the run validated in
    correct = sum(row["label"] == row["predictions"][0]["class"] for row in rows)
    assert len(rows) == result["samples"] == len(images) and correct == round(result["accuracy"] * len(images))
    predicted = kiln_predict_top1(last, images)  # fp32, as the exported file runs
    exported = tmp_path / "model.ts"
    code, _, err = run_kiln("export", str(last), "--format", "torchscript", "--out", str(exported))
    assert code == 0, err
    done = hidden_python(KILN_PACKAGES, [[str(SNIPPETS["torchscript"]), str(exported), *map(str, images)]], tmp_path)
    assert done.returncode == 0, done.stderr
    assert [line.split()[0] for line in done.stdout.splitlines()[1:]] == predicted


def test_named_weights_without_their_file_and_network_are_one_line_naming_file_and_folder(torch_home, folder,
                                                                                          tmp_path, capsys):
    run = tmp_path / "run"
    assert kiln("train", "imagefolder", "--data-dir", str(folder), "--model", "efficientnet_b0", "--weights",
                "DEFAULT", "--num-workers", "0", "--out", str(run)) == 2
    err = capsys.readouterr().err
    folder_path = torch_home / "hub" / "checkpoints"
    assert err.count("\n") == 1 and err.startswith("kiln: error: --weights EfficientNet_B0_Weights.IMAGENET1K_V1: ")
    assert f"efficientnet_b0_rwightman-7f5810bc.pth is not in {folder_path}" in err, err
    assert not run.exists()  # nothing written


@pytest.mark.parametrize("model, value, message", [
    ("efficientnet_b0", "IMAGENET", "not a weights name of efficientnet_b0 (its names: IMAGENET1K_V1, DEFAULT)"),
    ("efficientnet_b0", "ResNet50_Weights.IMAGENET1K_V2", "not a weights name of efficientnet_b0"),
    ("small_cnn", "DEFAULT", "small_cnn has no pretrained weights to name"),
])
def test_a_value_that_is_neither_a_file_nor_a_weights_name_is_refused(model, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        named_weights(model, value)


def test_paths_are_paths_and_names_resolve_to_the_weights_transforms(tmp_path):
    assert named_weights("resnet50", str(tmp_path / "missing.pth")) is None  # a path: loaded (or refused) as a file
    assert named_weights("resnet50", "") is None
    v2 = named_weights("resnet50", "ResNet50_Weights.IMAGENET1K_V2")
    assert (v2.name, v2.crop, v2.resize, v2.interpolation) == ("ResNet50_Weights.IMAGENET1K_V2", 224, 232, "bilinear")
    assert v2.preprocessing(224).resize == 232 and v2.num_classes == 1000
    assert named_weights("resnet50", "DEFAULT").name == "ResNet50_Weights.IMAGENET1K_V2"


def test_bicubic_preprocessing_round_trips_and_older_records_read_as_bilinear():
    p = Preprocessing(mode="RGB", size=8, mean=(0.5,) * 3, std=(0.5,) * 3, resize=9, interpolation="bicubic")
    assert Preprocessing.from_dict(p.to_dict()) == p
    old = {k: v for k, v in p.to_dict().items() if k != "interpolation"}
    assert Preprocessing.from_dict(old).interpolation == "bilinear"
    x = torch.rand(3, 20, 30)
    bilinear = Preprocessing.from_dict(old)
    assert p(x).shape == (3, 8, 8) and not torch.equal(p(x), bilinear(x))
