"""Pinned tasks on a real Mosquitto: ``submit(target=...)``, ``submit(pool=...)`` and the CLI flags."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable

import pytest
from brokers_support import BrokerEndpoint, Stack, gate_registry, start_cloud, start_edge, wait_for

from agent_common.registry import TaskRegistry
from cloud_agent.server import CloudAgent
from edge_agent.agent import EdgeAgent
from edge_agent.cli import main
from edge_agent.pinning import UnknownPoolError, UnknownServerError
from edge_agent.records import TaskFailed, TaskRecord


def recorded(edge: EdgeAgent) -> list[TaskRecord]:
    records: list[TaskRecord] = []
    edge.add_record_listener(records.append)
    return records


def knows(edge: EdgeAgent, nodes: set[str], task: str, pool: str | None = None) -> Callable[[], bool]:
    def check() -> bool:
        heard = {view.node for view in edge.servers() if task in view.tasks and not view.stale
                 and (pool is None or pool in view.pools)}
        return heard >= nodes
    check.__name__ = f"{sorted(nodes)} announcing {task!r}" + (f" in pool {pool!r}" if pool else "")
    return check


def ran(server: CloudAgent) -> int:
    return int(server.stats()["completed"].get("ok", 0))


def test_pinned_to_srv2_runs_there_every_time(mosquitto5: BrokerEndpoint, stack: Stack,
                                              topic_prefix: str) -> None:
    srv1 = start_cloud(mosquitto5, stack, topic_prefix, "srv1")
    srv2 = start_cloud(mosquitto5, stack, topic_prefix, "srv2")
    edge = start_edge(mosquitto5, stack, topic_prefix)  # runs the demo tasks itself too
    records = recorded(edge)
    wait_for(knows(edge, {"srv1", "srv2"}, "square"))
    handles = [edge.submit("square", {"x": x}, deadline=10.0, target="srv2") for x in range(6)]
    assert [handle.result(15) for handle in handles] == [{"y": x * x} for x in range(6)]
    wait_for(lambda: len(records) == 6)
    assert {(r.outcome, r.target, r.targets, r.reason) for r in records} == {
        ("ok", "srv2", ("srv2",), "pinned")}
    assert (ran(srv1), ran(srv2)) == (0, 6) and edge.stats().get("local_runs", 0) == 0


def test_a_pinned_retry_after_a_timeout_stays_on_its_server_and_runs_once(
        mosquitto5: BrokerEndpoint, stack: Stack, topic_prefix: str) -> None:
    gate = threading.Event()
    stack.append(gate.set)
    srv1 = start_cloud(mosquitto5, stack, topic_prefix, "srv1", registry=gate_registry(gate))
    srv2 = start_cloud(mosquitto5, stack, topic_prefix, "srv2", registry=gate_registry(gate))
    edge = start_edge(mosquitto5, stack, topic_prefix, registry=TaskRegistry(), max_timeout=0.3,
                      default_timeout=0.3, max_attempts=3)
    wait_for(knows(edge, {"srv1", "srv2"}, "gate"))
    handle = edge.submit("gate", "held", target="srv2")
    with pytest.raises(TaskFailed) as failed:
        handle.result(15)
    assert (failed.value.status, failed.value.attempts) == ("timeout", 3)
    assert handle.record is not None and handle.record.targets == ("srv2",) * 3
    wait_for(lambda: srv2.stats().get("duplicates", 0) == 2, message="attempts 2 and 3 joined to the first")
    gate.set()
    wait_for(lambda: ran(srv2) >= 1, message="the held task finished")
    assert srv1.stats().get("received", 0) == 0 and srv2.stats()["received"] == 3


def test_a_pool_of_two_runs_each_task_exactly_once(mosquitto5: BrokerEndpoint, stack: Stack,
                                                   topic_prefix: str) -> None:
    servers = [start_cloud(mosquitto5, stack, topic_prefix, name, pools=["gpu"]) for name in ("gA", "gB")]
    edge = start_edge(mosquitto5, stack, topic_prefix, registry=TaskRegistry())
    records = recorded(edge)
    wait_for(knows(edge, {"gA", "gB"}, "square", pool="gpu"))
    handles = [edge.submit("square", {"x": x}, deadline=10.0, pool="gpu") for x in range(20)]
    assert [handle.result(15) for handle in handles] == [{"y": x * x} for x in range(20)]
    wait_for(lambda: len(records) == 20)
    assert {r.target for r in records} <= {"gA", "gB"} and {r.reason for r in records} == {"pool"}
    assert sum(ran(server) for server in servers) == 20
    assert sum(server.stats().get("received", 0) for server in servers) == 20


def test_a_pool_attempt_that_times_out_is_not_sent_again_and_runs_once(
        mosquitto5: BrokerEndpoint, stack: Stack, topic_prefix: str) -> None:
    gate = threading.Event()
    stack.append(gate.set)
    servers = [start_cloud(mosquitto5, stack, topic_prefix, name, pools=["gpu"],
                           registry=gate_registry(gate)) for name in ("gA", "gB")]
    edge = start_edge(mosquitto5, stack, topic_prefix, registry=TaskRegistry(), max_timeout=0.3,
                      default_timeout=0.3, max_attempts=3)
    wait_for(knows(edge, {"gA", "gB"}, "gate", pool="gpu"))
    handle = edge.submit("gate", "held", pool="gpu")
    with pytest.raises(TaskFailed) as failed:
        handle.result(15)
    assert (failed.value.status, failed.value.attempts) == ("timeout", 1)
    gate.set()
    wait_for(lambda: sum(ran(server) for server in servers) == 1, message="the held task ran")
    wait_for(lambda: edge.stats().get("late_results", 0) == 1, message="its late result")
    assert sum(server.stats().get("received", 0) for server in servers) == 1
    assert edge.stats()["pool_sends"] == 1


def test_a_pin_to_an_unknown_server_or_pool_fails_fast_with_the_reason(
        mosquitto5: BrokerEndpoint, stack: Stack, topic_prefix: str) -> None:
    start_cloud(mosquitto5, stack, topic_prefix, "srv1", pools=["gpu"])
    edge = start_edge(mosquitto5, stack, topic_prefix, registry=TaskRegistry())
    wait_for(knows(edge, {"srv1"}, "square", pool="gpu"))
    with pytest.raises(UnknownServerError, match="'srv9'"):
        edge.submit("square", {"x": 1}, target="srv9")
    with pytest.raises(UnknownServerError, match="does not announce task 'nope'"):
        edge.submit("nope", {}, target="srv1")
    with pytest.raises(UnknownPoolError, match=r"pool 'cpu'.*no live server announces"):
        edge.submit("square", {"x": 1}, pool="cpu")
    with pytest.raises(ValueError, match="not both"):
        edge.submit("square", {"x": 1}, target="srv1", pool="gpu")
    with pytest.raises(ValueError, match="pool name"):
        edge.submit("square", {"x": 1}, pool="a/b")
    assert edge.stats().get("submitted", 0) == 0  # nothing was taken in


def test_cli_target_and_pool_flags(mosquitto5: BrokerEndpoint, stack: Stack, topic_prefix: str,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    srv1 = start_cloud(mosquitto5, stack, topic_prefix, "srv1")
    srv2 = start_cloud(mosquitto5, stack, topic_prefix, "srv2", pools=["gpu"])
    common = ["--broker", mosquitto5.url, "--prefix", topic_prefix, "--protocol", "5",
              "--tasks", "agent_common.demo_tasks", "--log-level", "info"]
    assert main(["submit", *common, "--target", "srv1", "square", '{"x": 5}']) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"y": 25} and "ran on srv1 (pinned)" in captured.err
    assert main(["submit", *common, "--pool", "gpu", "square", '{"x": 6}']) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"y": 36} and "ran on srv2 (pool)" in captured.err
    assert (ran(srv1), ran(srv2)) == (1, 1)
    assert main(["submit", *common, "--discover", "0.5", "--target", "srv9", "square", "{}"]) == 2
    assert "cannot pin task 'square' to server 'srv9'" in capsys.readouterr().err
    assert main(["submit", *common, "--discover", "0.5", "--pool", "cpu", "square", "{}"]) == 2
    assert "pool 'cpu': no live server announces this pool" in capsys.readouterr().err
    assert main(["submit", *common, "--target", "srv1", "--pool", "gpu", "square", "{}"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err
