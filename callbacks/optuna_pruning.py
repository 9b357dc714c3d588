"""OptunaPruning: report each validation's score to an Optuna trial and stop the run when it is pruned."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ignite.engine import Engine, Events
from ignite.engine.events import RemovableEventHandle

from engine.events import EpochEvents, ensure_epoch_events

if TYPE_CHECKING:  # pragma: no cover
    import optuna

__all__ = ["OptunaPruning"]


class OptunaPruning:
    """Report ``state.metrics[score_name]`` to ``trial`` after every validation; stop the run if pruned.

    Like optuna-integration's ``PyTorchIgnitePruningHandler``, but it listens on the trainer's
    EpochEvents.VALIDATION_COMPLETED (where the val metrics are current, whatever the attach order)
    and, instead of raising ``optuna.TrialPruned`` inside ignite's loop (which would end the run as a
    crash, with no checkpoint or summary), it calls ``trainer.terminate()``: the epoch's records and
    checkpoint are written and the run ends normally. The caller then reads ``pruned`` and raises
    ``optuna.TrialPruned`` from its objective. Each step is reported once (step = ``state.epoch``);
the last epoch is reported but never pruned, since the run has nothing left to save.

    Events: STARTED, EpochEvents.VALIDATION_COMPLETED. Reads ``state.metrics[score_name]``,
    ``state.epoch``. Calls ``trial.report``, ``trial.should_prune`` and ``engine.terminate()``.
    State: ``pruned`` / ``pruned_epoch``, per run (reset when a fresh run starts); nothing to resume,
    since the trial lives in the study's storage.

    Args:
        trial: the Optuna trial this run is.
        score_name: the trainer metric to report (the study maximises or minimises it).

    Example:
        >>> import optuna
        >>> optuna.logging.set_verbosity(optuna.logging.WARNING)
        >>> pruning = OptunaPruning(optuna.create_study(direction="maximize").ask())
        >>> pruning.pruned, pruning.pruned_epoch
        (False, None)
    """

    def __init__(self, trial: "optuna.trial.BaseTrial", score_name: str = "val_accuracy") -> None:
        import optuna  # here, not at the top: `import callbacks` should not cost every run optuna's import

        if not isinstance(trial, optuna.trial.BaseTrial):
            raise TypeError(f"trial must be an optuna trial, not {type(trial).__name__}")
        if not score_name:
            raise ValueError("score_name must not be empty")
        self.trial, self.score_name = trial, score_name
        self.pruned = False
        self.pruned_epoch: int | None = None
        self._reported: set[int] = set()  # optuna ignores (and warns about) a step reported twice

    def attach(self, engine: Engine) -> list[RemovableEventHandle]:
        """Report ``engine``'s validations to the trial; returns the handles."""
        ensure_epoch_events(engine)
        return [engine.add_event_handler(Events.STARTED, self._on_started),
                engine.add_event_handler(EpochEvents.VALIDATION_COMPLETED, self)]

    def _on_started(self, engine: Engine) -> None:
        if engine.state.iteration == 0:  # a fresh run, not a resume
            self.pruned, self.pruned_epoch = False, None

    def __call__(self, engine: Engine) -> None:
        value: Any = engine.state.metrics.get(self.score_name)
        step = int(engine.state.epoch)
        if value is None or step in self._reported:
            return
        self.trial.report(float(value), step)
        self._reported.add(step)
        finished = engine.state.max_epochs is not None and step >= engine.state.max_epochs
        if not finished and self.trial.should_prune():  # at the last epoch there is nothing left to save
            self.pruned, self.pruned_epoch = True, step
            engine.terminate()
