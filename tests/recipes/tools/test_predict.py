"""``kiln predict`` as a user meets it: real checkpoints of real runs, real image, IDX and CIFAR files,
its numbers checked against ``kiln eval``'s and against kiln's Python API."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import pickle
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from recipes.data.idx import IMAGES_MAGIC, LABELS_MAGIC
from recipes.run import evaluate_checkpoint, load
from recipes.tools.predict import find_inputs, format_rows, predict
from tests.recipes import kiln_in_process as kiln
from tests.recipes.tools.conftest import best_checkpoint

ACCURACY_LINE = re.compile(r"^top-1 accuracy (\d\.\d{4}) on (\d+) labelled inputs?$")


def run_predict(capsys, *args: str) -> tuple[int, str, list[str]]:
    """``kiln predict ARGS``: exit status, stdout, stderr lines."""
    capsys.readouterr()
    code = kiln("predict", *args)
    out, err = capsys.readouterr()
    return code, out, err.splitlines()


def predict_json(capsys, *args: str) -> tuple[list[dict], list[str]]:
    """``kiln predict ARGS --format json`` that must succeed: its rows and its stderr lines."""
    code, out, err = run_predict(capsys, *args, "--format", "json")
    assert code == 0, err
    return json.loads(out), err


def correct(rows: list[dict]) -> int:
    return sum(row["label"] == row["predictions"][0]["class"] for row in rows)


def eval_correct(checkpoint: Path, **options) -> tuple[int, int]:
    """``kiln eval``'s figures as (correct images, images)."""
    result = evaluate_checkpoint(checkpoint, **options)
    return round(result["accuracy"] * result["samples"]), result["samples"]


@pytest.fixture(scope="module")
def digits_best(digits_run) -> Path:
    return best_checkpoint(digits_run)


@pytest.fixture(scope="module")
def digits_rows(digits_best, digits_val_images) -> list[dict]:
    """The digits validation PNGs through ``recipes.tools.predict`` (what ``kiln predict --format json`` prints)."""
    trained = load(digits_best)
    rows, failed = predict(trained, find_inputs([digits_val_images], trained.class_names))
    assert not failed
    return json.loads(format_rows(rows, "json"))


def by_position(rows: list[dict]) -> dict[int, dict]:
    """Rows of digits validation images (``.../LABEL/NNNN.png`` or ``FILE[NNNN]``) by their position NNNN."""
    return {int(re.search(r"(\d+)(?:\.png|\])$", row["input"]).group(1)): row for row in rows}


@pytest.mark.parametrize("run, images", [("digits_run", "digits_val_images"), ("shapes_run", "shapes_folder")])
def test_predict_on_the_validation_images_reproduces_kiln_eval_accuracy(request, capsys, run, images):
    best = best_checkpoint(request.getfixturevalue(run))
    folder = request.getfixturevalue(images)
    folder = folder / "val" if (folder / "val").is_dir() else folder
    rows, err = predict_json(capsys, str(best), str(folder))
    expected, samples = eval_correct(best)
    assert len(rows) == samples and all("label" in row for row in rows)
    assert correct(rows) == expected
    assert ACCURACY_LINE.match(err[-1]).groups() == (f"{expected / samples:.4f}", str(samples))


def test_load_and_its_preprocess_reproduce_the_accuracy_in_a_few_lines(digits_best, digits_val_images):
    trained = load(digits_best)
    paths = sorted(digits_val_images.rglob("*.png"))
    probabilities = trained.probabilities([Image.open(path) for path in paths])
    predicted = [trained.class_names[i] for i in probabilities.argmax(dim=1).tolist()]
    assert sum(p == path.parent.name for p, path in zip(predicted, paths)) == eval_correct(digits_best)[0]


def test_tta_matches_kiln_eval_tta(capsys, digits_best, digits_val_images):
    rows, _ = predict_json(capsys, str(digits_best), str(digits_val_images), "--tta")
    assert correct(rows) == eval_correct(digits_best, tta=True)[0]


def test_json_rows_hold_k_sorted_probabilities_with_class_names(capsys, digits_best, digits_val_images):
    rows, _ = predict_json(capsys, str(digits_best), str(digits_val_images / "4"), "--top-k", "4")
    assert len(rows) == len(list((digits_val_images / "4").glob("*.png")))
    names = load(digits_best).class_names
    for row in rows:
        assert row["label"] == "4"
        predictions = row["predictions"]
        probabilities = [p["probability"] for p in predictions]
        assert len(predictions) == 4 and probabilities == sorted(probabilities, reverse=True)
        assert 0 < sum(probabilities) <= 1 + 1e-6
        assert all(names[p["index"]] == p["class"] for p in predictions)


def test_csv_parses_and_out_writes_the_file(capsys, tmp_path, digits_best, digits_val_images, digits_rows):
    out = tmp_path / "predictions.csv"
    code, stdout, err = run_predict(capsys, str(digits_best), str(digits_val_images), "--format", "csv", "--out", str(out))
    assert code == 0 and stdout == ""
    assert f"kiln: wrote {len(digits_rows)} predictions to {out}" in err
    table = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [r["input"] for r in table] == [r["input"] for r in digits_rows]
    assert [r["class_1"] for r in table] == [r["predictions"][0]["class"] for r in digits_rows]
    assert [r["label"] for r in table] == [r["label"] for r in digits_rows]
    assert {"p_1", "class_3", "p_3"} <= set(table[0])


def test_table_has_one_row_per_input_and_fits_the_width(capsys, digits_best, digits_val_images):
    code, out, _ = run_predict(capsys, str(digits_best), str(digits_val_images / "7"))
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["input", "label", "top-1", "top-2", "top-3"]
    assert len(lines) - 1 == len(list((digits_val_images / "7").glob("*.png")))
    trained = load(digits_best)
    found = find_inputs([digits_val_images / "7"], trained.class_names)
    rows, _ = predict(trained, found, workers=0)
    narrow = format_rows(rows, "table", width=60).splitlines()
    assert max(len(line) for line in narrow) <= 60 and narrow[1].startswith("~")


def test_folders_are_searched_recursively_and_other_files_ignored(capsys, tmp_path, digits_best, digits_val_images,
                                                                  digits_rows):
    nested = tmp_path / "a" / "b"
    shutil.copytree(digits_val_images, nested / "digits")
    (nested / "README.txt").write_text("not an image, and not asked for")
    rows, _ = predict_json(capsys, str(digits_best), str(tmp_path / "a"))
    assert len(rows) == len(digits_rows) and correct(rows) == correct(digits_rows)


def test_an_idx_file_with_its_labels_beside_it_predicts_as_the_png_files(capsys, tmp_path, digits_best,
                                                                         digits_val_images, digits_rows):
    pngs = sorted(digits_val_images.rglob("*.png"), key=lambda p: p.name)  # in position order
    images = np.stack([np.asarray(Image.open(p)) for p in pngs])
    labels = np.array([int(p.parent.name) for p in pngs], dtype=np.uint8)
    (tmp_path / "val-images-idx3-ubyte").write_bytes(struct.pack(">IIII", IMAGES_MAGIC, *images.shape) + images.tobytes())
    (tmp_path / "val-labels-idx1-ubyte").write_bytes(struct.pack(">II", LABELS_MAGIC, len(labels)) + labels.tobytes())
    rows, err = predict_json(capsys, str(digits_best), str(tmp_path / "val-images-idx3-ubyte"), "--workers", "0")
    assert rows[5]["input"] == f"{tmp_path / 'val-images-idx3-ubyte'}[5]"
    from_idx, from_png = by_position(rows), by_position(digits_rows)
    assert from_idx.keys() == from_png.keys()
    for n, row in from_idx.items():
        assert row["label"] == from_png[n]["label"]
        assert [p["class"] for p in row["predictions"]] == [p["class"] for p in from_png[n]["predictions"]]
    assert ACCURACY_LINE.match(err[-1]).group(2) == str(len(pngs))


def test_a_cifar_batch_given_to_the_grayscale_digits_model_is_converted_as_pil_converts(capsys, tmp_path, digits_best,
                                                                                          digits_val_images):
    labels = [3, 1, 4, 1, 5, 9]
    tint = np.random.default_rng(0).uniform(0.3, 1.0, size=(len(labels), 3, 1, 1))
    digits = np.stack([np.asarray(Image.open(sorted((digits_val_images / str(label)).glob("*.png"))[i]).resize((32, 32)))
                       for i, label in enumerate(labels)])
    pixels = (digits[:, None].astype(np.float64) * tint).round().astype(np.uint8)  # N x 3 x 32 x 32, tinted digits
    with open(tmp_path / "test_batch", "wb") as f:  # torchvision's format: bytes keys, rows of R, G, B planes
        pickle.dump({b"data": pixels.reshape(len(labels), -1), b"labels": labels}, f)
    for i, (image, label) in enumerate(zip(pixels, labels)):  # the same colour images as PNG files
        (tmp_path / str(label)).mkdir(exist_ok=True)
        Image.fromarray(image.transpose(1, 2, 0), mode="RGB").save(tmp_path / str(label) / f"{i:04d}.png")
    from_batch, err = predict_json(capsys, str(digits_best), str(tmp_path / "test_batch"))
    from_png, _ = predict_json(capsys, str(digits_best), *(str(tmp_path / str(label)) for label in sorted(set(labels))))
    assert [r["label"] for r in from_batch] == [str(label) for label in labels]
    pngs = by_position(from_png)
    assert all(row["predictions"] == pngs[n]["predictions"] for n, row in by_position(from_batch).items())
    assert correct(from_batch) >= 4  # real digits, so the model mostly knows them in colour too
    assert ACCURACY_LINE.match(err[-1]).groups() == (f"{correct(from_batch) / len(labels):.4f}", str(len(labels)))


def test_an_rgb_jpeg_of_another_size_is_predicted_as_the_python_api_does(capsys, tmp_path, digits_best,
                                                                          digits_val_images):
    source = next((digits_val_images / "2").glob("*.png"))
    jpeg = tmp_path / "two.jpg"
    Image.open(source).convert("RGB").resize((40, 30)).save(jpeg, quality=95)
    rows, _ = predict_json(capsys, str(digits_best), str(jpeg))
    trained = load(digits_best)
    probabilities = trained.probabilities([Image.open(jpeg)])[0]
    assert len(rows) == 1 and "label" not in rows[0]  # its folder is not named like a class
    assert rows[0]["predictions"][0]["index"] == int(probabilities.argmax())
    assert rows[0]["predictions"][0]["probability"] == pytest.approx(float(probabilities.max()), abs=1e-5)


def test_a_missing_file_is_named_skipped_and_exit_1_while_the_good_one_is_predicted(capsys, tmp_path, digits_best,
                                                                                    digits_val_images):
    good = next((digits_val_images / "5").glob("*.png"))
    missing = tmp_path / "missing.png"
    code, out, err = run_predict(capsys, str(digits_best), str(missing), str(good), "--format", "csv")
    assert code == 1
    assert [line for line in err if "skipped" in line] == [f"kiln: skipped {missing}: no such file or directory"]
    assert [r["input"] for r in csv.DictReader(io.StringIO(out))] == [str(good)]


def test_non_images_are_named_and_skipped_and_only_bad_inputs_exit_2(capsys, tmp_path, digits_best):
    fake = tmp_path / "x.png"
    fake.write_text("a text file with an image's name")
    notes = tmp_path / "notes.txt"
    notes.write_text("a text file")
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = run_predict(capsys, str(digits_best), str(fake), str(notes), str(empty))
    assert code == 2 and out == ""
    assert err[:3] == [f"kiln: skipped {fake}: not an image",
                       f"kiln: skipped {notes}: unknown format: not an image PIL reads, an IDX images file "
                       "(*-images-idx3-ubyte[.gz]) or a CIFAR batch (data_batch_N, test_batch)",
                       f"kiln: skipped {empty}: no image files in it (.jpg, .jpeg, .png, .ppm, .bmp, .pgm, .tif, "
                       ".tiff, .webp)"]
    assert err[3] == "kiln: error: no input could be read (3 skipped)" and len(err) == 4


def test_a_png_that_verifies_but_cannot_be_decoded_is_skipped_without_a_worker_traceback(capsys, tmp_path, digits_best,
                                                                                         digits_val_images):
    good = sorted((digits_val_images / "8").glob("*.png"))[:3]
    raw = good[0].read_bytes()
    header = bytearray(raw[16:29])
    header[0:8] = struct.pack(">II", 64, 64)  # the header claims more pixels than the data holds; its CRC is right
    lying = tmp_path / "lying.png"
    lying.write_bytes(raw[:16] + header + struct.pack(">I", zlib.crc32(b"IHDR" + header)) + raw[33:])
    code, out, err = run_predict(capsys, str(digits_best), str(lying), *map(str, good), "--workers", "2",
                                 "--batch-size", "2", "--format", "csv")
    assert code == 1
    assert [line for line in err if "skipped" in line] == [
        f"kiln: skipped {lying}: cannot decode it: image file is truncated (0 bytes not processed)"]
    assert not any("Traceback" in line for line in err)
    assert [r["input"] for r in csv.DictReader(io.StringIO(out))] == list(map(str, good))


def test_a_bad_checkpoint_is_one_line_and_exit_2(capsys, tmp_path, digits_val_images):
    bogus = tmp_path / "best.pt"
    bogus.write_text("not a checkpoint")
    code, out, err = run_predict(capsys, str(bogus), str(digits_val_images))
    assert code == 2 and out == "" and len(err) == 1 and err[0].startswith("kiln: error: ")


def test_a_checkpoint_without_the_inference_record_predicts_the_same(capsys, tmp_path, digits_best, digits_val_images,
                                                                     digits_rows):
    checkpoint = torch.load(digits_best, map_location="cpu", weights_only=False)
    del checkpoint["kiln"]["inference"]
    old = tmp_path / "old.pt"
    torch.save(checkpoint, old)
    rows, _ = predict_json(capsys, str(old), str(digits_val_images))
    assert rows == digits_rows


def test_equal_probabilities_rank_the_lower_class_first_as_eval_argmax_does(digits_best, digits_val_images):
    trained = load(digits_best)
    flat = torch.nn.Linear(32 * 32, len(trained.class_names))
    torch.nn.init.zeros_(flat.weight), torch.nn.init.zeros_(flat.bias)  # every class equally likely
    tied = dataclasses.replace(trained, model=torch.nn.Sequential(torch.nn.Flatten(), flat).eval(), channels_last=False)
    rows, _ = predict(tied, find_inputs([digits_val_images / "9"], trained.class_names), top_k=3, workers=0)
    assert all([index for _, index, _ in row.top] == [0, 1, 2] for row in rows)
