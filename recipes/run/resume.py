"""Continuing a stopped run from its last.pt, in its own run directory, exactly where it stopped."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import ignite.distributed as idist
from ignite.handlers import Checkpoint

from callbacks import OneCycle
from callbacks.files import append_jsonl, truncate_jsonl
from recipes import RECIPES
from recipes.config import Config, ConfigError, apply_overrides, flatten_config
from recipes.run.build import Assembly, build, write_config
from recipes.run.checkpoints import (find_last_checkpoint, load_checkpoint, run_changing_differences,
                                     with_run_precision)
from recipes.run.lock import RunLock
from recipes.run.rundir import LOCK, RunDir, cut_torn_records, read_json, read_summary, run_config
from recipes.run.train import execute

__all__ = ["ResumePlan", "plan_resume", "resume", "run_dir_of"]


@dataclass
class ResumePlan:
    """What :func:`plan_resume` found: the checkpoint, its config, the config to continue with, where."""

    last: Path
    checkpoint: dict[str, Any]
    saved: Config
    config: Config
    iteration: int
    epoch_length: int
    finished: bool  #: the run already ended (all epochs, or early stopping) and nothing changes that


def plan_resume(source: str | Path, *, epochs: int | None = None, new_schedule: bool = False,
                requested: Config | None = None, force: bool = False, world_size: int | None = None) -> ResumePlan:
    """Check that the run at ``source`` can continue as asked (see :func:`resume`), without building it.

    Raises:
        ConfigError: a missing or unusable run directory or checkpoint, a refused config change, a
            schedule change without ``new_schedule``, a different number of processes, or (unless
            ``force``) a config.json that is not valid JSON or was edited by hand.
    """
    source = Path(source)
    if source.suffix != ".pt":
        _refuse_a_run_without_checkpoint(source)
    last = source if source.suffix == ".pt" else find_last_checkpoint(source)
    checkpoint, saved = load_checkpoint(last, resumable=True)
    if not force:  # config.json is a record: an edit to it is refused, never silently overwritten
        check_config_record(last, saved, checkpoint, epochs=epochs)
    cfg = saved
    if requested is not None:
        changes = run_changing_differences(saved, requested)
        if changes and not force:
            raise ConfigError("the config differs from the checkpoint's in fields that change the run: "
                              + "; ".join(changes) + " (pass --force to continue anyway)")
        cfg = requested
    saved_world = int(checkpoint["kiln"].get("world_size", 1))
    world_size = idist.get_world_size() if world_size is None else world_size
    if saved_world != world_size:
        raise ConfigError(f"{last} was written by {saved_world} process(es) and the batch order depends on it: "
                          f"resume with --nproc-per-node {saved_world}")
    trainer_state = checkpoint["trainer"]
    iteration, epoch_length = int(trainer_state["iteration"]), int(trainer_state["epoch_length"])
    saved_epochs = saved.train.epochs
    finished = False
    if epochs is not None and epochs != saved_epochs:
        if epochs * epoch_length < iteration:
            raise ConfigError(f"the run is already past epoch {epochs} (iteration {iteration})")
        if not new_schedule:
            raise ConfigError(f"the one-cycle schedule spans {saved_epochs} epochs; running {epochs} would change it "
                              "(pass --new-schedule for a second one-cycle over the added epochs)")
        cfg = apply_overrides(cfg, {"train.epochs": epochs})
    elif cfg.train.epochs == saved_epochs:
        stopped_early = (checkpoint.get("early_stop") or {}).get("stopped_epoch")
        finished = iteration >= saved_epochs * epoch_length or bool(stopped_early)
    return ResumePlan(last, checkpoint, saved, with_run_precision(cfg, checkpoint), iteration, epoch_length, finished)


def run_dir_of(source: str | Path) -> Path:
    """The run directory of ``source``: RUN_DIR itself, or the one a RUN_DIR/checkpoints/*.pt belongs to."""
    source = Path(source)
    return source.parent.parent if source.suffix == ".pt" else source


def _refuse_a_run_without_checkpoint(run_dir: Path) -> None:
    """A run killed before its first checkpoint has nothing to resume: say how to start it over instead."""
    paths = RunDir(run_dir)
    if not run_dir.is_dir() or paths.last.exists():
        return
    names = {p.name for p in run_dir.iterdir()}
    if not (paths.holds_a_run(names) or names == {LOCK}):
        return  # not a kiln run directory: find_last_checkpoint says so
    config = read_json(paths.config) or {}
    try:
        status = f", status {read_summary(run_dir)[0]['status']}"
    except ConfigError:  # no summary.json and nothing to rebuild it from
        status = ""
    recipe = config.get("name") if isinstance(config.get("name"), str) else "RECIPE"
    raise ConfigError(f"{run_dir} stopped before its first checkpoint (no checkpoints/last.pt{status}): nothing to "
                      f"resume; start it over with: kiln train {recipe} --out {run_dir} --force")


def resume(source: str | Path, *, epochs: int | None = None, new_schedule: bool = False,
           requested: Config | None = None, force: bool = False, quiet: bool = False,
           stream: TextIO | None = None, extra_handlers: dict[str, Any] | None = None) -> Assembly:
    """Continue the run whose run directory (or last.pt) is ``source``, in the same run directory.

    The finished run equals the uninterrupted one: weights, optimizer, schedule, scaler, counters and
    the data position come from last.pt; lines the stopped process wrote after it are dropped from
    metrics.jsonl and steps.jsonl, and TensorBoard drops its points from that step on. A torn last line
    (a crash mid-append) is cut from each .jsonl record, with a ``torn_line_dropped`` event.

    Args:
        source: RUN_DIR, or a path to its checkpoints/last.pt.
        epochs: extend (or set) the run's length; refused if it changes the one-cycle schedule,
            unless ``new_schedule`` (a second one-cycle over the added epochs).
        requested: a config that must match the checkpoint's (``kiln train --resume``); run-changing
            differences are refused unless ``force``.
        force: continue despite run-changing differences in ``requested``.
        quiet: no progress bar or epoch lines.
        extra_handlers: name -> handler, attached to the trainer after the recipe's own (as ``train`` does;
            e.g. ``kiln sweep``'s ``OptunaPruning`` on a trial it resumes).

    The plots, report.html and findings are not redrawn here: ``recipes.report.finish_run(run.run_dir)``.

    The run directory is locked first (:class:`~recipes.run.lock.RunLock`): one process continues a run.

    Raises:
        ConfigError: a missing or unusable run directory or checkpoint (for a run killed before its first
            checkpoint: how to start it over), a refused config change, another kiln process in the directory.
    """
    if idist.get_rank() == 0:  # before anything is read: one process continues a run
        RunLock.take(run_dir_of(source), create=False)
    plan = plan_resume(source, epochs=epochs, new_schedule=new_schedule, requested=requested, force=force)
    last, checkpoint, saved, cfg = plan.last, plan.checkpoint, plan.saved, plan.config
    run_dir, iteration, epoch_length, saved_epochs = last.parent.parent, plan.iteration, plan.epoch_length, saved.train.epochs
    trainer_state = checkpoint["trainer"]
    if plan.finished:  # nothing to run: the Assembly says how the run ended (``ran`` stays False)
        run = build(cfg, run_dir, quiet=True)
        run.status = "completed"
        return run

    run = build(cfg, run_dir, quiet=quiet, stream=stream, resume_from_iteration=iteration,
                extra_handlers=extra_handlers)
    objects = run.to_save()
    objects.pop("kiln")
    for name in ("ema", "ema_model", "early_stop"):  # switched on by a --force'd config change: they start afresh
        if name not in checkpoint:
            objects.pop(name, None)
    if new_schedule and epochs is not None and epochs != saved_epochs:  # a second one-cycle over the added epochs
        objects.pop("schedule")
        remaining = OneCycle.total_steps_for(epochs, epoch_length, cfg.train.accumulation_steps) - checkpoint["trainer"]["optimizer_step"]
        run.handlers["schedule"].restart(max(1, remaining))
    objects["checkpointer"] = run.handlers["checkpointer"]
    trainer_state = dict(trainer_state)
    trainer_state["max_epochs"] = cfg.train.epochs
    checkpoint = {**checkpoint, "trainer": trainer_state}
    Checkpoint.load_objects(objects, checkpoint)
    started_from = (checkpoint.get("kiln") or {}).get("inference", {}).get("initial_weights")
    if started_from is not None:  # the weights the run started from, loaded before this resume: still its record
        run.inference["initial_weights"] = started_from
    if run.writes:
        cut_torn_records(run_dir, run.events_path, iteration)  # a crash mid-append: before anything is appended
        for path in (RunDir(run_dir).metrics, RunDir(run_dir).steps):
            truncate_jsonl(path, iteration)
        write_config(run)
        append_jsonl(run.events_path, {"event": "resume", "iteration": iteration, "epoch": iteration // epoch_length,
                                       "checkpoint": str(last), "epochs": cfg.train.epochs})
    return execute(run)


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
    run_dir = RunDir.of_checkpoint(last)
    recipe = saved.name if saved.name in RECIPES else "RECIPE"
    recorded = run_config(run_dir.root, hint=f"kiln train {recipe} --resume {last} --force (with the run's options) "
                                             "writes it anew")
    if recorded is None:
        return
    want = flatten_config(with_run_precision(saved, checkpoint))
    got = flatten_config(with_run_precision(recorded, checkpoint))
    keys = [k for k in sorted(set(want) | set(got)) if want.get(k) != got.get(k) and not (k == "train.epochs" and epochs)]
    if keys:
        changes = "; ".join(f"{k}: {want.get(k)!r} -> {got.get(k)!r}" for k in keys)
        raise ConfigError(f"{run_dir.config} was edited by hand ({changes}); kiln does not read edits: "
                          f"use kiln train {recipe} --resume {last} --set KEY=VALUE --force to change the run")
