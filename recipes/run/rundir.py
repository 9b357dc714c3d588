"""The run directory's records, read the one way every reader should read them.

A run's .jsonl records are appended while other processes (a report, a test, a second terminal) read them:
a reader can meet a last line half written, and a run killed mid-append leaves one behind for good. Either
way that line is not a record yet. :func:`read_jsonl` is the reader that knows it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["read_jsonl"]


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a .jsonl record, oldest first; ``[]`` when it does not exist (yet).

    A torn last line (being written now, or cut by a crash) does not parse and is left out, and so is any
    other line that does not hold one JSON object; a last line that parses is whole (no prefix of a JSON
    object is one), newline or not. OS errors other than a missing file (permission, I/O) are raised.

        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "steps.jsonl"
        >>> _ = p.write_text('{"iteration": 1}\\n{"iteration": 2}\\n{"itera')
        >>> read_jsonl(p)
        [{'iteration': 1}, {'iteration': 2}]
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    records = []
    for line in data.splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # JSONDecodeError, UnicodeDecodeError
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
