"""Run the examples the README and the guides show, and compare what they print with what the page says.

A *console block* is a fenced block whose first line starts with ``$ ``: each ``$ `` line is a command
(a line ending in ``\\`` continues on the next), the lines after it are what it prints (stdout and
stderr together, as a terminal shows them). The commands of one page run in order in one temporary
working directory (so ``kiln train ... --out runs/x`` then ``kiln resume runs/x`` works), where
``docs`` links to this folder (so ``python docs/digits_as_png.py`` works as written), with
``OMP_NUM_THREADS=1`` and ``MKL_NUM_THREADS=1``.

An HTML comment on the line above a fenced block says more about it:

- ``<!-- example: long -->``: run only by ``python docs/check_examples.py --long`` (Fashion-MNIST, sweeps);
- ``<!-- example: skip (reason) -->``: never run (it needs a GPU, a server or two machines); the reason is required;
- ``<!-- example: python -->``: a ```python block that is run; the next fenced block is what it prints;
- ``<!-- example: file NAME -->``: the block's text is written to NAME in the working directory (a recipe file);
- words combine: ``<!-- example: python long -->``.

What is compared is the stable part of the output: the sequence of lines, with every number replaced
by ``#``, the precision names (bf16, fp16, fp32) by ``PREC`` and runs of spaces by one space, so
figures that vary with the CPU (losses, timings, accuracies' last digits, ``auto`` precision) do not
count but every line, word and field does. A line ``...`` (or ``... (a note)``) in the page matches
any number of lines, for output that depends on the CPU (which findings kiln reports) or is too long
to show whole. The progress lines a run prints inside an epoch longer than ``train.progress_seconds``
(``epoch 4/12  iteration 400/469 (85%) ...``) are left out on both sides: whether they come at all
depends on the machine's speed. A command must exit with status 0, unless the next command of the block is
``echo $?``, whose shown output then says which status it had (that line is compared exactly).
"""
from __future__ import annotations

import difflib
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ROOT", "Block", "Result", "markdown_files", "parse", "normalise", "matches", "run_page"]

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
#: Seconds a block may run before it counts as failed.
QUICK_TIMEOUT, LONG_TIMEOUT = 300, 3600

_FENCE = re.compile(r"^(```+|~~~+)(.*)$")
_DIRECTIVE = re.compile(r"^<!--\s*example:\s*(.*?)\s*-->\s*$")
_NUMBER = re.compile(r"\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
_PRECISION = re.compile(r"\b(?:bf16|fp16|fp32)\b")
_ELISION = re.compile(r"^\.\.\.(?: \(.*\))?$")
#: A run's timed progress line inside a long epoch (recipes' Progress handler, without a terminal).
_PROGRESS = re.compile(r"^epoch \d+/\d+  iteration \d+/\d+ \(\d+%\)")


@dataclass
class Block:
    """One fenced block of a Markdown page that the check knows about."""

    path: Path
    line: int  #: 1-based line of the opening fence
    kind: str  #: console | python | file
    text: str  #: the block's content, exactly as the page shows it
    long: bool = False
    skip: str | None = None  #: why it is never run
    output: str | None = None  #: python: the next fenced block (what it prints)
    output_line: int | None = None
    filename: str | None = None  #: file: where its text is written
    fence: tuple[int, int] = (0, 0)  #: 0-based line indexes of the content (start, end exclusive)
    output_fence: tuple[int, int] | None = None

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path}:{self.line}"

    def commands(self) -> list[str]:
        """The console block's commands, continuation lines joined as the page writes them."""
        commands, lines = [], self.text.splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            i += 1
            if not line.startswith("$ "):
                continue
            command = line[2:]
            while command.endswith("\\") and i < len(lines):
                command += "\n" + lines[i]
                i += 1
            commands.append(command)
        return commands


@dataclass
class Result:
    """What running one block gave."""

    block: Block
    status: str  #: ok | drift | skipped
    seconds: float = 0.0
    transcript: str = ""
    diff: str = ""
    why: str = ""


def markdown_files() -> list[Path]:
    """README.md and every page in docs/."""
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def _directive(lines: list[str], fence_index: int) -> str | None:
    """The ``<!-- example: ... -->`` text on the non-blank line above a fence, if any."""
    j = fence_index - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    if j < 0:
        return None
    match = _DIRECTIVE.match(lines[j].strip())
    return match.group(1) if match else None


def _fences(lines: list[str]) -> list[tuple[int, int, str]]:
    """(opening line index, closing line index, info string) of every fenced block."""
    found, i = [], 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        marker, info = match.group(1), match.group(2).strip()
        j = i + 1
        while j < len(lines) and not (lines[j].startswith(marker[0] * len(marker)) and not lines[j].strip(marker[0]).strip()):
            j += 1
        found.append((i, j, info))
        i = j + 1
    return found


def parse(path: Path) -> list[Block]:
    """The console blocks of ``path``, and the python and file blocks its directives mark."""
    lines = path.read_text().splitlines()
    fences = _fences(lines)
    blocks = []
    for n, (start, end, info) in enumerate(fences):
        text = "".join(line + "\n" for line in lines[start + 1:end])
        directive = _directive(lines, start)
        words, skip = [], None
        if directive is not None:
            reason = re.search(r"\((.*)\)\s*$", directive)
            head = directive[:reason.start()] if reason else directive
            words = head.split()
            if "skip" in words:
                skip = reason.group(1).strip() if reason else ""
        block = Block(path, start + 1, "console", text, long="long" in words, skip=skip, fence=(start + 1, end))
        if "file" in words:
            block.kind, block.filename = "file", words[words.index("file") + 1]
        elif "python" in words:
            block.kind = "python"
            if n + 1 < len(fences):
                o_start, o_end, _ = fences[n + 1]
                block.output = "".join(line + "\n" for line in lines[o_start + 1:o_end])
                block.output_line, block.output_fence = o_start + 1, (o_start + 1, o_end)
        elif not text.startswith("$ "):
            continue
        blocks.append(block)
    return blocks


def normalise(text: str, workdir: str | None = None) -> list[str]:
    """The lines of ``text`` with numbers, precision names and spacing made comparable across CPUs."""
    if workdir:
        text = text.replace(workdir + os.sep, "").replace(workdir, ".")
    out: list[str] = []
    for line in text.splitlines():
        line = line.rstrip()
        if out and out[-1] == "$ echo $?":  # an exit status is compared as it is
            out.append(line.strip())
            continue
        if _PROGRESS.match(line):
            continue
        if _ELISION.match(line.strip()):
            out.append("...")
            continue
        line = _PRECISION.sub("PREC", line)
        line = _NUMBER.sub("#", line)
        out.append(re.sub(r"\s+", " ", line).strip())
    return out


def matches(expected: list[str], actual: list[str]) -> bool:
    """Whether ``actual`` is ``expected`` line for line, each ``...`` of ``expected`` standing for any lines."""
    # glob matching over lines: can[i][j] = expected[i:] matches actual[j:]
    can = [[False] * (len(actual) + 1) for _ in range(len(expected) + 1)]
    can[len(expected)][len(actual)] = True
    for i in range(len(expected) - 1, -1, -1):
        for j in range(len(actual), -1, -1):
            if expected[i] == "...":
                can[i][j] = can[i + 1][j] or (j < len(actual) and can[i][j + 1])
            else:
                can[i][j] = j < len(actual) and expected[i] == actual[j] and can[i + 1][j + 1]
    return can[0][0]


def _diff(expected: list[str], actual: list[str], where: str) -> str:
    return "\n".join(difflib.unified_diff(expected, actual, f"{where} (the page, normalised)",
                                          "what it printed (normalised)", lineterm="", n=2))


def _environment() -> dict[str, str]:
    env = {**os.environ, **ENV}
    # `kiln` and `python` are this interpreter's, and kiln's packages import from this checkout
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(ROOT), env.get("PYTHONPATH", "")] if p)
    env.pop("KILN_MALLOC", None)
    env.pop("COLUMNS", None)
    return env


def _console_script(block: Block, status_file: Path) -> str:
    parts = ["set +e", "__status=0"]
    for command in block.commands():
        shown = "$ " + command
        # echo the command as a terminal shows it, then give it the previous command's $? back
        parts.append(f"printf '%s\\n' {_quote(shown)}; (exit $__status)")
        parts.append(command)
        parts.append(f"__status=$?; echo $__status >> {_quote(str(status_file))}")
    return "\n".join(parts) + "\n"


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def _run_console(block: Block, workdir: Path, env: dict[str, str], timeout: float) -> Result:
    status_file = workdir.parent / f"status-{block.line}"
    status_file.unlink(missing_ok=True)
    started = time.monotonic()
    try:
        proc = subprocess.run(["bash", "-c", _console_script(block, status_file)], cwd=workdir, env=env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=timeout)
        transcript = proc.stdout
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return Result(block, "drift", time.monotonic() - started, out, why=f"timed out after {timeout:.0f} s")
    seconds = time.monotonic() - started
    statuses = [int(s) for s in status_file.read_text().split()] if status_file.exists() else []
    commands = block.commands()
    whys = []
    for i, command in enumerate(commands):
        shown_by_echo = i + 1 < len(commands) and commands[i + 1].strip() == "echo $?"
        if i < len(statuses) and statuses[i] != 0 and not shown_by_echo:
            whys.append(f"`{command}` exited with status {statuses[i]} (show it with a following `$ echo $?`)")
    if len(statuses) < len(commands):
        whys.append(f"only {len(statuses)} of {len(commands)} commands ran")
    return _compare(block, block.text, transcript, str(workdir), seconds, whys)


def _run_python(block: Block, workdir: Path, env: dict[str, str], timeout: float) -> Result:
    started = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-c", block.text], cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Result(block, "drift", time.monotonic() - started, why=f"timed out after {timeout:.0f} s")
    whys = [f"exited with status {proc.returncode}"] if proc.returncode else []
    if block.output is None:
        whys.append("no fenced block after it shows its output")
    return _compare(block, block.output or "", proc.stdout, str(workdir), time.monotonic() - started, whys)


def _compare(block: Block, shown: str, transcript: str, workdir: str, seconds: float, whys: list[str]) -> Result:
    expected, actual = normalise(shown), normalise(transcript, workdir)
    diff = ""
    if not matches(expected, actual):
        whys.append("the output differs from the page")
        diff = _diff(expected, actual, block.where)
    return Result(block, "drift" if whys else "ok", seconds, transcript, diff, "; ".join(whys))


def run_page(path: Path, long: bool = False, workdir: Path | None = None, on_result=None) -> list[Result]:
    """Run the blocks of one page in order in one working directory; long ones only if ``long``.

    ``on_result(result)`` is called after each block (the script prints as it goes).
    """
    blocks = parse(path)
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="kiln-docs-") as tmp:
        work = Path(workdir) if workdir else Path(tmp) / "work"
        work.mkdir(parents=True, exist_ok=True)
        if not (work / "docs").exists():
            (work / "docs").symlink_to(DOCS, target_is_directory=True)
        env = _environment()
        for block in blocks:
            if block.kind == "file":
                (work / block.filename).write_text(block.text)
                continue
            if block.skip is not None:
                result = Result(block, "skipped", why=f"skip: {block.skip}")
            elif block.long and not long:
                result = Result(block, "skipped", why="long (run with --long)")
            else:
                timeout = LONG_TIMEOUT if block.long else QUICK_TIMEOUT
                run = _run_python if block.kind == "python" else _run_console
                result = run(block, work, env, timeout)
            results.append(result)
            if on_result is not None:
                on_result(result)
    return results


def rewrite(results: list[Result]) -> int:
    """Put what each block printed into its page, where the page shows no ``...``; returns how many changed.

    Run by ``check_examples.py --update`` to regenerate the shown outputs from real runs (figures
    included); blocks with an elision are left for a person to edit.
    """
    by_page: dict[Path, list[Result]] = {}
    for r in results:
        if r.status != "skipped" and r.transcript:
            by_page.setdefault(r.block.path, []).append(r)
    count = 0
    for path, page_results in by_page.items():
        lines = path.read_text().splitlines()
        for r in sorted(page_results, key=lambda r: r.block.line, reverse=True):
            shown = r.block.output if r.block.kind == "python" else r.block.text
            fence = r.block.output_fence if r.block.kind == "python" else r.block.fence
            if shown is None or fence is None or "..." in normalise(shown) or shown == r.transcript:
                continue
            lines[fence[0]:fence[1]] = r.transcript.rstrip("\n").splitlines()
            count += 1
        path.write_text("\n".join(lines) + "\n")
    return count
