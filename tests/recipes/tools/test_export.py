"""``kiln export``: TorchScript, torch.export and ONNX files of real runs, checked, with their metadata, and the
snippets in docs/ (docs/use-the-model.md shows them) that load them with kiln's packages hidden."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import onnxruntime
import pytest
import torch

from recipes.run import load
from recipes.run.checkpoints import load_checkpoint
from recipes.tools.export import ONNX_MISSING, check_inputs, check_parity, read_metadata
from tests.conftest import SINGLE_THREAD_ENV
from tests.recipes import kiln_in_process as kiln
from tests.recipes.data.test_imagefolder import write_image_folder
from tests.recipes.tools.conftest import best_checkpoint

DOCS = Path(__file__).resolve().parents[3] / "docs"
SNIPPETS = {"torchscript": DOCS / "load_without_kiln.py", "exported": DOCS / "load_without_kiln.py",
            "onnx": DOCS / "load_onnx_without_kiln.py"}
FORMATS = {"torchscript": ".ts", "exported": ".pt2", "onnx": ".onnx"}
KILN_PACKAGES = ["recipes", "engine", "callbacks"]

#: ``python -c BOOTSTRAP HIDDEN RUNS``: refuse to import the comma-separated HIDDEN packages (a meta-path
#: finder ahead of every other), prove they are refused, then run each ``[script, *argv]`` of the JSON
#: list RUNS as ``__main__`` (script ``-m NAME``: that module), a line ``=== N`` before each.
BOOTSTRAP = """
import importlib, importlib.abc, json, runpy, sys
hidden = set(sys.argv[1].split(","))
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in hidden:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden)", name=name)
sys.meta_path.insert(0, Refuse())
for name in hidden:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError:
        continue
    sys.exit(f"{name} is importable")
for n, run in enumerate(json.loads(sys.argv[2])):
    print(f"=== {n}", flush=True)
    sys.argv = run[1:] if run[0] == "-m" else run
    if run[0] == "-m":
        runpy.run_module(run[1], run_name="__main__", alter_sys=True)
    else:
        runpy.run_path(run[0], run_name="__main__")
"""


def hidden_python(hidden: list[str], runs: list[list[str]], cwd: Path) -> subprocess.CompletedProcess:
    """Run :data:`BOOTSTRAP` in a fresh interpreter in ``cwd``, without PYTHONPATH, one intra-op thread."""
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, **SINGLE_THREAD_ENV}
    return subprocess.run([sys.executable, "-c", BOOTSTRAP, ",".join(hidden), json.dumps(runs)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def run_kiln(*args: str) -> tuple[int, str, str]:
    """``kiln ARGS`` in this process: exit status, stdout, stderr (usable in module-scoped fixtures)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = kiln(*args)
    return code, out.getvalue(), err.getvalue()


def export_all(best: Path, folder: Path, *extra: str) -> dict[str, tuple[Path, str]]:
    """``kiln export BEST --format F --out FOLDER/model.SUFFIX EXTRA`` for each format: the file and stdout."""
    exports = {}
    for fmt, suffix in FORMATS.items():
        path = folder / f"model{suffix}"
        code, out, err = run_kiln("export", str(best), "--format", fmt, "--out", str(path), *extra)
        assert code == 0, err
        assert err == ""  # the exporters' own chatter is silenced
        exports[fmt] = (path, out)
    return exports


@pytest.fixture(scope="module")
def digits_exports(digits_run, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    return export_all(best_checkpoint(digits_run), tmp_path_factory.mktemp("digits-exports"), "--dynamic-batch")


@pytest.fixture(scope="module")
def shapes_exports(shapes_run, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    return export_all(best_checkpoint(shapes_run), tmp_path_factory.mktemp("shapes-exports"), "--dynamic-batch")


def kiln_predict_top1(best: Path, images: list[Path]) -> list[str]:
    """The class ``kiln predict BEST IMAGE... --precision fp32`` gives each image file."""
    code, out, err = run_kiln("predict", str(best), *map(str, images), "--precision", "fp32", "--format", "json",
                              "--top-k", "1", "--workers", "0")
    assert code == 0, err
    top1 = {row["input"]: row["predictions"][0]["class"] for row in json.loads(out)}
    return [top1[str(p)] for p in images]


@pytest.fixture(params=["digits", "shapes"])
def exported_run(request) -> tuple[Path, dict[str, tuple[Path, str]], list[Path]]:
    """The digits run and the resnet18 image-folder run: best checkpoint, its exports, its validation PNG files."""
    if request.param == "digits":
        run, exports = request.getfixturevalue("digits_run"), request.getfixturevalue("digits_exports")
        images = sorted(request.getfixturevalue("digits_val_images").rglob("*.png"))
    else:
        run, exports = request.getfixturevalue("shapes_run"), request.getfixturevalue("shapes_exports")
        images = sorted((request.getfixturevalue("shapes_folder") / "val").rglob("*.png"))
    return best_checkpoint(run), exports, images


def test_snippets_give_kilns_top1_on_every_validation_image(exported_run, tmp_path):
    best, exports, images = exported_run
    runs = [[str(SNIPPETS[fmt]), str(path), *map(str, images)] for fmt, (path, _) in exports.items()]

    done = hidden_python(KILN_PACKAGES, runs, cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    outputs = re.split(r"^=== \d+\n", done.stdout, flags=re.MULTILINE)[1:]
    expected = kiln_predict_top1(best, images)
    assert images
    for fmt, output in zip(exports, outputs):
        lines = output.splitlines()
        assert len(lines) == len(images), fmt
        classes = [line.rsplit(" ", 1)[0] for line in lines]
        probabilities = [float(line.rsplit(" ", 1)[1]) for line in lines]
        assert classes == expected, fmt
        assert all(0 < p <= 1 for p in probabilities)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_metadata_round_trips_and_the_output_says_what_was_checked(fmt, digits_run, digits_exports):
    best = best_checkpoint(digits_run)
    path, out = digits_exports[fmt]
    saved, _ = load_checkpoint(best)
    trained = load(best, device="cpu", precision="fp32")

    meta = read_metadata(path)

    assert meta["format"] == 1
    assert meta["class_names"] == trained.class_names == [str(i) for i in range(10)]
    assert meta["preprocessing"] == trained.preprocess.to_dict()
    assert meta["input"] == {"channels": 1, "size": 32, "batch": "dynamic"}
    assert meta["model"] == saved["kiln"]["inference"]["model"]
    assert meta["validated_precision"] == saved["kiln"]["precision"]
    assert meta["weights"] == trained.weights
    assert meta["checkpoint"] == str(best)
    assert meta["torch_version"] == torch.__version__
    check = meta["check"]
    assert check["samples"] == 64 and check["inputs"] == "validation"
    assert 0 <= check["max_abs_diff"] <= check["tolerance"]
    first, second = out.splitlines()
    size = path.stat().st_size / 1e6
    assert first == (f"exported {best} -> {path} ({fmt}, {size:.1f} MB, batch dynamic); checked on 64 validation "
                     f"images: max abs difference {check['max_abs_diff']:.3g} (tolerance {check['tolerance']:.3g})")
    assert second == f"preprocessing: {trained.preprocess.describe()}"
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(f"model{s}" for s in FORMATS.values())  # no temp files


def test_without_dynamic_batch_pt2_and_onnx_take_batches_of_one(digits_run, tmp_path):
    best = best_checkpoint(digits_run)
    exports = export_all(best, tmp_path)
    trained = load(best, device="cpu", precision="fp32")
    x, _, _ = check_inputs(trained, 2)
    with torch.inference_mode():
        eager = trained.model.to(memory_format=torch.contiguous_format)(x)  # as exported
    assert all(read_metadata(path)["input"]["batch"] == 1 for path, _ in exports.values())
    assert all("batch 1);" in out for _, out in exports.values())

    program = torch.export.load(exports["exported"][0]).module()
    torch.testing.assert_close(program(x[:1]), eager[:1])
    with pytest.raises(Exception, match=r"size\(\)\[0\] == 1"):  # the guard torch.export put on the batch
        program(x)

    session = onnxruntime.InferenceSession(str(exports["onnx"][0]), providers=["CPUExecutionProvider"])
    torch.testing.assert_close(torch.from_numpy(session.run(None, {"input": x[:1].numpy()})[0]), eager[:1],
                               atol=1e-4, rtol=0)
    with pytest.raises(Exception, match="Got: 2 Expected: 1"):
        session.run(None, {"input": x.numpy()})

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated in this torch
        traced = torch.jit.load(str(exports["torchscript"][0]))
    torch.testing.assert_close(traced(x), eager)  # a traced CNN takes any batch anyway (documented in --help)


def test_the_check_refuses_a_program_whose_outputs_differ(digits_run):
    trained = load(best_checkpoint(digits_run), device="cpu", precision="fp32")
    model = trained.model
    x, kind, note = check_inputs(trained, 64)
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        next(perturbed.parameters()).view(-1)[0] += 0.5  # one weight of the first convolution

    same = check_parity(model, copy.deepcopy(model), x, batch=64)
    differs = check_parity(model, perturbed, x, batch=64)

    assert (kind, note) == ("validation", None)
    assert same.error is None and same.max_abs_diff == 0.0
    assert differs.max_abs_diff > differs.tolerance
    assert differs.error == f"max abs difference {differs.max_abs_diff:.3g} > tolerance {differs.tolerance:.3g}"


def test_default_output_is_beside_the_checkpoint_and_out_suffix_picks_the_format(digits_run, tmp_path):
    checkpoint = tmp_path / "checkpoints" / best_checkpoint(digits_run).name
    checkpoint.parent.mkdir()
    shutil.copy(best_checkpoint(digits_run), checkpoint)

    code, out, err = run_kiln("export", str(checkpoint), "--format", "torchscript")
    assert code == 0, err
    written = checkpoint.with_suffix(".ts")
    assert written.name == checkpoint.name[: -len(".pt")] + ".ts"
    assert f" -> {written} (torchscript," in out

    code, out, err = run_kiln("export", str(checkpoint), "--out", str(tmp_path / "model.pt2"))
    assert code == 0, err
    assert f" -> {tmp_path / 'model.pt2'} (exported," in out
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == [checkpoint.name, written.name]


def test_an_unwritable_out_is_one_line_before_any_work(digits_run, tmp_path, capsys):
    regular_file = tmp_path / "file"
    regular_file.write_text("")

    code = kiln("export", str(best_checkpoint(digits_run)), "--out", str(regular_file / "sub" / "x.ts"))

    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert err == f"kiln: error: cannot write --out {regular_file / 'sub'}: not a directory\n"


def test_missing_onnx_packages_are_named_in_one_line(digits_run, tmp_path):
    target = tmp_path / "model.onnx"
    done = hidden_python(["onnxscript"], [["-m", "recipes.cli", "export", str(best_checkpoint(digits_run)),
                                           "--format", "onnx", "--out", str(target)]], cwd=tmp_path)

    assert done.returncode == 2
    assert done.stderr == f"kiln: error: {ONNX_MISSING}\n"
    assert not target.exists()


def test_unreadable_data_checks_on_random_inputs_and_says_so(tmp_path):
    folder = write_image_folder(tmp_path / "images", {"train": 4, "val": 2})
    run_dir = tmp_path / "run"
    assert kiln("train", "imagefolder", "--data-dir", str(folder), "--model", "small_cnn", "--image-size", "16",
                "--num-workers", "0", "--epochs", "1", "--quiet", "--no-report", "--out", str(run_dir)) == 0
    folder.rename(tmp_path / "moved")
    target = tmp_path / "model.pt2"

    code, out, err = run_kiln("export", str(best_checkpoint(run_dir)), "--out", str(target), "--check-batch", "8")

    assert code == 0, err
    assert len(err.splitlines()) == 1
    assert err.startswith(f"kiln: cannot read the imagefolder data (no data directory at {folder}")
    assert err.endswith("): checking on 8 random inputs instead\n")
    assert "checked on 8 random inputs" in out
    check = read_metadata(target)["check"]
    assert (check["inputs"], check["samples"]) == ("random", 8)
