"""The Python examples of the README and the guides run as written, and are the files the other tests run.

The step-event example is in README.md (and is docs/example_step_events.py); the whole run from Python is in
docs/handlers.md; the torch-only loader is in docs/use-the-model.md (and is docs/load_without_kiln.py).
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SINGLE_THREAD_ENV

ROOT = Path(__file__).resolve().parent.parent
HEADING = "## From Python: attach your own handler to a step event"
EXAMPLE = ROOT / "docs" / "example_step_events.py"
RESULT = re.compile(r"(\d+) optimizer steps, train_loss")


def _section() -> str:
    readme = (ROOT / "README.md").read_text()
    if HEADING not in readme:
        pytest.fail(f"README.md has no heading {HEADING!r}: the Python example belongs under it")
    section = readme.split(HEADING, 1)[1]
    return re.split(r"^## ", section, maxsplit=1, flags=re.MULTILINE)[0]


def readme_example() -> str:
    """The first ```python block under HEADING, exactly as the README shows it."""
    match = re.search(r"^```python\n(.*?)^```", _section(), flags=re.MULTILINE | re.DOTALL)
    if match is None:
        pytest.fail(f"README.md has no ```python block under {HEADING!r}: embed docs/example_step_events.py there")
    return match.group(1)


def test_the_readme_example_is_docs_example_step_events():
    assert readme_example() == EXAMPLE.read_text(), \
        "README.md's example and docs/example_step_events.py differ: copy one into the other"


def test_the_readme_example_runs_as_written(digits):
    code = readme_example()
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, **SINGLE_THREAD_ENV})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if RESULT.search(line)]
    assert lines, result.stdout
    # two epochs over every digit in batches of 64, one optimizer step per batch
    steps = int(RESULT.search(lines[-1]).group(1))
    assert steps == 2 * math.ceil(len(digits[0]) / 64)
    # and the output the README shows has the same count
    shown = RESULT.search(_section().split(code, 1)[1])
    if shown is not None:
        assert int(shown.group(1)) == steps


HANDLER_GUIDE = ROOT / "docs" / "handlers.md"
WHOLE_RUN = "## A whole run from Python"
MODEL_GUIDE = ROOT / "docs" / "use-the-model.md"


def test_the_handler_guides_whole_run_example_runs_as_written(tmp_path):
    guide = HANDLER_GUIDE.read_text()
    assert WHOLE_RUN in guide, f"docs/handlers.md has no heading {WHOLE_RUN!r}: the whole-run example belongs under it"
    section = guide.split(WHOLE_RUN, 1)[1]
    code = re.search(r"^```python\n(.*?)^```", section, flags=re.MULTILINE | re.DOTALL).group(1)
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, **SINGLE_THREAD_ENV, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    status, _, accuracy = result.stdout.splitlines()[0].partition(" best val_accuracy ")
    assert status == "completed" and float(accuracy) >= 0.9
    assert f"report: {Path('runs/py-digits/report.html')}" in result.stdout
    assert (tmp_path / "runs" / "py-digits" / "plots" / "loss.png").exists()


def test_the_guides_torch_only_snippet_is_the_file_the_export_tests_run():
    """tests/recipes/tools/test_export.py runs docs/load_without_kiln.py with kiln hidden; the guide shows its code."""
    code = (ROOT / "docs" / "load_without_kiln.py").read_text().split('"""', 2)[2].lstrip("\n")
    assert f"```python\n{code}```" in MODEL_GUIDE.read_text(), \
        "docs/use-the-model.md's snippet for loading an export without kiln and docs/load_without_kiln.py differ"
