"""Where a sweep's study lives: opening an Optuna storage (SQLite, PostgreSQL, any SQLAlchemy URL) with one-line
diagnostics, and the check that a continued study searches what it was started with."""
from __future__ import annotations

import time
import warnings
from typing import Any

import optuna

from recipes.config import ConfigError
from recipes.tools.sweep.space import TrialSeededTPE

__all__ = ["CONNECT_TIMEOUT", "check_same_sweep", "open_study"]


#: Seconds a PostgreSQL storage may take to answer before ``kiln sweep`` gives up on it.
CONNECT_TIMEOUT = 10


def _safe_url(url: str) -> str:
    """``url`` without its password."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy can parse: say it as given
        return url


def _libpq_url_without_timeout(url: str) -> bool:
    """A PostgreSQL URL for psycopg (3, SQLAlchemy 2.1's default) or psycopg2, which take libpq's
    ``connect_timeout``, that does not set one itself."""
    try:
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy can parse: opening it will say so
        return False
    return (parsed.drivername in ("postgresql", "postgresql+psycopg", "postgresql+psycopg2")
            and "connect_timeout" not in parsed.query)


def _storage_error(error: Exception) -> str:
    """Why a storage could not be opened, in one line; a missing database driver names what to install."""
    missing = error if isinstance(error, ModuleNotFoundError) else None
    cause: BaseException | None = error
    seen: set[int] = set()
    while missing is None and cause is not None and id(cause) not in seen:  # Optuna re-raises the driver's
        seen.add(id(cause))  # ImportError as its own
        cause = cause.__cause__ or cause.__context__
        missing = cause if isinstance(cause, ModuleNotFoundError) else None
    if missing is not None and missing.name:
        driver = missing.name.split(".")[0]
        if driver.startswith("psycopg"):
            return (f"its driver {driver} is not installed; install kiln's PostgreSQL extra "
                    "(pip install 'kiln[postgres]', psycopg 3) and use postgresql://... or postgresql+psycopg://...")
        return f"its driver {driver} is not installed (pip install {driver})"
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return reason[:200]


def _creation_race(error: Exception) -> bool:
    """Whether ``error`` is another worker creating the same tables at the same moment."""
    text = str(error).lower()
    return any(k in text for k in ("unique constraint", "already exists", "database is locked", "duplicate"))


def open_study(name: str, storage_url: str, *, seed: int, pruner: str, n_trials: int,
               heartbeat_interval: int = 10, grace_period: int | None = None) -> optuna.Study:
    """Create the study, or load it if it exists, in ``storage_url`` (heartbeats on).

    Raises:
        ConfigError: the storage cannot be opened (one line naming the URL, without its password).
    """
    kwargs: dict[str, Any] = {}
    if storage_url.startswith("sqlite"):  # several workers on one file: wait for the lock, don't fail on it
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    elif _libpq_url_without_timeout(storage_url):  # a server that does not answer: give up in seconds, not minutes
        kwargs["engine_kwargs"] = {"connect_args": {"connect_timeout": CONNECT_TIMEOUT}, "pool_pre_ping": True}
    for attempt in range(4):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(storage_url, heartbeat_interval=heartbeat_interval,
                                                     grace_period=grace_period or 3 * heartbeat_interval, **kwargs)
            break
        except Exception as e:  # a driver that is missing, a host that does not answer, a malformed URL
            if attempt < 3 and _creation_race(e):  # workers started together both create the schema: retry
                time.sleep(0.5 + attempt)
                continue
            raise ConfigError(f"cannot open the study storage {_safe_url(storage_url)}: {_storage_error(e)}") from None
    pruners = {"median": optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1),
               "none": optuna.pruners.NopPruner()}
    if pruner not in pruners:
        raise ConfigError(f"--pruner must be median or none, not {pruner!r}")
    sampler = TrialSeededTPE(seed, n_startup_trials=max(2, min(10, n_trials // 3)))
    return optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruners[pruner],
                               direction="maximize", load_if_exists=True)


def check_same_sweep(study: optuna.Study, identity: dict[str, Any]) -> None:
    """Record what this study searches; refuse to continue it with a different recipe or space."""
    saved = study.user_attrs.get("kiln")
    if saved is None:
        study.set_user_attr("kiln", identity)
        return
    if saved != identity:
        changed = [k for k in identity if saved.get(k) != identity[k]]
        raise ConfigError(f"study {study.study_name!r} was started with a different {', '.join(changed)}; "
                          "re-run it with the same arguments, or pick another --study or --out")
