"""timm's models through the extra ``kiln[timm]``: ``--model timm:NAME``, and ``--weights`` naming timm's pretrained
weights, found offline (``HF_HUB_OFFLINE=1``) in a Hugging Face hub cache, with timm's own preprocessing.

The weights file is one this test makes (a seeded timm resnet18 with 1000 classes), saved with safetensors where
huggingface_hub looks for ``model.safetensors`` of ``timm/resnet18.a1_in1k`` in a temporary ``HF_HUB_CACHE``. The
runs are processes of their own: huggingface_hub reads ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` when it is imported.
Without timm these tests skip, unless ``KILN_REQUIRE_TIMM=1`` (``.ci/run`` installs the extra and sets it).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from recipes.models import head_parameters, load_weights
from recipes.pretrained import named_weights, weights_comment
from recipes.run import load
from tests.recipes import kiln_in_process
from tests.recipes.data.test_imagefolder import write_image_folder
from tests.recipes.test_pretrained import NO_NETWORK
from tests.runs import ENV, kiln

REPO = "timm/resnet18.a1_in1k"  #: where timm's resnet18 DEFAULT weights are on the hub
COMMIT = "0123456789abcdef0123456789abcdef01234567"  #: any 40 hex digits: the cached snapshot's revision


@pytest.fixture(scope="module")
def timm():
    try:
        import timm
    except ImportError:
        if os.environ.get("KILN_REQUIRE_TIMM"):  # CI installs the extra: there a missing timm is a failure
            pytest.fail("timm is required here (KILN_REQUIRE_TIMM) but not installed: pip install -e '.[timm]'")
        pytest.skip("timm is not installed (pip install -e '.[timm]')")
    return timm


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images"), {"train": 6, "val": 2}, size=(40, 48))


def in_hub_cache(hub: Path, repo: str, file: str, tensors: dict[str, torch.Tensor]) -> Path:
    """``tensors`` saved as huggingface_hub caches ``file`` of ``repo``: ``models--OWNER--NAME/snapshots/COMMIT/FILE``,
    with ``refs/main`` naming that commit."""
    from safetensors.torch import save_file

    folder = hub / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(COMMIT)
    path = folder / "snapshots" / COMMIT / file
    path.parent.mkdir(parents=True)
    save_file(tensors, path)
    return path


def pattern(timm, name: str) -> dict[str, torch.Tensor]:
    """A 1000-class timm ``name``'s state dict, seeded: unlike any random start kiln would make."""
    with torch.random.fork_rng():
        torch.manual_seed(123)
        return timm.create_model(name, num_classes=1000).state_dict()


def offline(hub: Path) -> dict[str, str]:
    """The environment of a kiln process with ``hub`` as its only source of weights."""
    return {**ENV, **NO_NETWORK, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}


def train(folder: Path, out: Path, hub: Path, *extra: str):
    return kiln("train", "imagefolder", "--data-dir", folder, "--model", "timm:resnet18", "--weights", "a1_in1k",
                "--image-size", "32", "--batch-size", "6", "--num-workers", "0", "--epochs", "1", "--quiet",
                "--no-report", "--out", out, *extra, env=offline(hub))


@pytest.fixture(scope="module")
def timm_run(timm, folder, tmp_path_factory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """``kiln train imagefolder --model timm:resnet18 --weights a1_in1k``, offline, from a file this test placed in a
    Hugging Face cache; an LR of 1e-9 leaves the loaded weights where they were. The run directory, the file and
    its weights."""
    root = tmp_path_factory.mktemp("timm")
    made = pattern(timm, "resnet18")
    path = in_hub_cache(root / "hub", REPO, "model.safetensors", made)
    done = train(folder, root / "run", root / "hub", "--lr", "1e-10", "--max-lr", "1e-9", "--weight-decay", "0")
    assert done.returncode == 0, done.stderr
    return root / "run", path, made


def test_a_timm_model_trains_from_pretrained_weights_in_an_offline_hugging_face_cache(timm, timm_run):
    run, path, made = timm_run
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    runtime = json.loads((run / "config.json").read_text())["runtime"]
    assert runtime["initial_weights"] == {"name": "resnet18.a1_in1k", "file": str(path), "sha256": sha256,
                                          "head_replaced": True}
    cfg = timm.models.get_pretrained_cfg("resnet18.a1_in1k")  # timm's own: bicubic, crop_pct 0.95
    assert runtime["preprocessing"] == {"mode": "RGB", "size": 32, "mean": list(cfg.mean), "std": list(cfg.std),
                                        "resize": math.floor(32 / cfg.crop_pct), "interpolation": cfg.interpolation}
    trained = load(run / "checkpoints" / "last.pt")
    assert trained.record["initial_weights"]["sha256"] == sha256
    state = trained.model.state_dict()
    assert state["fc.weight"].shape == (3, 512)  # the head: replaced for the folder's three classes
    body = [k for k in made if not k.startswith("fc.") and "running_" not in k and "num_batches" not in k]
    assert len(body) > 50 and all(torch.allclose(state[k].float(), made[k], rtol=0, atol=1e-6) for k in body)
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    note = next(e["note"] for e in events if e["event"] == "weights")
    assert note.startswith(f"loaded weights resnet18.a1_in1k from {path} except the classifier fc (1000 classes")


@pytest.mark.parametrize("environment", ["offline", "no network"])
def test_timm_weights_missing_from_the_cache_are_one_line_naming_repo_file_and_cache(timm, folder, tmp_path,
                                                                                     environment):
    hub = tmp_path / "hub"
    env = offline(hub) if environment == "offline" else {**ENV, **NO_NETWORK, "HF_HUB_CACHE": str(hub)}
    done = kiln("train", "imagefolder", "--data-dir", folder, "--model", "timm:resnet18", "--weights", "DEFAULT",
                "--num-workers", "0", "--quiet", "--out", tmp_path / "run", env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"kiln: error: --weights resnet18.a1_in1k: model.safetensors of the Hugging Face "
                                  f"repo {REPO} is not in the cache {hub} and could not be downloaded (")
    assert ("HF_HUB_OFFLINE is set" in done.stderr) == (environment == "offline")
    assert not (tmp_path / "run").exists()  # nothing written


def test_an_unknown_timm_model_is_one_line(timm, capsys):
    assert kiln_in_process("show", "imagefolder", "--set", "model.name=timm:resnet18x") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown timm model 'resnet18x'; did you mean timm:resnet18?" in err
    assert kiln_in_process("show", "imagefolder", "--set", "model.name=timm:nosuchnet") == 2
    assert capsys.readouterr().err.startswith("kiln: error: unknown timm model 'nosuchnet'")


def test_without_timm_a_timm_model_is_one_line_naming_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` fails, as where the extra is not installed
    assert kiln_in_process("show", "imagefolder", "--set", "model.name=timm:resnet18") == 2
    err = capsys.readouterr().err
    assert err == "kiln: error: model timm:resnet18 needs the timm extra: pip install 'kiln[timm]'\n"


def test_tags_resolve_through_pretrained_cfg_to_timm_own_eval_transform(timm):
    default = named_weights("timm:resnet18", "DEFAULT")
    assert named_weights("timm:resnet18", "a1_in1k") == default == named_weights("timm:resnet18", "resnet18.a1_in1k")
    assert (default.name, default.repo, default.files[0], default.num_classes) == (
        "resnet18.a1_in1k", REPO, "model.safetensors", 1000)
    assert named_weights("timm:resnet18.tv_in1k", "DEFAULT").name == "resnet18.tv_in1k"  # the model's own tag
    for name, size in [("resnet18.a1_in1k", 224), ("resnet18.tv_in1k", 224), ("convnext_nano.in12k_ft_in1k", 32)]:
        cfg = timm.models.get_pretrained_cfg(name)
        theirs = timm.data.create_transform(**timm.data.resolve_data_config({"input_size": (3, size, size)},
                                                                            pretrained_cfg=cfg.to_dict()))
        resize = next(t for t in theirs.transforms if type(t).__name__ == "Resize")
        ours = named_weights(f"timm:{name.split('.')[0]}", name).preprocessing(size)
        assert (ours.resize, ours.size, ours.interpolation) == (resize.size, size, resize.interpolation.value)
        assert (ours.mean, ours.std) == (tuple(cfg.mean), tuple(cfg.std))
    with pytest.raises(Exception, match=r"not a pretrained tag of timm:resnet18 \(its tags: DEFAULT, a1_in1k, "):
        named_weights("timm:resnet18", "b1_in1k")
    assert named_weights("timm:resnet18", "weights.safetensors") is None  # a path: loaded (or refused) as a file


def test_kiln_show_names_the_cache_file_and_whether_it_is_there(timm, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # read when kiln asks, as an import would
    first, second = weights_comment("timm:resnet18", "DEFAULT", 32).splitlines()
    assert first == (f"# --weights DEFAULT: resnet18.a1_in1k, file model.safetensors of {REPO} in the Hugging Face "
                     f"cache {tmp_path} (not there yet: the run downloads it)")
    assert second == "# inputs made as the weights were trained: RGB, shorter side to 33 (bicubic), center crop " \
                     "32x32, mean (0.485, 0.456, 0.406) std (0.229, 0.224, 0.225)"
    path = in_hub_cache(tmp_path, REPO, "model.safetensors", {"x": torch.zeros(1)})
    assert weights_comment("timm:resnet18", "DEFAULT", 32).splitlines()[0] == \
           f"# --weights DEFAULT: resnet18.a1_in1k, file {path} (there)"


@pytest.mark.parametrize("name, head", [("resnet18", "fc"), ("convnext_nano", "head.fc"), ("dla34", "fc")])
def test_the_head_is_timm_classifier_and_safetensors_files_load_all_but_it(timm, tmp_path, name, head):
    """dla34's classifier is a 1x1 convolution: found through ``get_classifier()``, not as the last linear layer."""
    from safetensors.torch import save_file

    from recipes.models import build_model

    model = build_model(f"timm:{name}", in_channels=3, num_classes=3, image_size=32, channels=(8,))
    assert [p.data_ptr() for p in head_parameters(model)] == \
           [p.data_ptr() for p in model.get_submodule(head).parameters()]
    if name == "dla34":
        return
    made = pattern(timm, name)
    save_file(made, tmp_path / "model.safetensors")
    note, replaced = load_weights(model, str(tmp_path / "model.safetensors"), f"{name}.x")
    assert replaced and f"except the classifier {head} (1000 classes in the file, 3 here" in note
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in made.items() if not k.startswith(f"{head}."))
