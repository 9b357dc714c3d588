"""A sweep in MLflow: one parent run for the study, each trial's run nested under it (``mlflow.parentRunId``)."""
from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, TextIO

from recipes.tracking.mirror import experiment_id, mlflow_client, reason_line, run_url

__all__ = ["SweepMirror"]


class SweepMirror:
    """The parent MLflow run of a sweep's study, shared by every worker on the study: its id is kept in the
    study's user attrs (``mlflow_run:URI``), so a worker on another machine nests its trials under the same run.

    Trials are mirrored by :func:`recipes.tracking.open_mirror` with ``parent_run_id=`` :attr:`run_id`; the
    parent gets the search space as params, and the best value and trial counts when the results are written.

    Example::

        parent = SweepMirror(study, "http://127.0.0.1:5000", "digits")
        ...  # trials, each open_mirror(cfg, trial_dir, uri=parent.uri, parent_run_id=parent.run_id)
        parent.finish({"best_val_accuracy": 0.99}, {"trials": 12})
    """

    def __init__(self, study: Any, uri: str, experiment: str, stream: TextIO | None = None) -> None:
        self.study, self.uri, self.experiment, self.stream = study, uri, experiment, stream or sys.stdout
        self.client = mlflow_client(uri)
        self.run_id: str | None = None

    def start(self, params: Mapping[str, str]) -> str | None:
        """The parent run's id (created by the first worker, with ``params``); None, with one line, when the server
        cannot be reached (the trials are then mirrored unnested, or sent later with ``kiln mlflow-sync``)."""
        key = f"mlflow_run:{self.uri}"
        self.run_id = self.study.user_attrs.get(key)
        if self.run_id is not None:
            return self.run_id
        try:
            run = self.client.create_run(experiment_id(self.client, self.experiment), run_name=f"{self.study.study_name} (sweep)",
                                         tags={"kiln.sweep": self.study.study_name})
            self.client.log_batch(run.info.run_id, params=_params(params))
        except Exception as e:  # noqa: BLE001 - the server is not usable: the sweep goes on without a parent
            print(f"kiln: MLflow server at {self.uri} unavailable: {reason_line(e)}; the sweep goes on, its trials "
                  "unnested", file=self.stream)
            return None
        self.study.set_user_attr(key, run.info.run_id)
        self.run_id = run.info.run_id
        return self.run_id

    def finish(self, metrics: Mapping[str, float], tags: Mapping[str, Any]) -> None:
        """The sweep's results on the parent run (``metrics`` at step 0, ``tags`` as text), and FINISHED, and one line
        with its address; a server that cannot be reached is one line."""
        if self.run_id is None:
            return
        try:
            for key, value in metrics.items():
                self.client.log_metric(self.run_id, key, float(value), step=0)
            for key, value in tags.items():
                self.client.set_tag(self.run_id, key, str(value))
            self.client.set_terminated(self.run_id, status="FINISHED")
            url = run_url(self.uri, self.client.get_run(self.run_id).info.experiment_id, self.run_id)
            print(f"mlflow: {url} (the sweep's run; its trials are nested under it)", file=self.stream)
        except Exception as e:  # noqa: BLE001
            print(f"kiln: the sweep's results did not reach MLflow at {self.uri}: {reason_line(e)}", file=self.stream)


def _params(params: Mapping[str, str]) -> list:
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in list(params.items())[:100]]
