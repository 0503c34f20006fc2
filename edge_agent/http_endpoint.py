"""A local HTTP endpoint on the device: any program posts a task and gets its result, no MQTT needed.

    curl -s --data-binary '{"x": 7}' 'http://127.0.0.1:8780/tasks/square?deadline=5'
    {"y": 49}

``POST /tasks/<name>`` with a JSON body (the payload; ``{"$bytes": "<base64>"}`` for bytes, as on the
bridge) submits the task through the :class:`EdgeAgent`, so it runs locally or is offloaded like any
other, and answers with its JSON result. ``?deadline=<seconds>`` bounds it (default
:data:`DEFAULT_DEADLINE`). ``GET /healthz`` says whether the agent is up and connected.

Answers (errors are ``{"error": <reason>, "detail": <text>}``, plus ``attempts`` and ``target`` for
a task that ran): 200 the result; 400 malformed JSON, a bad deadline or query, a bad task name;
404 unknown task or path; 405 wrong method; 411 no Content-Length (chunked bodies are refused);
413 a body over ``max_body`` (refused from its Content-Length, before it is read); 502 the task
raised or a server did not know it; 503 no usable option, the agent stopped, a server busy, the
store-and-forward spool full, or ``max_pending`` requests already waiting (with ``Retry-After``);
504 the deadline passed (also for a task that waited in the spool for a server until then). Bad
requests are counted by reason and logged rate-limited (:class:`BadInputLog`).

Bound to 127.0.0.1 by default: anything that can reach the port can run tasks on this device's
budget, so exposing it beyond the device is a deliberate choice (``http_host``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import math
import re
import socket
import threading
import time
from collections import Counter
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from agent_common.badinput import BadInputLog
from agent_common.registry import UnknownTaskError
from edge_agent.records import TaskFailed
from edge_agent.spool import SpoolFull
from topics.codec import Codec, EncodeError
from topics.errors import DecodeError
from topics.models import MAX_TTL

if TYPE_CHECKING:
    from edge_agent.agent import EdgeAgent

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_MAX_BODY = 1024 * 1024
DEFAULT_MAX_PENDING = 64
DEFAULT_DEADLINE = 30.0
"""Seconds a task posted without ``?deadline`` may take."""
READ_TIMEOUT = 10.0
"""Seconds a client may take to send its request (a silent connection does not hold a thread)."""
RETRY_AFTER = "1"
LINGER_BYTES, LINGER_SECONDS = 4 * 1024 * 1024, 2.0
"""At most this much of a refused body is read (and dropped) before the connection is closed."""
_TASK_PATH = re.compile(r"/tasks/([^/]+)")
_TASK_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
# outcome of a failed task -> (HTTP status, Retry-After?)
_FAILED: dict[str, tuple[HTTPStatus, bool]] = {
    "error": (HTTPStatus.BAD_GATEWAY, False),
    "unknown-task": (HTTPStatus.BAD_GATEWAY, False),
    "rejected-busy": (HTTPStatus.SERVICE_UNAVAILABLE, True),
    "failed": (HTTPStatus.SERVICE_UNAVAILABLE, True),
    "expired": (HTTPStatus.GATEWAY_TIMEOUT, False),
    "timeout": (HTTPStatus.GATEWAY_TIMEOUT, False),
}


class _Refusal(Exception):
    """A request answered with an error: status, reason (counted), detail (said)."""

    def __init__(self, status: HTTPStatus, reason: str, detail: str, *, bad_input: bool = True,
                 retry_after: bool = False, close: bool = False, **extra: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail
        self.bad_input = bad_input
        self.retry_after = retry_after
        self.close = close
        self.extra = extra


class HttpEndpoint:
    """The endpoint of one agent. The constructor binds the socket (``port=0``: a free one, read
    :attr:`port`); :meth:`start` serves on a daemon thread; :meth:`close` stops."""

    def __init__(self, agent: EdgeAgent, *, host: str = DEFAULT_HOST, port: int = 0,
                 max_body: int = DEFAULT_MAX_BODY, max_pending: int = DEFAULT_MAX_PENDING,
                 default_deadline: float = DEFAULT_DEADLINE) -> None:
        self.agent = agent
        self.max_body = max_body
        self.max_pending = max_pending
        self.default_deadline = default_deadline
        self.bad_input = BadInputLog(log)
        self._codec = Codec("json", max_payload=max_body)
        self._lock = threading.Lock()
        self._pending = 0
        self._responses: Counter[int] = Counter()
        self._server = _Server((host, port), _handler_class(self), max_connections=max_pending + 16,
                               on_refused=lambda: self._answered(HTTPStatus.SERVICE_UNAVAILABLE))
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return str(self._server.server_address[0])

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> HttpEndpoint:
        if self._thread is None:
            self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                            name=f"{self.agent.id}-http", daemon=True)
            self._thread.start()
            log.info("node=%s HTTP endpoint on %s (POST /tasks/<name>)", self.agent.id, self.url)
        return self

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(2.0)
        self._server.server_close()

    def stats(self) -> dict[str, Any]:
        """``responses`` by status code, ``pending`` requests now, ``bad_input`` by reason."""
        with self._lock:
            return {"responses": {str(code): n for code, n in sorted(self._responses.items())},
                    "pending": self._pending, "bad_input": self.bad_input.snapshot()}

    def _answered(self, status: int) -> None:
        with self._lock:
            self._responses[status] += 1

    # ------------------------------------------------------------------ requests
    def health(self) -> dict[str, Any]:
        stats = self.agent.stats()
        return {"status": "ok", "node": self.agent.id, "connected": bool(stats.get("connected")),
                "servers": int(stats.get("servers", {}).get("usable", 0)),
                "local_tasks": self.agent.registry.names()}

    def run_task(self, name: str, query: str, body: bytes) -> tuple[bytes, dict[str, str]]:
        """Submit ``name`` with the JSON ``body``; the encoded result and headers, or :class:`_Refusal`."""
        deadline = self._deadline(query)
        try:
            payload = self._codec.decode_value(body, "json")
        except DecodeError as exc:
            raise _Refusal(HTTPStatus.BAD_REQUEST, f"json-{exc.reason}",
                           f"the body is not a JSON payload: {exc.detail}") from exc
        with self._lock:
            if self._pending >= self.max_pending:
                raise _Refusal(HTTPStatus.SERVICE_UNAVAILABLE, "busy",
                               f"{self._pending} requests already waiting (max_pending {self.max_pending})",
                               bad_input=False, retry_after=True)
            self._pending += 1
        try:
            return self._submit(name, payload, deadline)
        finally:
            with self._lock:
                self._pending -= 1

    def _deadline(self, query: str) -> float:
        try:
            params = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query), max_num_fields=8)
        except ValueError as exc:
            raise _Refusal(HTTPStatus.BAD_REQUEST, "bad-query", f"cannot parse the query: {exc}") from exc
        unknown = sorted(set(params) - {"deadline"})
        if unknown:
            raise _Refusal(HTTPStatus.BAD_REQUEST, "bad-query", f"unknown parameter(s) {unknown[:4]}; "
                           "only 'deadline' is known")
        values = params.get("deadline")
        if not values:
            return self.default_deadline
        try:
            deadline = float(values[-1])
        except ValueError:
            deadline = math.nan
        if len(values) > 1 or not 0.0 < deadline <= MAX_TTL:
            raise _Refusal(HTTPStatus.BAD_REQUEST, "bad-deadline", "deadline must be one number of seconds "
                           f"in (0, {MAX_TTL:.0f}], got {values[:2]}")
        return deadline

    def _submit(self, name: str, payload: Any, deadline: float) -> tuple[bytes, dict[str, str]]:
        try:
            handle = self.agent.submit(name, payload, deadline=deadline, origin=json.dumps({"http": name}))
        except UnknownTaskError as exc:
            raise _Refusal(HTTPStatus.NOT_FOUND, "unknown-task", str(exc)) from exc
        except RuntimeError as exc:  # stopped
            raise _Refusal(HTTPStatus.SERVICE_UNAVAILABLE, "stopped", str(exc), bad_input=False,
                           retry_after=True) from exc
        except SpoolFull as exc:  # nowhere to run it and no room to keep it
            raise _Refusal(HTTPStatus.SERVICE_UNAVAILABLE, "spool-full", str(exc), bad_input=False,
                           retry_after=True) from exc
        except ValueError as exc:
            raise _Refusal(HTTPStatus.BAD_REQUEST, "bad-task", str(exc)) from exc
        try:
            value = handle.result(timeout=deadline + 5.0)  # the agent gives an outcome by the deadline
        except TaskFailed as exc:
            status, retry = _FAILED.get(exc.status, (HTTPStatus.BAD_GATEWAY, False))
            record = handle.record
            raise _Refusal(status, exc.status, exc.error, bad_input=False, retry_after=retry,
                           attempts=exc.attempts, target=record.target if record else None,
                           task_id=handle.task_id) from exc
        except concurrent.futures.TimeoutError as exc:
            raise _Refusal(HTTPStatus.GATEWAY_TIMEOUT, "timeout", f"no outcome within {deadline + 5.0:.1f}s",
                           bad_input=False) from exc
        try:
            data = self._codec.encode_value(value, "json")
        except EncodeError as exc:
            raise _Refusal(HTTPStatus.INTERNAL_SERVER_ERROR, "unencodable-result",
                           f"the result cannot be sent as JSON: {exc}", bad_input=False) from exc
        record = handle.record
        headers = {"X-Task-Id": handle.task_id}
        if record is not None:
            headers |= {"X-Offload-Target": record.target, "X-Offload-Reason": record.reason,
                        "X-Offload-Attempts": str(record.attempts)}
        return data, headers


_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: "
         + RETRY_AFTER.encode() + b"\r\nConnection: close\r\nContent-Length: 59\r\n\r\n"
         b'{"error": "busy", "detail": "too many connections at once"}')


class _Server(ThreadingHTTPServer):
    """One thread per connection, at most ``max_connections`` at once (beyond: 503, closed)."""

    daemon_threads = True
    # ThreadingHTTPServer sets allow_reuse_address; a second agent on the same port must fail instead
    allow_reuse_address = False
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], *,
                 max_connections: int, on_refused: Any) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)
        self._max_connections = max_connections
        self._on_refused = on_refused
        self._connections = 0
        self._count_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._count_lock:
            full = self._connections >= self._max_connections
            if not full:
                self._connections += 1
        if full:
            self._on_refused()
            with contextlib.suppress(OSError):
                request.sendall(_BUSY)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._count_lock:
                self._connections -= 1


def _handler_class(endpoint: HttpEndpoint) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        pass

    Handler.endpoint = endpoint
    return Handler


class _Handler(BaseHTTPRequestHandler):
    endpoint: HttpEndpoint
    protocol_version = "HTTP/1.1"
    timeout = READ_TIMEOUT
    disable_nagle_algorithm = True
    """Headers and body go out in two writes: with Nagle on, a keep-alive client's delayed ACK would
    hold the body back ~40 ms on every request."""
    server_version = "mqtt-offload-edge"

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:  # the base class's name
        log.debug("node=%s http %s", self.endpoint.agent.id, format % args)

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/healthz":
            self._json(HTTPStatus.OK, self.endpoint.health())
        elif _TASK_PATH.fullmatch(path):
            self._refuse(_Refusal(HTTPStatus.METHOD_NOT_ALLOWED, "method", "POST a task", allow="POST"))
        else:
            self._refuse(_Refusal(HTTPStatus.NOT_FOUND, "bad-path", f"no such path {path[:100]!r}; "
                                  "POST /tasks/<name> or GET /healthz"))

    def do_POST(self) -> None:
        name = ""
        try:
            parts = urlsplit(self.path)
            matched = _TASK_PATH.fullmatch(parts.path)
            if matched is None:
                raise _Refusal(HTTPStatus.NOT_FOUND, "bad-path", f"no such path {parts.path[:100]!r}; "
                               "POST /tasks/<name>", close=True)
            name = unquote(matched.group(1))
            if not _TASK_NAME.fullmatch(name):
                raise _Refusal(HTTPStatus.BAD_REQUEST, "bad-task-name", "a task name is 1-128 of "
                               "A-Z a-z 0-9 _ . : -", close=True)
            body = self._body()
            data, headers = self.endpoint.run_task(name, parts.query, body)
        except _Refusal as refusal:
            self._refuse(refusal, task=name)
            return
        self._send(HTTPStatus.OK, data, headers)

    def do_PUT(self) -> None:
        self._refuse(_Refusal(HTTPStatus.METHOD_NOT_ALLOWED, "method", "POST a task", allow="POST",
                              close=True))

    do_DELETE = do_PATCH = do_PUT

    def handle_expect_100(self) -> bool:
        """Refuse an oversized body before the client sends it (curl asks first for large ones)."""
        try:
            self._check_length()
        except _Refusal as refusal:
            self._refuse(refusal)
            return False
        return super().handle_expect_100()

    def _check_length(self) -> int:
        if self.headers.get("Transfer-Encoding"):
            raise _Refusal(HTTPStatus.LENGTH_REQUIRED, "no-length", "chunked bodies are not accepted: send "
                           "Content-Length", close=True)
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            raise _Refusal(HTTPStatus.LENGTH_REQUIRED, "no-length", "send the body with a Content-Length",
                           close=True)
        try:
            length = int(length_header)
        except ValueError:
            length = -1
        if length < 0:
            raise _Refusal(HTTPStatus.BAD_REQUEST, "bad-length", "Content-Length is not a byte count",
                           close=True)
        limit = self.endpoint.max_body
        if length > limit:  # refused unread: the connection is closed after the answer
            raise _Refusal(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "too-large",
                           f"the body is {length} bytes, over the limit of {limit}", close=True)
        return length

    def _body(self) -> bytes:
        length = self._check_length()
        body = self.rfile.read(length)
        if len(body) < length:
            raise _Refusal(HTTPStatus.BAD_REQUEST, "short-body", f"got {len(body)} of {length} bytes",
                           close=True)
        return body

    def _refuse(self, refusal: _Refusal, *, task: str = "") -> None:
        endpoint = self.endpoint
        if refusal.bad_input:
            endpoint.bad_input.record(f"http-{refusal.reason}", refusal.detail,
                                      context=f"client={self.client_address[0]}"
                                      + (f" task={task[:128]!r}" if task else ""))
        headers: dict[str, str] = {}
        if refusal.retry_after:
            headers["Retry-After"] = RETRY_AFTER
        allow = refusal.extra.pop("allow", None)
        if allow:
            headers["Allow"] = allow
        if refusal.close:
            self.close_connection = True
            headers["Connection"] = "close"
        body = {"error": refusal.reason, "detail": refusal.detail[:2000]}
        body |= {key: value for key, value in refusal.extra.items() if value is not None}
        self._json(refusal.status, body, headers)
        if refusal.close:
            self._linger()

    def _linger(self) -> None:
        """After an answer sent before the body was read: stop sending, then read (and drop) a bounded
        amount of what the client still sends, so that closing does not reset the connection before
        the client has read the answer."""
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(0.5)
            left, end = LINGER_BYTES, time.monotonic() + LINGER_SECONDS
            while left > 0 and time.monotonic() < end and (chunk := self.connection.recv(min(left, 65536))):
                left -= len(chunk)
        except OSError:
            pass

    def _json(self, status: HTTPStatus, value: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(value).encode(), headers or {})

    def _send(self, status: HTTPStatus, data: bytes, headers: dict[str, str]) -> None:
        self.endpoint._answered(int(status))
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)
        except OSError as exc:  # the client went away
            self.close_connection = True
            log.debug("node=%s http client gone before the answer: %s", self.endpoint.agent.id, exc)


__all__ = ["DEFAULT_DEADLINE", "DEFAULT_HOST", "DEFAULT_MAX_BODY", "DEFAULT_MAX_PENDING", "HttpEndpoint"]
