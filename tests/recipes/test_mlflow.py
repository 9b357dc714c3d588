"""Runs and sweeps mirrored in a real MLflow tracking server (tests/mlflow_server.py), read back with MLflow's own
client: live epochs, params and artifacts, one MLflow run across SIGTERM and SIGKILL resumes, an outage, sweeps."""
from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest

from recipes.config import hparams
from recipes.run.rundir import RunDir, read_json, read_jsonl, run_config
from tests.runs import kiln, start, wait_for

pytestmark = pytest.mark.slow

#: The digits recipe, small: 16x16 images, a step record every 5 iterations, no mid-epoch checkpoints (last.pt is
#: written at epoch ends), a sync after every epoch.
QUICK = ["--set", "data.image_size=16", "--set", "train.log_every=5", "--set", "checkpoint.every_minutes=0",
         "--set", "tracking.mlflow_every_seconds=0"]


@pytest.fixture(scope="module")
def server(mlflow_server):
    """The session's server (tests/conftest.py); this module's tests run one after another on one worker."""
    return mlflow_server


@pytest.fixture(scope="module")
def client(server):
    from mlflow.tracking import MlflowClient

    return MlflowClient(server.uri)


def run_id(run_dir: Path, server) -> str | None:
    """The MLflow run mirroring ``run_dir`` on ``server`` (None before it is created)."""
    record = read_json(RunDir(run_dir).mlflow) or {}
    return (record.get("servers") or {}).get(server.uri, {}).get("run_id")


def history(client, rid: str, key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of every value the server holds for ``key``, by step."""
    return sorted((m.step, m.value) for m in client.get_metric_history(rid, key))


def server_epochs(client, run_dir: Path, server) -> list[int]:
    """The epochs whose val_accuracy the server holds (none before the MLflow run exists)."""
    rid = run_id(run_dir, server)
    return [step for step, _ in history(client, rid, "val_accuracy")] if rid else []


def assert_mirrors(client, run_dir: Path, server, status: str = "FINISHED") -> None:
    """The MLflow run holds every record of the run directory once, with the same values, and ``status``."""
    rid = run_id(run_dir, server)
    run = client.get_run(rid)
    assert run.info.status == status
    metrics = read_jsonl(RunDir(run_dir).metrics)
    for key in ("val_accuracy", "train_loss", "lr"):
        assert history(client, rid, key) == [(m["epoch"], m[key]) for m in metrics], key
    steps = read_jsonl(RunDir(run_dir).steps)
    assert history(client, rid, "train/loss") == [(s["iteration"], s["loss"]) for s in steps]


def test_a_run_is_on_the_server_while_it_trains_with_its_params_tags_and_artifacts(server, client, tmp_path):
    run_dir = tmp_path / "run"
    proc = start("train", "digits", "--epochs", "6", *QUICK, "--mlflow", server.uri, "--out", str(run_dir))
    seen = []  # how many epochs the run had written when epoch 1 was first on the server

    def epoch_1_on_server() -> bool:
        seen.append(len(read_jsonl(RunDir(run_dir).metrics)))
        return 1 in server_epochs(client, run_dir, server)

    wait_for(epoch_1_on_server, proc, what="epoch 1 on the MLflow server")
    assert seen[-1] < 6, "epoch 1 reached the server only once the run had ended"
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    rid = run_id(run_dir, server)
    assert f"kiln: mlflow: {server.uri}/#/experiments/" in out and rid in out

    assert_mirrors(client, run_dir, server)
    run = client.get_run(rid)
    want = {k: str(v) for k, v in hparams(run_config(run_dir)).items()}
    assert run.data.params == want  # every config key, as TensorBoard's hparams flatten it, as text
    runtime = json.loads(RunDir(run_dir).config.read_text())["runtime"]
    assert {"kiln.recipe": "digits", "kiln.precision": runtime["precision"], "kiln.device": "cpu",
            "kiln.world_size": "1"}.items() <= run.data.tags.items()
    assert run.data.tags.get("mlflow.source.git.commit") == runtime.get("git_commit")  # a checkout's commit, if any
    assert client.get_experiment(run.info.experiment_id).name == "digits"
    artifacts = {f.path for f in client.list_artifacts(rid)}
    assert {"config.json", "summary.json", "report.html", "findings.json", "plots"} <= artifacts
    assert {"plots/loss.png", "plots/accuracy.png"} <= {f.path for f in client.list_artifacts(rid, "plots")}
    local = tmp_path / "downloaded"
    local.mkdir()
    summary = client.download_artifacts(rid, "summary.json", str(local))
    assert json.loads(Path(summary).read_text()) == json.loads(RunDir(run_dir).summary.read_text())


def test_sigterm_then_resume_continues_the_same_mlflow_run(server, client, tmp_path):
    run_dir = tmp_path / "run"
    proc = start("train", "digits", "--epochs", "5", *QUICK, "--mlflow", server.uri, "--out", str(run_dir),
                 "--quiet", "--no-report")
    wait_for(lambda: 2 in server_epochs(client, run_dir, server), proc, what="epoch 2 on the MLflow server")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert client.get_run(run_id(run_dir, server)).info.status == "KILLED"  # summary.json: interrupted

    resumed = kiln("resume", str(run_dir), "--quiet", "--no-report")  # the server comes from mlflow.json
    assert resumed.returncode == 0, resumed.stderr
    assert_mirrors(client, run_dir, server)
    assert [step for step, _ in history(client, run_id(run_dir, server), "val_accuracy")] == [1, 2, 3, 4, 5]
    experiment = client.get_run(run_id(run_dir, server)).info.experiment_id
    assert len(client.search_runs([experiment], filter_string=f"tags.`kiln.run_dir` = '{run_dir.resolve()}'")) == 1


def test_a_resume_that_changes_a_param_keeps_the_first_value_and_tags_the_change(server, client, tmp_path):
    """MLflow's params cannot change: ``kiln resume --epochs 3 --new-schedule`` on a 2-epoch run keeps
    ``train.epochs`` 2 and says 2 -> 3 in a tag; epochs 1..3 are each on the server once."""
    run_dir = tmp_path / "run"
    done = kiln("train", "digits", "--epochs", "2", *QUICK, "--mlflow", server.uri, "--out", str(run_dir),
                "--quiet", "--no-report")
    assert done.returncode == 0, done.stderr
    resumed = kiln("resume", str(run_dir), "--epochs", "3", "--new-schedule", "--quiet", "--no-report")
    assert resumed.returncode == 0, resumed.stderr
    run = client.get_run(run_id(run_dir, server))
    assert run.data.params["train.epochs"] == "2"
    assert run.data.tags["kiln.changed_on_resume.train.epochs"] == "2 -> 3"
    assert_mirrors(client, run_dir, server)
    assert [step for step, _ in history(client, run_id(run_dir, server), "val_accuracy")] == [1, 2, 3]


def test_sigkill_after_the_server_got_epochs_the_checkpoint_lacks_sends_none_twice(server, client, tmp_path):
    """Killed after epoch k's records reached the server but before the checkpoint holding epoch k: the resumed run
    writes those epochs again (equal values: exact resume) and sends none of them twice."""
    run_dir = tmp_path / "run"
    proc = start("train", "digits", "--epochs", "12", *QUICK, "--mlflow", server.uri, "--out", str(run_dir),
                 "--quiet", "--no-report")
    wait_for(lambda: RunDir(run_dir).last.exists() and server_epochs(client, run_dir, server), proc,
             what="the first checkpoint")
    kept = tmp_path / "last.pt"
    shutil.copyfile(RunDir(run_dir).last, kept)  # epoch 1 or 2: what a kill before the next checkpoint leaves
    import torch

    trainer = torch.load(kept, weights_only=True)["trainer"]
    kept_epoch = trainer["iteration"] // trainer["epoch_length"]
    wait_for(lambda: max(server_epochs(client, run_dir, server)) >= kept_epoch + 2, proc,
             what=f"epoch {kept_epoch + 2} on the MLflow server")
    proc.kill()
    proc.communicate(timeout=60)
    shutil.copyfile(kept, RunDir(run_dir).last)  # the checkpoint predates epochs the server holds
    assert max(server_epochs(client, run_dir, server)) > kept_epoch

    resumed = kiln("resume", str(run_dir), "--quiet", "--no-report")
    assert resumed.returncode == 0, resumed.stderr
    assert_mirrors(client, run_dir, server)
    assert [step for step, _ in history(client, run_id(run_dir, server), "val_accuracy")] == list(range(1, 13))


def test_the_server_killed_mid_run_and_back_loses_nothing_and_doubles_nothing(server, client, tmp_path):
    run_dir = tmp_path / "run"
    proc = start("train", "digits", "--epochs", "14", *QUICK, "--mlflow", server.uri, "--out", str(run_dir),
                 "--no-report")
    wait_for(lambda: 1 in server_epochs(client, run_dir, server), proc, what="epoch 1 on the MLflow server")
    server.kill()
    down_at = len(read_jsonl(RunDir(run_dir).metrics))
    wait_for(lambda: len(read_jsonl(RunDir(run_dir).metrics)) >= down_at + 3, proc, what="3 epochs with the server down")
    proc.send_signal(signal.SIGSTOP)  # the run waits while the server starts again (seconds), then goes on
    try:
        server.start()
    finally:
        proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    said = [line for line in err.splitlines() if "MLflow server at" in line]
    assert len(said) == 2, err  # one line when it went down, one when it was back
    assert said[0].startswith(f"kiln: MLflow server at {server.uri} unavailable: ") and "training goes on" in said[0]
    assert said[1].startswith(f"kiln: MLflow server at {server.uri} is back: sent ")
    assert_mirrors(client, run_dir, server)

    for _ in range(2):  # afterwards, as often as you like: nothing doubled
        synced = kiln("mlflow-sync", str(run_dir))
        assert synced.returncode == 0, synced.stderr
        assert "sent 0 metric values" in synced.stdout
    assert_mirrors(client, run_dir, server)


def test_a_server_down_at_the_start_is_one_line_and_mlflow_sync_sends_the_run_later(server, client, tmp_path):
    dead = f"http://127.0.0.1:{server.port + 1 if server.port < 65535 else 1}"  # nothing listens there
    run_dir = tmp_path / "run"
    done = kiln("train", "digits", "--epochs", "2", *QUICK, "--mlflow", dead, "--out", str(run_dir), "--no-report")
    assert done.returncode == 0, done.stderr
    said = [line for line in (done.stdout + done.stderr).splitlines() if "MLflow" in line]
    assert said[0].startswith(f"kiln: MLflow server at {dead} unavailable: ") and "kiln mlflow-sync" in said[0], said
    assert len(said) <= 2, said  # that line, and the end's naming kiln mlflow-sync again

    refused = kiln("train", "digits", "--epochs", "2", *QUICK, "--mlflow", dead, "--mlflow-required",
                   "--out", str(tmp_path / "refused"))
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "--mlflow-required" in refused.stderr and not (tmp_path / "refused").exists()

    for _ in range(2):
        synced = kiln("mlflow-sync", str(run_dir), "--mlflow", server.uri)
        assert synced.returncode == 0, synced.stderr
    assert_mirrors(client, run_dir, server)
    assert {"config.json", "summary.json"} <= {f.path for f in client.list_artifacts(run_id(run_dir, server))}


def test_several_processes_send_from_rank_0_alone(server, client, tmp_path):
    run_dir = tmp_path / "run"
    done = kiln("train", "digits", "--epochs", "2", *QUICK, "--nproc-per-node", "2", "--mlflow", server.uri,
                "--mlflow-experiment", "ddp", "--out", str(run_dir), "--no-report")
    assert done.returncode == 0, done.stderr
    runs = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id(run_dir, server)]
    assert_mirrors(client, run_dir, server)
    assert client.get_run(run_id(run_dir, server)).data.tags["kiln.world_size"] == "2"


def test_log_model_sends_the_best_checkpoint_and_a_torchscript_export(server, client, tmp_path):
    run_dir = tmp_path / "run"
    done = kiln("train", "digits", "--epochs", "1", *QUICK, "--mlflow", server.uri, "--mlflow-log-model",
                "--mlflow-experiment", "models", "--out", str(run_dir), "--no-report")
    assert done.returncode == 0, done.stderr
    rid = run_id(run_dir, server)
    assert client.get_experiment(client.get_run(rid).info.experiment_id).name == "models"
    best = RunDir(run_dir).best_checkpoints()[-1]
    assert [f.path for f in client.list_artifacts(rid, "checkpoints")] == [f"checkpoints/{best.name}"]
    exported = client.download_artifacts(rid, f"model/{best.with_suffix('.ts').name}", str(tmp_path))
    import torch

    model = torch.jit.load(exported)
    assert model(torch.zeros(3, 1, 16, 16)).shape == (3, 10)


def test_a_sweep_is_one_parent_run_with_a_nested_run_per_trial_and_pruned_ones_marked(server, client, tmp_path):
    # with this seed and fp32 on any CPU, trial 3 falls below the median of trials 0-2 after its first epoch
    out = tmp_path / "sweep"
    done = kiln("sweep", "digits", "--trials", "4", "--epochs", "3", "--set", "data.image_size=16",
                "--set", "train.precision=fp32", "--out", str(out), "--mlflow", server.uri,
                "--mlflow-experiment", "sweep")
    assert done.returncode == 0, done.stderr
    experiment = client.get_experiment_by_name("sweep").experiment_id
    runs = client.search_runs([experiment])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    trials = {int(r.data.tags["kiln.trial"]): r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert sorted(trials) == [0, 1, 2, 3]
    rows = {row["number"]: row for row in json.loads((out / "sweep.json").read_text())["trials"]}
    for number, run in trials.items():
        assert (run.data.tags.get("kiln.pruned") == "true") == (rows[number]["state"] == "pruned")
        assert run.info.status == ("KILLED" if rows[number]["state"] == "pruned" else "FINISHED")
        assert run.data.metrics["val_accuracy"] == read_jsonl(out / "trials" / f"{number:03d}" / "metrics.jsonl")[-1]["val_accuracy"]
    assert rows[3]["state"] == "pruned"
    best = max(row["best_val_accuracy"] for row in rows.values() if row["state"] == "complete")
    assert parents[0].data.metrics["best_val_accuracy"] == best


def test_without_the_extra_mlflow_is_one_line_naming_it(tmp_path):
    blocker = tmp_path / "no_mlflow"
    (blocker / "mlflow").mkdir(parents=True)
    (blocker / "mlflow" / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    import os

    from tests.runs import ENV

    done = kiln("train", "digits", "--epochs", "1", "--mlflow", "http://127.0.0.1:9", "--out", str(tmp_path / "r"),
                env={**ENV, "PYTHONPATH": f"{blocker}{os.pathsep}{ENV.get('PYTHONPATH', '')}"})
    assert done.returncode == 2
    assert done.stderr.strip() == "kiln: error: --mlflow needs the MLflow client: pip install 'kiln[mlflow]'"
    assert not (tmp_path / "r").exists()
