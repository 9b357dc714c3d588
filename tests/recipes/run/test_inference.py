"""Self-describing checkpoints and ``recipes.run.load``: a trained model usable from its checkpoint alone."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from recipes import get_recipe
from recipes.config import ConfigError, apply_overrides, config_to_dict
from recipes.models import build_model
from recipes.run import load, plan_resume
from recipes.run.evaluate import evaluate_checkpoint
from tests.recipes import kiln_in_process as kiln
from tests.recipes.data.test_imagefolder import write_image_folder


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory) -> Path:
    """Two epochs of digits with an EMA of the weights (no end-of-run report: its checkpoints are what is used)."""
    run_dir = tmp_path_factory.mktemp("ema") / "run"
    assert kiln("train", "digits", "--epochs", "2", "--ema", "0.9", "--quiet", "--no-report",
                "--out", str(run_dir)) == 0
    return run_dir


def test_every_checkpoint_and_config_json_say_how_to_rebuild_and_feed_the_model(ema_run):
    runtime = json.loads((ema_run / "config.json").read_text())["runtime"]
    for path in sorted((ema_run / "checkpoints").glob("*.pt")):
        meta = torch.load(path, weights_only=True)["kiln"]
        record = meta["inference"]
        assert {k: runtime[k] for k in record} == record, path
        assert record["model"] == {"name": "small_cnn", "in_channels": 1, "num_classes": 10, "image_size": 32,
                                   "channels": [32, 64, 128]}
        p = record["preprocessing"]
        assert (p["mode"], p["size"], p["resize"], len(p["mean"]), len(p["std"])) == ("L", 32, None, 1, 1)
        assert record["input"] == {"channels": 1, "size": 32} and record["channels_last"] is True
        assert meta["precision"] in ("fp32", "bf16") and meta["class_names"] == [str(i) for i in range(10)]
        model = build_model(**record["model"])  # the record alone rebuilds the network the weights fit
        model.load_state_dict(torch.load(path, weights_only=True)["model"])


def test_load_gives_the_ema_weights_in_eval_mode_and_reproduces_kiln_eval(ema_run):
    best = next((ema_run / "checkpoints").glob("best-*.pt"))
    trained = load(best)
    checkpoint = torch.load(best, weights_only=True)
    assert trained.weights == "ema" and not trained.model.training
    for name, tensor in trained.model.state_dict().items():
        assert torch.equal(tensor, checkpoint["ema_model"][name]), name
    from recipes.data import load as load_data

    data = load_data(trained.config, trained.device)
    correct = sum(int((trained.logits(x).argmax(1) == y).sum()) for x, y in data.val)
    assert correct / len(data.val.x) == evaluate_checkpoint(best)["accuracy"]


def test_a_checkpoint_from_a_gpu_run_loads_on_the_cpu(ema_run, tmp_path):
    """What a CUDA run's checkpoint says (device cuda, fp16) must not stop a CPU-only machine from using it."""
    checkpoint = torch.load(ema_run / "checkpoints" / "last.pt", weights_only=True)
    config = checkpoint["kiln"]["config"]
    config["train"]["device"] = "cuda"
    checkpoint["kiln"]["precision"] = "bf16"
    torch.save(checkpoint, tmp_path / "gpu.pt")
    trained = load(tmp_path / "gpu.pt")
    assert trained.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert trained.precision.name == "bf16"
    assert trained.logits(torch.zeros(2, 1, 32, 32)).shape == (2, 10)


def test_a_checkpoint_without_the_record_gets_it_back_from_its_recipe(ema_run, tmp_path):
    best = next((ema_run / "checkpoints").glob("best-*.pt"))
    checkpoint = torch.load(best, weights_only=True)
    del checkpoint["kiln"]["inference"]
    torch.save(checkpoint, tmp_path / "old.pt")
    old, new = load(tmp_path / "old.pt"), load(best)
    assert old.preprocess == new.preprocess
    x = torch.randn(4, 1, 32, 32)
    assert torch.equal(old.logits(x), new.logits(x))

    checkpoint["kiln"]["config"]["data"].update(dataset="mnist", data_dir=str(tmp_path / "moved"), image_size=28)
    torch.save(checkpoint, tmp_path / "old-mnist.pt")
    with pytest.raises(ConfigError, match="written before kiln recorded preprocessing.*cannot be read"):
        load(tmp_path / "old-mnist.pt")


def test_the_saved_config_has_the_real_class_count_and_the_run_still_continues(tmp_path):
    folder = write_image_folder(tmp_path / "images", {"train": 4, "val": 2})
    args = ("train", "imagefolder", "--data-dir", str(folder), "--image-size", "16", "--model", "small_cnn",
            "--num-workers", "0", "--epochs", "1", "--quiet", "--no-report", "--out", str(tmp_path / "run"))
    assert kiln(*args) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data"]["num_classes"] == 3 == config["runtime"]["model"]["num_classes"]
    assert config_to_dict(load(tmp_path / "run" / "checkpoints" / "last.pt").config)["data"]["num_classes"] == 3
    requested = apply_overrides(get_recipe("imagefolder"), {"data.data_dir": str(folder), "data.image_size": 16,
                                                            "model.name": "small_cnn", "data.num_workers": 0,
                                                            "train.epochs": 1})
    assert requested.data.num_classes == 10  # what `kiln train ... --resume last.pt` asks for: not a different run
    assert plan_resume(tmp_path / "run" / "checkpoints" / "last.pt", requested=requested).finished
