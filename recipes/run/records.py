"""A run directory's records as kiln reads them back: config.json, and the JSONL files a resume repairs.

config.json is kiln's record of a run, never an input: the checkpoint holds the config a run continues
with, and a resume refuses to overwrite a config.json someone edited (:func:`check_config_record`).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from callbacks.files import append_jsonl, cut_torn_last_line
from recipes import RECIPES
from recipes.config import (
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
)
from recipes.run.checkpoints import _flatten, with_run_precision
from recipes.run.rundir import RECORDS, RunDir, read_json_strictly

__all__ = ["check_config_record", "cut_torn_records", "read_config_json", "run_config"]


def read_config_json(run_dir: str | Path, hint: str = "restore the file kiln wrote") -> dict[str, Any] | None:
    """RUN_DIR/config.json as a dict, or None when there is none.

    Raises:
        ConfigError: one line naming the file (:func:`recipes.run.rundir.read_json_strictly`; ``hint``
            says what to do about a file that does not parse).
    """
    return read_json_strictly(RunDir(run_dir).config, hint)


def run_config(run_dir: str | Path, hint: str = "restore the file kiln wrote") -> Config | None:
    """The :class:`Config` recorded in RUN_DIR/config.json, or None when there is none.

    Raises:
        ConfigError: see :func:`read_config_json`; or a config this kiln cannot use (named with the file).
    """
    data = read_config_json(run_dir, hint)
    if data is None:
        return None
    try:
        return config_from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{RunDir(run_dir).config} holds a config this kiln cannot use: {e}") from None


def check_config_record(last: Path, saved: Config, checkpoint: Mapping[str, Any], *, epochs: int | None = None) -> None:
    """Refuse to resume over a config.json that no longer records the checkpoint's config.

    ``saved`` is the config of ``checkpoint`` (at ``last``, in RUN_DIR/checkpoints/). Every key counts,
    except ``train.precision`` auto against the name it resolved to (a resume writes that name into
    config.json, while the checkpoint it resumed from may still say auto) and ``train.epochs`` when the
    resume sets it (``epochs``). No config.json: nothing to compare.

    Raises:
        ConfigError: config.json cannot be read or parsed, or differs from the checkpoint's config
            (the keys named, with the command that changes a run's config).
    """
    run_dir = RunDir.of_checkpoint(last).root
    recipe = saved.name if saved.name in RECIPES else "RECIPE"
    recorded = run_config(run_dir, hint=f"kiln train {recipe} --resume {last} --force (with the run's options) "
                                        "writes it anew")
    if recorded is None:
        return
    want = _flatten(config_to_dict(with_run_precision(saved, checkpoint)))
    got = _flatten(config_to_dict(with_run_precision(recorded, checkpoint)))
    keys = [k for k in sorted(set(want) | set(got)) if want.get(k) != got.get(k) and not (k == "train.epochs" and epochs)]
    if keys:
        changes = "; ".join(f"{k}: {want.get(k)!r} -> {got.get(k)!r}" for k in keys)
        raise ConfigError(f"{RunDir(run_dir).config} was edited by hand ({changes}); kiln does not read edits: "
                          f"use kiln train {recipe} --resume {last} --set KEY=VALUE --force to change the run")


def cut_torn_records(run_dir: Path, events_path: Path, iteration: int) -> dict[str, int]:
    """Cut a torn last line off each of RUN_DIR's :data:`RECORDS`, with an events.jsonl line per file cut.

    Called when a run is resumed, before anything is appended. Returns ``{file name: bytes dropped}``
    for the files that had one.
    """
    torn = {name: cut_torn_last_line(run_dir / name) for name in RECORDS}
    torn = {name: dropped for name, dropped in torn.items() if dropped}
    for name, dropped in torn.items():
        append_jsonl(events_path, {"event": "torn_line_dropped", "file": name, "bytes": dropped, "iteration": iteration})
    return torn
