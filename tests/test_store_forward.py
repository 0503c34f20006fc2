"""Store and forward on a real Mosquitto: tasks that cannot run anywhere wait in the spool (on disk)
and are sent when a server is back, also by a restarted agent; the spool full refuses the submit.

The offline period is "until the test starts the server": every wait is on an event.
"""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path
from typing import Any

import pytest
from brokers_support import Stack, endpoint, start_cloud, start_edge, wait_for

from agent_common.registry import TaskRegistry, UnknownTaskError
from edge_agent.agent import EdgeAgent, SpoolFull, TaskFailed
from edge_agent.spool import Spool
from topics.brokers import MosquittoBroker

N = 200


def _edge(mosquitto_broker: MosquittoBroker, stack: Stack, prefix: str, spool: Path,
          **fields: Any) -> EdgeAgent:
    """A device that runs nothing itself, with a spool."""
    return start_edge(endpoint(mosquitto_broker), stack, prefix, registry=TaskRegistry(), spool_path=spool,
                      **fields)


def _outcome(future: concurrent.futures.Future[Any]) -> str:
    error = future.exception()
    return "ok" if error is None else error.status if isinstance(error, TaskFailed) else type(error).__name__


def test_tasks_wait_for_a_server_and_short_deadlines_expire(
        mosquitto_broker: MosquittoBroker, stack: Stack, topic_prefix: str, tmp_path: Path) -> None:
    edge = _edge(mosquitto_broker, stack, topic_prefix, tmp_path / "spool.db")
    wait_for(lambda: edge.connected, message="device connected")
    futures = [edge.submit("square", {"x": i}, deadline=120.0) for i in range(N)]
    short = [edge.submit("square", {"x": -1}, deadline=0.2) for _ in range(5)]
    assert edge.stats()["spool"]["tasks"] == N + 5
    assert not any(f.done() for f in futures)
    for future in short:  # answered at their deadline by the spool's expiry timer
        with pytest.raises(TaskFailed) as failed:
            future.result(timeout=15.0)
        assert failed.value.status == "expired"
    assert edge.stats()["spool_expired"] == 5
    began = time.monotonic()
    cloud = start_cloud(endpoint(mosquitto_broker), stack, topic_prefix, "srv-sf")
    results = [future.result(timeout=60.0) for future in futures]
    drained = time.monotonic() - began
    assert results == [{"y": i * i} for i in range(N)]
    wait_for(lambda: edge.stats()["spool"]["tasks"] == 0, message="spool emptied")  # removed after handover
    stats = edge.stats()
    assert stats["spool_forwarded"] == N and stats["outcome_ok"] == N
    wait_for(lambda: cloud.stats()["completed"].get("ok") == N, message="server ran each once")
    assert cloud.stats().get("duplicates", 0) == 0
    print(f"\n{N} spooled tasks answered {drained:.2f} s after the server started")


def test_a_restarted_agent_sends_what_the_first_one_spooled(
        mosquitto_broker: MosquittoBroker, stack: Stack, topic_prefix: str, tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    first = _edge(mosquitto_broker, stack, topic_prefix, path)
    wait_for(lambda: first.connected, message="device connected")
    futures = [first.submit("square", {"x": i}, deadline=120.0) for i in range(N)]
    expiring = first.submit("square", {"x": 1}, deadline=1.0)
    first.stop()  # the process's callers are told; the tasks stay on disk
    with pytest.raises(TaskFailed, match="stays in the spool"):
        futures[0].result(timeout=5.0)
    with Spool(path) as spool:
        assert len(spool) == N + 1
    assert expiring.done()
    second = _edge(mosquitto_broker, stack, topic_prefix, path, id=first.id)
    assert second.stats()["spool_recovered"] == N + 1
    wait_for(lambda: second.stats().get("spool_expired") == 1, message="the short one expired")
    cloud = start_cloud(endpoint(mosquitto_broker), stack, topic_prefix, "srv-sf2")
    wait_for(lambda: second.stats().get("spool_recovered_ok") == N, timeout=60.0,
             message="every spooled task answered")
    wait_for(lambda: cloud.stats()["completed"].get("ok") == N, message="server ran each once")
    assert cloud.stats().get("duplicates", 0) == 0
    wait_for(lambda: second.stats()["spool"]["tasks"] == 0, message="spool emptied")


def test_a_full_spool_refuses_the_submit(
        mosquitto_broker: MosquittoBroker, stack: Stack, topic_prefix: str, tmp_path: Path) -> None:
    edge = _edge(mosquitto_broker, stack, topic_prefix, tmp_path / "spool.db", spool_max_tasks=3)
    kept = [edge.submit("square", {"x": i}, deadline=60.0) for i in range(3)]
    with pytest.raises(SpoolFull, match="spool full") as full:
        edge.submit("square", {"x": 9}, deadline=60.0)
    assert isinstance(full.value, ValueError)
    stats = edge.stats()
    assert stats["spool_refused"] == 1 and stats["spool"]["tasks"] == 3
    start_cloud(endpoint(mosquitto_broker), stack, topic_prefix, "srv-sf3")
    assert [f.result(timeout=30.0) for f in kept] == [{"y": i * i} for i in range(3)]


def test_without_a_spool_such_a_task_is_refused_as_before(
        mosquitto_broker: MosquittoBroker, stack: Stack, topic_prefix: str) -> None:
    edge = start_edge(endpoint(mosquitto_broker), stack, topic_prefix, registry=TaskRegistry())
    with pytest.raises(UnknownTaskError, match="square"):
        edge.submit("square", {"x": 1})
