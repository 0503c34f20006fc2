"""Edge agent integration: real brokers, real cloud agents (in-process and as killed subprocesses)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from brokers_support import BrokerEndpoint, Stack, start_cloud, start_edge, wait_for

from agent_common.registry import TaskRegistry
from edge_agent.agent import EdgeAgent
from edge_agent.records import TaskRecord
from topics.brokers import MosquittoBroker

REPO = Path(__file__).resolve().parent.parent


def serving(edge: EdgeAgent, node: str, task: str = "square") -> Callable[[], bool]:
    def check() -> bool:
        return any(v.node == node and not v.stale and task in v.tasks for v in edge.servers())

    return check


def recorded(edge: EdgeAgent) -> list[TaskRecord]:
    records: list[TaskRecord] = []
    edge.add_record_listener(records.append)
    return records


def test_offload_round_trip_on_every_broker(broker: BrokerEndpoint, topic_prefix: str, stack: Stack) -> None:
    start_cloud(broker, stack, topic_prefix, "srv-a")
    edge = start_edge(broker, stack, topic_prefix, registry=TaskRegistry(), policy="remote")
    records = recorded(edge)
    wait_for(serving(edge, "srv-a"), timeout=10.0)
    results = [edge.submit("square", {"x": x}).result(10) for x in range(5)]
    assert results == [{"y": x * x} for x in range(5)]
    wait_for(lambda: len(records) == 5)
    assert {r.target for r in records} == {"srv-a"}
    wait_for(lambda: any(v.rtt is not None for v in edge.servers()), message="an rtt sample")


@pytest.mark.mosquitto
def test_sigkilled_server_process_every_task_gets_one_outcome(mosquitto_broker: MosquittoBroker,
                                                              topic_prefix: str, stack: Stack) -> None:
    endpoint = BrokerEndpoint("mosquitto", mosquitto_broker.url, "3.1.1", mosquitto_broker)
    server = subprocess.Popen(
        [sys.executable, "-m", "cloud_agent", "run", "--broker", mosquitto_broker.url, "--id", "victim",
         "--tasks", "agent_common.demo_tasks", "--prefix", topic_prefix, "--heartbeat-interval", "0.2",
         "--keepalive", "1", "--workers", "2", "--log-level", "warning"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE)

    def reap() -> None:
        if server.poll() is None:
            server.kill()
        server.wait(5)
        assert server.stderr is not None
        server.stderr.close()

    stack.append(reap)
    edge = start_edge(endpoint, stack, topic_prefix, policy="remote", default_timeout=30.0,
                      local_workers=4)
    records = recorded(edge)
    wait_for(serving(edge, "victim", "sleep"), timeout=15.0, message="the server subprocess")
    futures = [edge.submit("sleep", {"seconds": 2.0}) for _ in range(4)]

    def holds_all() -> bool:  # a heartbeat says: two tasks running, two queued behind them
        return any(v.node == "victim" and v.load.in_flight == 2 and v.load.queue_length == 2
                   for v in edge.servers())

    wait_for(holds_all, timeout=15.0, message="the server holding every task")
    os.kill(server.pid, signal.SIGKILL)
    server.wait(5)
    outcomes = [future.result(20) for future in futures]  # Will after 1.5 x keepalive, then local
    assert outcomes == [{"slept": 2.0}] * 4
    wait_for(lambda: len(records) == 4)
    assert len({r.task_id for r in records}) == 4
    assert all(r.targets[0] == "victim" for r in records)
    # The queued two could not start before a running one ended (2 s after that heartbeat).
    assert sum(r.targets[-1] == "local" for r in records) >= 2
    assert edge.stats()["server_deaths_in_flight"] >= 2
    assert next(v for v in edge.servers() if v.node == "victim").stale


@pytest.mark.mosquitto
def test_broker_restart_offloading_resumes(broker_factory: Callable[..., BrokerEndpoint], topic_prefix: str,
                                           stack: Stack) -> None:
    endpoint = broker_factory("mosquitto-3.1.1")
    start_cloud(endpoint, stack, topic_prefix, "phoenix")
    edge = start_edge(endpoint, stack, topic_prefix, policy="remote")
    records = recorded(edge)
    wait_for(serving(edge, "phoenix"), timeout=10.0)
    assert edge.submit("square", {"x": 2}).result(10) == {"y": 4}
    assert isinstance(endpoint.broker, MosquittoBroker)
    endpoint.broker.restart(down_for=0.3)
    wait_for(lambda: edge.connected, timeout=15.0, message="edge reconnected")
    wait_for(serving(edge, "phoenix"), timeout=15.0, message="heartbeats back")
    wait_for(lambda: edge.stats().get("outcome_ok", 0) >= 1)
    assert edge.submit("square", {"x": 3}).result(10) == {"y": 9}
    wait_for(lambda: len(records) == 2)
    assert [r.target for r in records] == ["phoenix", "phoenix"]


@pytest.mark.mosquitto
def test_bridge_fed_by_mosquitto_pub(mosquitto_broker: MosquittoBroker, topic_prefix: str,
                                     stack: Stack) -> None:
    endpoint = BrokerEndpoint("mosquitto", mosquitto_broker.url, "3.1.1", mosquitto_broker)
    start_cloud(endpoint, stack, topic_prefix, "bridge-srv")
    route = {"filter": f"{topic_prefix}/sensors/+/reading", "task": "square",
             "output": f"{topic_prefix}/results/{{1}}/square", "qos": 1}
    edge = start_edge(endpoint, stack, topic_prefix, routes=[route])
    wait_for(serving(edge, "bridge-srv"), timeout=10.0)
    port = str(mosquitto_broker.port)
    reader = subprocess.Popen(
        ["stdbuf", "-oL", "mosquitto_sub", "-d", "-h", "127.0.0.1", "-p", port,
         "-t", f"{topic_prefix}/results/#", "-v", "-C", "2", "-W", "20"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    stack.append(lambda: reader.kill() if reader.poll() is None else None)
    assert reader.stdout is not None
    for line in reader.stdout:  # -d: debug lines (line-buffered by stdbuf), among them the SUBACK
        if line.startswith("Subscribed (mid"):
            break
    else:
        pytest.fail("mosquitto_sub ended before its subscription was acknowledged")
    for room, x in (("kitchen", 3), ("bad", None), ("garage", 4)):
        payload = "{broken" if x is None else json.dumps({"x": x})
        subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", port, "-q", "1",
                        "-t", f"{topic_prefix}/sensors/{room}/reading", "-m", payload],
                       check=True, timeout=10)
    reader.wait(timeout=25)  # -C 2: it exits after two messages
    out = reader.stdout.read()  # the rest, past what the SUBACK loop buffered
    lines = dict(line.split(" ", 1) for line in out.strip().splitlines()
                 if line.startswith(f"{topic_prefix}/results/"))
    assert {topic: json.loads(body) for topic, body in lines.items()} == {
        f"{topic_prefix}/results/kitchen/square": {"y": 9},
        f"{topic_prefix}/results/garage/square": {"y": 16}}
    assert edge.stats()["bridge"]["bad_input"] == {"bridge-malformed": 1}
