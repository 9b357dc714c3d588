"""What a user watching `kiln train` sees: the bar in a real terminal (tmux), plain lines in a pipe."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import uuid

import pytest

from tests.runs import KILN, REPO, kiln

#: tqdm's bar with kiln's postfix, e.g. ``Epoch [2/4]: [12/23]  52%|####4  , loss=0.747, lr=8.12e-03,
#: img/s=1830, run_eta=00:03 [00:01<00:01]``: the epoch's ETA is tqdm's own ``<...]``.
BAR = re.compile(r"\[\d+/\d+\].*loss=[\d.]+.*lr=[\d.e+-]+.*img/s=\d+.*run_eta=[\d:]+.*<\d")


def _tmux_or_skip() -> str:
    tmux = shutil.which("tmux")
    if tmux is None:
        if os.environ.get("KILN_REQUIRE_TMUX"):
            pytest.fail("tmux is required here (KILN_REQUIRE_TMUX) but not installed")
        pytest.skip("tmux is not installed (apt-get install tmux)")
    return tmux


def test_a_terminal_shows_the_bar_with_lr_throughput_and_both_etas(tmp_path):
    tmux = _tmux_or_skip()
    session = f"kiln-test-{uuid.uuid4().hex[:8]}"
    # the bar is the subject, not the end-of-run report (the run is ended once the bar is seen)
    command = " ".join([*KILN, "train", "digits", "--epochs", "6", "--no-report", "--out", str(tmp_path / "run")])
    subprocess.run([tmux, "new-session", "-d", "-s", session, "-x", "160", "-y", "30", "-c", str(REPO),
                    f"{command}; sleep 60"], check=True)
    seen, screens = None, []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and seen is None:
            screen = subprocess.run([tmux, "capture-pane", "-p", "-t", session], capture_output=True, text=True,
                                    check=False).stdout
            screens.append(screen)
            seen = next((line for line in screen.splitlines() if BAR.search(line)), None)
            if "epoch 6/6" in screen:
                break
            time.sleep(0.05)
    finally:
        subprocess.run([tmux, "kill-session", "-t", session], capture_output=True, check=False)
    assert seen is not None, "no bar with lr, img/s and both ETAs; last screen:\n" + (screens[-1] if screens else "")


def test_a_pipe_gets_plain_progress_lines_inside_a_long_epoch(tmp_path):
    """Piped (a batch job's log), an epoch longer than train.progress_seconds prints progress lines, and
    no carriage returns anywhere (the end-of-run report's lines included: it is drawn)."""
    done = kiln("train", "digits", "--epochs", "1", "--out", tmp_path / "run", "--set", "data.batch_size=8",
                "--set", "train.progress_seconds=0.5", timeout=600)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    progress = [line for line in lines if line.startswith("epoch 1/1  iteration ")]
    epoch_line = next(i for i, line in enumerate(lines) if line.startswith("epoch 1/1  train_loss"))
    assert progress and all(lines.index(line) < epoch_line for line in progress), done.stdout
    assert re.search(r"iteration \d+/180 \(\d+%\)  loss [\d.]+  lr [\d.e+-]+  \d+ img/s  epoch ETA [\d:]+  "
                     r"run ETA [\d:]+$", progress[0]), progress[0]
    assert "\r" not in done.stdout and "\r" not in done.stderr
