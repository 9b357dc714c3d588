"""The run assembly: a config becomes data, model, optimizer, trainer, handlers and a run directory."""
from __future__ import annotations

import dataclasses
import datetime as _dt
import platform
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import ignite.distributed as idist
import torch
from ignite.handlers import Checkpoint
from ignite.metrics import Accuracy, Loss

from callbacks import (AMP, Checkpointer, GracefulStop, GradClip, MetricsLog, NanGuard, OneCycle, Progress, RunSummary,
                       TensorBoard, Validation)
from callbacks._files import append_jsonl, truncate_jsonl, write_json_atomic
from callbacks.nan_diagnosis import summarize_diagnosis
from callbacks import EMA, EarlyStop, MixUpCutMix
from engine import Precision, create_evaluator, create_trainer, resolve_device, resolve_precision
from engine.rng import RNGState
from recipes.compiled import CompiledForward
from recipes.checkpoints import RunMeta, find_last_checkpoint, load_checkpoint, run_changing_differences
from recipes.config import Config, ConfigError, apply_overrides, config_to_dict
from recipes.data import (DataError, EpochBatchSampler, LoaderBatches, TensorBatches, digits_tensors, mix_seed,
                          random_crop_flip, split_indices, synthetic_tensors)
from recipes.datasets import dataset_classes, load_data, num_samples
from recipes.models import build_model, load_weights, parameter_groups
from recipes.report import hparams as report_hparams

__all__ = ["Assembly", "build", "train", "resume", "plan_resume", "ResumePlan", "evaluate_checkpoint", "make_run_dir",
           "versions"]


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
    stop_signal: int | None = None
    class_names: list[str] = field(default_factory=list)  #: the data set's classes, in label order
    world_size: int = 1  #: data-parallel processes; only rank 0 writes files and prints

    @property
    def writes(self) -> bool:
        """Whether this process writes the run directory (rank 0 of a data-parallel group)."""
        return idist.get_rank() == 0

    @property
    def events_path(self) -> Path:
        """RUN_DIR/events.jsonl."""
        return self.run_dir / "events.jsonl"

    def to_save(self) -> dict[str, Any]:
        """What last.pt holds: every object whose state the run needs to continue."""
        names = ("amp", "schedule", "summary", "nan_guard")
        optional = {n: self.handlers[n] for n in ("ema", "early_stop") if n in self.handlers}
        if "ema" in self.handlers:  # the averaged weights: validation, best-* and `kiln eval` use them
            optional["ema_model"] = self.handlers["ema"].ema_model
        return {"trainer": self.trainer, "model": self.model, "optimizer": self.optimizer,
                **{n: self.handlers[n] for n in names}, **optional, "rng": RNGState(), "kiln": self.meta()}

    def meta(self) -> RunMeta:
        """The ``kiln`` section of this run's checkpoints: the config and the class names."""
        return RunMeta(self.config, extra={"class_names": list(self.class_names), "world_size": self.world_size})


def versions() -> dict[str, str]:
    """The versions a run was made with (written into config.json).

    torchvision's comes from its installed metadata (e.g. ``0.29.1``, without a ``+cu130`` local tag):
    importing torchvision only to read its version would cost a digits run 0.2 s.
    """
    import ignite

    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": _installed_version("torchvision"), "ignite": ignite.__version__,
            "kiln": _installed_version("kiln")}


def _installed_version(distribution: str) -> str:
    try:
        from importlib.metadata import version

        return version(distribution)
    except Exception:  # not installed as a distribution (e.g. kiln run from a checkout)
        return "0+unknown"


def make_run_dir(cfg: Config, out: str | Path | None) -> Path:
    """``out``, or ``runs/<recipe>-<timestamp>``; refuses a directory that already holds files."""
    if out is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = Path("runs") / f"{cfg.name}-{stamp}"
    run_dir = Path(out)
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise ConfigError(f"{run_dir} already exists and is not empty; pick another --out (or `kiln resume {run_dir}`)")
    return run_dir


def _data(cfg: Config, device: torch.device) -> tuple[Any, TensorBatches, int, int]:
    d = cfg.data
    if d.dataset in ("cifar10", "imagefolder"):  # on disk: recipes.datasets reads, batches and augments them
        return load_data(cfg, device)
    if d.dataset == "digits":
        x, y = digits_tensors(d.image_size)
        num_classes = 10
    elif d.dataset == "synthetic":
        x, y = synthetic_tensors(d.samples, d.num_classes, d.image_size, cfg.train.seed)
        num_classes = d.num_classes
    else:  # pragma: no cover - DataConfig validates the name
        raise DataError(f"unknown data set {d.dataset!r}")
    train_idx, val_idx = split_indices(len(x), d.val_fraction, cfg.train.seed)
    mean, std = x[train_idx].mean(), x[train_idx].std()
    x = (x - mean) / std
    augment = None
    if d.augment != "none":
        flip = d.augment == "crop+flip"
        augment = lambda xb, g: random_crop_flip(xb, g, pad=max(1, d.image_size // 8), flip=flip)  # noqa: E731
    seed = cfg.train.seed
    if d.num_workers > 0:  # the DataLoader path: workers load and collate, the batches are the same
        sampler = EpochBatchSampler(len(train_idx), d.batch_size, shuffle=True, seed=seed)
        dataset = torch.utils.data.TensorDataset(x[train_idx], y[train_idx])
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=d.num_workers,
                                             pin_memory=device.type == "cuda")
        train: Any = LoaderBatches(loader, seed=seed, augment=augment)
    else:
        x, y = x.to(device), y.to(device)
        train = TensorBatches(x[train_idx.to(device)], y[train_idx.to(device)], d.batch_size, shuffle=True,
                              seed=seed, augment=augment)
    val = TensorBatches(x[val_idx.to(x.device)].to(device), y[val_idx.to(y.device)].to(device),
                        max(d.batch_size, 256), shuffle=False)
    return train, val, x.shape[1], num_classes


def _shard(data: Any, rank: int, world_size: int) -> Any:
    """Make ``data`` (TensorBatches or LoaderBatches) read this rank's share of every epoch's order."""
    data.sampler.rank, data.sampler.world_size = rank, world_size
    return data


def _model(cfg: Config, in_channels: int, num_classes: int) -> torch.nn.Module:
    """The recipe's network, built on the CPU with random weights; a model that cannot take this data is a ConfigError."""
    try:
        return build_model(cfg.model.name, in_channels, num_classes, cfg.data.image_size, cfg.model.channels)
    except ValueError as e:
        raise ConfigError(f"model {cfg.model.name}: {e}") from None


def _load_weights(model: torch.nn.Module, path: str) -> str:
    try:
        return load_weights(model, path)
    except ValueError as e:
        raise ConfigError(f"--weights: {e}") from None


def _resolve_runtime(cfg: Config) -> tuple[torch.device, Precision]:
    device = resolve_device(cfg.train.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is cuda but no CUDA device is available here; use --device cpu")
    try:
        return device, resolve_precision(cfg.train.precision, device)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def build(cfg: Config, run_dir: str | Path, *, quiet: bool = False, stream: TextIO | None = None,
          resume_from_iteration: int | None = None) -> Assembly:
    """Assemble a run of ``cfg`` writing into ``run_dir`` (created), without starting it.

    Handlers are attached in this order, written once here: AMP, GradClip, OneCycle, Validation,
    MetricsLog, TensorBoard, RunSummary, (when on) EMA, MixUpCutMix, EarlyStop, then NanGuard, Checkpointer,
    GracefulStop, Progress. None depends on that order for correctness: each acts on the step or epoch
    event that guarantees what it needs.
    """
    t = cfg.train
    device, precision = _resolve_runtime(cfg)
    run_dir = Path(run_dir)
    rank, world_size = idist.get_rank(), idist.get_world_size()
    writes = rank == 0
    quiet = quiet or not writes

    torch.manual_seed(t.seed)
    train_data, val_data, in_channels, num_classes = _data(cfg, device)
    if world_size > 1:  # each rank reads every world_size-th sample of the same (seed, epoch) order
        _shard(train_data, rank, world_size)
        _shard(val_data, rank, world_size)
    class_names = dataset_classes(cfg)
    model = _model(cfg, in_channels, num_classes)
    weights_note = None
    if cfg.model.weights and not (run_dir / "checkpoints" / "last.pt").exists():  # a resumed run has its weights
        weights_note = _load_weights(model, cfg.model.weights)
    model = model.to(device)
    if writes:
        run_dir.mkdir(parents=True, exist_ok=True)  # only now: bad data or weights leave no empty run directory
    memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    ddp_model = model
    if world_size > 1:  # DDP (gradients all-reduced); `model` stays the plain module that checkpoints hold
        ddp_model = idist.auto_model(model, sync_bn=t.sync_bn)
        model = ddp_model.module
    optimizer = torch.optim.AdamW(
        parameter_groups(model, cfg.optim.weight_decay, cfg.optim.decay_norm_and_bias),
        lr=cfg.optim.lr, betas=(0.9, cfg.optim.beta2), eps=cfg.optim.eps,
        fused=True,  # one kernel per step, on the CPU too (foreach AdamW: 2-7x slower there)
    )
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)
    forward = CompiledForward(ddp_model, t.compile_backend) if t.compile else ddp_model  # checkpoints keep `model`
    step_seed = t.seed if rank == 0 else mix_seed(t.seed, rank)  # dropout masks differ between ranks
    trainer = create_trainer(forward, optimizer, loss_fn, device=device, precision=precision,
                             accumulation_steps=t.accumulation_steps, seed=step_seed, memory_format=memory_format)
    ema = EMA(model, decay=t.ema_decay) if t.ema_decay else None  # validation runs on the EMA weights
    evaluator = create_evaluator(ema.ema_model if ema is not None else model,
                                 {"accuracy": Accuracy(device=device), "loss": Loss(torch.nn.CrossEntropyLoss(), device=device)},
                                 device=device, precision=precision, memory_format=memory_format)
    total_steps = OneCycle.total_steps_for(t.epochs, len(train_data), t.accumulation_steps)
    s = cfg.schedule
    purge = resume_from_iteration + 1 if resume_from_iteration is not None else None
    handlers: dict[str, Any] = {
        "amp": AMP(device=device.type, init_scale=t.init_scale, growth_interval=t.growth_interval),
        "grad_clip": GradClip(model.parameters(), max_norm=t.clip_norm or None),
        "schedule": OneCycle(optimizer, max_lr=s.max_lr, total_steps=total_steps, pct_start=s.pct_start,
                             div_factor=s.max_lr / cfg.optim.lr, final_div_factor=s.final_div_factor,
                             anneal_strategy=s.anneal_strategy, cycle_momentum=s.cycle_momentum),
        "validation": Validation(evaluator, val_data),
        "summary": RunSummary(run_dir),
    }
    if writes:  # one process writes the run's records
        handlers["metrics_log"] = MetricsLog(run_dir, every=t.log_every)
        handlers["tensorboard"] = TensorBoard(run_dir / "tb", every=t.log_every, purge_step=purge,
                                              hparams=report_hparams(cfg))
    events_path = run_dir / "events.jsonl" if writes else None
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
    handlers["nan_guard"] = NanGuard(
        model, optimizer, to_snapshot=to_snapshot, schedule=handlers["schedule"],
        scaler=handlers["amp"].scaler if precision.needs_scaler else None, policy=t.on_nan,
        check_every=t.nan_check_every, max_skips=t.nan_max_skips, lr_factor=t.nan_lr_factor,
        max_rollbacks=t.nan_max_rollbacks, max_consecutive_skips=t.nan_collapse_skips,
        min_loss_scale=t.nan_min_loss_scale, max_loss_ratio=t.nan_max_loss_ratio or None,
        events_path=events_path)
    run = Assembly(cfg, run_dir, device, precision, model, optimizer, trainer, evaluator, train_data, val_data, handlers,
                   class_names=class_names, world_size=world_size)
    if weights_note is not None and writes:
        append_jsonl(run.events_path, {"event": "weights", "path": cfg.model.weights, "note": weights_note})
        if not quiet:
            print(f"kiln: {weights_note}", file=stream or sys.stdout)
    c = cfg.checkpoint
    best_to_save = {"model": model, "kiln": run.meta()}
    if ema is not None:  # best-* are ranked by the EMA's val_accuracy: they hold the EMA weights too
        best_to_save["ema_model"] = ema.ema_model
    handlers["checkpointer"] = Checkpointer(
        run_dir / "checkpoints", run.to_save(), best_to_save=best_to_save,
        every_iterations=c.every_iterations, every_minutes=c.every_minutes, keep_best=c.keep_best,
        events_path=events_path)
    handlers["graceful_stop"] = GracefulStop()
    handlers["progress"] = Progress(quiet=quiet, stream=stream)
    for name, handler in handlers.items():
        if writes or name != "summary":  # the summary object exists on every rank for its checkpointed state
            handler.attach(trainer)
    return run


def write_config(run: Assembly) -> None:
    """config.json: the resolved recipe, plus what it resolved to on this machine and the versions."""
    if not run.writes:
        return
    write_json_atomic(run.run_dir / "config.json", {
        **config_to_dict(run.config),
        "runtime": {"device": str(run.device), "precision": run.precision.name,
                    "batches_per_epoch": len(run.train_data), "val_samples": num_samples(run.val_data),
                    "class_names": list(run.class_names), "world_size": run.world_size,
                    "global_batch_size": run.config.data.batch_size * run.world_size,
                    "command": " ".join(sys.argv)},
        "versions": versions(),
    })


def _execute(run: Assembly) -> Assembly:
    """Run the trainer to its end or to a stop; record how it ended in summary.json and events.jsonl."""
    summary: RunSummary = run.handlers["summary"]
    stop: GracefulStop = run.handlers["graceful_stop"]
    try:
        run.trainer.run(run.train_data, max_epochs=run.config.train.epochs)
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once, last.pt is whatever was saved before
        run.status, run.stop_signal = "interrupted", signal.SIGINT
        if run.writes:
            summary.write("interrupted")
            append_jsonl(run.events_path, {"event": "interrupted", "signal": "SIGINT (twice)",
                                           "iteration": run.trainer.state.iteration, "epoch": run.trainer.state.epoch})
        return run
    except BaseException as e:
        run.status = "failed"
        if run.writes:
            summary.write("failed", error=f"{type(e).__name__}: {e}")
        raise
    finally:
        stop.restore()
        if "tensorboard" in run.handlers:
            run.handlers["tensorboard"].close()
    s = run.trainer.state
    summary_extra: dict[str, Any] = {}
    event: dict[str, Any] | None = None
    early_stop = run.handlers.get("early_stop")
    if getattr(s, "diverged", None) is not None:  # NanGuard stopped it, with the last good state restored
        run.status = "diverged"
        summary_extra["diagnosis"] = summarize_diagnosis(s.diverged)
    elif early_stop is not None and early_stop.stopped_epoch is not None and s.iteration < s.max_epochs * s.epoch_length:
        run.status = "completed"  # finished by its own rule, not cut short: `kiln resume` has nothing to do
        reason = (f"val_accuracy did not rise by more than {early_stop.min_delta:g} in {early_stop.patience} "
                  f"epoch{'s' if early_stop.patience > 1 else ''}")
        summary_extra.update(stopped_early=True, stopped_epoch=early_stop.stopped_epoch, reason=reason)
        event = {"event": "early_stop", "reason": reason, "best_val_accuracy": summary.best_val_accuracy}
    else:
        run.status = "completed" if s.iteration >= s.max_epochs * s.epoch_length else "interrupted"
        if stop.received is not None:
            run.stop_signal = stop.received
            event = {"event": "interrupted", "signal": signal.Signals(stop.received).name}
    if run.world_size > 1:
        summary_extra["rank_parameter_checksums"] = _parameter_checksums(run.model)
    if run.writes:
        if summary_extra or run.status != "completed":
            summary.write(run.status, **summary_extra)
        if event is not None:
            append_jsonl(run.events_path, {**event, "iteration": s.iteration, "epoch": s.epoch})
    return run


def _parameter_checksums(model: torch.nn.Module) -> list[float]:
    """One float64 checksum of the parameters per rank (all-gathered): equal when the ranks agree."""
    with torch.no_grad():
        total = sum((p.double() * (i + 1)).sum() for i, p in enumerate(model.parameters()))
    gathered = idist.all_gather(total.reshape(1).to(idist.device()))
    return [float(v) for v in gathered]


def train(cfg: Config, run_dir: str | Path, *, quiet: bool = False, stream: TextIO | None = None,
          auto_max_lr: bool = False, extra_handlers: dict[str, Any] | None = None) -> Assembly:
    """Build and run ``cfg`` into a new ``run_dir``; summary.json records how it ended (also on errors).

    ``extra_handlers`` (name -> handler) are attached to the trainer after the recipe's own and join
    ``run.handlers`` (e.g. ``kiln sweep``'s ``OptunaPruning``).

    With ``auto_max_lr`` the LR range test (``recipes.lr_find``) runs first, on a throwaway trainer,
    and the run trains at its suggestion from the same initial weights; the test is recorded in
    config.json, events.jsonl and lr_find.png. Afterwards plots/, report.html and the findings are
    written and printed (``recipes.report``).
    """
    from recipes.lr_find import choose_max_lr, record_in_run
    from recipes.report import finish_run

    found = None
    if auto_max_lr:
        cfg, found = choose_max_lr(cfg, quiet=quiet, stream=stream)
    run = build(cfg, run_dir, quiet=quiet, stream=stream)
    for name, handler in (extra_handlers or {}).items():
        handler.attach(run.trainer)
        run.handlers[name] = handler
    write_config(run)
    if found is not None:
        record_in_run(run, found)
    run = _execute(run)
    finish_run(run.run_dir, stream)
    return run


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
            schedule change without ``new_schedule``, or a different number of processes.
    """
    source = Path(source)
    last = source if source.suffix == ".pt" else find_last_checkpoint(source)
    checkpoint, saved = load_checkpoint(last, resumable=True)
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
    return ResumePlan(last, checkpoint, saved, cfg, iteration, epoch_length, finished)


def resume(source: str | Path, *, epochs: int | None = None, new_schedule: bool = False,
           requested: Config | None = None, force: bool = False, quiet: bool = False,
           stream: TextIO | None = None) -> Assembly:
    """Continue the run whose run directory (or last.pt) is ``source``, in the same run directory.

    The finished run equals the uninterrupted one: weights, optimizer, schedule, scaler, counters and
    the data position come from last.pt; lines the stopped process wrote after it are dropped from
    metrics.jsonl and steps.jsonl, and TensorBoard drops its points from that step on.

    Args:
        source: RUN_DIR, or a path to its checkpoints/last.pt.
        epochs: extend (or set) the run's length; refused if it changes the one-cycle schedule,
            unless ``new_schedule`` (a second one-cycle over the added epochs).
        requested: a config that must match the checkpoint's (``kiln train --resume``); run-changing
            differences are refused unless ``force``.
        force: continue despite run-changing differences in ``requested``.
        quiet: no progress bar or epoch lines.

    Raises:
        ConfigError: a missing or unusable run directory or checkpoint, a refused config change.
    """
    plan = plan_resume(source, epochs=epochs, new_schedule=new_schedule, requested=requested, force=force)
    last, checkpoint, saved, cfg = plan.last, plan.checkpoint, plan.saved, plan.config
    run_dir, iteration, epoch_length, saved_epochs = last.parent.parent, plan.iteration, plan.epoch_length, saved.train.epochs
    trainer_state = checkpoint["trainer"]
    if plan.finished:
        run = build(cfg, run_dir, quiet=True)
        run.status = "completed"
        return run

    run = build(cfg, run_dir, quiet=quiet, stream=stream, resume_from_iteration=iteration)
    objects = run.to_save()
    objects.pop("kiln")
    for name in ("ema", "ema_model", "early_stop"):  # switched on by a --force'd config change: they start afresh
        if name not in checkpoint:
            objects.pop(name, None)
    if new_schedule and epochs is not None and epochs != saved_epochs:
        objects.pop("schedule")
        remaining = OneCycle.total_steps_for(epochs, epoch_length, cfg.train.accumulation_steps) - checkpoint["trainer"]["optimizer_step"]
        sched = cfg.schedule
        run.handlers["schedule"].__init__(run.optimizer, max_lr=sched.max_lr, total_steps=max(1, remaining),
                                          pct_start=sched.pct_start, div_factor=sched.max_lr / cfg.optim.lr,
                                          final_div_factor=sched.final_div_factor, anneal_strategy=sched.anneal_strategy,
                                          cycle_momentum=sched.cycle_momentum)
    objects["checkpointer"] = run.handlers["checkpointer"]
    trainer_state = dict(trainer_state)
    trainer_state["max_epochs"] = cfg.train.epochs
    checkpoint = {**checkpoint, "trainer": trainer_state}
    Checkpoint.load_objects(objects, checkpoint)
    if run.writes:
        for name in ("metrics.jsonl", "steps.jsonl"):
            truncate_jsonl(run_dir / name, iteration)
        write_config(run)
        append_jsonl(run.events_path, {"event": "resume", "iteration": iteration, "epoch": iteration // epoch_length,
                                       "checkpoint": str(last), "epochs": cfg.train.epochs})
    from recipes.report import finish_run

    run = _execute(run)
    finish_run(run.run_dir, stream)  # plots/, report.html and the findings, over the whole run
    return run


def evaluate_checkpoint(path: str | Path, *, device: str | None = None, batch_size: int | None = None,
                        data_dir: str | None = None, tta: bool = False) -> dict[str, Any]:
    """Evaluate a checkpoint (last.pt or best-*.pt) on its recipe's validation data (or on ``data_dir``'s).

    ``tta`` averages the logits of each image and its horizontal mirror. Returns ``{"loss",
    "accuracy", "samples", "epoch", "recipe", "device", "top5" (None under 5 classes), "per_class",
    "per_class_samples", "confusion_matrix" (rows: true class), "class_names", "tta"}``
    (see :func:`recipes.evaluation.evaluate`).

    Raises:
        ConfigError / DataError: an unusable checkpoint, missing data, or data whose classes differ
            from the ones the checkpoint was trained on.
    """
    from recipes.evaluation import evaluate

    checkpoint, cfg = load_checkpoint(path)
    overrides: dict[str, Any] = {}
    if device is not None:
        overrides["train.device"] = device
    if batch_size is not None:
        overrides["data.batch_size"] = batch_size
    if data_dir is not None:
        overrides["data.data_dir"] = data_dir
    cfg = apply_overrides(cfg, overrides)
    dev, precision = _resolve_runtime(cfg)
    workers = cfg.data.num_workers if cfg.data.dataset == "imagefolder" else 0  # folders of images decode in workers
    _, val_data, in_channels, num_classes = _data(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=workers)), dev)
    saved_names = list(checkpoint["kiln"].get("class_names") or [])
    data_names = dataset_classes(cfg)
    if saved_names and cfg.data.dataset == "imagefolder" and data_names != saved_names:
        raise DataError(f"the data in {cfg.data.data_dir} has classes {data_names}; {path} was trained on {saved_names}")
    model = _model(cfg, in_channels, num_classes).to(dev)
    try:
        model.load_state_dict(checkpoint["ema_model" if "ema_model" in checkpoint else "model"])  # EMA weights first
    except (RuntimeError, KeyError) as e:
        raise ConfigError(f"{path}: the model weights do not fit the recipe's model ({str(e).splitlines()[0]})") from None
    result = evaluate(model, val_data, num_classes, device=dev, precision=precision, tta=tta)
    trainer_state = checkpoint.get("trainer") or {}
    epoch = int(trainer_state["iteration"]) // int(trainer_state["epoch_length"]) if trainer_state else None
    return {**result, "samples": num_samples(val_data), "epoch": epoch, "recipe": cfg.name, "device": str(dev),
            "class_names": saved_names or data_names, "weights": "ema" if "ema_model" in checkpoint else "model"}
