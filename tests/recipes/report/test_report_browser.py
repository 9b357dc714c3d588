"""report.html in a real headless browser (Debian's chromium): every image loads, the summary shows, nothing is fetched.

The browser is driven through the Chrome DevTools protocol over ``--remote-debugging-pipe`` (JSON
messages, NUL-terminated, on file descriptors 3 and 4) with the standard library only. A full-page
screenshot is kept as a test artifact in ``test-artifacts/report_browser/``. Without chromium the test
is skipped, unless ``KILN_REQUIRE_BROWSER=1`` (``.ci/run`` sets it after installing chromium).
"""
from __future__ import annotations

import base64
import io
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from recipes.cli.options import resolve_config
from recipes.report import finish_run
from recipes.report.mistakes import measure_mistakes
from recipes.run import train

ARTIFACTS = Path(__file__).resolve().parents[3] / "test-artifacts" / "report_browser"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--remote-debugging-pipe"]


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


class DevTools:
    """A minimal DevTools-protocol client over the pipe chromium opens on fds 3 (in) and 4 (out)."""

    def __init__(self, binary: str, profile: Path) -> None:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def wire_fds() -> None:  # in the child, before exec: fd 3 reads commands, fd 4 writes replies
            os.dup2(to_browser_r, 3)
            os.dup2(from_browser_w, 4)

        self.proc = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                     preexec_fn=wire_fds, close_fds=False,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._next_id = 0
        self._messages: queue.Queue = queue.Queue()
        self.events: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buffer = b""
        while True:
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                self._messages.put(None)
                return
            buffer += chunk
            while b"\0" in buffer:
                raw, buffer = buffer.split(b"\0", 1)
                self._messages.put(json.loads(raw))

    def _next(self, deadline: float) -> dict:
        message = self._messages.get(timeout=max(0.01, deadline - time.monotonic()))
        if message is None:
            raise RuntimeError("chromium closed the DevTools pipe")
        if "id" not in message:
            self.events.append(message)
        return message

    def send(self, method: str, session: str | None = None, timeout: float = 30.0, **params) -> dict:
        """Send a command and wait for its reply; events that arrive meanwhile are kept in ``events``."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._next(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def wait_event(self, method: str, timeout: float = 30.0) -> dict:
        """The first event called ``method`` (already received or still to come)."""
        for event in self.events:
            if event.get("method") == method:
                return event
        deadline = time.monotonic() + timeout
        while True:
            message = self._next(deadline)
            if message.get("method") == method:
                return message

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except Exception:  # noqa: BLE001 - it may already be gone
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_browser)


CHECK_PAGE = """JSON.stringify({
  images: Array.from(document.images).map(i => ({ok: i.complete && i.naturalWidth > 0, w: i.naturalWidth,
                                                  shown: i.getBoundingClientRect().width, alt: i.alt})),
  title: document.title,
  summary: (document.querySelector('#summary') || {innerText: ''}).innerText,
  findings: (document.querySelector('#findings') || {innerText: ''}).innerText,
  mistakes: (document.querySelector('#mistakes') || {innerText: ''}).innerText,
  summaryVisible: !!document.querySelector('#summary') && document.querySelector('#summary').getBoundingClientRect().height > 0
})"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    cfg = resolve_config("synthetic", ("train.log_every=2",))
    run_dir = tmp_path_factory.mktemp("browser") / "run"
    train(cfg, run_dir, quiet=True, stream=io.StringIO())
    measure_mistakes(run_dir, io.StringIO())  # what the best checkpoint gets wrong, as the CLI does after a run
    finish_run(run_dir, io.StringIO())  # plots/ and report.html, as the CLI writes them after a run
    return run_dir


def test_report_opens_in_chromium_with_every_image_loaded(run_dir, tmp_path):
    binary = _chromium()
    if binary is None:
        if os.environ.get("KILN_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium is required here (KILN_REQUIRE_BROWSER=1) but is not installed")
        pytest.skip("no chromium: apt-get install chromium (.ci/run does)")
    report = run_dir / "report.html"
    summary = json.loads((run_dir / "summary.json").read_text())
    plots = sorted(p.name for p in (run_dir / "plots").glob("*.png"))

    browser = DevTools(binary, tmp_path / "profile")
    try:
        target = browser.send("Target.createTarget", url="about:blank")["targetId"]
        session = browser.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        browser.send("Page.enable", session)
        browser.send("Network.enable", session)
        browser.send("Emulation.setDeviceMetricsOverride", session, width=1200, height=900, deviceScaleFactor=1,
                     mobile=False)
        browser.send("Page.navigate", session, url=report.as_uri())
        browser.wait_event("Page.loadEventFired")
        state = json.loads(browser.send("Runtime.evaluate", session, expression=CHECK_PAGE,
                                        returnByValue=True)["result"]["value"])
        size = browser.send("Page.getLayoutMetrics", session)["cssContentSize"]
        shot = browser.send("Page.captureScreenshot", session, format="png", captureBeyondViewport=True,
                            clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
    finally:
        browser.close()

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    screenshot = ARTIFACTS / "report.png"
    screenshot.write_bytes(base64.b64decode(shot["data"]))
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert {"mistakes.png", "confusion.png"} <= set(plots)  # the misclassified images and the confusion matrix
    assert sorted(image["alt"] for image in state["images"]) == plots
    assert all(image["ok"] for image in state["images"]), state["images"]  # every image decoded
    assert all(image["w"] > 500 and image["shown"] > 300 for image in state["images"])
    assert state["summaryVisible"]
    assert summary["status"] in state["summary"]
    assert f"{100 * summary['best_val_accuracy']:.2f}%" in state["summary"]
    assert "BEST VAL ACCURACY" in state["summary"].upper()
    assert state["title"].startswith("kiln report: synthetic")
    mistakes = json.loads((run_dir / "mistakes.json").read_text())
    assert "What it gets wrong" in state["mistakes"] and mistakes["checkpoint"] in state["mistakes"]
    assert len(mistakes["top_losses"]) == 16 and sum(map(sum, mistakes["confusion_matrix"])) == mistakes["samples"]
    fetched = [e["params"]["request"]["url"] for e in browser.events if e.get("method") == "Network.requestWillBeSent"]
    assert fetched and all(url.startswith(("file://", "data:")) for url in fetched), fetched  # no network
