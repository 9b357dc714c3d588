"""``kiln sweep``: an Optuna study over a recipe's hyperparameters; every trial is a normal kiln run.

One study (TPE, seeded, maximising the best val_accuracy) lives in an Optuna storage: SQLite in the
sweep directory by default, or any SQLAlchemy URL, so several workers (processes or machines) share
it. Trial ``k`` trains in ``DIR/trials/kkk`` with :func:`recipes.run.train` in this process and an
:class:`callbacks.OptunaPruning` on its trainer. Workers send heartbeats: the RUNNING trial of a worker
that died is marked FAILED by the next worker that looks (after the grace period), and the study goes
on. At the end: a table, ``DIR/sweep.json``, ``DIR/best.yaml`` (a recipe file `kiln train` accepts),
``DIR/plots/*.png`` and ``DIR/sweep.html``.

Its parts: ``space`` (what is searched), ``storage`` (where the study lives), ``worker`` (the trials) and
``results`` (the table, best.yaml, sweep.json). The page (plots, sweep.html) is drawn by the report wing,
``recipes.report.sweep_page``, which the CLI hands to :func:`run_sweep` as ``draw``.
"""
from __future__ import annotations

from recipes.tools.sweep.results import SweepResult, format_table, write_results
from recipes.tools.sweep.space import ParamSpec, TrialSeededTPE, default_space, parse_param, trial_config
from recipes.tools.sweep.storage import CONNECT_TIMEOUT, open_study
from recipes.tools.sweep.worker import SweepInterrupted, run_sweep

__all__ = ["CONNECT_TIMEOUT", "ParamSpec", "SweepInterrupted", "SweepResult", "TrialSeededTPE", "default_space",
           "format_table", "open_study", "parse_param", "run_sweep", "trial_config", "write_results"]
