"""``kiln mlflow-sync``: send a run directory to an MLflow tracking server afterwards."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from recipes.config import ConfigError

__all__ = ["mlflow_sync"]


@click.command("mlflow-sync")
@click.argument("run_dir", type=click.Path())
@click.option("--mlflow", "uri", metavar="URI", help="The tracking server (default: the run's own --mlflow, else "
              "$KILN_MLFLOW_URI, else the server it was last mirrored to).")
@click.option("--experiment", metavar="NAME", help="The MLflow experiment of a run not sent before (default: the "
              "run's tracking.mlflow_experiment, else its recipe's name).")
@click.option("--log-model", is_flag=True, help="Also send the best checkpoint and its TorchScript export.")
def mlflow_sync(run_dir: str, uri: str | None, experiment: str | None, log_model: bool) -> None:
    """Send RUN_DIR's params, metrics, artifacts and status to an MLflow server: whatever it lacks.

    \b
    The same MLflow run as the run's own mirror (RUN_DIR/mlflow.json); running it twice doubles nothing.
    For a run trained while its server was down, or without --mlflow. A run still training mirrors itself.
    Example:  kiln mlflow-sync runs/d5 --mlflow http://127.0.0.1:5000
    Exit status: 0 sent, 1 the server could not be reached, 2 bad input.
    """
    import tempfile

    from recipes.cli.jobs import model_artifacts
    from recipes.run.lock import RunLock
    from recipes.run.rundir import RunDir, read_summary, run_config
    from recipes.tracking import STATUS, MlflowUnavailable, RunMirror, mirror_uri

    folder = Path(run_dir)
    if not RunDir(folder).config.is_file():
        raise ConfigError(f"{run_dir} is not a kiln run directory (no config.json)")
    lock = RunLock.take(folder, create=False, busy_hint="a run that trains mirrors itself; wait for it to end")
    try:
        cfg = run_config(folder)
        server = mirror_uri(uri or cfg.tracking.mlflow_uri, folder)
        if server is None:
            raise ConfigError("name the tracking server: --mlflow URI, or set KILN_MLFLOW_URI")
        summary, _ = read_summary(folder)
        mirror = RunMirror(folder, server, experiment or cfg.tracking.mlflow_experiment or cfg.name)
        with tempfile.TemporaryDirectory() as tmp:
            try:
                sent = mirror.sync(final=True, extra=model_artifacts(folder, Path(tmp)) if log_model else None)
            except MlflowUnavailable as e:
                click.echo(f"kiln: error: {e}; nothing is lost: run the same command again", err=True)
                sys.exit(1)
    finally:
        lock.release()
    click.echo(f"sent {sent} metric values the server lacked, the params, tags and artifacts; status "
               f"{STATUS.get(summary['status'], 'RUNNING')} ({summary['status']} in summary.json)")
    click.echo(f"mlflow: {mirror.url}")
