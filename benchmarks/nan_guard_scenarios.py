"""NanGuard's fault scenarios, every policy, fp32/bf16/fp16: what each run wrote, as one JSON file to diff.

A refactoring of the guard must not change what it does. This runs each fault of
``tests/callbacks/test_nan_guard.py`` (a NaN/Inf input, a NaN gradient, a NaN parameter, a parameter gone
bad between steps, an exploding loss, a diverging max_lr, repeated skips, an fp16 scale collapse and a
scale below the floor) under each policy, each precision, three optimizers (AdamW, fused AdamW, whose
update the guard drops on the device, and SGD) and both attach orders of GradClip, and records what a
user could see: events.jsonl as written, the ``kiln`` log lines, the metrics, ``state.diverged``, the
guard's state dict, and a SHA-256 of the weights at the start of every iteration and of the final
weights and optimizer state. Run it before a change and after, then compare the two files::

    python benchmarks/nan_guard_scenarios.py --out /tmp/before.json
    ... change ...
    python benchmarks/nan_guard_scenarios.py --out /tmp/after.json --compare /tmp/before.json

``--compare`` prints the scenarios that differ (exit 1) or "identical" (exit 0). About a minute on one
CPU thread.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ignite.engine import Engine, Events  # noqa: E402

from callbacks import AMP, GradClip, NanGuard, OneCycle  # noqa: E402
from engine import create_trainer  # noqa: E402
from tests.conftest import TinyCNN, random_batches  # noqa: E402

__all__ = ["scenarios", "main"]


def _digest(tensors: Any) -> str:
    """SHA-256 of every tensor in a (nested) state dict, in order."""
    sha = hashlib.sha256()

    def walk(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            sha.update(value.detach().float().contiguous().numpy().tobytes())
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                sha.update(str(key).encode())
                walk(value[key])
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)
        else:
            sha.update(repr(value).encode())

    walk(tensors)
    return sha.hexdigest()[:16]


def _run(tmp: Path, policy: str, precision: str, optimizer: str, fault: Callable, *, clip_first: bool = True,
         batch_norm: bool = True, max_lr: float = 0.05, weight_decay: float = 0.0, epochs: int = 2,
         init_scale: float = 2.0**16, **guard_options: Any) -> dict[str, Any]:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = TinyCNN(batch_norm=batch_norm)
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=max_lr / 25, momentum=0.9, weight_decay=weight_decay)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=max_lr / 25, weight_decay=weight_decay,
                                fused=optimizer == "adamw-fused")
    trainer = create_trainer(model, opt, F.cross_entropy, precision=precision, seed=0)
    data = random_batches(count=6, batch_size=8, seed=3)
    schedule = OneCycle(opt, max_lr=max_lr, total_steps=epochs * len(data))
    amp = AMP(device="cpu", init_scale=init_scale)
    to_snapshot = {"model": model, "optimizer": opt, "schedule": schedule}
    if precision == "fp16":
        to_snapshot["scaler"] = amp.scaler
    events = tmp / "events.jsonl"
    guard = NanGuard(model, opt, to_snapshot=to_snapshot, schedule=schedule,
                     scaler=amp.scaler if precision == "fp16" else None, policy=policy, events_path=events,
                     **{"check_every": 2, **guard_options})
    clip = GradClip(model.parameters(), max_norm=1.0)
    for handler in ([amp, clip, schedule, guard] if clip_first else [guard, schedule, clip, amp]):
        handler.attach(trainer)
    starts: list[str] = []
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: starts.append(_digest(model.state_dict())))
    fault(trainer, model)
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    log = logging.getLogger("kiln")
    log.addHandler(handler)
    try:
        state = trainer.run(data, max_epochs=epochs)
    finally:
        log.removeHandler(handler)
    metrics = {k: state.metrics.get(k) for k in ("nan_skips", "rollbacks", "scale_collapses", "train_loss")}
    return {"events": events.read_text() if events.exists() else "", "log": lines, "metrics": metrics,
            "iteration": state.iteration, "diverged": json.dumps(state.diverged, sort_keys=True, default=str),
            "guard": guard.state_dict(), "weights_at_start": starts, "weights": _digest(model.state_dict()),
            "optimizer": _digest(opt.state_dict()), "lr": opt.param_groups[0]["lr"]}


def _input(iterations: tuple[int, ...], value: float = float("nan")) -> Callable:
    def fault(trainer: Engine, model: torch.nn.Module) -> None:
        @trainer.on(Events.ITERATION_STARTED(event_filter=lambda e, it: it in iterations))
        def _poison(engine: Engine) -> None:
            x, y = engine.state.batch
            x = x.clone()
            x[0, 0, 0, 0] = value
            engine.state.batch = (x, y)
    return fault


def _gradient(name: str, iterations: range, value: float = float("nan")) -> Callable:
    def fault(trainer: Engine, model: torch.nn.Module) -> None:
        def hook(grad: torch.Tensor) -> torch.Tensor:
            if trainer.state.iteration in iterations:
                grad = grad.clone()
                grad.view(-1)[0] = value
            return grad
        dict(model.named_parameters())[name].register_hook(hook)
    return fault


def _parameter(name: str, iteration: int, event: Any = Events.ITERATION_STARTED, value: float = float("nan")) -> Callable:
    def fault(trainer: Engine, model: torch.nn.Module) -> None:
        @trainer.on(event(once=iteration))
        def _poison(engine: Engine) -> None:
            with torch.no_grad():
                dict(model.named_parameters())[name].view(-1)[0] = value
    return fault


def _scale_head(iteration: int) -> Callable:
    def fault(trainer: Engine, model: torch.nn.Module) -> None:
        trainer.on(Events.ITERATION_COMPLETED(once=iteration))(lambda e: model[-1].weight.data.mul_(1e6))
    return fault


def _none(trainer: Engine, model: torch.nn.Module) -> None:
    pass


def scenarios() -> dict[str, tuple[Callable, dict[str, Any]]]:
    """name -> (fault, options of the run), for one policy, precision and optimizer."""
    return {
        "clean": (_none, {}),
        "input-nan": (_input((5,)), {}),
        "input-inf": (_input((4,), float("inf")), {}),
        "inputs-3-4-5": (_input((3, 4, 5)), {"max_skips": 2}),
        "inputs-3-9": (_input((3, 9)), {"epochs": 3}),
        "gradient": (_gradient("3.weight", range(7, 8)), {}),
        "gradient-guard-first": (_gradient("3.weight", range(7, 8)), {"clip_first": False}),
        "parameter": (_parameter("0.weight", 4), {}),
        "parameter-between-steps": (_parameter("3.bias", 3, Events.ITERATION_COMPLETED, float("inf")), {}),
        "exploding-loss": (_scale_head(5), {"batch_norm": False}),
        "exploding-loss-off": (_scale_head(5), {"batch_norm": False, "max_loss_ratio": None}),
        "max-lr": (_none, {"batch_norm": False, "max_lr": 1e5, "weight_decay": 0.1, "lr_factor": 1e-4, "epochs": 3}),
        "max-lr-2-rollbacks": (_none, {"batch_norm": False, "max_lr": 1e5, "weight_decay": 0.1, "max_rollbacks": 2,
                                       "epochs": 3}),
        "fp16-one-skip": (_gradient("3.weight", range(3, 4), float("inf")), {"fp16": True, "epochs": 1}),
        "fp16-collapse": (_gradient("3.weight", range(3, 6), float("inf")), {"fp16": True,
                                                                             "max_consecutive_skips": 3}),
        "fp16-huge-init-scale": (_none, {"fp16": True, "epochs": 1, "max_consecutive_skips": 3,
                                         "init_scale": 2.0**40}),
        "fp16-floor": (_gradient("3.weight", range(3, 5), float("inf")), {"fp16": True, "epochs": 1,
                                                                          "min_loss_scale": 2.0**15}),
    }


def main(argv: list[str] | None = None) -> int:
    """Run every scenario; write the JSON; with ``--compare``, report the differences."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--compare", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    with TemporaryDirectory() as tmp:
        for name, (fault, options) in scenarios().items():
            fp16 = options.pop("fp16", False)
            for precision in (("fp16",) if fp16 else ("fp32", "bf16")):
                for optimizer in ("adamw", "adamw-fused", "sgd"):
                    for policy in ("skip", "rollback", "stop"):
                        key = f"{name}/{precision}/{optimizer}/{policy}"
                        run_dir = Path(tmp) / key.replace("/", "-")
                        run_dir.mkdir()
                        results[key] = _run(run_dir, policy, precision, optimizer, fault, **options)
            options["fp16"] = fp16
    args.out.write_text(json.dumps(results, indent=1, sort_keys=True, default=str))
    print(f"{len(results)} runs -> {args.out}")
    if args.compare is None:
        return 0
    before = json.loads(args.compare.read_text())
    after = json.loads(args.out.read_text())
    differ = [key for key in sorted(set(before) | set(after)) if before.get(key) != after.get(key)]
    for key in differ:
        fields = [f for f in (before.get(key) or after.get(key)) if (before.get(key) or {}).get(f) != (after.get(key) or {}).get(f)]
        print(f"differs: {key}: {', '.join(fields)}")
    print("identical" if not differ else f"{len(differ)} of {len(after)} runs differ")
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
