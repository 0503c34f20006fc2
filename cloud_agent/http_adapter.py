"""The built-in ``http`` task: forward a request to ONE configured local HTTP service, safely.

Task payload::

    {"method": "POST", "path": "/api/run", "query": {"k": "v"}, "headers": {"content-type": "..."},
     "body": <str | bytes | JSON value>}

Result payload: ``{"status": 200, "headers": {...}, "body": <str for text/JSON, else bytes>}``.

Only the configured base URL is ever contacted: absolute URLs, ``//host`` paths, ``..`` segments,
backslashes and control characters are refused; redirects are returned, never followed; proxies from
the environment are ignored; only allow-listed headers pass either way; a timeout and a response size
limit bound every call. HTTP error statuses (4xx, 5xx) are results, not task errors.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
REQUEST_HEADERS = frozenset({"accept", "accept-language", "content-type", "if-match", "if-none-match",
                             "user-agent", "x-request-id"})
RESPONSE_HEADERS = frozenset({"content-type", "content-length", "etag", "last-modified", "location",
                              "cache-control", "x-request-id"})
_TEXT_TYPES = ("text/", "application/json", "application/xml", "+json", "+xml")


class HttpAdapterError(ValueError):
    """A request the adapter refuses to send, or a response it refuses to return."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Return 3xx responses as they are: following them could leave the configured base URL."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _check_path(path: Any) -> str:
    if not isinstance(path, str) or not path.startswith("/"):
        raise HttpAdapterError("path must be a string starting with '/'")
    if path.startswith("//") or "\\" in path or any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        raise HttpAdapterError(f"path {path[:100]!r} is not a plain local path")
    parts = urlsplit(path)
    if parts.scheme or parts.netloc or parts.query or parts.fragment:
        raise HttpAdapterError("path must not carry a scheme, host, query or fragment (use 'query')")
    segments = path.split("/")
    if any(seg in ("..", ".") or seg.lower() in ("%2e%2e", "%2e", ".%2e", "%2e.") for seg in segments):
        raise HttpAdapterError("path must not contain '.' or '..' segments")
    return quote(path, safe="/%:@!$&'()*+,;=-._~")


class HttpForwarder:
    """Callable task function forwarding one request to ``base_url``."""

    __name__ = "http"

    def __init__(self, base_url: str, *, timeout: float = 10.0, max_response: int = 512 * 1024,
                 request_headers: Iterable[str] = REQUEST_HEADERS,
                 response_headers: Iterable[str] = RESPONSE_HEADERS) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise HttpAdapterError(f"http base URL {base_url!r} must be http(s)://host[:port][/path]")
        if parts.query or parts.fragment or parts.username:
            raise HttpAdapterError(f"http base URL {base_url!r} must not carry query, fragment or user")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.max_response = max_response
        self.request_headers = frozenset(h.lower() for h in request_headers)
        self.response_headers = frozenset(h.lower() for h in response_headers)
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())

    def __repr__(self) -> str:
        return f"HttpForwarder({self.base_url!r}, timeout={self.timeout})"

    def build_request(self, payload: Any) -> urllib.request.Request:
        """Validate a task payload and turn it into a request to the base URL."""
        if not isinstance(payload, Mapping):
            raise HttpAdapterError("http task payload must be a map with method and path")
        unknown = set(payload) - {"method", "path", "query", "headers", "body"}
        if unknown:
            raise HttpAdapterError(f"unknown http request fields: {', '.join(sorted(unknown))}")
        method = str(payload.get("method", "GET")).upper()
        if method not in METHODS:
            raise HttpAdapterError(f"method {method[:20]!r} not allowed ({', '.join(sorted(METHODS))})")
        url = self.base_url + _check_path(payload.get("path", "/"))
        query = payload.get("query")
        if query:
            if not isinstance(query, Mapping):
                raise HttpAdapterError("query must be a map of names to values")
            url += "?" + urlencode({str(k): v for k, v in query.items()}, doseq=True)
        headers: dict[str, str] = {}
        raw_headers = payload.get("headers") or {}
        if not isinstance(raw_headers, Mapping):
            raise HttpAdapterError("headers must be a map")
        for name, value in raw_headers.items():
            key = str(name).lower()
            if key not in self.request_headers:
                raise HttpAdapterError(f"header {key[:40]!r} not allowed "
                                       f"({', '.join(sorted(self.request_headers))})")
            text = str(value)
            if "\r" in text or "\n" in text:
                raise HttpAdapterError(f"header {key!r} has a line break")
            headers[key] = text
        body = payload.get("body")
        data: bytes | None
        if body is None:
            data = None
        elif isinstance(body, bytes):
            data = body
        elif isinstance(body, str):
            data = body.encode()
        else:
            data = json.dumps(body, separators=(",", ":")).encode()
            headers.setdefault("content-type", "application/json")
        return urllib.request.Request(url, data=data, headers=headers, method=method)

    def __call__(self, payload: Any) -> dict[str, Any]:
        request = self.build_request(payload)
        try:
            response = self._opener.open(request, timeout=self.timeout)
        except urllib.error.HTTPError as exc:  # 4xx/5xx and unfollowed 3xx: a result, not a failure
            response = exc
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise HttpAdapterError(f"{request.get_method()} {self.base_url} failed: {reason}") from exc
        with response:
            body = response.read(self.max_response + 1)
            if len(body) > self.max_response:
                raise HttpAdapterError(f"response body over the limit of {self.max_response} bytes")
            status = int(response.status if response.status is not None else response.getcode())
            headers = {k.lower(): v for k, v in response.headers.items()
                       if k.lower() in self.response_headers}
        content_type = headers.get("content-type", "").lower()
        value: str | bytes = body
        if any(marker in content_type for marker in _TEXT_TYPES):
            try:
                value = body.decode("utf-8")
            except UnicodeDecodeError:
                value = body
        return {"status": status, "headers": headers, "body": value}
