"""report.html (self-contained), ``kiln report RUN_DIR``, and the TensorBoard files a run leaves."""
from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import pytest
from click.testing import CliRunner
from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
from tensorboard.plugins.hparams import plugin_data_pb2

from recipes import get_recipe
from recipes.cli import cli, main
from recipes.cli.options import resolve_config
from recipes.config import ConfigError, config_to_dict, hparams
from recipes.report import find_issues, finish_run, format_findings, load_run, write_report
from recipes.run import train


class _Page(HTMLParser):
    """Collects what a browser would fetch: img/script/link/iframe sources, and the section ids."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.fetches: list[str] = []
        self.sections: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag in ("script", "iframe", "video", "audio", "source") and attrs.get("src"):
            self.fetches.append(attrs["src"])
        if tag == "link" and attrs.get("href"):
            self.fetches.append(attrs["href"])
        if tag == "section":
            self.sections.append(attrs.get("id", ""))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    cfg = resolve_config("synthetic", ("train.log_every=2",))
    run_dir = tmp_path_factory.mktemp("report") / "run"
    stream = io.StringIO()
    train(cfg, run_dir, quiet=True, stream=stream)
    finish_run(run_dir, stream)  # plots/, report.html, findings: as the CLI does after a run
    (run_dir / "console.txt").write_text(stream.getvalue())
    return run_dir


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_run_ends_with_plots_report_and_findings_on_the_console(run_dir):
    console = (run_dir / "console.txt").read_text()
    findings = find_issues(load_run(run_dir))
    assert format_findings(findings) in console
    assert f"report: {run_dir / 'report.html'}" in console
    assert (run_dir / "report.html").stat().st_size > 20_000


def test_report_is_one_self_contained_page(run_dir):
    page = _Page()
    text = (run_dir / "report.html").read_text()
    page.feed(text)
    assert page.fetches == []
    assert "http://" not in text and "https://" not in text and "url(" not in text
    plots = sorted((run_dir / "plots").glob("*.png"))
    assert len(page.images) == len(plots) >= 4
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert page.sections == ["summary", "findings", "plots", "events", "checkpoint", "config"]


def test_report_shows_summary_config_events_and_best_checkpoint(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    text = (run_dir / "report.html").read_text()
    assert f"{100 * summary['best_val_accuracy']:.2f}%" in text
    assert f'class="status-{summary["status"]}"' in text
    for key, value in config_to_dict(get_recipe("synthetic")).items():
        if isinstance(value, dict):
            for name in value:
                assert f"<td>{name}</td>" in text
    best = sorted((run_dir / "checkpoints").glob("best*.pt"))
    assert best and best[-1].name in text
    events = _lines(run_dir / "events.jsonl")
    assert f"checkpoint: {sum(e['event'] == 'checkpoint' for e in events)}" in text
    what_trains = json.loads((run_dir / "config.json").read_text())["runtime"]["what_trains"]
    assert what_trains.startswith("small_cnn: ") and "parameters, all training, peak LR" in what_trains
    assert f"<b>what trains:</b> {what_trains}" in text  # as the run's first lines said it


def test_report_recomputes_from_the_records_and_reads_events_tolerantly(run_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "plots")
    (copy / "report.html").unlink()
    with open(copy / "events.jsonl", "a") as f:
        f.write(json.dumps({"event": "interrupted", "signal": "SIGTERM", "iteration": 7, "epoch": 2}) + "\n")
        f.write(json.dumps({"event": "something_new", "detail": "<b>escaped</b>"}) + "\n")
        f.write('{"event": "resume", "iter')  # a line cut short by a crash
    result = CliRunner().invoke(cli, ["report", str(copy)])
    assert result.exit_code == 0, result.output
    assert format_findings(find_issues(load_run(copy))) in result.output
    # the same plots, and what the best checkpoint gets wrong (measured by `kiln report` when missing)
    assert {p.name for p in (copy / "plots").iterdir()} == {p.name for p in (run_dir / "plots").iterdir()} | {
        "mistakes.png", "confusion.png"}
    text = (copy / "report.html").read_text()
    assert "What it gets wrong" in text and (copy / "mistakes.json").exists()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(copy / "tb"), size_guidance={"images": 0})
    tb.Reload()
    (image,) = tb.Images("val/mistakes")  # the same picture in TensorBoard, at the run's last iteration
    assert image.step == json.loads((copy / "summary.json").read_text())["iterations"] and image.width > 500
    assert "<td>interrupted</td>" in text and "signal=SIGTERM" in text
    assert "something_new" in text and "&lt;b&gt;escaped&lt;/b&gt;" in text and "<b>escaped</b>" not in text


def test_kiln_report_skips_a_torn_last_line_of_metrics_and_steps(run_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    for name in ("metrics.jsonl", "steps.jsonl"):  # a crash mid-append: the last line cut in half
        data = (copy / name).read_bytes()
        start = data.rstrip(b"\n").rfind(b"\n") + 1
        (copy / name).write_bytes(data[: start + (len(data) - start) // 2])
    done = subprocess.run([sys.executable, "-m", "recipes.cli", "report", str(copy)], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0 and not done.stderr, done.stderr
    whole, torn = load_run(run_dir), load_run(copy)
    assert torn.metrics == whole.metrics[:-1] and torn.steps == whole.steps[:-1]
    assert {p.name for p in (copy / "plots").iterdir()} == {p.name for p in (run_dir / "plots").iterdir()} | {
        "mistakes.png", "confusion.png"}
    assert f"report: {copy / 'report.html'}" in done.stdout


@pytest.mark.parametrize("make, message", [
    (lambda tmp: tmp / "missing", "no run directory"),
    (lambda tmp: (tmp / "file.txt").write_text("x") and tmp / "file.txt", "not a directory"),
    (lambda tmp: tmp, "holds no metrics"),
])
def test_bad_run_dirs_are_config_errors_and_one_line_on_the_cli(tmp_path, make, message, capsys):
    target = make(tmp_path)
    with pytest.raises(ConfigError, match=message):
        write_report(target)
    with pytest.raises(SystemExit) as exit_:
        main(["report", str(target)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_tensorboard_has_every_scalar_and_the_hparams(run_dir):
    steps, metrics = _lines(run_dir / "steps.jsonl"), _lines(run_dir / "metrics.jsonl")
    summary = json.loads((run_dir / "summary.json").read_text())
    tb = EventMultiplexer(size_guidance={"scalars": 0, "tensors": 0})
    tb.AddRunsFromDirectory(str(run_dir / "tb"))
    tb.Reload()
    assert set(tb.Runs()) == {".", "hparams"}
    for tag in ("train/loss", "train/lr", "train/grad_norm"):
        assert [e.step for e in tb.Scalars(".", tag)] == [s["iteration"] for s in steps], tag
    for tag in ("epoch/train_loss", "val/loss", "val/accuracy", "epoch/lr", "epoch/images_per_second"):
        assert [e.step for e in tb.Scalars(".", tag)] == [m["iteration"] for m in metrics], tag
    assert "train/loss_scale" not in tb.Runs()["."]["scalars"]  # fp32

    final = {tag: tb.Scalars("hparams", tag)[-1].value for tag in tb.Runs()["hparams"]["scalars"]}
    assert final["hparam/best_val_accuracy"] == pytest.approx(summary["best_val_accuracy"])
    assert final["hparam/final_val_accuracy"] == pytest.approx(summary["final_val_accuracy"])
    assert final["hparam/final_val_loss"] == pytest.approx(metrics[-1]["val_loss"])
    content = tb.GetAccumulator("hparams").PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    logged = {k: v for k, v in start.session_start_info.hparams.items()}
    cfg = resolve_config("synthetic", ("train.log_every=2",))
    expected = hparams(cfg)
    assert set(logged) == set(expected) | {"runtime.world_size", "runtime.global_batch_size"}
    assert logged["runtime.world_size"].number_value == 1
    assert logged["runtime.global_batch_size"].number_value == cfg.data.batch_size
    assert logged["schedule.max_lr"].number_value == pytest.approx(expected["schedule.max_lr"])
    assert logged["train.epochs"].number_value == cfg.train.epochs


def test_hparams_are_flat_scalars():
    flat = hparams(get_recipe("digits"))
    assert flat["schedule.max_lr"] == get_recipe("digits").schedule.max_lr
    assert flat["model.channels"] == "32,64,128"
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())
