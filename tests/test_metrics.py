"""Prometheus metrics of both agents, scraped over HTTP from agents running on Mosquitto.

Each agent serves its own registry on a free port (``metrics_port=0``, read back from
``agent.metrics.port``); tests compare two scrapes around what they make happen.
"""

from __future__ import annotations

import socket
import threading
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from brokers_support import (
    BrokerEndpoint,
    Stack,
    endpoint,
    gate_registry,
    start_cloud,
    start_edge,
    wait_for,
)
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from agent_common.metrics import OTHER, LabelCap
from agent_common.registry import TaskRegistry, load_tasks
from cloud_agent.config import CloudConfig
from cloud_agent.server import CloudAgent
from edge_agent.agent import EdgeAgent
from edge_agent.config import EdgeConfig
from edge_agent.metrics import target_of
from edge_agent.records import TaskRecord
from topics.brokers import MosquittoBroker
from topics.memory import MemoryBroker, MemoryTransport
from topics.mqtt import MqttTransport
from topics.names import TopicTree
from topics.transport import BrokerRefused

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    """Every sample of the metrics page at ``url``: (name, labels) -> value."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def edge_bad_input(samples: Samples) -> float:
    """The edge agent's own bad input, all reasons."""
    return sum(v for (name, labels), v in samples.items()
               if name == "offload_edge_bad_input_total" and ("source", "agent") in labels)


@pytest.fixture
def mosquitto(mosquitto_broker: MosquittoBroker) -> BrokerEndpoint:
    return endpoint(mosquitto_broker)


def test_counters_move_between_scrapes(mosquitto: BrokerEndpoint, stack: Stack, topic_prefix: str) -> None:
    gate = threading.Event()
    server = start_cloud(mosquitto, stack, topic_prefix, "srv-m", registry=gate_registry(gate),
                         metrics_port=0)
    edge = start_edge(mosquitto, stack, topic_prefix, metrics_port=0)
    stack.append(gate.set)  # released before the agents stop (the stack runs last-in first-out)
    assert edge.metrics is not None and server.metrics is not None
    assert edge.metrics.port != server.metrics.port and edge.metrics.port > 0
    edge_url, server_url = edge.metrics.url, server.metrics.url
    wait_for(lambda: any(view.node == "srv-m" and not view.stale and "square" in view.tasks
                         for view in edge.servers()), message="the server announced")
    edge_before, server_before = scrape(edge_url), scrape(server_url)

    remote = [edge.submit("square", {"x": n}, policy="remote") for n in range(3)]
    local = [edge.submit("square", {"x": n}, policy="local") for n in range(2)]
    assert [h.result(timeout=15)["y"] for h in remote + local] == [0, 1, 4, 0, 1]
    # garbage on the server's inbox and on the fleet's heartbeats: bad input on both sides
    tree = TopicTree(topic_prefix)
    edge.publish(tree.task_inbox("srv-m"), b"\xff not a task", qos=1)
    edge.publish(tree.heartbeat("ghost"), b"{not json", qos=1)
    wait_for(lambda: value(scrape(server_url), "offload_server_bad_input_total", reason="malformed") > 0,
             message="the server's bad input counted")
    wait_for(lambda: edge_bad_input(scrape(edge_url)) > 0, message="the edge's bad input counted")

    edge_after, server_after = scrape(edge_url), scrape(server_url)

    def moved(after: Samples, before: Samples, name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved(edge_after, edge_before, "offload_edge_tasks_total", outcome="ok", kind="remote",
                 server="srv-m") == 3
    assert moved(edge_after, edge_before, "offload_edge_tasks_total", outcome="ok", kind="local",
                 server="") == 2
    assert moved(edge_after, edge_before, "offload_edge_submitted_total") == 5
    assert moved(edge_after, edge_before, "offload_edge_offloaded_total") == 3
    assert moved(edge_after, edge_before, "offload_edge_task_latency_seconds_count", task="square",
                 kind="remote") == 3
    assert moved(edge_after, edge_before, "offload_edge_task_latency_seconds_count", task="square",
                 kind="local") == 2
    decisions = sum(v - value(edge_before, name, **dict(labels)) for (name, labels), v in edge_after.items()
                    if name == "offload_edge_decisions_total")
    assert decisions == 5
    assert value(edge_after, "offload_edge_connected") == 1
    assert value(edge_after, "offload_edge_servers_usable") >= 1
    assert moved(server_after, server_before, "offload_server_tasks_completed_total", status="ok") == 3
    assert moved(server_after, server_before, "offload_server_tasks_received_total") == 4  # with the garbage
    assert value(server_after, "offload_server_workers") == 2
    assert moved(server_after, server_before, "offload_server_mqtt_published_total") > 0

    # a task held in flight shows in both agents' gauges, and leaves them when it ends
    held = edge.submit("gate", {"n": 1}, deadline=30)
    wait_for(lambda: value(scrape(server_url), "offload_server_tasks_in_flight") == 1,
             message="the held task running on the server")
    assert value(scrape(edge_url), "offload_edge_tasks_in_flight") == 1
    gate.set()
    assert held.result(timeout=15) == {"n": 1}
    wait_for(lambda: value(scrape(server_url), "offload_server_tasks_in_flight") == 0,
             message="the server idle again")
    assert value(scrape(edge_url), "offload_edge_tasks_in_flight") == 0


def test_reconnects_counted_after_a_broker_restart(broker_factory: Any, stack: Stack,
                                                   topic_prefix: str) -> None:
    target: BrokerEndpoint = broker_factory("mosquitto-3.1.1")
    server = start_cloud(target, stack, topic_prefix, "srv-r", metrics_port=0)
    edge = start_edge(target, stack, topic_prefix, registry=TaskRegistry(), metrics_port=0)
    assert edge.metrics is not None and server.metrics is not None
    edge_url, server_url = edge.metrics.url, server.metrics.url
    wait_for(lambda: edge.servers(), message="the server heard")
    assert value(scrape(edge_url), "offload_edge_mqtt_reconnects_total") == 0
    assert value(scrape(server_url), "offload_server_mqtt_reconnects_total") == 0
    target.broker.restart()
    wait_for(lambda: value(scrape(edge_url), "offload_edge_mqtt_reconnects_total") >= 1,
             message="the edge's reconnect counted")
    wait_for(lambda: value(scrape(server_url), "offload_server_mqtt_reconnects_total") >= 1,
             message="the server's reconnect counted")
    wait_for(lambda: value(scrape(edge_url), "offload_edge_connected") == 1,
             message="the edge connected again")
    wait_for(lambda: any(not view.stale and "square" in view.tasks for view in edge.servers()),
             message="the server heard again")
    assert edge.submit("square", {"x": 3}).result(timeout=15) == {"y": 9}


# ---------------------------------------------------------------------- without a broker


@pytest.fixture
def agents(stack: Stack) -> Iterator[list[EdgeAgent]]:
    made: list[EdgeAgent] = []
    yield made
    for agent in made:
        agent.stop()


def test_off_by_default_and_one_registry_per_agent(agents: list[EdgeAgent]) -> None:
    registry = load_tasks("agent_common.demo_tasks")
    quiet = EdgeAgent(EdgeConfig(id="quiet"), None, registry)
    agents.append(quiet)
    quiet.start()
    assert quiet.metrics is None and quiet.http_endpoint is None
    first, second = (EdgeAgent(EdgeConfig(id=name, metrics_port=0), None, registry) for name in ("a", "b"))
    agents.extend((first, second))
    first.start()
    second.start()
    assert first.metrics is not None and second.metrics is not None
    assert first.submit("square", {"x": 2}).result(timeout=10) == {"y": 4}
    assert value(scrape(first.metrics.url), "offload_edge_tasks_total", outcome="ok", kind="local",
                 server="") == 1
    assert value(scrape(second.metrics.url), "offload_edge_tasks_total", outcome="ok", kind="local",
                 server="") == 0


def test_a_port_in_use_fails_start_with_nothing_running(agents: list[EdgeAgent]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        agent = EdgeAgent(EdgeConfig(id="clash", metrics_port=port), None, TaskRegistry())
        with pytest.raises(OSError):
            agent.start()
        assert agent.metrics is None
        both = EdgeAgent(EdgeConfig(id="clash2", metrics_port=0, http_port=port), None, TaskRegistry())
        with pytest.raises(OSError):
            both.start()
        assert both.http_endpoint is None and both.metrics is None


def test_bridge_messages_and_bad_input(agents: list[EdgeAgent]) -> None:
    broker = MemoryBroker()
    route = {"filter": "sensors/+/reading", "task": "square", "output": "results/{1}/square"}
    agent = EdgeAgent(EdgeConfig.model_validate({"id": "bridged", "metrics_port": 0, "routes": [route]}),
                      MemoryTransport(broker, "bridged"), load_tasks("agent_common.demo_tasks"))
    agents.append(agent)
    agent.start()
    assert agent.metrics is not None
    url = agent.metrics.url
    client = MemoryTransport(broker, "sensor")
    client.connect()
    try:
        client.publish("sensors/kitchen/reading", b'{"x": 3}')
        client.publish("sensors/garage/reading", b"{not json")
        wait_for(lambda: value(scrape(url), "offload_edge_bridge_messages_total", event="published") == 1,
                 message="the bridged result published")
    finally:
        client.close()
    samples = scrape(url)
    assert value(samples, "offload_edge_bridge_messages_total", event="received") == 2
    assert value(samples, "offload_edge_bad_input_total", source="bridge", reason="bridge-malformed") == 1


def test_a_refused_login_leaves_no_port_open(broker_factory: Any) -> None:
    guarded: BrokerEndpoint = broker_factory("mosquitto-3.1.1", users={"cam1": "right"})
    config = EdgeConfig(id="cam1", broker=guarded.url, username="cam1", password=SecretStr("wrong"),
                        metrics_port=0, http_port=0)
    agent = EdgeAgent(config, MqttTransport(config.transport_config()), TaskRegistry())
    with pytest.raises(BrokerRefused):
        agent.start()
    assert agent.metrics is None and agent.http_endpoint is None
    agent.stop()


def test_cloud_metrics_close_on_stop() -> None:
    config = CloudConfig(id="srv-x", metrics_port=0, heartbeat_interval=0.2, workers=1, grace_period=0.0)
    server = CloudAgent(config, MemoryTransport(MemoryBroker(), client_id="srv-x"),
                        load_tasks("agent_common.demo_tasks"))
    server.start()
    assert server.metrics is not None
    url = server.metrics.url
    assert value(scrape(url), "offload_server_workers") == 1
    server.stop()
    assert server.metrics is None
    with pytest.raises(OSError):
        scrape(url)


def test_label_values_are_bounded() -> None:
    cap = LabelCap(2)
    assert [cap(name) for name in ("s1", "s2", "s3", "s1", "s4")] == ["s1", "s2", OTHER, "s1", OTHER]


def _record(target: str, targets: tuple[str, ...]) -> TaskRecord:
    return TaskRecord("t1", "square", "dev", "ect", target, "lowest-ect", "failed", len(targets), 0.0,
                      targets=targets)


def test_where_a_task_ran() -> None:
    assert target_of(_record("local", ())) == ("none", "")
    assert target_of(_record("local", ("srv1", "local"))) == ("local", "")
    assert target_of(_record("srv2", ("srv1", "srv2"))) == ("remote", "srv2")
