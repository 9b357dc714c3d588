"""Reading kiln checkpoints safely, and deciding whether a config may continue a checkpointed run.

Saving them is ``callbacks.Checkpointer``'s job; :class:`RunMeta` is the ``kiln`` section it saves.
"""
from __future__ import annotations

import pickle
import stat
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from callbacks.files import os_error_line
from recipes.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    flatten_config,
)
from recipes.run.rundir import RunDir

__all__ = ["CHECKPOINT_FORMAT", "RunMeta", "find_last_checkpoint", "load_checkpoint", "run_changing_differences",
           "with_run_precision"]

CHECKPOINT_FORMAT = 1

#: Config keys that may differ between a checkpoint and the run continuing it: they do not change
#: what is computed (where it runs, how often it logs or saves) or are handled on their own (epochs).
#: The whole ``guard`` section is run-neutral too: it only acts on a run that already diverged; and so is
#: ``tracking``: where the run is mirrored.
RUN_NEUTRAL_KEYS = ("description", "train.device", "train.log_every", "train.epochs", "checkpoint.every_iterations",
                    "checkpoint.every_minutes", "checkpoint.keep_best", "data.num_workers", "data.data_dir",
                    "data.download", "train.compile", "train.compile_backend", "train.channels_last")


class RunMeta:
    """The ``kiln`` section of a checkpoint: format version and the resolved config (state_dict-able)."""

    def __init__(self, cfg: Config, extra: Mapping[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.extra = dict(extra or {})

    def state_dict(self) -> dict[str, Any]:
        """``{"format", "config", ...extra}``, weights_only-safe."""
        return {"format": CHECKPOINT_FORMAT, "config": config_to_dict(self.cfg), **self.extra}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore: the config is read with :func:`load_checkpoint`."""


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu",
                    resumable: bool = False) -> tuple[dict[str, Any], Config]:
    """Load a kiln checkpoint with ``torch.load(weights_only=True)``: no pickled code ever runs.

    Returns the checkpoint dict and its config.

    Raises:
        ConfigError: one line saying what is wrong: missing, not a file, unreadable (the OS's reason:
            ``permission denied: PATH``), opened but truncated or corrupt,
            holding pickled objects (refused unexecuted), not a kiln checkpoint, or (``resumable``)
            a weights-only checkpoint that cannot continue a run.
    """
    path = Path(path)
    _check_readable(path)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except OSError as e:
        if e.errno is None:  # torch's own reader raises errno-less OSErrors on bad bytes
            raise ConfigError(f"{path} is truncated or corrupt: {e}") from None
        raise ConfigError(os_error_line(e, path)) from None
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if "weights_only" in str(e) or "Unsupported global" in str(e) or "GLOBAL" in str(e):
            raise ConfigError(f"{path} holds pickled Python objects; refused without running them "
                              "(kiln checkpoints hold only tensors, numbers and strings)") from None
        raise ConfigError(f"{path} is corrupt ({first})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path} is truncated or corrupt: {reason}") from None
    except Exception as e:  # noqa: BLE001 - arbitrary bytes make the unpickler fail in any way (IndexError, KeyError...)
        raise ConfigError(f"{path} is not a checkpoint: it could not be read ({type(e).__name__})") from None
    meta = checkpoint.get("kiln") if isinstance(checkpoint, dict) else None
    if not isinstance(meta, dict) or "config" not in meta:
        raise ConfigError(f"{path} is not a kiln checkpoint (it has no 'kiln' section)")
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path} has checkpoint format {meta.get('format')}; this kiln reads format {CHECKPOINT_FORMAT}")
    try:
        cfg = config_from_dict(meta["config"])
    except ConfigError as e:
        raise ConfigError(f"{path} holds a config this kiln cannot use: {e}") from None
    if resumable and "trainer" not in checkpoint:
        raise ConfigError(f"{path} holds model weights only (a best-* checkpoint); resume from checkpoints/last.pt")
    return checkpoint, cfg


def _check_readable(path: Path) -> None:
    """One line when ``path`` is not a file this process can open: missing, not a file, or the OS's
    reason (``permission denied: PATH``), so that only a file that opens and does not parse is "corrupt"."""
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise ConfigError(f"no checkpoint at {path}") from None
    except OSError as e:
        raise ConfigError(os_error_line(e, path)) from None
    if not stat.S_ISREG(mode):
        raise ConfigError(f"{path} is not a file")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise ConfigError(os_error_line(e, path)) from None


def run_changing_differences(saved: Config, requested: Config) -> list[str]:
    """``key: saved -> requested`` for every field that would make the continued run a different run.

    ``data.num_classes`` counts only for the synthetic data set (it makes that many classes); for the
    others a saved config records the data's own count there (:func:`recipes.config.with_class_count`).
    A requested ``finetune.freeze_epochs`` of -1 (auto), or ``data.memory_budget`` of auto, is whatever the
    saved run resolved it to.
    """
    a, b = flatten_config(saved), flatten_config(requested)
    neutral = set(RUN_NEUTRAL_KEYS) | ({"data.num_classes"} if saved.data.dataset != "synthetic" else set())
    if requested.finetune.freeze_epochs == -1:
        neutral.add("finetune.freeze_epochs")
    if requested.data.memory_budget == "auto":
        neutral.add("data.memory_budget")
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and k not in neutral and not k.startswith(("guard.", "tracking."))]


def with_run_precision(cfg: Config, checkpoint: Mapping[str, Any]) -> Config:
    """``cfg`` with ``train.precision: auto`` pinned to the precision the checkpointed run trained in.

    ``auto`` depends on the machine (bf16 on a CPU with AMX, fp32 on one without), so a run resumed or
    evaluated elsewhere would otherwise switch precision halfway. Checkpoints record the resolved name;
    older ones, from before ``auto`` could mean bf16 on a CPU, trained in fp32 there.
    """
    if cfg.train.precision != "auto":
        return cfg
    recorded = (checkpoint.get("kiln") or {}).get("precision")
    if recorded is None and str(cfg.train.device) in ("auto", "cpu") and not torch.cuda.is_available():
        recorded = "fp32"
    return apply_overrides(cfg, {"train.precision": recorded}) if recorded else cfg


def find_last_checkpoint(run_dir: str | Path) -> Path:
    """RUN_DIR/checkpoints/last.pt, or a one-line ConfigError saying why there is none."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise ConfigError(f"no run directory at {run_dir}")
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a directory")
    if not RunDir(run_dir).config.exists():
        raise ConfigError(f"{run_dir} is not a kiln run directory (no config.json)")
    last = RunDir(run_dir).last
    if not last.exists():
        raise ConfigError(f"{run_dir} has no checkpoint to resume from (no checkpoints/last.pt)")
    return last
