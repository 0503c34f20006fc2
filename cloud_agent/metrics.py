"""Prometheus metrics of one cloud agent (``metrics_port`` in the config; off by default).

Everything is read from :meth:`CloudAgent.stats` and :meth:`CloudAgent.load` when Prometheus
scrapes: the server already counts what it received, answered and refused, so nothing is counted
twice and the agent needs no hook. Task names (service times, task errors) come from the server's
own registry, so their labels are bounded by what it serves.

Metric names are listed in docs/cloud-agent.md ("Metrics").
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from agent_common.metrics import (
    DEFAULT_HOST,
    CollectorRegistry,
    MetricsServer,
    counter,
    gauge,
    serve,
    transport_families,
)

if TYPE_CHECKING:
    from cloud_agent.server import CloudAgent

PREFIX = "offload_server"
_COUNTED = (("received", "messages handled as tasks, valid or not"),
            ("duplicates", "retries answered from the cache or attached to the running task"),
            ("id_reused", "tasks refused because their id was used for other content"),
            ("late_results", "hung tasks that returned after they were answered expired"),
            ("pings", "pongs sent"), ("heartbeats", "heartbeats sent"))


class CloudMetrics:
    """The metrics of ``agent`` in a registry of their own (:attr:`registry`)."""

    def __init__(self, agent: CloudAgent) -> None:
        self.agent = agent
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def serve(self, *, host: str = DEFAULT_HOST, port: int = 0) -> MetricsServer:
        return serve(self.registry, host=host, port=port, what=f"cloud agent {self.agent.node_id}")

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        agent = self.agent
        stats, load = agent.stats(), agent.load()
        yield counter(f"{PREFIX}_tasks_received", "messages handled as tasks, valid or not",
                      int(stats.get("received", 0)))
        for key, documentation in _COUNTED[1:]:
            yield counter(f"{PREFIX}_{key}", documentation, int(stats.get(key, 0)))
        yield counter(f"{PREFIX}_tasks_completed", "answers sent, by status", stats.get("completed", {}),
                      label="status")
        yield counter(f"{PREFIX}_bad_input", "refused input by reason", stats.get("bad_input", {}),
                      label="reason")
        yield counter(f"{PREFIX}_results_not_sent", "results that could not be published, by reason",
                      stats.get("unsent", {}), label="reason")
        yield counter(f"{PREFIX}_task_errors", "tasks that raised, by task name",
                      stats.get("task_errors", {}), label="task")
        yield gauge(f"{PREFIX}_queue_length", "tasks waiting for a worker", load.queue_length)
        yield gauge(f"{PREFIX}_queue_capacity", "tasks that may wait for a worker", load.queue_capacity)
        yield gauge(f"{PREFIX}_tasks_in_flight", "tasks running", load.in_flight)
        yield gauge(f"{PREFIX}_workers", "worker threads", load.workers)
        yield gauge(f"{PREFIX}_cpu_share", "this process's share of the machine's CPU (0..1), as "
                    "heartbeats report it", load.cpu)
        yield gauge(f"{PREFIX}_cached_results", "results kept to answer retries",
                    stats.get("cached_results", 0))
        yield gauge(f"{PREFIX}_draining", "1 while the server is stopping", 1 if agent.draining else 0)
        service = GaugeMetricFamily(f"{PREFIX}_service_time_seconds", "smoothed service time by task, "
                                    "as heartbeats report it", labels=["task"])
        for name, seconds in sorted(load.service_time.items()):
            service.add_metric([name], seconds)
        yield service
        yield from transport_families(PREFIX, stats.get("transport", {}))


__all__ = ["PREFIX", "CloudMetrics"]
