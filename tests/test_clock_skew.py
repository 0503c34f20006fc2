"""Deadlines survive clocks that disagree: ``Task.ttl`` on the wire, real agents on Mosquitto.

A device (or a server) whose clock is 10 minutes off offloads normally, deadlines still expire when
the work outlasts the ttl, and the server logs the measured offset once per sender.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

import pytest
from brokers_support import BrokerEndpoint, RawClient, Stack, endpoint, start_cloud, start_edge, wait_for

from agent_common.registry import TaskRegistry
from cloud_agent.server import CLOCK_OFFSET_LIMIT
from edge_agent.agent import EdgeAgent
from edge_agent.records import TaskRecord
from topics.brokers import MosquittoBroker

OFFSET = 600.0  # ten minutes


@pytest.fixture
def mqtt(mosquitto_broker: MosquittoBroker) -> BrokerEndpoint:
    return endpoint(mosquitto_broker, "3.1.1")


def skewed(offset: float) -> Callable[[], float]:
    return lambda: time.time() + offset


def serving(edge: EdgeAgent, node: str) -> Callable[[], bool]:
    return lambda: any(v.node == node and not v.stale for v in edge.servers())


def offload_batch(edge: EdgeAgent, count: int = 5) -> list[TaskRecord]:
    records: list[TaskRecord] = []
    edge.add_record_listener(records.append)
    results = [edge.submit("square", {"x": x}, deadline=5.0).result(10) for x in range(count)]
    assert results == [{"y": x * x} for x in range(count)]
    wait_for(lambda: len(records) == count)
    return records


def offset_warnings(caplog: pytest.LogCaptureFixture, sender: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "clock of" in r.getMessage() and sender in r.getMessage()]


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["ahead", "behind"])
def test_device_clock_ten_minutes_off_offloads_normally(mqtt: BrokerEndpoint, topic_prefix: str,
                                                        stack: Stack, caplog: pytest.LogCaptureFixture,
                                                        sign: float) -> None:
    caplog.set_level(logging.WARNING, logger="cloud_agent.server")
    server = start_cloud(mqtt, stack, topic_prefix, "srv-a")
    edge = start_edge(mqtt, stack, topic_prefix, registry=TaskRegistry(), policy="remote",
                      clock=skewed(sign * OFFSET))
    wait_for(serving(edge, "srv-a"), timeout=10.0)
    records = offload_batch(edge) + offload_batch(edge)
    assert {(r.outcome, r.target, r.attempts) for r in records} == {("ok", "srv-a", 1)}
    warnings = offset_warnings(caplog, edge.id)
    assert len(warnings) == 1, [w.getMessage() for w in warnings]
    logged = re.search(r" is ([+-][0-9.]+) s off", warnings[0].getMessage())
    assert logged is not None and abs(float(logged.group(1)) - sign * OFFSET) < 5.0
    measured = server.clock_offsets.offsets[edge.id]
    assert abs(measured - sign * OFFSET) < 5.0


def test_server_clock_ten_minutes_off_serves_normally(mqtt: BrokerEndpoint, topic_prefix: str,
                                                      stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="cloud_agent.server")
    start_cloud(mqtt, stack, topic_prefix, "srv-late", clock=skewed(-OFFSET))
    edge = start_edge(mqtt, stack, topic_prefix, registry=TaskRegistry(), policy="remote")
    wait_for(serving(edge, "srv-late"), timeout=10.0)
    records = offload_batch(edge)
    assert {(r.outcome, r.target, r.attempts) for r in records} == {("ok", "srv-late", 1)}
    assert len(offset_warnings(caplog, edge.id)) == 1


def test_synchronised_clocks_log_no_offset(mqtt: BrokerEndpoint, topic_prefix: str, stack: Stack,
                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="cloud_agent.server")
    server = start_cloud(mqtt, stack, topic_prefix, "srv-a")
    edge = start_edge(mqtt, stack, topic_prefix, registry=TaskRegistry(), policy="remote")
    wait_for(serving(edge, "srv-a"), timeout=10.0)
    offload_batch(edge, 3)
    assert offset_warnings(caplog, edge.id) == []
    assert abs(server.clock_offsets.offsets[edge.id]) < CLOCK_OFFSET_LIMIT


def test_ttl_still_expires_on_a_skewed_server(mqtt: BrokerEndpoint, topic_prefix: str, stack: Stack) -> None:
    """The ttl is counted on the server's clock from receipt: shorter than the work gives expired,
    longer gives ok, whatever the server's clock says."""
    start_cloud(mqtt, stack, topic_prefix, "srv-off", clock=skewed(OFFSET))
    client = RawClient(mqtt, topic_prefix, stack)
    wait_for(lambda: client.transport.connected)
    started = time.monotonic()
    short = client.task(client.tree.task_inbox("srv-off"), "sleep", {"seconds": 1.0}, task_id="t-short",
                        ttl=0.2)
    assert short.status == "expired" and short.error is not None and "deadline" in short.error
    assert time.monotonic() - started < 1.0  # answered at the ttl, not after the work
    assert client.task(client.tree.task_inbox("srv-off"), "sleep", {"seconds": 0.05}, task_id="t-long",
                       ttl=5.0).status == "ok"
    assert client.task(client.tree.task_inbox("srv-off"), "square", {"x": 3}, task_id="t-none",
                       ttl=None).payload == {"y": 9}


def test_legacy_absolute_deadline_still_accepted(mqtt: BrokerEndpoint, topic_prefix: str,
                                                 stack: Stack) -> None:
    """An older client's absolute ``deadline`` still works when the clocks agree; ``ttl`` wins."""
    start_cloud(mqtt, stack, topic_prefix, "srv-a")
    client = RawClient(mqtt, topic_prefix, stack)
    late = client.task(client.tree.task_inbox("srv-a"), "sleep", {"seconds": 1.0}, task_id="t-abs",
                       ttl=None, deadline=time.time() + 0.2)
    assert late.status == "expired"
    assert client.task(client.tree.task_inbox("srv-a"), "square", {"x": 2}, task_id="t-abs-ok", ttl=None,
                       deadline=time.time() + 5.0).status == "ok"
    both = client.task(client.tree.task_inbox("srv-a"), "square", {"x": 4}, task_id="t-both",
                       deadline=time.time() - 1.0, ttl=5.0)
    assert both.status == "ok"
