"""Export a trained model for use without kiln: TorchScript, ``torch.export`` (.pt2) or ONNX, checked before writing.

The model is exported as :func:`recipes.run.load` gives it on the CPU in fp32 (eval mode, EMA weights
when the run kept an EMA, contiguous memory format), so the file runs anywhere. Each file carries
``kiln.json`` (:func:`export_metadata`: class names, preprocessing, input shape, where it came from and
how it was checked): an extra file of the TorchScript and .pt2 archives, the ``kiln`` metadata property
of an ONNX model; :func:`read_metadata` reads it back.

Before anything is written the exported program is serialized, loaded back (ONNX: into an
onnxruntime session) and run next to the eager model on real validation inputs (random ones when the
data cannot be read). It must give the same top-1 on every input and logits within
``RELATIVE_TOLERANCE * max(1, max |logit|)`` of eager's; only then is the file written, atomically.
Measured on this project's CPU (digits small_cnn, image-folder resnet18): TorchScript and .pt2 are
bit-identical to eager, ONNX Runtime differs by about 1e-6 on logits of magnitude 1-10, so 1e-4 leaves a
margin of about 100 while still catching a wrong weight or a mis-traced branch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from callbacks.files import write_atomic
from recipes.config import ConfigError
from recipes.data import DataError
from recipes.run.build import versions
from recipes.run.inference import Trained, load
from recipes.run.parts import make_data

__all__ = ["FORMATS", "METADATA_FILE", "ONNX_METADATA_KEY", "ONNX_MISSING", "RELATIVE_TOLERANCE", "ExportFailed",
           "Exported", "Parity", "check_inputs", "check_parity", "default_output", "export_checkpoint",
           "export_metadata", "format_export", "read_metadata", "require_onnx", "resolve_format"]

#: Export format -> file suffix.
FORMATS = {"torchscript": ".ts", "exported": ".pt2", "onnx": ".onnx"}
METADATA_FILE = "kiln.json"  #: the extra file in .ts and .pt2 archives
ONNX_METADATA_KEY = "kiln"  #: the ONNX model's metadata property
METADATA_FORMAT = 1
RELATIVE_TOLERANCE = 1e-4
ONNX_MISSING = "ONNX export needs the onnx, onnxscript and onnxruntime packages: pip install 'kiln[onnx]'"

#: A program under test: a batch of inputs -> its logits (fp32, on the CPU).
Program = Callable[[torch.Tensor], torch.Tensor]
#: Writes the program with its ``{METADATA_FILE: json}`` into a binary file.
Writer = Callable[[BinaryIO, str], None]


class ExportFailed(Exception):
    """The exporter could not export the model, or its program does not match the model; nothing was written."""


@dataclass(frozen=True)
class Parity:
    """How the exported program was checked against the eager model before it was written."""

    max_abs_diff: float  #: the largest logit difference over all checked inputs
    tolerance: float  #: the largest allowed: RELATIVE_TOLERANCE * max(1, max |eager logit|)
    samples: int  #: inputs checked
    inputs: str  #: "validation" (the checkpoint's validation images) or "random" (the data could not be read)
    error: str | None = None  #: why the program does not match the model; None when it does

    def to_dict(self) -> dict[str, Any]:
        """The ``check`` entry of the metadata (a written file always passed it: no ``error``)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "error"}


@dataclass(frozen=True)
class Exported:
    """A written export: where, what, and how it was checked (``note``: why random inputs, if they were used)."""

    checkpoint: Path
    path: Path
    format: str
    size_bytes: int
    metadata: dict[str, Any]
    note: str | None = None


def resolve_format(fmt: str | None, out: str | Path | None) -> str:
    """``fmt``, or the format ``out``'s suffix names (``.ts``, ``.pt2``, ``.onnx``).

    Raises:
        ConfigError: no format given and none to read from ``out``.
    """
    if fmt is not None:
        if fmt not in FORMATS:
            raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
        return fmt
    by_suffix = {suffix: name for name, suffix in FORMATS.items()}
    if out is not None and Path(out).suffix in by_suffix:
        return by_suffix[Path(out).suffix]
    raise ConfigError(f"say which format: --format {'|'.join(FORMATS)}")


def default_output(checkpoint: str | Path, fmt: str, out: str | Path | None = None) -> Path:
    """The file to write: ``out``; inside ``out`` when it is a folder (or ends in ``/``); by default beside the checkpoint,
    same name with the format's suffix (``best-epoch3-...pt`` -> ``best-epoch3-....ts``).

    Raises:
        ConfigError: the file would be the checkpoint itself.
    """
    checkpoint = Path(checkpoint)
    name = checkpoint.with_suffix(FORMATS[fmt]).name
    if out is None:
        path = checkpoint.with_name(name)
    elif Path(out).is_dir() or str(out).endswith(("/", os.sep)):
        path = Path(out) / name
    else:
        path = Path(out)
    if path.exists() and checkpoint.exists() and path.resolve() == checkpoint.resolve():
        raise ConfigError(f"--out {out} is the checkpoint itself; pick another file")
    return path


def require_onnx() -> None:
    """Import the ONNX exporter's and checker's packages, or raise one ConfigError line naming the extra."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise ConfigError(ONNX_MISSING) from None


def export_checkpoint(checkpoint: str | Path, fmt: str, out: Path, *, dynamic_batch: bool = False,
                      check_batch: int = 64) -> Exported:
    """Export ``checkpoint``'s model to ``out`` in ``fmt`` (see :data:`FORMATS`), checked first.

    Args:
        checkpoint: a kiln checkpoint (best-*.pt or last.pt).
        fmt: ``torchscript`` (traced; scripted if tracing fails), ``exported`` (``torch.export``) or ``onnx``.
        out: the file to write (its folder must exist).
        dynamic_batch: the file takes any batch size; else batches of 1.
        check_batch: how many validation inputs the check runs (fewer if the validation split is smaller).

    Raises:
        ConfigError: an unusable checkpoint, or ONNX asked for without its packages.
        ExportFailed: the exporter failed, or the program's outputs differ from the model's (nothing written).
    """
    if fmt == "onnx":
        require_onnx()
    trained = load(checkpoint, device="cpu", precision="fp32")
    model = trained.model.to(memory_format=torch.contiguous_format)
    inputs, kind, note = check_inputs(trained, check_batch)
    example = inputs[:1].repeat(2 if dynamic_batch else 1, 1, 1, 1)  # a batch of 1 would pin the dimension to 1
    try:
        with _quiet():
            program, writer = _EXPORTERS[fmt](model, example, dynamic_batch)
    except Exception as e:  # noqa: BLE001 - any exporter error is this model's, reported in one line
        raise ExportFailed(f"{fmt} export of {checkpoint} failed: {_first_line(e)}; nothing written") from None
    parity = check_parity(model, program, inputs, batch=len(inputs) if dynamic_batch else 1, kind=kind)
    if parity.error:
        raise ExportFailed(f"{fmt} export of {checkpoint} does not match the model: {parity.error}; nothing written")
    metadata = export_metadata(checkpoint, trained, dynamic_batch, parity)
    text = json.dumps(metadata)
    with _quiet():
        write_atomic(out, lambda f: writer(f, text))
    return Exported(Path(checkpoint), Path(out), fmt, Path(out).stat().st_size, metadata, note)


def check_inputs(trained: Trained, n: int) -> tuple[torch.Tensor, str, str | None]:
    """Up to ``n`` preprocessed validation inputs of ``trained``'s data set, ``"validation"``, and no note;
    or, when that data cannot be read, ``n`` seeded standard-normal inputs, ``"random"``, and a note saying why."""
    cfg = trained.config
    cpu_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=0))
    try:
        batches, count = [], 0
        for x, _ in make_data(cpu_cfg, torch.device("cpu")).val:
            batches.append(x)
            count += len(x)
            if count >= n:
                break
        if batches:
            return torch.cat(batches)[:n].float().contiguous(), "validation", None
        reason = "its validation split is empty"
    except (DataError, ConfigError, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    shape = (n, trained.preprocess.channels, trained.preprocess.size, trained.preprocess.size)
    random = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    return random, "random", f"cannot read the {cfg.data.dataset} data ({reason}): checking on {n} random inputs instead"


def check_parity(model: nn.Module, program: Program, x: torch.Tensor, *, batch: int,
                 kind: str = "validation") -> Parity:
    """Run ``model`` (eager) and ``program`` on ``x`` in batches of ``batch`` and compare their logits.

    ``Parity.error`` says what is wrong when the largest difference exceeds the tolerance
    (``RELATIVE_TOLERANCE * max(1, max |eager logit|)``) or the top-1 class differs on any input;
    it is None when they match.

    Example:
        >>> m = nn.Linear(4, 3).eval()
        >>> check_parity(m, m, torch.ones(2, 4), batch=2).max_abs_diff
        0.0
    """
    with torch.inference_mode():
        eager = torch.cat([model(chunk).float() for chunk in x.split(batch)])
        exported = torch.cat([program(chunk).float() for chunk in x.split(batch)])
    diff = float((eager - exported).abs().max())
    tolerance = RELATIVE_TOLERANCE * max(1.0, float(eager.abs().max()))
    flipped = int((eager.argmax(1) != exported.argmax(1)).sum())
    error = None
    if not diff <= tolerance:  # NaN fails too
        error = f"max abs difference {diff:.3g} > tolerance {tolerance:.3g}"
    elif flipped:
        error = f"top-1 differs on {flipped} of {len(x)} inputs (max abs difference {diff:.3g})"
    return Parity(diff, tolerance, len(x), kind, error)


def export_metadata(checkpoint: str | Path, trained: Trained, dynamic_batch: bool, parity: Parity) -> dict[str, Any]:
    """``kiln.json``: what a user of the exported file needs, and where it came from.

    ``{"format": 1, "class_names", "preprocessing" (Preprocessing.to_dict()), "input": {"channels", "size",
    "batch": 1|"dynamic"}, "model" (build_model's arguments), "validated_precision" (null for a checkpoint
    from before kiln recorded it), "weights" ("ema"|"model"), "checkpoint", "kiln_version", "torch_version",
    "check": {"max_abs_diff", "tolerance", "samples", "inputs": "validation"|"random"}}``
    """
    preprocess = trained.preprocess
    return {
        "format": METADATA_FORMAT, "class_names": list(trained.class_names), "preprocessing": preprocess.to_dict(),
        "input": {"channels": preprocess.channels, "size": preprocess.size, "batch": "dynamic" if dynamic_batch else 1},
        "model": trained.record["model"], "validated_precision": trained.validated_precision, "weights": trained.weights,
        "checkpoint": str(checkpoint), "kiln_version": versions()["kiln"], "torch_version": torch.__version__,
        "check": parity.to_dict(),
    }


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ``kiln.json`` of an exported file (.ts, .pt2 or .onnx, told apart by suffix).

    Raises:
        ConfigError: the file has no kiln metadata, or its suffix is none of FORMATS'.
    """
    path = Path(path)
    extra = {METADATA_FILE: ""}
    with _quiet():
        if path.suffix == ".ts":
            torch.jit.load(str(path), _extra_files=extra, map_location="cpu")
        elif path.suffix == ".pt2":
            torch.export.load(path, extra_files=extra)
        elif path.suffix == ".onnx":
            import onnx

            props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
            extra[METADATA_FILE] = props.get(ONNX_METADATA_KEY, "")
        else:
            raise ConfigError(f"{path}: not an exported file (.ts, .pt2 or .onnx)")
    if not extra[METADATA_FILE]:
        raise ConfigError(f"{path} has no kiln metadata")
    return json.loads(extra[METADATA_FILE])


def format_export(result: Exported) -> str:
    """Two lines: what was written and how it was checked, then the preprocessing it expects."""
    meta = result.metadata
    check = meta["check"]
    images = "validation images" if check["inputs"] == "validation" else "random inputs"
    return (f"exported {result.checkpoint} -> {result.path} ({result.format}, {result.size_bytes / 1e6:.1f} MB, "
            f"batch {meta['input']['batch']}); checked on {check['samples']} {images}: "
            f"max abs difference {check['max_abs_diff']:.3g} (tolerance {check['tolerance']:.3g})\n"
            f"preprocessing: {_describe(meta['preprocessing'])}")


def _describe(preprocessing: dict[str, Any]) -> str:
    from recipes.data.preprocess import Preprocessing

    return Preprocessing.from_dict(preprocessing).describe()


def _torchscript(model: nn.Module, example: torch.Tensor, dynamic_batch: bool) -> tuple[Program, Writer]:
    """Traced (any batch size works for kiln's CNNs either way); scripted if tracing fails."""
    try:
        module = torch.jit.trace(model, example, check_trace=False)  # check_parity checks, on more inputs
    except Exception:  # noqa: BLE001 - data-dependent control flow: TorchScript's compiler may still take it
        module = torch.jit.script(model)

    def write(f: BinaryIO, metadata: str) -> None:
        torch.jit.save(module, f, _extra_files={METADATA_FILE: metadata})

    return torch.jit.load(_serialized(write), map_location="cpu"), write


def _exported(model: nn.Module, example: torch.Tensor, dynamic_batch: bool) -> tuple[Program, Writer]:
    """``torch.export``: batch 1 unless ``dynamic_batch``, which marks dimension 0 dynamic."""
    shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    program = torch.export.export(model, (example,), dynamic_shapes=shapes)

    def write(f: BinaryIO, metadata: str) -> None:
        torch.export.save(program, f, extra_files={METADATA_FILE: metadata})

    return torch.export.load(_serialized(write)).module(), write


def _onnx(model: nn.Module, example: torch.Tensor, dynamic_batch: bool) -> tuple[Program, Writer]:
    """The dynamo ONNX exporter (input ``input``, output ``logits``), checked in an onnxruntime session."""
    import onnx
    import onnxruntime

    shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    proto = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=shapes, input_names=["input"],
                              output_names=["logits"]).model_proto
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])

    def write(f: BinaryIO, metadata: str) -> None:
        onnx.helper.set_model_props(proto, {ONNX_METADATA_KEY: metadata})
        f.write(proto.SerializeToString())

    return run, write


_EXPORTERS: dict[str, Callable[[nn.Module, torch.Tensor, bool], tuple[Program, Writer]]] = {
    "torchscript": _torchscript, "exported": _exported, "onnx": _onnx}


def _serialized(write: Writer) -> io.BytesIO:
    """What ``write`` writes (without metadata), in memory, ready to be loaded back."""
    buffer = io.BytesIO()
    write(buffer, "{}")
    buffer.seek(0)
    return buffer


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' progress lines and warnings (the ONNX exporter prints; TorchScript warns that
    it is deprecated): kiln prints its own lines."""
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        yield


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__
