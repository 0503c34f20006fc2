"""Prometheus metrics of one edge agent (``metrics_port`` in the config; off by default).

Finished tasks are counted from the agent's record listener (one :class:`TaskRecord` each): by
outcome and where they ran, by the reason of their last decision, and their latency. Everything
the agent already counts or holds (bad input, the local pool, the server table, the broker link)
is read from :meth:`EdgeAgent.stats` when Prometheus scrapes. Label values are bounded: at most
``max_servers`` server ids and ``max_tasks`` task names, the rest are ``other``.

Metric names are listed in docs/edge-agent.md ("Metrics").
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from agent_common.metrics import (
    DEFAULT_HOST,
    CollectorRegistry,
    LabelCap,
    MetricsServer,
    counter,
    gauge,
    serve,
    transport_families,
)
from edge_agent.records import TaskRecord

if TYPE_CHECKING:
    from edge_agent.agent import EdgeAgent

PREFIX = "offload_edge"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_COUNTED = (("submitted", "tasks submitted"), ("local_runs", "local runs started"),
            ("offloaded", "attempts sent to a server"), ("retries", "attempts retried on another option"),
            ("timeouts", "offloaded attempts that timed out"),
            ("late_results", "results that came after their task had its outcome"))


def target_of(record: TaskRecord) -> tuple[str, str]:
    """``(kind, server)`` of a finished task: ``local``/``""``, ``remote``/its last server, or
    ``none``/``""`` for a task that never had an option."""
    if not record.targets:
        return "none", ""
    if record.target == "local":
        return "local", ""
    return "remote", record.target


class EdgeMetrics:
    """The metrics of ``agent`` in a registry of their own (:attr:`registry`)."""

    def __init__(self, agent: EdgeAgent, *, max_servers: int = 16, max_tasks: int = 32) -> None:
        self.agent = agent
        self.registry = CollectorRegistry()
        self._servers = LabelCap(max_servers)
        self._tasks = LabelCap(max_tasks)
        self.tasks = Counter(f"{PREFIX}_tasks", "finished tasks by outcome and where they ran last "
                             "(kind local/remote/none; server id, at most max_servers, then 'other')",
                             ["outcome", "kind", "server"], registry=self.registry)
        self.decisions = Counter(f"{PREFIX}_decisions", "finished tasks by the reason of their last "
                                 "decision", ["reason"], registry=self.registry)
        self.latency = Histogram(f"{PREFIX}_task_latency_seconds", "submission to result of tasks that "
                                 "ended ok, by task name (at most max_tasks, then 'other') and kind",
                                 ["task", "kind"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_StatsCollector(agent))
        agent.add_record_listener(self.record)

    def record(self, record: TaskRecord) -> None:
        """Count one finished task (the agent's record listener)."""
        kind, server = target_of(record)
        self.tasks.labels(record.outcome, kind, self._servers(server) if server else "").inc()
        self.decisions.labels(record.reason or "none").inc()
        latency = record.latency
        if record.ok and latency is not None:
            self.latency.labels(self._tasks(record.name), kind).observe(max(0.0, latency))

    def serve(self, *, host: str = DEFAULT_HOST, port: int = 0) -> MetricsServer:
        return serve(self.registry, host=host, port=port, what=f"edge agent {self.agent.id}")


class _StatsCollector:
    """Counters and gauges read from the agent at scrape time."""

    def __init__(self, agent: EdgeAgent) -> None:
        self._agent = agent

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        agent = self._agent
        stats = agent.stats()
        for key, documentation in _COUNTED:
            yield counter(f"{PREFIX}_{key}", documentation, int(stats.get(key, 0)))
        bad = CounterMetricFamily(f"{PREFIX}_bad_input", "refused input by source (agent, bridge, http) "
                                  "and reason", labels=["source", "reason"])
        sources: list[tuple[str, dict[str, int]]] = [("agent", stats.get("bad_input", {})),
                                                     ("bridge", stats.get("bridge", {}).get("bad_input", {}))]
        endpoint = agent.http_endpoint
        http: dict[str, Any] = endpoint.stats() if endpoint is not None else {}
        sources.append(("http", http.get("bad_input", {})))
        for source, reasons in sources:
            for reason, count in sorted(reasons.items()):
                bad.add_metric([source, reason], count)
        yield bad
        bridge = stats.get("bridge")
        if bridge is not None:
            yield counter(f"{PREFIX}_bridge_messages", "bridged messages by what became of them (received, "
                          "submitted, published, failed, ...)",
                          {key: n for key, n in bridge.items() if isinstance(n, int)}, label="event")
        if endpoint is not None:
            yield counter(f"{PREFIX}_http_responses", "answers of the local HTTP endpoint by status code",
                          http.get("responses", {}), label="code")
            yield gauge(f"{PREFIX}_http_pending", "HTTP requests waiting for their task", http["pending"])
        spool = stats.get("spool")
        if spool is not None:
            yield gauge(f"{PREFIX}_spool_tasks", "tasks waiting in the store-and-forward spool",
                        spool["tasks"])
            yield gauge(f"{PREFIX}_spool_bytes", "payload bytes waiting in the spool", spool["bytes"])
            events = {"spooled": stats.get("spooled", 0), "refused": stats.get("spool_refused", 0)}
            events |= {key.removeprefix("spool_"): n for key, n in stats.items()
                       if key.startswith("spool_") and isinstance(n, int) and key != "spool_refused"}
            yield counter(f"{PREFIX}_spool_events", "spooled tasks by what became of them (spooled, "
                          "forwarded, expired, refused, recovered, recovered_<outcome>)", events,
                          label="event")
        yield gauge(f"{PREFIX}_local_queue_length", "local tasks waiting for a worker",
                    stats.get("local_queued", 0))
        yield gauge(f"{PREFIX}_local_running", "local tasks running", stats.get("local_running", 0))
        yield gauge(f"{PREFIX}_local_workers", "local workers", agent.config.local_workers)
        yield gauge(f"{PREFIX}_tasks_in_flight", "submitted tasks without an outcome yet",
                    stats.get("in_flight", 0))
        servers = stats.get("servers", {})
        yield gauge(f"{PREFIX}_servers_known", "servers in the table", servers.get("known", 0))
        yield gauge(f"{PREFIX}_servers_usable", "servers fresh enough to be offered a task",
                    servers.get("usable", 0))
        yield gauge(f"{PREFIX}_connected", "1 while the broker link is up",
                    1 if stats.get("connected") else 0)
        yield from transport_families(PREFIX, stats.get("transport", {}))


__all__ = ["LATENCY_BUCKETS", "PREFIX", "EdgeMetrics", "target_of"]
