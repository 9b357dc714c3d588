"""``kiln sweep``: --param parsing, the default space, a real (tiny) study with its files, resuming it,
bad input as one line with exit status 2; slow: best.yaml reproduces the best trial, and two workers
share one study (one killed mid-trial) without running a trial twice."""
from __future__ import annotations

import io
import json
import signal

import optuna
import pytest
import yaml

from recipes import RECIPES
from recipes.cli import main
from recipes.config import ConfigError, apply_overrides
from recipes.recipe_files import load_recipe_file
from recipes.report import finish_run
from recipes.report.sweep_page import draw_sweep
from recipes.run.rundir import RunDir
from recipes.tools.sweep import ParamSpec, default_space, parse_param, run_sweep, trial_config
from tests.runs import kiln, start, wait_for

DIGITS = RECIPES["digits"]
TINY = apply_overrides(DIGITS, {"data.image_size": 16, "train.epochs": 1, "data.batch_size": 128})


def test_param_specs_take_bare_and_dotted_keys():
    assert parse_param("max_lr=log:1e-3:1e-1", DIGITS) == ParamSpec("schedule.max_lr", "log", 1e-3, 1e-1)
    assert parse_param("train.label_smoothing=0:0.3", DIGITS) == ParamSpec("train.label_smoothing", "float", 0.0, 0.3)
    assert parse_param("batch_size=choice:32,64,128", DIGITS) == ParamSpec("data.batch_size", "choice", choices=(32, 64, 128))
    assert parse_param("batch_size=16:64", DIGITS).kind == "int"  # an integer field gets integer draws
    assert parse_param("train.nan_lr_factor=0.1:0.5", DIGITS).key == "guard.lr_factor"  # a renamed key, as --set


@pytest.mark.parametrize("spec, message", [
    ("max_lr=log:1e-3", "expected KEY=log:LOW:HIGH"),
    ("max_lr", "expected KEY=log:LOW:HIGH"),
    ("max_lr=log:0:1", "LOW > 0"),
    ("max_lr=0.1:0.01", "LOW must be below HIGH"),
    ("maxlr=log:1e-3:1e-1", "did you mean 'max_lr'"),
    ("batch_size=choice:32,big", "is not an integer"),
    ("batch_size=1.5:4", "integer"),
])
def test_bad_param_specs_are_one_line_errors(spec, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_param(spec, DIGITS)
    assert "\n" not in str(info.value)


def test_the_default_space_is_centred_on_the_recipe():
    space = {p.key: p for p in default_space(DIGITS)}
    assert set(space) == {"schedule.max_lr", "optim.weight_decay", "train.label_smoothing", "data.batch_size"}
    assert (space["schedule.max_lr"].low, space["schedule.max_lr"].high) == pytest.approx((1e-3, 1e-1))
    assert space["data.batch_size"].choices == (32, 64, 128)
    assert "schedule.max_lr" not in {p.key for p in default_space(DIGITS, with_max_lr=False)}


def test_a_new_max_lr_keeps_where_the_cycle_starts_relative_to_it():
    cfg = trial_config(DIGITS, {"schedule.max_lr": 0.002})
    assert cfg.optim.lr == pytest.approx(0.002 * DIGITS.optim.lr / DIGITS.schedule.max_lr)


def _space():
    return [ParamSpec("schedule.max_lr", "log", 3e-3, 3e-2), ParamSpec("train.label_smoothing", "float", 0.0, 0.3)]


def test_a_tiny_sweep_writes_its_runs_and_results_and_resumes(tmp_path, capsys):
    out = tmp_path / "sweep"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    result = run_sweep("digits", TINY, _space(), n_trials=2, out=out, storage=None, study_name=None,
                       fixed={"data.image_size": "16", "train.epochs": 1, "data.batch_size": "128"},
                       finish=lambda run_dir: finish_run(run_dir, io.StringIO()), draw=draw_sweep)
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["000", "001"]
    for run_dir in (out / "trials").iterdir():  # every trial is a normal kiln run directory
        assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
        assert (run_dir / "metrics.jsonl").exists() and (run_dir / "report.html").exists()
    sweep = json.loads((out / "sweep.json").read_text())
    assert [t["rank"] for t in sweep["trials"]] == [1, 2]
    assert sweep["best"]["best_val_accuracy"] == pytest.approx(result.study.best_value)
    assert {"optimization_history.png", "accuracy_vs_max_lr.png", "accuracy_vs_label_smoothing.png",
            "param_importances.png", "intermediate_values.png", "parallel_coordinate.png"} <= {p.name for p in result.plots}
    page = (out / "sweep.html").read_text()
    assert "data:image/png;base64," in page and "<table>" in page and ".card" in page  # report.html's style
    for trial in ("000", "001"):  # each trial links to its own report
        assert f'href="trials/{trial}/report.html"' in page
    printed = capsys.readouterr().out.splitlines()
    table = printed[:-3]
    assert table[-3].split()[:2] == ["rank", "trial"] and table[-2].split()[0] == "1"
    assert printed[-3].startswith(f"written: {out / 'sweep.html'}") and str(out / "sweep.json") in printed[-3]
    assert printed[-2] == f"best: {out / 'best.yaml'}; train it with: kiln train {out / 'best.yaml'}"
    assert printed[-1].startswith(f"plots: {out / 'plots'} (") and "parallel_coordinate.png" in printed[-1]

    best = load_recipe_file(str(out / "best.yaml"))
    assert yaml.safe_load((out / "best.yaml").read_text())["base"] == "digits"
    best_params = result.study.best_params
    assert best.schedule.max_lr == pytest.approx(best_params["schedule.max_lr"])
    assert (best.data.image_size, best.train.epochs, best.data.batch_size) == (16, 1, 128)

    again = run_sweep("digits", TINY, _space(), n_trials=3, out=out, storage=None, study_name=None,
                      fixed={"data.image_size": "16", "train.epochs": 1, "data.batch_size": "128"})
    assert len(again.study.trials) == 3  # continued the same study: one more trial, not three
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["000", "001", "002"]
    with pytest.raises(ConfigError, match="different space"):
        run_sweep("digits", TINY, _space()[:1], n_trials=3, out=out, storage=None, study_name=None,
                  fixed={"data.image_size": "16", "train.epochs": 1, "data.batch_size": "128"})


@pytest.mark.parametrize("args, message", [
    (["--trials", "2", "--param", "max_lr=log:1e-3"], "--param 'max_lr=log:1e-3': expected"),
    (["--trials", "2", "--param", "learning_rate=0:1"], "unknown config key 'learning_rate'"),
    (["--trials", "2", "--storage", "postgresql://kiln:secret@nowhere/db"], "cannot open the study storage postgresql://kiln:***@nowhere/db"),
    (["--trials", "0"], "--trials must be >= 1"),
    (["--trials", "2", "--max-lr", "auto", "--param", "max_lr=log:1e-3:1e-1"], "--max-lr auto chooses max_lr"),
])
def test_bad_input_is_one_line_and_exit_status_2(args, message, tmp_path, capfd):
    with pytest.raises(SystemExit) as info:
        main(["sweep", "digits", *args, "--out", str(tmp_path / "sweep")])
    _, err = capfd.readouterr()
    assert info.value.code == 2
    assert err.count("\n") == 1 and message in err and "secret" not in err
    assert not (tmp_path / "sweep" / "trials").exists()


@pytest.mark.slow
def test_max_lr_auto_runs_the_range_test_once_per_batch_size(tmp_path):
    import io

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    stream = io.StringIO()
    space = [ParamSpec("train.label_smoothing", "float", 0.0, 0.3)]
    result = run_sweep("digits", TINY, space, n_trials=2, out=tmp_path / "sweep", storage=None, study_name=None,
                       auto_max_lr=True, stream=stream)
    assert stream.getvalue().count("--max-lr auto") == 1  # one range test for the one batch size
    found = result.study.user_attrs["auto_max_lr:batch_size=128"]
    for trial in result.study.trials:
        assert trial.user_attrs["config"]["schedule.max_lr"] == found["schedule.max_lr"]


@pytest.mark.slow
def test_best_yaml_reproduces_the_best_trial(tmp_path):
    out = tmp_path / "sweep"
    sweep = kiln("sweep", "digits", "--trials", "3", "--epochs", "2", "--set", "data.image_size=16", "--out", out,
                 timeout=600)
    assert sweep.returncode == 0, sweep.stderr
    best = json.loads((out / "sweep.json").read_text())["best"]
    # only its summary.json is compared: no end-of-run report
    again = kiln("train", out / "best.yaml", "--quiet", "--no-report", "--out", tmp_path / "again", timeout=600)
    assert again.returncode == 0, again.stderr
    reproduced = json.loads((tmp_path / "again" / "summary.json").read_text())["best_val_accuracy"]
    assert reproduced == best["best_val_accuracy"]  # same seed, same figure


@pytest.mark.slow
def test_two_workers_share_a_study_and_one_dying_mid_trial_leaves_it_consistent(tmp_path):
    out = tmp_path / "sweep"
    n = 4
    args = ["sweep", "digits", "--trials", str(n), "--epochs", "2", "--set", "data.image_size=16",
            "--out", str(out), "--pruner", "none", "--heartbeat", "2"]
    out.mkdir()
    first = start(*args)
    second = start(*args)
    try:
        def first_is_mid_trial() -> bool:
            """A trial of the first worker (its run directory's lock names its PID) has logged a step and not
            ended: any trial, or a pause between two, would let the kill miss what this test is about."""
            for run_dir in map(RunDir, (out / "trials").glob("*")):
                try:
                    mine = run_dir.lock.read_text().strip() == str(first.pid)
                    running = json.loads(run_dir.summary.read_text())["status"] == "running"
                except (OSError, ValueError, KeyError):
                    continue
                if mine and running and run_dir.steps.exists():
                    return True
            return False

        wait_for(first_is_mid_trial, first, second, what="the first worker inside a trial", timeout=300)
        first.send_signal(signal.SIGKILL)
        first.wait()
        stdout, stderr = second.communicate(timeout=600)
    finally:
        for p in (first, second):
            if p.poll() is None:
                p.kill()
    assert second.returncode == 0, stderr
    study = optuna.load_study(study_name="digits", storage=f"sqlite:///{out / 'sweep.db'}")
    states = [t.state for t in study.trials if not t.user_attrs.get("surplus")]
    assert states.count(optuna.trial.TrialState.COMPLETE) == n
    assert optuna.trial.TrialState.RUNNING not in states
    assert optuna.trial.TrialState.FAIL in states, stdout  # the dead worker's trial, marked failed by the heartbeat check
    run_dirs = [t.user_attrs["run_dir"] for t in study.trials if "run_dir" in t.user_attrs]
    assert len(run_dirs) == len(set(run_dirs))  # no trial run twice
    assert len(json.loads((out / "sweep.json").read_text())["trials"]) >= n


SWEEP = ["sweep", "digits", "--trials", "2", "--epochs", "2", "--set", "data.image_size=16", "--set", "train.log_every=1"]
MOMENTS = {
    "before-trials": "SIGTERM: sweep stopped before its first trial; re-run the same command to start it",
    "mid-trial": "SIGTERM: trial 0 stopped at iteration ",
    "between-trials": "SIGTERM: sweep stopped between trials (1 of 2 trials done; re-run the same command to continue",
    "page": "SIGTERM: the sweep's page was not drawn (2 trials done); re-run the same command to draw it",
}


def _stop_at(moment: str, out, sig: int = signal.SIGTERM, sweep: tuple[str, ...] = tuple(SWEEP)):
    """``kiln sweep`` stopped by ``sig`` at ``moment``: mid-trial when trial 0's steps.jsonl has 5 records, else
    where the sweep holds (KILN_SWEEP_HOLD, said on stderr). Returns (exit status, stderr lines)."""
    from tests.runs import ENV, wait_for

    proc = start(*sweep, "--out", out, env=None if moment == "mid-trial" else {**ENV, "KILN_SWEEP_HOLD": moment})
    if moment == "mid-trial":
        steps = out / "trials" / "000" / "steps.jsonl"
        wait_for(lambda: steps.exists() and len(steps.read_text().splitlines()) >= 6, proc, what="5 steps of trial 0")
    else:
        lines: list[str] = []
        wait_for(lambda: lines.append(proc.stderr.readline()) or "holding at" in lines[-1], proc,
                 what=f"the sweep holding at {moment}")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, [line for line in err.splitlines() if "holding at" not in line]


@pytest.mark.slow
@pytest.mark.parametrize("moment", MOMENTS)
def test_sigterm_at_any_moment_is_one_line_and_143_and_the_same_command_continues(tmp_path, moment):
    out = tmp_path / "sweep"
    code, err = _stop_at(moment, out)
    assert code == 143 and len(err) == 1 and err[0].startswith(f"kiln: {MOMENTS[moment]}"), err
    again = kiln(*SWEEP, "--out", out)
    assert again.returncode == 0, again.stderr
    study = optuna.load_study(study_name="digits", storage=f"sqlite:///{out / 'sweep.db'}")
    assert not [t for t in study.trials if t.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)]
    rows = json.loads((out / "sweep.json").read_text())["trials"]
    assert len(rows) == 2 and {r["state"] for r in rows} == {"complete"}  # each trial counted once
    assert (out / "sweep.html").exists()
    if moment == "mid-trial":  # the stopped trial's run went on from its last.pt, with its own parameters
        stopped = study.trials[0]
        resumer = next(t for t in study.trials if t.user_attrs.get("resumes") == 0)
        assert stopped.state == optuna.trial.TrialState.FAIL and resumer.params == stopped.params
        assert resumer.user_attrs["run_dir"] == stopped.user_attrs["run_dir"]
        events = [json.loads(line) for line in (out / "trials" / "000" / "events.jsonl").read_text().splitlines()]
        assert [e["event"] for e in events].count("resume") == 1
        assert next(e for e in events if e["event"] == "resume")["iteration"] > 0
        assert f"trial   {resumer.number}: " in again.stdout and "(resumes trial 0)" in again.stdout


@pytest.mark.slow
def test_ctrl_c_mid_trial_is_one_line_and_130(tmp_path):
    code, err = _stop_at("mid-trial", tmp_path / "sweep", signal.SIGINT)
    assert code == 130 and len(err) == 1 and err[0].startswith("kiln: SIGINT: trial 0 stopped at iteration "), err


@pytest.mark.slow
def test_sigterm_while_a_trial_is_pruned_counts_it_once_and_the_same_command_finishes(tmp_path):
    # with this seed and fp32 on any CPU, trial 3 falls below the median of trials 0-2 after its first epoch
    sweep = ("sweep", "digits", "--trials", "4", "--epochs", "3", "--set", "data.image_size=16",
             "--set", "train.precision=fp32")
    out = tmp_path / "sweep"
    code, err = _stop_at("pruned", out, sweep=sweep)
    assert code == 143 and err == ["kiln: SIGTERM: sweep stopped after a trial (4 of 4 trials done; re-run the same "
                                   "command to write the results and the page)"], err
    again = kiln(*sweep, "--out", out)
    assert again.returncode == 0, again.stderr
    rows = json.loads((out / "sweep.json").read_text())["trials"]
    assert [r["state"] for r in rows] == ["complete", "complete", "complete", "pruned"] and rows[-1]["number"] == 3
    assert (out / "trials" / "003" / "report.html").exists()  # the pruned trial's report, drawn despite the signal

