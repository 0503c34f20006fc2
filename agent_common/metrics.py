"""What both agents' Prometheus metrics share: the HTTP server, bounded labels, counters read at scrape.

Each agent has its own :class:`prometheus_client.CollectorRegistry` (never the process-wide default
one), so two agents in one process (tests, the simulator, a device with its peer server) never
clash. Counters that the agent already keeps (``stats()``) are read when Prometheus scrapes, by a
custom collector, rather than counted twice.

Needs ``prometheus-client`` (the ``metrics`` extra); agents import this module only when metrics
are turned on (``metrics_port``), so a device without them does not load it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping
from typing import Any

try:
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise RuntimeError("metrics need prometheus-client: pip install 'mqtt-offload[metrics]'") from exc

log = logging.getLogger(__name__)

OTHER = "other"
"""The label value standing for every value past a :class:`LabelCap`'s limit."""

DEFAULT_HOST = "127.0.0.1"


class LabelCap:
    """Bounded label values: the first ``limit`` distinct values are kept, every later one is
    :data:`OTHER`, so a fleet of many servers or task names cannot blow up the series count."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        with self._lock:
            if value in self._seen:
                return value
            if len(self._seen) < self._limit:
                self._seen.add(value)
                return value
        return OTHER


def counter(name: str, documentation: str, values: Mapping[str, int | float] | int | float,
            label: str | None = None) -> CounterMetricFamily:
    """A counter family from a number, or from ``{label value: number}`` under ``label``."""
    if label is None:
        assert not isinstance(values, Mapping)
        return CounterMetricFamily(name, documentation, value=values)
    family = CounterMetricFamily(name, documentation, labels=[label])
    assert isinstance(values, Mapping)
    for key, value in sorted(values.items()):
        family.add_metric([str(key)], value)
    return family


def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def transport_families(prefix: str, stats: Mapping[str, Any]) -> Iterator[CounterMetricFamily]:
    """The transport's link and message counters (``stats()["transport"]``) as counters."""
    for key, documentation in (("reconnects", "times the broker link came back after a loss"),
                               ("disconnects", "times the broker link was lost"),
                               ("published", "MQTT messages published"),
                               ("delivered", "MQTT messages handed to a handler")):
        yield counter(f"{prefix}_mqtt_{key}", documentation, int(stats.get(key, 0)))


class MetricsServer:
    """``registry`` served as Prometheus text on ``http://host:port/metrics`` (any path, in fact) by
    prometheus_client's own threaded HTTP server. ``port=0`` binds a free port: read :attr:`port`."""

    def __init__(self, registry: CollectorRegistry, *, host: str = DEFAULT_HOST, port: int = 0) -> None:
        self.registry = registry
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        self.host = host

    @property
    def port(self) -> int:
        """The bound port (the one asked for, or the free one picked for 0)."""
        return int(self._server.server_port)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(2.0)


def serve(registry: CollectorRegistry, *, host: str, port: int, what: str) -> MetricsServer:
    """``registry`` served on ``host:port``; logs where."""
    server = MetricsServer(registry, host=host, port=port)
    log.info("%s metrics on %s", what, server.url)
    return server


__all__ = ["DEFAULT_HOST", "OTHER", "CollectorRegistry", "LabelCap", "MetricsServer", "counter", "gauge",
           "serve", "transport_families"]
