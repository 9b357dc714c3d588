"""A run: the parts made from a config, assembled on ignite engines with kiln's handlers, then trained,
resumed or evaluated. The plots and report of a run are ``recipes.report``'s job.

``build`` assembles without running; ``train`` builds and runs; ``resume`` continues a stopped run;
``evaluate_checkpoint`` evaluates a saved model; ``load`` makes one ready to use. ``RunLock`` makes one process the only writer of a
run directory.
"""
from recipes.run.build import Assembly, build, make_run_dir, versions, write_config
from recipes.run.checkpoints import find_last_checkpoint, load_checkpoint, run_changing_differences
from recipes.run.evaluate import evaluate, evaluate_checkpoint
from recipes.run.inference import Trained, load
from recipes.run.lock import RunLock
from recipes.run.resume import ResumePlan, plan_resume, resume, run_dir_of
from recipes.run.train import execute, train

__all__ = ["Assembly", "build", "train", "execute", "resume", "plan_resume", "ResumePlan", "evaluate",
           "evaluate_checkpoint", "make_run_dir", "write_config", "versions", "load_checkpoint",
           "find_last_checkpoint", "run_changing_differences", "RunLock", "run_dir_of", "load", "Trained"]
