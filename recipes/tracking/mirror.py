"""A run directory mirrored in an MLflow tracking server: whatever the server lacks is sent, nothing twice.

One mechanism serves every case: while the run trains (``LiveMirror`` calls :meth:`RunMirror.sync` from
its thread), at the end, after a resume, after the server was down, and in ``kiln mlflow-sync``. A sync
reads the run directory (config.json, metrics.jsonl, steps.jsonl, summary.json) and sends what is past the
server's last step of each metric, in ``log_batch`` calls of up to 1,000 values. The server's last steps
are read once per connection and then followed locally; a failed call makes them unknown, so the next
sync reads them again (a call that timed out may still have landed). A run killed after its records
reached the server but before its checkpoint, then resumed, writes those epochs again with the same
values (exact resume) and the server already has them: they are skipped.

MLflow's client is used directly: ignite's ``MLflowLogger`` and MLflow's fluent async logging send each
event as it comes and know nothing of what the server already holds, which a resume and an outage need.

What goes where (``RUN_DIR/mlflow.json`` keeps the MLflow run id, per server):

- params: the config's keys as :func:`recipes.config.hparams` flattens them for TensorBoard, as text;
- tags: kiln's version, the recipe, precision, device, world size, the working tree's git commit;
- metrics: metrics.jsonl's values at step = epoch, steps.jsonl's as ``train/KEY`` at step = iteration
  (TensorBoard's names);
- status: summary.json's (:data:`STATUS`);
- artifacts, at the end: config.json, summary.json, findings.json, report.html, plots/ (and, when asked,
  the best checkpoint and its export: ``extra``).
"""
from __future__ import annotations

import contextlib
import math
import os
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from callbacks.files import write_json_atomic
from recipes.config import ConfigError, config_from_dict, hparams
from recipes.run.rundir import PLOTS, RunDir, read_json, read_jsonl

__all__ = ["ENV_URI", "STATUS", "MlflowUnavailable", "RunMirror", "experiment_id", "mirror_uri", "mlflow_client",
           "reason_line", "run_url"]

#: The environment variable that names a tracking server when neither ``--mlflow`` nor the config does.
ENV_URI = "KILN_MLFLOW_URI"

#: summary.json's status -> the MLflow run's.
STATUS = {"running": "RUNNING", "completed": "FINISHED", "failed": "FAILED", "diverged": "FAILED",
          "interrupted": "KILLED", "killed": "KILLED"}

#: MLflow's HTTP settings when the environment sets none: its own (7 retries with doubling waits, 120 s
#: timeout) make an unreachable server cost minutes; a run retries at its next sync anyway.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}

BATCH_METRICS, BATCH_PARAMS = 1000, 100  # MLflow's log_batch limits
_NOT_METRICS = ("epoch", "iteration")


class MlflowUnavailable(Exception):
    """The tracking server could not be reached or refused a call; the message is one line."""


def mirror_uri(configured: str, run_dir: str | Path | None = None) -> str | None:
    """The tracking server a run is mirrored to: ``--mlflow`` or the config's, else ``$KILN_MLFLOW_URI``, else the
    server the run directory was mirrored to before (a resume keeps mirroring there); None: no mirror."""
    if configured.strip():
        return configured.strip()
    if os.environ.get(ENV_URI, "").strip():
        return os.environ[ENV_URI].strip()
    if run_dir is not None:
        servers = (read_json(RunDir(run_dir).mlflow) or {}).get("servers") or {}
        mirrored = [uri for uri, entry in servers.items() if isinstance(entry, dict) and entry.get("run_id")]
        if mirrored:
            return mirrored[-1]  # the last server that holds the run (not one that was down when it began)
    return None


def mlflow_client(uri: str) -> Any:
    """An ``MlflowClient`` for ``uri``, with kiln's HTTP defaults where the environment sets none.

    Raises:
        ConfigError: the MLflow client is not installed (one line naming the extra).
    """
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise ConfigError("--mlflow needs the MLflow client: pip install 'kiln[mlflow]'") from None
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    return MlflowClient(tracking_uri=uri)


def reason_line(error: BaseException) -> str:
    """An MLflow or HTTP error in one line: the cause, when it is the connection's (``connection refused``,
    ``timed out``), else the message, cut to 160 characters.

        >>> reason_line(OSError("HTTPConnectionPool(host='127.0.0.1', port=9): Max retries exceeded with url: "
        ...                     "/api/2.0/mlflow/runs/get (Caused by NewConnectionError('[Errno 111] Connection refused'))"))
        'connection refused'
    """
    text = " ".join(str(error).split()) or type(error).__name__
    for cause in ("Connection refused", "timed out", "Name or service not known", "No route to host",
                  "Connection reset", "Remote end closed connection"):
        if cause.lower() in text.lower():
            return cause.lower()
    return text if len(text) <= 160 else text[:157] + "..."


def experiment_id(client: Any, name: str) -> str:
    """The id of the MLflow experiment ``name``, created if missing (a run's, and a sweep's parent run's)."""
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found is not None else client.create_experiment(name)


def run_url(uri: str, experiment: str, run_id: str) -> str:
    """An MLflow run's page on the server ``uri``."""
    return f"{uri.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


class RunMirror:
    """The MLflow run that mirrors one run directory (see the module's docstring).

    Example (a server at ``uri``)::

        mirror = RunMirror("runs/d5", "http://127.0.0.1:5000")
        mirror.sync(final=True)  # everything the server lacks, the artifacts, the final status

    Args:
        run_dir: the run directory.
        uri: the tracking server.
        experiment: the MLflow experiment (default: the recipe's name, from config.json).
        parent_run_id: the MLflow run this one is nested under (a sweep's).
        tags: more tags for the run (e.g. a sweep trial's number).
        run_name: the MLflow run's name (default: the run directory's).
    """

    def __init__(self, run_dir: str | Path, uri: str, experiment: str | None = None, *,
                 parent_run_id: str | None = None, tags: Mapping[str, str] | None = None,
                 run_name: str | None = None) -> None:
        self.run_dir, self.uri = Path(run_dir), uri
        self.experiment, self.parent_run_id, self.tags = experiment, parent_run_id, dict(tags or {})
        self.run_name = run_name or self.run_dir.name
        self.client = mlflow_client(uri)
        recorded = self._recorded()
        self.run_id: str | None = recorded.get("run_id")
        self.down = False  #: the last call to the server failed (LiveMirror says so once, and when it is back)
        self._experiment_id: str | None = recorded.get("experiment_id")
        self._last_step: dict[str, int] | None = None  # the server's last step per metric; None: to be read
        self._running = False  # this process has marked the MLflow run RUNNING

    # -- the run id, kept in RUN_DIR/mlflow.json ------------------------------------------------------------
    def _record(self) -> dict[str, Any]:
        return read_json(RunDir(self.run_dir).mlflow) or {}

    def _recorded(self) -> dict[str, Any]:
        return (self._record().get("servers") or {}).get(self.uri) or {}

    def _write_record(self, **entry: Any) -> None:
        record = self._record()
        record.setdefault("uid", uuid.uuid4().hex)
        record.setdefault("servers", {})[self.uri] = {**record.get("servers", {}).get(self.uri, {}), **entry}
        write_json_atomic(RunDir(self.run_dir).mlflow, record)

    @property
    def url(self) -> str | None:
        """The run's page on the server (None before it exists)."""
        if self.run_id is None or self._experiment_id is None:
            return None
        return run_url(self.uri, self._experiment_id, self.run_id)

    def check(self) -> None:
        """Reach the server: find the experiment (created if missing). Raises :class:`MlflowUnavailable`."""
        with self._calls():
            self._experiment()

    def _experiment(self) -> str:
        if self._experiment_id is None:
            self._experiment_id = experiment_id(self.client, self.experiment or self._config().get("name") or "kiln")
        return self._experiment_id

    def connect(self) -> str:
        """The MLflow run's id: the recorded one, or the one a lost reply created (found by the run directory's
        uid tag), or a new run in the experiment. Raises :class:`MlflowUnavailable`."""
        if self.run_id is not None:
            return self.run_id
        with self._calls():
            self._write_record()  # the uid exists before the run does: a create whose reply is lost is found
            uid = self._record()["uid"]
            experiment = self._experiment()
            runs = self.client.search_runs([experiment], filter_string=f"tags.`kiln.uid` = '{uid}'", max_results=1)
            if runs:
                self.run_id = runs[0].info.run_id
            else:
                tags = {"kiln.uid": uid, "kiln.run_dir": str(self.run_dir.resolve()), **self.tags}
                if self.parent_run_id:
                    tags["mlflow.parentRunId"] = self.parent_run_id
                self.run_id = self.client.create_run(experiment, tags=tags, run_name=self.run_name).info.run_id
            self._write_record(experiment_id=experiment, run_id=self.run_id)
        return self.run_id

    @contextlib.contextmanager
    def _calls(self) -> Iterator[None]:
        """Calls to the server: any error but a file's (an OSError naming a file: the run directory's own) is
        :class:`MlflowUnavailable`, and leaves the server's last steps unknown (a call that failed may have
        landed); ``down`` follows. (requests' errors are OSErrors too, naming no file.)"""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - requests' and MLflow's errors: the server is not usable now
            if isinstance(e, OSError) and e.filename is not None:
                raise
            self._last_step, self.down = None, True
            if isinstance(e, MlflowUnavailable):
                raise
            raise MlflowUnavailable(f"MLflow server at {self.uri} unavailable: {reason_line(e)}") from None
        self.down = False

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Tag the MLflow run (e.g. a pruned sweep trial). Raises :class:`MlflowUnavailable`."""
        with self._calls():
            for key, value in tags.items():
                self.client.set_tag(self.connect(), key, str(value))

    # -- what the run directory holds -----------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        return read_json(RunDir(self.run_dir).config) or {}

    def metrics(self) -> list[tuple[str, float, int]]:
        """Every metric value the run directory holds, as ``(key, value, step)``, in the records' order."""
        out = []
        for record in read_jsonl(RunDir(self.run_dir).metrics):
            out += [(k, v, int(record["epoch"])) for k, v in _values(record).items()]
        for record in read_jsonl(RunDir(self.run_dir).steps):
            out += [(f"train/{k}", v, int(record["iteration"])) for k, v in _values(record).items()]
        return out

    def _params_and_tags(self) -> tuple[dict[str, str], dict[str, str]]:
        data = self._config()
        if not data:
            return {}, {}
        runtime, versions = data.get("runtime") or {}, data.get("versions") or {}
        params = {k: str(v) for k, v in hparams(config_from_dict(data)).items()}
        tags = {"kiln.version": versions.get("kiln"), "kiln.recipe": data.get("name"),
                "kiln.precision": runtime.get("precision"), "kiln.device": runtime.get("device"),
                "kiln.world_size": runtime.get("world_size"), "mlflow.source.git.commit": runtime.get("git_commit")}
        return params, {k: str(v) for k, v in tags.items() if v is not None}

    # -- sending ----------------------------------------------------------------------------------------------
    def sync(self, *, final: bool = False, extra: Mapping[str, str | Path] | None = None) -> int:
        """Send what the server lacks: params and tags (once), new metric values, the status; with ``final``
        also the artifacts (and ``extra``: artifact folder -> file) and the run's end. Returns the number of
        metric values sent. Raises :class:`MlflowUnavailable` (what was not sent goes next time)."""
        with self._calls():
            self.connect()
            values = self.metrics()  # the run directory's records, read once per sync
            if self._last_step is None:
                self._read_server(values)
            sent = self._send_metrics(values)
            status = STATUS.get((read_json(RunDir(self.run_dir).summary) or {}).get("status", "running"), "RUNNING")
            if final:
                self._send_artifacts(extra or {})
                if status == "RUNNING":
                    self.client.update_run(self.run_id, status="RUNNING")
                else:
                    self.client.set_terminated(self.run_id, status=status)
            elif not self._running:
                self.client.update_run(self.run_id, status="RUNNING")  # a resumed run is running again
                self._running = True
        return sent

    def _read_server(self, values: list[tuple[str, float, int]]) -> None:
        """The server's params, tags and last step per metric; params and tags it lacks are sent (none before
        config.json is written: the server is read again until they are)."""
        run = self.client.get_run(self.run_id)
        params, tags = self._params_and_tags()
        if not params:
            return
        new_params = [(k, v) for k, v in params.items() if k not in run.data.params]
        changed = {f"kiln.changed_on_resume.{k}": f"{run.data.params[k]} -> {v}"
                   for k, v in params.items() if k in run.data.params and run.data.params[k] != v}
        new_tags = {k: v for k, v in {**tags, **changed}.items() if run.data.tags.get(k) != v}
        from mlflow.entities import Param, RunTag

        for i in range(0, max(len(new_params), len(new_tags)), BATCH_PARAMS):
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in new_params[i:i + BATCH_PARAMS]],
                                  tags=[RunTag(k, v) for k, v in list(new_tags.items())[i:i + BATCH_PARAMS]])
        last: dict[str, int] = {}
        for key in {key for key, _, _ in values} & set(run.data.metrics):
            last[key] = max(m.step for m in self.client.get_metric_history(self.run_id, key))
        self._last_step = last

    def _send_metrics(self, values: list[tuple[str, float, int]]) -> int:
        from mlflow.entities import Metric

        if self._last_step is None:  # no config.json yet: nothing to send
            return 0
        now = int(time.time() * 1000)
        pending = [Metric(k, v, now, step) for k, v, step in values if step > self._last_step.get(k, -1)]
        for i in range(0, len(pending), BATCH_METRICS):
            batch = pending[i:i + BATCH_METRICS]
            self.client.log_batch(self.run_id, metrics=batch)
            for m in batch:
                self._last_step[m.key] = max(m.step, self._last_step.get(m.key, -1))
        return len(pending)

    def _send_artifacts(self, extra: Mapping[str, str | Path]) -> None:
        paths = RunDir(self.run_dir)
        for path in (paths.config, paths.summary, paths.findings, paths.report, paths.lr_find, paths.lr_find_plot):
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path))
        if paths.plots.is_dir():
            self.client.log_artifacts(self.run_id, str(paths.plots), artifact_path=PLOTS)
        for folder, path in extra.items():
            self.client.log_artifact(self.run_id, str(path), artifact_path=folder)


def _values(record: Mapping[str, Any]) -> dict[str, float]:
    """A record's finite numbers (NaN and Inf stay in the run directory: MLflow's stores differ on them)."""
    out = {}
    for key, value in record.items():
        number = _number(value)
        if key not in _NOT_METRICS and number is not None and math.isfinite(number):
            out[key] = number
    return out
