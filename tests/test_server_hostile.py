"""A cloud agent on a real Mosquitto against hostile or careless clients: poison reply topics, results
aimed outside the sender's topics, ids reused, invalid tasks. The agent stays on the broker, counts
and dead-letters what it refuses, publishes nothing where it must not, and serves the next task."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import cbor2
import pytest
from brokers_support import BrokerEndpoint, MessageLog, wait_for

import topics.mqtt as mqtt_module
from agent_common.registry import TaskRegistry
from cloud_agent.config import CloudConfig
from cloud_agent.server import CloudAgent
from topics.codec import Codec
from topics.models import DeadLetter, NodeState, Ping, Result, Task
from topics.mqtt import MqttTransport
from topics.names import TopicTree

CBOR = Codec("cbor")
JSON = Codec("json")
TransportFactory = Callable[..., MqttTransport]
POISON = "\x01"  # a control character: Mosquitto disconnects a client that publishes to it


class Watcher(MessageLog):
    """Collects every message on a filter (a plain client, like an attacker or an operator)."""

    def results(self, topic: str) -> list[Result]:
        return [CBOR.decode(m.payload, Result) if m.payload[:1] != b"{" else
                JSON.decode(m.payload, Result) for m in self.on(topic)]


@pytest.fixture
def target(broker_factory: Callable[..., BrokerEndpoint]) -> BrokerEndpoint:
    return broker_factory("mosquitto-3.1.1")


@pytest.fixture
def tree(topic_prefix: str) -> TopicTree:
    return TopicTree(topic_prefix)


@pytest.fixture
def connects() -> list[float]:
    """When the agent's transport finished each (re)connect and re-subscription."""
    return []


@pytest.fixture
def config(tree: TopicTree) -> CloudConfig:
    return CloudConfig(id="srv1", prefix=tree.prefix, workers=2, queue_size=8, heartbeat_interval=0.2)


@pytest.fixture
def server_transport(target: BrokerEndpoint, tree: TopicTree, config: CloudConfig,
                     connects: list[float]) -> MqttTransport:
    transport = MqttTransport(config.transport_config(target.url).model_copy(
        update={"client_id": f"srv1-{tree.prefix[-8:]}", "reconnect_min_delay": 0.05,
                "reconnect_max_delay": 0.2}))
    transport.add_connect_listener(lambda: connects.append(time.monotonic()))
    return transport


@pytest.fixture
def agent(config: CloudConfig, server_transport: MqttTransport,
          connects: list[float]) -> Iterator[CloudAgent]:
    registry = TaskRegistry()
    registry.task("square")(lambda payload: {"y": payload["x"] ** 2})
    server = CloudAgent(config, server_transport, registry)
    server.start()
    # start() returns at CONNACK; the inbox is subscribed once the connect listeners run (as a
    # device would, wait for that before sending: a device waits for the birth or a heartbeat).
    wait_for(lambda: len(connects) >= 1, 10.0, message="the agent subscribed")
    yield server
    server.stop(grace=1.0)


@pytest.fixture
def device(target: BrokerEndpoint, tree: TopicTree, make_transport: TransportFactory) -> Watcher:
    return Watcher(make_transport(target, f"dev1-{tree.prefix[-8:]}"), f"{tree.prefix}/#")


def _task(tree: TopicTree, task_id: str, x: int, **fields: Any) -> Task:
    values: dict[str, Any] = {"id": task_id, "task": "square", "sender": "dev1",
                              "reply_to": tree.result_inbox("dev1"), "created": time.time(),
                              "payload": {"x": x}}
    values.update(fields)
    return Task.model_validate(values)


def _send(device: Watcher, tree: TopicTree, task: Task) -> None:
    device.transport.publish(tree.task_inbox("srv1"), CBOR.encode(task), qos=1)


def _with_reply_to(message: Task | Ping, reply_to: str) -> bytes:
    """``message`` as CBOR with a ``reply_to`` our own models refuse: what another client can send."""
    wire = cbor2.loads(CBOR.encode(message))
    (key,) = [k for k, v in wire.items() if v == message.reply_to]
    wire[key] = reply_to
    return bytes(cbor2.dumps(wire))


def _answer(device: Watcher, tree: TopicTree, task_id: str, count: int = 1) -> Result:
    wait_for(lambda: len([r for r in device.results(tree.result_inbox("dev1"))
                          if r.task_id == task_id]) >= count, 10.0, message=f"result of {task_id}")
    return [r for r in device.results(tree.result_inbox("dev1")) if r.task_id == task_id][count - 1]


def test_a_control_character_in_reply_to_is_refused_before_anything_is_published(
        agent: CloudAgent, device: Watcher, tree: TopicTree) -> None:
    poison_task = _with_reply_to(_task(tree, "p1", 2), f"{tree.result_inbox('dev1')}{POISON}")
    device.transport.publish(tree.task_inbox("srv1"), poison_task, qos=1)
    ping = Ping(nonce=1, sender="dev1", reply_to=tree.pong("dev1"), sent=1.0)
    device.transport.publish(tree.ping("srv1"), _with_reply_to(ping, f"{tree.pong('dev1')}{POISON}"), qos=0)
    wait_for(lambda: agent.stats()["bad_input"].get("bad-reply-to") == 2, 10.0)
    _send(device, tree, _task(tree, "p2", 3))
    assert _answer(device, tree, "p2").payload == {"y": 9}
    transport = agent.stats()["transport"]
    assert transport["disconnects"] == 0 and transport["publish_dropped_refused"] == 0


def test_a_reply_topic_the_broker_refuses_costs_two_reconnects_not_the_server(
        agent: CloudAgent, server_transport: MqttTransport, device: Watcher, tree: TopicTree,
        connects: list[float], monkeypatch: pytest.MonkeyPatch) -> None:
    """A gap in topic validation (simulated: the transport's check lets everything through, and a
    result goes out on a topic the broker refuses): the broker closes the connection, paho would
    resend the message after every reconnect; the transport drops it after the second loss, counts
    it, and the server goes on serving."""
    monkeypatch.setattr(mqtt_module, "validate_publish_topic", lambda topic: topic)
    server_transport.publish(f"{tree.result_inbox('dev1')}{POISON}", b"poison", qos=1)
    wait_for(lambda: agent.stats()["transport"]["publish_dropped_refused"] == 1, 15.0,
             message="the refused result dropped")
    wait_for(lambda: len(connects) == 3, 10.0, message="the agent back after the second loss")
    _send(device, tree, _task(tree, "after", 3))
    assert _answer(device, tree, "after").payload == {"y": 9}
    transport = agent.stats()["transport"]
    assert transport["disconnects"] == 2 and transport["reconnects"] == 2
    states = [CBOR.decode(m.payload, NodeState) for m in device.on(tree.state("srv1"))]
    assert states and states[-1].status == "online"


def test_results_never_go_outside_the_senders_topics_on_a_real_broker(
        agent: CloudAgent, device: Watcher, tree: TopicTree, target: BrokerEndpoint,
        make_transport: TransportFactory) -> None:
    outside = Watcher(make_transport(target, f"ha-{tree.prefix[-8:]}"), "homeassistant/#")
    victim = Watcher(make_transport(target, f"dev2-{tree.prefix[-8:]}"),
                     f"{tree.prefix}/node/dev2/#")
    _send(device, tree, _task(tree, "ha", 1, reply_to="homeassistant/switch/pump/set"))
    _send(device, tree, _task(tree, "other", 1, reply_to=tree.result_inbox("dev2")))
    wait_for(lambda: agent.stats()["bad_input"].get("reply-to-not-allowed") == 2, 10.0)
    wait_for(lambda: len(device.on(tree.dead_letter("srv1"))) == 2, 10.0)
    letter = CBOR.decode(device.on(tree.dead_letter("srv1"))[0].payload, DeadLetter)
    assert letter.reason == "reply-to-not-allowed"
    _send(device, tree, _task(tree, "mine", 4))
    assert _answer(device, tree, "mine").payload == {"y": 16}
    # Once the marker went through the broker, anything published before it would have arrived.
    marker = f"{tree.prefix}/node/dev2/marker"
    device.transport.publish(marker, b"m", qos=1)
    wait_for(lambda: victim.on(marker), 10.0, message="the marker")
    assert outside.messages == [] and [m.topic for m in victim.messages] == [marker]


def test_a_reused_id_and_an_invalid_task_are_answered_with_errors(
        agent: CloudAgent, device: Watcher, tree: TopicTree) -> None:
    _send(device, tree, _task(tree, "t-1", 3))
    assert _answer(device, tree, "t-1").payload == {"y": 9}
    _send(device, tree, _task(tree, "t-1", 5))  # a client whose counter restarted
    reused = _answer(device, tree, "t-1", 2)
    assert reused.status == "error" and reused.payload is None and "already used" in (reused.error or "")
    raw = {"v": 1, "id": "t-2", "task": "square", "sender": "dev1",
           "reply_to": tree.result_inbox("dev1"), "payload": {"x": 1}, "priority": 9}
    device.transport.publish(tree.task_inbox("srv1"), json.dumps(raw).encode(), qos=1)
    invalid = _answer(device, tree, "t-2")
    assert invalid.status == "error" and invalid.content_type == "application/json"
    assert "created" in (invalid.error or "") and "priority" in (invalid.error or "")
    wait_for(lambda: agent.stats()["bad_input"] == {"schema": 1}, 10.0)
    assert agent.stats()["id_reused"] == 1 and agent.stats()["invalid_answered"] == 1
