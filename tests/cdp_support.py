"""Headless Chromium driven over its DevTools protocol: just what the dashboard tests need.

Chromium is Debian's (``apt-get install chromium``). The client is a few calls over one WebSocket
(the ``websockets`` package, which amqtt already brings): navigate, evaluate an expression in the
page, take a screenshot; console errors and uncaught exceptions of the page are collected, so a
test can tell a page that broke from one that merely shows the wrong thing.
"""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from websockets.sync.client import ClientConnection, connect

CHROMIUM_MISSING = "chromium not installed: apt-get install -y chromium"


def chromium_binary() -> str | None:
    """Path of Debian's Chromium (or a chromium/google-chrome on PATH), or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class BrowserError(RuntimeError):
    """Chromium did not start, or a DevTools call failed."""


class Browser:
    """One headless Chromium process with one page, driven over the DevTools protocol."""

    def __init__(self, binary: str, *, width: int = 1360, height: int = 900,
                 flags: Sequence[str] = ()) -> None:
        """``flags``: more command-line switches (e.g. ``--ignore-certificate-errors-spki-list=...``)."""
        self._profile = Path(tempfile.mkdtemp(prefix="chromium-"))
        self._ids = itertools.count(1)
        self.errors: list[str] = []
        """Console errors and uncaught exceptions of the page, in order."""
        self._stderr = (self._profile / "stderr").open("wb")
        self._process = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions",
             "--disable-background-networking", "--disable-background-timer-throttling",
             "--disable-renderer-backgrounding", "--disable-backgrounding-occluded-windows",
             f"--window-size={width},{height}", f"--user-data-dir={self._profile}",
             "--remote-debugging-port=0", *flags, "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._stderr)
        try:
            self._socket = connect(self._page_socket_url(), max_size=None, open_timeout=10)
            self.call("Runtime.enable")
            self.call("Page.enable")
            self.call("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        except BaseException:
            self.close()
            raise

    def _page_socket_url(self, timeout: float = 20.0) -> str:
        """The page target's DevTools WebSocket: Chromium writes its port to DevToolsActivePort."""
        marker = self._profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise BrowserError(f"chromium exited with {self._process.returncode}: {self._stderr_tail()}")
            lines = marker.read_text().split("\n") if marker.exists() else []
            if len(lines) >= 2 and lines[0].isdigit():
                browser = connect(f"ws://127.0.0.1:{lines[0]}{lines[1]}", max_size=None, open_timeout=10)
                try:
                    return self._first_page(browser, int(lines[0]), deadline)
                finally:
                    browser.close()
            time.sleep(0.05)
        raise BrowserError(f"chromium gave no DevTools port within {timeout:.0f}s: {self._stderr_tail()}")

    def _first_page(self, browser: ClientConnection, port: int, deadline: float) -> str:
        while time.monotonic() < deadline:
            browser.send(json.dumps({"id": 1, "method": "Target.getTargets"}))
            answer = json.loads(browser.recv(timeout=10))
            pages = [t for t in answer.get("result", {}).get("targetInfos", []) if t.get("type") == "page"]
            if pages:
                return f"ws://127.0.0.1:{port}/devtools/page/{pages[0]['targetId']}"
            time.sleep(0.05)
        raise BrowserError("chromium opened no page")

    def _stderr_tail(self) -> str:
        log_file = self._profile / "stderr"
        text = log_file.read_text(errors="replace") if log_file.exists() else ""
        return " | ".join(text.strip().splitlines()[-3:]) or "no output"

    def call(self, method: str, params: dict[str, Any] | None = None, *, timeout: float = 15.0) -> Any:
        """One DevTools command; returns its ``result`` (events that arrive meanwhile are kept)."""
        call_id = next(self._ids)
        self._socket.send(json.dumps({"id": call_id, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(f"{method}: no answer within {timeout:.0f}s")
            message = json.loads(self._socket.recv(timeout=left))
            if message.get("id") == call_id:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error']}")
                return message.get("result", {})
            self._event(message)

    def _event(self, message: dict[str, Any]) -> None:
        method, params = message.get("method"), message.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            shown = details.get("exception", {}).get("description") or details.get("text", "")
            self.errors.append(f"exception: {shown}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            args = params.get("args", [])
            shown = " ".join(str(a.get("value", a.get("description", ""))) for a in args)
            self.errors.append(f"console: {shown}")
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            self.errors.append("log: " + params["entry"].get("text", ""))

    def navigate(self, url: str) -> None:
        """Open ``url`` and wait for its load event."""
        self.call("Log.enable")
        self.call("Page.navigate", {"url": url})
        self.wait_for("document.readyState === 'complete'", message=f"{url} to load")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-serialisable values only)."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression[:80]!r} threw: {result['exceptionDetails'].get('text')}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, *, timeout: float = 20.0, interval: float = 0.02,
                 message: str = "") -> Any:
        """Poll ``expression`` in the page until it is truthy; returns its value, raises on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() >= deadline:
                raise BrowserError(f"timed out after {timeout:.0f}s waiting for {message or expression}"
                                   f" (page errors: {self.errors or 'none'})")
            time.sleep(interval)

    def screenshot(self, path: Path) -> Path:
        """A PNG of the whole page (beyond the window's height) at ``path``."""
        height = int(self.evaluate("Math.ceil(document.documentElement.scrollHeight)") or 900)
        width = int(self.evaluate("Math.ceil(document.documentElement.scrollWidth)") or 1360)
        data = self.call("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}})["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        socket = getattr(self, "_socket", None)
        if socket is not None:
            socket.close()
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(5.0)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(5.0)
        self._stderr.close()
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
