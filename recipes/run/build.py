"""The run assembly: a config becomes data, model, optimizer, trainer, handlers and a run directory."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import ignite.distributed as idist
import torch
import yaml
from ignite.metrics import Accuracy, ConfusionMatrix, Loss, TopKCategoricalAccuracy

from callbacks import (AMP, EMA, Checkpointer, EarlyStop, GracefulStop, GradClip, MetricsLog, MixUpCutMix, NanGuard,
                       Progress, RunSummary, TensorBoard, Validation)
from callbacks.files import append_jsonl, os_error_line, write_json_atomic
from engine import Precision, create_evaluator, create_trainer
from engine.rng import RNGState
from recipes.config import Config, ConfigError, config_to_dict, hparams, with_class_count
from recipes.data import mix_seed, num_samples
from recipes.run.checkpoints import RunMeta
from recipes.run.compiled import CompiledForward
from recipes.run.inference import inference_record
from recipes.run.lock import RunLock, discarded_on_failure
from recipes.run.rundir import LOCK, RUN_FILES, RunDir
from recipes.run.parts import (initial_weights_file, load_initial_weights, make_data, make_fine_tune, make_loss,
                               make_model, make_optimizer, make_schedule, resolve_freeze_epochs, resolve_runtime,
                               resolve_memory_budget, what_trains)

__all__ = ["Assembly", "build", "git_commit", "make_run_dir", "versions", "write_config"]


@dataclass
class Assembly:
    """Everything a run is made of; ``handlers`` maps a name to each attached handler, in attach order.

    After :func:`train` or :func:`resume`: ``status`` is how it ended (completed, interrupted, ...)
    and ``stop_signal`` the signal number that stopped it, if one did. ``class_names`` go into
    config.json (runtime) and into every checkpoint's ``kiln`` section.
    """

    config: Config
    run_dir: Path
    device: torch.device
    precision: Precision
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    trainer: Any
    evaluator: Any
    train_data: Any
    val_data: Any
    handlers: dict[str, Any] = field(default_factory=dict)
    status: str = "built"
    ran: bool = False  #: the trainer ran (``execute``): the run directory has new records to report on
    stop_signal: int | None = None
    class_names: list[str] = field(default_factory=list)  #: the data set's classes, in label order
    world_size: int = 1  #: data-parallel processes; only rank 0 writes files and prints
    inference: dict[str, Any] = field(default_factory=dict)  #: how to rebuild and feed the model (inference_record)
    #: what the run's first lines said of it (``what_trains``, ``data_reading``): config.json's runtime keeps them
    #: for the report
    said: dict[str, str] = field(default_factory=dict)

    @property
    def writes(self) -> bool:
        """Whether this process writes the run directory (rank 0 of a data-parallel group)."""
        return idist.get_rank() == 0

    @property
    def stopped_early(self) -> bool:
        """Whether EarlyStop ended the run before its last epoch: finished by its own rule, not cut short."""
        early_stop, s = self.handlers.get("early_stop"), self.trainer.state
        return (early_stop is not None and early_stop.stopped_epoch is not None
                and s.iteration < s.max_epochs * s.epoch_length)

    @property
    def events_path(self) -> Path:
        """RUN_DIR/events.jsonl."""
        return RunDir(self.run_dir).events

    def to_save(self) -> dict[str, Any]:
        """What last.pt holds: every object whose state the run needs to continue."""
        names = ("amp", "schedule", "summary", "nan_guard")
        optional = {n: self.handlers[n] for n in ("ema", "early_stop") if n in self.handlers}
        if "ema" in self.handlers:  # the averaged weights: validation, best-* and `kiln eval` use them
            optional["ema_model"] = self.handlers["ema"].ema_model
        return {"trainer": self.trainer, "model": self.model, "optimizer": self.optimizer,
                **{n: self.handlers[n] for n in names}, **optional, "rng": RNGState(), "kiln": self.meta()}

    def meta(self) -> RunMeta:
        """The ``kiln`` section of this run's checkpoints: the config, the class names, the process count,
        the precision ``auto`` resolved to (resume, eval and predict keep it) and the inference record."""
        return RunMeta(self.config, extra={"class_names": list(self.class_names), "world_size": self.world_size,
                                           "precision": self.precision.name, "inference": self.inference})


def versions() -> dict[str, str]:
    """The versions a run was made with (written into config.json).

    torchvision's comes from its installed metadata (e.g. ``0.29.1``, without a ``+cu130`` local tag):
    importing torchvision only to read its version would cost a digits run 0.2 s.
    """
    import ignite

    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": _installed_version("torchvision"), "ignite": ignite.__version__,
            "kiln": _installed_version("kiln")}


def git_commit(folder: str | Path = ".") -> str | None:
    """The commit checked out in the git work tree around ``folder`` (where the run was started), or None when
    there is none or git is missing: config.json records it, and an MLflow mirror tags the run with it."""
    import subprocess

    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def _installed_version(distribution: str) -> str:
    try:
        from importlib.metadata import version

        return version(distribution)
    except Exception:  # not installed as a distribution (e.g. kiln run from a checkout)
        return "0+unknown"


def make_run_dir(cfg: Config, out: str | Path | None, *, force: bool = False, writes: bool = True) -> Path:
    """``out``, or ``runs/<recipe>-<timestamp>``: created and locked for this process (:class:`RunLock`)
    before any data is loaded, then checked to hold nothing but the lock file.

    With ``force``, a run that stopped before its first checkpoint (and no live process holds) is
    cleared and started over; a run with checkpoints, or files kiln did not write, are still refused.
    ``writes=False`` (data-parallel ranks other than 0) only names the directory.

    Raises:
        ConfigError: the directory is in use by another kiln process, holds files, or cannot be created
            or written (one line with the path and the cause: read-only file system, permission denied...).
    """
    if out is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = Path("runs") / f"{cfg.name}-{stamp}"
    run_dir = Path(out)
    if not writes:
        return run_dir
    if LOCK not in _entries(run_dir):  # not locked before: refuse without leaving a lock file in it
        _check_can_start(run_dir, force)
    RunLock.take(run_dir, busy_hint="wait for it to end, or pick another --out")
    with discarded_on_failure(run_dir):
        if _check_can_start(run_dir, force):
            _start_over(run_dir)
    return run_dir


def _entries(run_dir: Path) -> set[str]:
    """The names in ``run_dir`` (none if it does not exist yet)."""
    if not os.path.lexists(run_dir):  # also False for a name too long: creating it then says why
        return set()
    try:
        return {p.name for p in run_dir.iterdir()}
    except NotADirectoryError:
        raise ConfigError(f"{run_dir} is a file, not a directory; pick another --out") from None
    except OSError as e:
        raise ConfigError(f"cannot read the run directory: {os_error_line(e, run_dir)}") from None


def _check_can_start(run_dir: Path, force: bool) -> bool:
    """Whether ``run_dir`` holds a run to clear first (``force``); raises if a new run may not start there."""
    files = _entries(run_dir) - {LOCK}
    if not files:
        return False
    has_checkpoints = RunDir(run_dir).last.exists()  # what `kiln resume` continues from
    is_run = RunDir(run_dir).holds_a_run(files)
    foreign = sorted(n for n in files if n not in RUN_FILES and not (n.startswith(".") and n.endswith(".tmp")))
    if force and is_run and not has_checkpoints and not foreign:
        return True
    if has_checkpoints:
        advice = "--force starts over only a run that stopped before its first checkpoint; " if force else ""
        raise ConfigError(f"{run_dir} already exists and holds a run with checkpoints; {advice}continue it with "
                          f"`kiln resume {run_dir}`, or pick another --out")
    if is_run and not foreign:
        raise ConfigError(f"{run_dir} holds a run that stopped before its first checkpoint; start it over with "
                          "--force, or pick another --out")
    kiln_run = " (--force starts over only a kiln run)" if force else ""
    raise ConfigError(f"{run_dir} already exists and is not empty{kiln_run}; pick another --out")


def _start_over(run_dir: Path) -> None:
    """Remove what a run that never reached its first checkpoint left (``kiln train --force``)."""
    for name in sorted(_entries(run_dir) - {LOCK}):
        path = run_dir / name
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError as e:
            raise ConfigError(f"cannot clear the run to start over: {os_error_line(e)}") from None


def _shard(data: Any, rank: int, world_size: int) -> Any:
    """Make ``data`` (TensorBatches or LoaderBatches) read this rank's share of every epoch's order."""
    data.sampler.rank, data.sampler.world_size = rank, world_size
    return data


def build(cfg: Config, run_dir: str | Path, *, quiet: bool = False, stream: TextIO | None = None,
          resume_from_iteration: int | None = None, extra_handlers: dict[str, Any] | None = None) -> Assembly:
    """Assemble a run of ``cfg`` writing into ``run_dir`` (created), without starting it.

    First this process takes the run directory's lock (:class:`RunLock`; rank 0 under data parallelism),
    before any data is loaded: another kiln process writing there, or a directory that cannot be
    written, is a one-line ConfigError. If the assembly fails before anything is written, the lock and
    the directories it made are removed again.

    Handlers are attached in this order, written once here: AMP, GradClip, OneCycle, Validation, RunSummary,
    (when fine-tuning) FineTune, MetricsLog, TensorBoard, (when on) EMA, MixUpCutMix, EarlyStop, then NanGuard,
    Checkpointer, GracefulStop, Progress, then ``extra_handlers`` (name -> handler; they join ``run.handlers``: e.g.
    ``kiln sweep``'s OptunaPruning). None depends on that order for correctness: each acts on the step or
    epoch event that guarantees what it needs.
    """
    if idist.get_rank() == 0:
        RunLock.take(run_dir)
    with discarded_on_failure(run_dir):  # a run that failed before it began leaves no run directory behind
        return _assemble(cfg, Path(run_dir), quiet=quiet, stream=stream, resume_from_iteration=resume_from_iteration,
                         extra_handlers=extra_handlers or {})


def _assemble(cfg: Config, run_dir: Path, *, quiet: bool, stream: TextIO | None,
              resume_from_iteration: int | None, extra_handlers: dict[str, Any]) -> Assembly:
    """:func:`build`, once the run directory is locked. One long function on purpose: the run is assembled in
    one pass, top to bottom, in the attach order :func:`build` documents."""
    t = cfg.train
    device, precision = resolve_runtime(cfg)
    rank, world_size = idist.get_rank(), idist.get_world_size()
    writes = rank == 0
    quiet = quiet or not writes

    resuming = RunDir(run_dir).last.exists()  # a resumed run has its weights and its resolved config
    weights_file = None
    if cfg.model.weights and not resuming:
        weights_file = initial_weights_file(cfg)  # named weights fetched now, before the data are loaded
    if not resuming:  # "auto" made concrete, so that a resume reads the data the same way
        cfg = resolve_memory_budget(cfg)
    torch.manual_seed(t.seed)
    data = make_data(cfg, device)
    cfg = with_class_count(cfg, data.num_classes)  # config.json and checkpoints say how many classes there are
    train_data, val_data, num_classes = data.train, data.val, data.num_classes
    if world_size > 1:  # each rank reads every world_size-th sample of the same (seed, epoch) order
        _shard(train_data, rank, world_size)
        _shard(val_data, rank, world_size)
    model = make_model(cfg, data.in_channels, num_classes)
    weights_note, initial_weights = None, None
    if weights_file is not None:
        weights_note, initial_weights = load_initial_weights(model, *weights_file)
    if not resuming:  # a new run: "auto" made concrete, so a resume keeps what it chose
        cfg = resolve_freeze_epochs(cfg, bool(initial_weights and initial_weights["head_replaced"]))
    if cfg.finetune.freeze_epochs > 0 and world_size > 1:
        raise ConfigError("finetune.freeze_epochs: a frozen body is for one process for now (DDP must see every "
                          "parameter train); set --set finetune.freeze_epochs=0 with --nproc-per-node")
    model = model.to(device)
    memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    ddp_model = model
    if world_size > 1:  # DDP (gradients all-reduced); `model` stays the plain module that checkpoints hold
        ddp_model = idist.auto_model(model, sync_bn=t.sync_bn)
        model = ddp_model.module
    optimizer = make_optimizer(cfg, model)
    loss_fn = make_loss(cfg)
    forward = CompiledForward(ddp_model, t.compile_backend) if t.compile else ddp_model  # checkpoints keep `model`
    step_seed = t.seed if rank == 0 else mix_seed(t.seed, rank)  # dropout masks differ between ranks
    trainer = create_trainer(forward, optimizer, loss_fn, device=device, precision=precision,
                             accumulation_steps=t.accumulation_steps, seed=step_seed, memory_format=memory_format)
    ema = EMA(model, decay=t.ema_decay) if t.ema_decay else None  # validation runs on the EMA weights
    evaluator = create_evaluator(ema.ema_model if ema is not None else model,
                                 {"accuracy": Accuracy(device=device), "loss": Loss(torch.nn.CrossEntropyLoss(), device=device),
                                  **({"top5_accuracy": TopKCategoricalAccuracy(k=5, device=device)} if num_classes > 5 else {}),
                                  "confusion_matrix": ConfusionMatrix(num_classes, device=device)},
                                 device=device, precision=precision, memory_format=memory_format)
    paths = RunDir(run_dir)
    purge = resume_from_iteration + 1 if resume_from_iteration is not None else None
    handlers: dict[str, Any] = {
        "amp": AMP(device=device.type, init_scale=t.init_scale, growth_interval=t.growth_interval),
        "grad_clip": GradClip(model.parameters(), max_norm=t.clip_norm or None),
        "schedule": make_schedule(cfg, optimizer, len(train_data)),
        "validation": Validation(evaluator, val_data),
        "summary": RunSummary(paths.summary),
    }
    fine_tune = make_fine_tune(cfg, model, handlers["schedule"], len(train_data))
    if fine_tune is not None:
        handlers["fine_tune"] = fine_tune
    if writes:  # one process writes the run's records
        handlers["metrics_log"] = MetricsLog(paths.metrics, paths.steps, every=t.log_every)
        run_hparams = {**hparams(cfg), "runtime.world_size": world_size,
                       "runtime.global_batch_size": cfg.data.batch_size * world_size}
        handlers["tensorboard"] = TensorBoard(paths.tensorboard, every=t.log_every, purge_step=purge, hparams=run_hparams,
                                              config_text=yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    events_path = paths.events if writes else None
    if ema is not None:
        handlers["ema"] = ema
    if t.mixup_alpha or t.cutmix_alpha:
        handlers["mix"] = MixUpCutMix(num_classes, mixup_alpha=t.mixup_alpha, cutmix_alpha=t.cutmix_alpha, seed=t.seed)
    if t.early_stop_patience:
        handlers["early_stop"] = EarlyStop(t.early_stop_patience, min_delta=t.early_stop_min_delta)
    to_snapshot = {"model": model, "optimizer": optimizer, "schedule": handlers["schedule"]}
    if precision.needs_scaler:
        to_snapshot["scaler"] = handlers["amp"].scaler  # the scaler only: AMP's skip count is history, not state
    if ema is not None:  # a rollback restores the average too, not only the weights it follows
        to_snapshot.update(ema_model=ema.ema_model, ema=ema)
    g = cfg.guard
    handlers["nan_guard"] = NanGuard(
        model, optimizer, to_snapshot=to_snapshot, schedule=handlers["schedule"],
        scaler=handlers["amp"].scaler if precision.needs_scaler else None, policy=g.on_nan,
        check_every=g.check_every, max_skips=g.max_skips, lr_factor=g.lr_factor,
        max_rollbacks=g.max_rollbacks, max_consecutive_skips=g.collapse_skips,
        min_loss_scale=g.min_loss_scale, max_loss_ratio=g.max_loss_ratio or None,
        events_path=events_path)
    run = Assembly(cfg, run_dir, device, precision, model, optimizer, trainer, evaluator, train_data, val_data, handlers,
                   class_names=data.class_names, world_size=world_size,
                   inference=inference_record(cfg, data.in_channels, num_classes, data.preprocessing,
                                              initial_weights=initial_weights))
    run.said = {"what_trains": what_trains(cfg, model, fine_tune), **({"data_reading": data.reading} if data.reading else {})}
    if data.reading and writes and not quiet:
        print(f"kiln: data: {data.reading}", file=stream or sys.stdout)
    if weights_note is not None and writes:
        append_jsonl(run.events_path, {"event": "weights", "path": cfg.model.weights, "note": weights_note,
                                       **initial_weights})
        if not quiet:
            print(f"kiln: {weights_note}", file=stream or sys.stdout)
    if writes and not quiet:  # the parameter count; what a fine-tune trains, and when
        print(f"kiln: {run.said['what_trains']}", file=stream or sys.stdout)
    c = cfg.checkpoint
    best_to_save = {"model": model, "kiln": run.meta()}
    if ema is not None:  # best-* are ranked by the EMA's val_accuracy: they hold the EMA weights too
        best_to_save["ema_model"] = ema.ema_model
    handlers["checkpointer"] = Checkpointer(
        paths.checkpoints, run.to_save(), best_to_save=best_to_save,
        every_iterations=c.every_iterations, every_minutes=c.every_minutes, keep_best=c.keep_best,
        events_path=events_path)
    handlers["graceful_stop"] = GracefulStop()
    handlers["progress"] = Progress(quiet=quiet, stream=stream, line_seconds=t.progress_seconds, evaluator=evaluator)
    handlers.update(extra_handlers)
    for name, handler in handlers.items():
        if writes or name != "summary":  # the summary object exists on every rank for its checkpointed state
            handler.attach(trainer)
    return run


def write_config(run: Assembly) -> None:
    """config.json: the resolved recipe, plus what it resolved to on this machine and the versions."""
    if not run.writes:
        return
    write_json_atomic(RunDir(run.run_dir).config, {
        **config_to_dict(run.config),
        "runtime": {"device": str(run.device), "precision": run.precision.name,
                    "batches_per_epoch": len(run.train_data), "val_samples": num_samples(run.val_data),
                    "class_names": list(run.class_names), **run.inference, "world_size": run.world_size,
                    "global_batch_size": run.config.data.batch_size * run.world_size,
                    "parameters": sum(p.numel() for p in run.model.parameters()),
                    "command": " ".join(sys.argv), **run.said,
                    **({"git_commit": commit} if (commit := git_commit()) else {})},
        "versions": versions(),
    })
