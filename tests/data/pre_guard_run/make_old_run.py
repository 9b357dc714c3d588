"""Make the pre-guard-section run directory fixture with the code of commit 914fbf2.

Run from a checkout of that commit, one thread (as the test suite runs):
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=. python make_old_run.py OUT
"""
import os
import shutil
import signal
import sys
from pathlib import Path


def main(out: Path) -> None:
    from ignite.engine import Events

    from recipes.cli import resolve_config  # the layout of commit 914fbf2
    from recipes.run import train

    shutil.rmtree(out, ignore_errors=True)
    sets = ("model.channels=4,8", "train.nan_check_every=7", "train.nan_max_rollbacks=2", "checkpoint.every_minutes=0")
    cfg = resolve_config("digits", sets, epochs=2, batch_size=128)

    class StopAt:
        def __init__(self, it):
            self.it = it

        def attach(self, trainer):
            return [trainer.add_event_handler(Events.ITERATION_COMPLETED(once=self.it),
                                              lambda e: os.kill(os.getpid(), signal.SIGTERM))]

    run = train(cfg, out / "stopped", quiet=True, extra_handlers={"stop": StopAt(15)})
    print("stopped", run.status, run.trainer.state.iteration)
    run = train(cfg, out / "reference", quiet=True)
    print("reference", run.status, run.trainer.state.iteration)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
