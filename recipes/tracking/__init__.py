"""Runs and sweeps mirrored in an MLflow tracking server (the ``kiln[mlflow]`` extra).

:class:`RunMirror` (mirror.py) sends a run directory's records to the server, skipping what it has;
:class:`LiveMirror` (live.py) does so from a thread while the run trains; :func:`open_mirror` and
:func:`finish_mirror` are what ``kiln train``, ``kiln resume`` and ``kiln sweep`` call around a run.
"""
from __future__ import annotations

import contextlib
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TextIO

from callbacks.files import os_error_line
from recipes.config import Config, ConfigError
from recipes.tracking.live import LiveMirror
from recipes.tracking.mirror import ENV_URI, STATUS, MlflowUnavailable, RunMirror, mirror_uri, mlflow_client

__all__ = ["ENV_URI", "STATUS", "LiveMirror", "MlflowUnavailable", "RunMirror", "finish_mirror", "mirror_uri",
           "mirrored", "mlflow_client", "open_mirror", "require_mlflow_client", "start_mirror"]


def require_mlflow_client(configured: str, run_dir: str | Path | None = None) -> str | None:
    """Before anything is written: the server named (:func:`mirror_uri`; None: none), whose MLflow client is then
    installed.

    Raises:
        ConfigError: it is not (one line naming the extra).
    """
    server = mirror_uri(configured, run_dir)
    if server is not None:
        mlflow_client(server)
    return server


def open_mirror(cfg: Config, run_dir: str | Path, *, uri: str | None = None, experiment: str | None = None,
                parent_run_id: str | None = None, tags: Mapping[str, str] | None = None, run_name: str | None = None,
                stream: TextIO | None = None) -> RunMirror | None:
    """The mirror of the run in ``run_dir``, its server reached (the experiment found or created; the MLflow run
    is created by :func:`start_mirror`, once the run is built), or None when no server is named (``uri``,
    ``cfg.tracking.mlflow_uri``, ``$KILN_MLFLOW_URI``, the run's mlflow.json). A server that cannot be reached
    is one line on ``stream`` (stderr), and the run trains without it for now.

    Raises:
        ConfigError: the MLflow client is not installed, or the server cannot be reached and
            ``tracking.mlflow_required`` is set.
    """
    server = mirror_uri(uri or cfg.tracking.mlflow_uri, run_dir)
    if server is None:
        return None
    mirror = RunMirror(run_dir, server, experiment or cfg.tracking.mlflow_experiment or cfg.name,
                       parent_run_id=parent_run_id, tags=tags, run_name=run_name)
    try:
        mirror.check()
    except MlflowUnavailable as e:
        if cfg.tracking.mlflow_required:
            raise ConfigError(f"{e} (--mlflow-required: not training without it)") from None
        print(f"kiln: {e}; training without it for now: the run is sent when it is back, or with "
              f"`kiln mlflow-sync {run_dir}`", file=stream or sys.stderr, flush=True)
    return mirror


def start_mirror(mirror: RunMirror | None, stream: TextIO | None = None, *, send: bool = True,
                 say_url: bool = True) -> None:
    """Once the run is built: create the MLflow run (or find it again), and with ``send`` its params and tags and
    the RUNNING status (a resume leaves that to the live mirror's first sync, after the records written past
    its checkpoint are cut); print the run's address (on stdout). A server that is down stays one line (said
    when the mirror was opened, or now, on ``stream``: stderr)."""
    if mirror is None:
        return
    was_down = mirror.down
    try:
        mirror.sync() if send else mirror.connect()
    except MlflowUnavailable as e:
        if not was_down:
            print(f"kiln: {e}; training goes on without it for now", file=stream or sys.stderr, flush=True)
        return
    if say_url:
        print(f"kiln: mlflow: {mirror.url}", file=stream or sys.stdout, flush=True)


def finish_mirror(mirror: RunMirror | None, run_dir: str | Path, *, extra: Mapping[str, str | Path] | None = None,
                  stream: TextIO | None = None, say_sent: bool = True) -> bool:
    """The final sync after a run and its report: every record the server lacks, the artifacts (and ``extra``),
    the status; one line with the run's address (unless not ``say_sent``). A server that cannot be reached is
    one line naming ``kiln mlflow-sync``; returns whether it was sent."""
    if mirror is None:
        return True
    try:
        mirror.sync(final=True, extra=extra)
    except (MlflowUnavailable, OSError) as e:  # an OSError: a file of the run that could not be read
        reason = str(e) if isinstance(e, MlflowUnavailable) else f"a file could not be read: {os_error_line(e)}"
        print(f"kiln: {reason}: the run is not all on the server; send it later with `kiln mlflow-sync {run_dir}`",
              file=stream or sys.stderr, flush=True)
        return False
    if say_sent:
        print(f"kiln: mlflow: sent to {mirror.url}", file=stream or sys.stdout, flush=True)
    return True


@contextlib.contextmanager
def mirrored(mirror: RunMirror | None, run_dir: str | Path, every_seconds: float = 5.0, *,
             artifacts: Callable[[Path], Mapping[str, str | Path]] | None = None, stream: TextIO | None = None,
             say_sent: bool = True) -> Iterator[dict[str, LiveMirror]]:
    """Around the block that trains a run and draws its report: the handlers to attach (``{"mlflow":
    LiveMirror}``, none without a mirror); after it, even when it raised, the final sync (:func:`finish_mirror`)
    with ``artifacts(tmp)``'s files (e.g. the exported model, written into the temporary folder ``tmp``)."""
    if mirror is None:
        yield {}
        return
    live = LiveMirror(mirror, every_seconds, stream)
    try:
        yield {"mlflow": live}
    finally:
        live.close()
        with tempfile.TemporaryDirectory() as tmp:
            extra = artifacts(Path(tmp)) if artifacts is not None else None
            finish_mirror(mirror, run_dir, extra=extra, stream=stream, say_sent=say_sent)
