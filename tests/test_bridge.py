"""Bridge tests on the in-memory broker: JSON in -> task -> JSON out with captures, bad input counted."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from typing import Any

import cbor2
import pytest
from brokers_support import wait_for
from pydantic import ValidationError

from agent_common.registry import TaskRegistry
from edge_agent.agent import EdgeAgent
from edge_agent.config import BridgeRoute, EdgeConfig, render_output
from topics.errors import TopicError
from topics.memory import MemoryBroker, MemoryTransport
from topics.transport import Message


def registry() -> TaskRegistry:
    tasks = TaskRegistry()

    @tasks.task("square")
    def square(payload: Any) -> Any:
        return {"value": payload["x"] ** 2}

    @tasks.task("shout")
    def shout(payload: Any) -> Any:
        return bytes(payload).upper()

    return tasks


ROUTES = [
    {"filter": "sensors/+/reading", "task": "square", "output": "results/{1}/square"},
    {"filter": "cbor/+/in", "task": "square", "output": "cbor/{1}/out", "input_format": "cbor",
     "output_format": "cbor"},
    {"filter": "raw/#", "task": "shout", "output": "shouted/{1}", "input_format": "raw",
     "output_format": "raw"},
    {"filter": "loop/+", "task": "square", "output": "loop/{1}"},
]


@pytest.fixture
def setup() -> Iterator[tuple[EdgeAgent, MemoryTransport, list[Message]]]:
    broker = MemoryBroker()
    config = EdgeConfig.model_validate({"id": "bridge1", "prefix": "test/bridge", "routes": ROUTES})
    agent = EdgeAgent(config, MemoryTransport(broker, "bridge1"), registry(), rng=random.Random(1))
    agent.start()
    client = MemoryTransport(broker, "node-red")
    client.connect()
    seen: list[Message] = []
    for topic_filter in ("results/#", "cbor/+/out", "shouted/#"):
        client.subscribe(topic_filter, seen.append)
    yield agent, client, seen
    client.close()
    agent.stop()


def test_json_in_json_out_with_captures(setup: tuple[EdgeAgent, MemoryTransport, list[Message]]) -> None:
    agent, client, seen = setup
    client.publish("sensors/kitchen/reading", b'{"x": 3}')
    client.publish("sensors/garage/reading", json.dumps({"x": 5}).encode())
    wait_for(lambda: len(seen) == 2)
    by_topic = {m.topic: json.loads(m.payload) for m in seen}
    assert by_topic == {"results/kitchen/square": {"value": 9}, "results/garage/square": {"value": 25}}
    assert agent.stats()["bridge"]["published"] == 2


def test_cbor_and_raw_routes(setup: tuple[EdgeAgent, MemoryTransport, list[Message]]) -> None:
    _agent, client, seen = setup
    client.publish("cbor/a1/in", cbor2.dumps({"x": 4}))
    client.publish("raw/deep/er", b"hello")
    wait_for(lambda: len(seen) == 2)
    by_topic = {m.topic: m.payload for m in seen}
    assert cbor2.loads(by_topic["cbor/a1/out"]) == {"value": 16}
    assert by_topic["shouted/deep/er"] == b"HELLO"


def test_malformed_messages_are_counted_not_fatal(
        setup: tuple[EdgeAgent, MemoryTransport, list[Message]]) -> None:
    agent, client, seen = setup
    client.publish("sensors/bad/reading", b"{not json")
    client.publish("sensors/worse/reading", b"\xff\xfe")
    client.publish("sensors/typed/reading", b'"no x here"')  # decodes, the task then fails
    client.publish("loop/a", b'{"x": 1}')  # would feed itself forever
    client.publish("sensors/ok/reading", b'{"x": 2}')
    wait_for(lambda: any(m.topic == "results/ok/square" for m in seen))
    wait_for(lambda: agent.stats()["bridge"].get("failed", 0) == 1)
    stats = agent.stats()["bridge"]
    assert stats["bad_input"] == {"bridge-malformed": 2, "bridge-loop": 1}
    assert stats["published"] == 1
    assert [m.topic for m in seen] == ["results/ok/square"]


def test_route_validation() -> None:
    with pytest.raises(ValidationError, match="capture"):
        BridgeRoute(filter="a/+/b", task="t", output="out/{2}")
    with pytest.raises(ValidationError):
        BridgeRoute(filter="a/#/b", task="t", output="out")
    with pytest.raises(ValidationError, match="publishable"):
        BridgeRoute(filter="a/+", task="t", output="out/+")
    assert render_output("r/{2}/{1}", ["a", "b"]) == "r/b/a"
    with pytest.raises(TopicError):
        render_output("r/{3}", ["a"])
