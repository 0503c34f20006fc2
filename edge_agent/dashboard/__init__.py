"""The fleet dashboard: one page that watches the fleet over MQTT over WebSockets, in the browser.

The page (``index.html`` beside this module, with the vendored MQTT.js browser build ``mqtt.min.js``)
connects straight to the broker's WebSockets listener: no server of ours sits in between. It is
configured by its URL query (``?broker=ws://127.0.0.1:9001&prefix=offload/v1``); ``edge-agent
dashboard`` prints that URL for the installed file (``--print``) or serves the files on loopback
(``--serve PORT``).

    edge-agent dashboard --ws-broker ws://127.0.0.1:9001 --print
    edge-agent dashboard --ws-broker ws://127.0.0.1:9001 --serve 8080
    edge-agent dashboard --ws-broker wss://broker.lan:9443 --username operator --serve 8080
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import http.server
import logging
import re
import signal
import threading
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlencode, urlsplit

from agent_common.cli import EXIT_OK, UsageError
from topics.errors import TopicError
from topics.names import DEFAULT_PREFIX, TopicTree, validate_node_id

log = logging.getLogger(__name__)

__all__ = ["FILES", "DashboardServer", "add_arguments", "inline_script_hash", "page_path", "page_query",
           "run"]

HERE = Path(__file__).resolve().parent
FILES: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "mqtt.min.js": "text/javascript; charset=utf-8",
    "mqtt.js-LICENSE.md": "text/markdown; charset=utf-8",
}
"""The files served, by name, with their content types (nothing else is)."""


def page_path() -> Path:
    """The installed page (package data)."""
    return HERE / "index.html"


def page_query(ws_broker: str, prefix: str = DEFAULT_PREFIX, *, username: str | None = None) -> str:
    """The page's query string for ``ws_broker`` (``ws://host:port`` or ``wss://...``), ``prefix`` and
    the user it logs in as (the page asks for the password); raises :class:`ValueError` for a broker
    URL, prefix or user name the page cannot use."""
    parts = urlsplit(ws_broker)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"the WebSockets broker must be ws://host:port or wss://host:port, "
                         f"got {ws_broker!r}")
    try:
        parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
    except ValueError as exc:
        raise ValueError(f"bad port in {ws_broker!r}: {exc}") from None
    try:
        TopicTree(prefix)
    except TopicError as exc:
        raise ValueError(f"bad prefix {prefix!r}: {exc}") from exc
    values = {"broker": ws_broker, "prefix": prefix}
    if username is not None:
        try:
            values["username"] = validate_node_id(username, what="username")
        except TopicError as exc:
            raise ValueError(f"{exc} (the page's node id is its user name)") from exc
    return urlencode(values)


_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)


def inline_script_hash(html: str) -> str:
    """The CSP source (``'sha256-...'``) of the page's one inline script."""
    scripts = _INLINE_SCRIPT.findall(html)
    if len(scripts) != 1:
        raise ValueError(f"the page must have exactly one inline script, found {len(scripts)}")
    digest = hashlib.sha256(scripts[0].encode("utf-8")).digest()
    return f"'sha256-{base64.b64encode(digest).decode()}'"


class _Handler(http.server.BaseHTTPRequestHandler):
    server_version = "mqtt-offload-dashboard"
    sys_version = ""

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _answer(self, *, body: bool) -> None:
        name = urlsplit(self.path).path.lstrip("/") or "index.html"
        kind = FILES.get(name)
        if kind is None:
            self.send_error(404)
            return
        data = (HERE / name).read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # http.server's signature
        log.debug("dashboard http: " + format, *args)


class DashboardServer:
    """The page's files over HTTP on ``host:port`` (0: a free port), in a thread; a context manager."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1") -> None:
        self._http = http.server.ThreadingHTTPServer((host, port), _Handler)
        self._http.daemon_threads = True
        self.host = host
        self.port: int = self._http.server_address[1]
        self._thread: threading.Thread | None = None

    def url(self, query: str = "") -> str:
        return f"http://{self.host}:{self.port}/" + (f"?{query}" if query else "")

    def start(self) -> DashboardServer:
        if self._thread is None:
            self._thread = threading.Thread(target=self._http.serve_forever, name="dashboard-http",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._http.shutdown()
            self._thread.join(5.0)
            self._thread = None
        self._http.server_close()

    def __enter__(self) -> DashboardServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``edge-agent dashboard``."""
    parser.add_argument("--ws-broker", required=True, metavar="URL",
                        help="the broker's WebSockets listener, ws://host:port (wss:// for TLS)")
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"topic prefix of the fleet "
                        f"(default {DEFAULT_PREFIX})")
    parser.add_argument("--username", metavar="USER", default=None,
                        help="log in as USER (the page asks for the password; the page's node id is "
                        "USER: 'operator' under the shipped ACL)")
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument("--print", action="store_true", help="print the page's file URL (the default)")
    shown.add_argument("--serve", type=int, metavar="PORT", default=None,
                       help="serve the page on 127.0.0.1:PORT (0: a free port) until Ctrl-C, print its URL")


def run(args: argparse.Namespace) -> int:
    """``edge-agent dashboard``: print the page's URL, or serve it until SIGINT/SIGTERM."""
    try:
        query = page_query(args.ws_broker, args.prefix, username=args.username)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if args.serve is None:
        print(f"{page_path().as_uri()}?{query}", flush=True)
        return EXIT_OK
    if not 0 <= args.serve <= 65535:
        raise UsageError(f"--serve needs a port 0-65535, got {args.serve}")
    try:
        server = DashboardServer(args.serve)
    except OSError as exc:
        raise UsageError(f"cannot serve on 127.0.0.1:{args.serve}: {exc.strerror or exc}") from exc
    stop_requested = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop_requested.set())
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with server:
            print(server.url(query), flush=True)
            while not stop_requested.wait(0.5):
                pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return EXIT_OK
