"""Hostile input, family by family (``bench/hostile.py``, shared with ``bench/fuzz_agents.py``).

The decoders refuse each payload with its own reason and nothing else escapes; refusing costs little
memory and few operations (counted, not timed); topic validation agrees with what Mosquitto accepts;
and a server and a device on a real Mosquitto count every payload by reason, stay connected and keep
serving.
"""

from __future__ import annotations

import random
import socket
import struct
import sys
import tracemalloc
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any, ParamSpec, TypeVar

import cbor2
import pytest
from brokers_support import BrokerEndpoint, endpoint, wait_for

from agent_common.registry import TaskRegistry, load_tasks
from bench.hostile import (
    BAD_REPLY_TOPICS,
    FAMILIES,
    FUZZ_NODE,
    TARGETS,
    Hostile,
    applies,
    cbor_with,
    hostile,
    shared_reference_bomb,
    valid_fields,
)
from cloud_agent.config import CloudConfig
from cloud_agent.server import CloudAgent
from edge_agent.agent import EdgeAgent
from edge_agent.config import EdgeConfig
from topics.brokers import MosquittoBroker
from topics.codec import MAX_ITEMS, Codec
from topics.errors import DecodeError, TopicError
from topics.models import Task
from topics.mqtt import MqttTransport
from topics.names import Kind, TopicTree, validate_publish_topic, validate_topic_name

TREE = TopicTree("hostile/v1")
DECODE_REASONS = {"empty", "oversized", "malformed", "too-deep", "too-many-items", "big-int", "schema",
                  "version", "bad-reply-to", "bad-topic"}
CASES = [(family, kind) for family in FAMILIES for kind in TARGETS if applies(family, kind)]
SAMPLES = 25
P = ParamSpec("P")
R = TypeVar("R")


def samples(family: str, kind: Kind, count: int = SAMPLES) -> Iterator[Hostile]:
    rng = random.Random(f"{family}/{kind.value}")
    for _ in range(count):
        yield hostile(rng, kind, TREE, family=family)


def outcome(codec: Codec, item: Hostile) -> str:
    """The reason a payload is refused with, or ``valid``; fails on anything but a DecodeError."""
    try:
        decoded = codec.decode(item.data, item.model, topic="hostile/t")
    except DecodeError as error:
        assert error.topic == "hostile/t" and error.size == len(item.data)
        return error.reason
    assert isinstance(decoded, item.model)
    return "valid"


@pytest.mark.parametrize(("family", "kind"), CASES, ids=[f"{f}-{k.value}" for f, k in CASES])
def test_each_family_gets_its_reason_and_nothing_else(family: str, kind: Kind) -> None:
    for item in samples(family, kind):
        for codec in (Codec("cbor"), Codec("json")):  # a receiver reads both, whatever it sends
            got = outcome(codec, item)
            if item.reason is None:  # random bytes and mutations: any reason, or (rarely) valid
                assert got in DECODE_REASONS | {"valid"}
            else:
                assert got == item.reason, (item.family, item.data[:80])


# Refusing costs little: memory (tracemalloc) and work (Python calls and lines executed) --------


class Work:
    """Counts the Python function calls and executed lines of one call."""

    def __init__(self) -> None:
        self.calls = 0
        self.lines = 0

    def _trace(self, frame: FrameType, event: str, arg: Any) -> Callable[..., Any]:
        if event == "call":
            self.calls += 1
        elif event == "line":
            self.lines += 1
        return self._trace

    def run(self, action: Callable[[], object]) -> None:
        sys.settrace(self._trace)
        try:
            action()
        except DecodeError:
            pass
        finally:
            sys.settrace(None)


def counting(counter: Counter[str], key: str, real: Callable[P, R]) -> Callable[P, R]:
    """``real``, counting each call under ``key`` in ``counter``."""
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        counter.update([key])
        return real(*args, **kwargs)
    return wrapper


def decoding(codec: Codec, item: Hostile) -> Callable[[], object]:
    """A call that decodes ``item`` as its model (bound here, not to the caller's loop variable)."""
    return lambda: codec.decode(item.data, item.model)


def decoding_task(codec: Codec, data: bytes) -> Callable[[], object]:
    """A call that decodes ``data`` as a Task."""
    return lambda: codec.decode(data, Task)


def peak_memory(action: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        action()
    except DecodeError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


CHEAP_FAMILIES = ["cbor-tag", "bomb-28-29", "big-int-cbor", "big-int-json", "nan-json", "nan-cbor",
                  "bad-utf8", "truncated", "version", "empty", "oversized", "deep"]


@pytest.mark.parametrize("family", CHEAP_FAMILIES)
def test_refusals_take_little_memory_and_few_steps(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    decoders = Counter[str]()
    real = cbor2.CBORDecoder
    monkeypatch.setattr(cbor2, "CBORDecoder", counting(decoders, "made", real))
    codec = Codec()
    for kind in TARGETS:
        if not applies(family, kind):
            continue
        for item in samples(family, kind, 6):
            work = Work()
            work.run(decoding(codec, item))
            assert work.calls < 300 and work.lines < 3000, (family, work.calls, work.lines)
            assert peak_memory(decoding(codec, item)) < 256 * 1024
    if family in ("cbor-tag", "bomb-28-29"):
        assert decoders["made"] == 0  # refused before cbor2 sees a byte


def test_a_shared_reference_bomb_costs_the_same_at_any_size() -> None:
    """Each level doubles the tree behind the references: 20 levels took 13.6 s and 176 MiB before."""
    codec = Codec()
    costs = []
    for levels in (10, 20, 60, 255):
        data = cbor_with(valid_fields(Kind.TASK, TREE, random.Random(1)), "payload",
                         shared_reference_bomb(levels))
        with pytest.raises(DecodeError, match="tag 28 \\(shared value\\)"):
            codec.decode(data, Task)
        work = Work()
        work.run(decoding_task(codec, data))
        costs.append((work.calls, work.lines, peak_memory(decoding_task(codec, data))))
    lines = [cost[1] for cost in costs]
    assert max(lines) - min(lines) < 50 and max(cost[0] for cost in costs) < 100, costs
    assert max(cost[2] for cost in costs) < 64 * 1024, costs


@pytest.mark.parametrize("fmt", ["cbor", "json"])
def test_too_many_items_stops_at_the_limit_not_at_the_end_of_the_input(fmt: str) -> None:
    count = 10 * MAX_ITEMS if fmt == "cbor" else 5 * MAX_ITEMS  # within the 1 MiB limit
    data = (b"\xa1\x61p\x9f" + b"\x00" * count + b"\xff" if fmt == "cbor"
            else b'{"p":[' + b"0," * count + b"0]}")
    work = Work()
    work.run(lambda: Codec().decode(data, Task))
    assert work.lines < (15 * MAX_ITEMS if fmt == "cbor" else 1000), work.lines  # JSON: per 64 KiB
    assert peak_memory(lambda: Codec().decode(data, Task)) < (64 * 1024 if fmt == "cbor" else 2 << 20)
    with pytest.raises(DecodeError) as info:
        Codec().decode(data, Task)
    assert info.value.reason == "too-many-items"


def test_a_6000_digit_integer_is_a_counted_decode_error_not_a_value_error() -> None:
    for body in (b'{"v":' + b"1" * 6000 + b"}", b'{"v":1,"payload":[' + b"9" * 6000 + b"]}"):
        with pytest.raises(DecodeError) as info:
            Codec().decode(body, Task)
        assert info.value.reason == "big-int" and "6000 digits" in info.value.detail


# Topic validation agrees with Mosquitto ---------------------------------------------------------


def _remaining_length(n: int) -> bytes:
    out = b""
    while True:
        n, digit = divmod(n, 128)
        out += bytes([digit | (0x80 if n else 0)])
        if not n:
            return out


def mosquitto_accepts(port: int, topic: bytes) -> bool:
    """Publish ``topic`` (raw bytes, QoS 1) from a bare MQTT 3.1.1 client: PUBACK, or disconnected?"""
    with socket.create_connection(("127.0.0.1", port), timeout=5.0) as sock:
        client_id = f"probe-{uuid.uuid4().hex[:8]}".encode()
        body = b"\x00\x04MQTT\x04\x02\x00\x0a" + struct.pack("!H", len(client_id)) + client_id
        sock.sendall(b"\x10" + _remaining_length(len(body)) + body)
        assert sock.recv(4)[:1] == b"\x20"
        publish = struct.pack("!H", len(topic)) + topic + b"\x00\x01" + b"x"
        sock.sendall(b"\x32" + _remaining_length(len(publish)) + publish)
        try:
            answer = sock.recv(4)
        except (ConnectionResetError, TimeoutError):
            return False
        return answer[:1] == b"\x40"


TOPIC_CASES = [*BAD_REPLY_TOPICS, "a/b", "a b", "a\xa0b", "a\ufdf0", "a\ufffd", "a\U0010fffd", "a\ue000",
               "a//b/", "/", "a" + "/a" * 200, "x" * 65_535, "$SYS/x", "$x/y"]


@pytest.mark.parametrize("topic", TOPIC_CASES, ids=lambda t: repr(t[:24]))
def test_topic_validation_agrees_with_mosquitto(mosquitto_broker: MosquittoBroker, topic: str) -> None:
    if not topic or "+" in topic or "#" in topic:
        return  # paho and we never publish these; Mosquitto's answer to them is not the question
    try:
        validate_topic_name(topic)
        valid = True
    except TopicError:
        valid = False
    assert mosquitto_accepts(mosquitto_broker.port, topic.encode()) is valid
    if topic.startswith("$"):  # a valid name, refused by the protocol for what a server publishes
        with pytest.raises(TopicError):
            validate_publish_topic(topic)


def test_mosquitto_refuses_lone_surrogates_and_overlong_encodings(mosquitto_broker: MosquittoBroker) -> None:
    for raw in (b"a\xed\xa0\x80", b"a\xc0\x80", b"a\xf4\x90\x80\x80"):
        assert not mosquitto_accepts(mosquitto_broker.port, raw)
    with pytest.raises(TopicError):
        validate_publish_topic("a\ud800")


# A server and a device on Mosquitto: every family counted, both connected, both serving ---------

def fleet_targets(tree: TopicTree) -> list[tuple[str, Kind, str]]:
    """Every (agent, kind, topic) an agent subscribes to: a server's two inboxes, a device's five."""
    return [("server", Kind.TASK, tree.task_inbox("srv")), ("server", Kind.PING, tree.ping("srv")),
            ("device", Kind.RESULT, tree.result_inbox("dev")), ("device", Kind.PONG, tree.pong("dev")),
            ("device", Kind.PING, tree.ping("dev")), ("device", Kind.HEARTBEAT, tree.heartbeat(FUZZ_NODE)),
            ("device", Kind.STATE, tree.state(FUZZ_NODE))]


def bad_input_is(stats: Callable[[], dict[str, Any]], expected: Counter[str]) -> Callable[[], bool]:
    """Whether an agent's bad-input counters are ``expected``, asked anew at each call."""
    return lambda: stats()["bad_input"] == dict(expected)


def counted_as(agent: str, kind: Kind, reason: str) -> str:
    """The key a bad-input counter has: a server counts the decode reason, a device prefixes it."""
    return reason if agent == "server" else f"{kind.value}-{reason}"


def test_agents_on_mosquitto_count_every_family_and_keep_serving(mosquitto_broker: MosquittoBroker) -> None:
    target = endpoint(mosquitto_broker)
    tree = TopicTree(f"test/{uuid.uuid4().hex[:8]}")
    stop: list[Callable[[], None]] = []
    try:
        server, device, transports, fuzzer = _start_fleet(target, tree, stop)
        wait_for(lambda: any(v.node == "srv" and not v.stale for v in device.servers()), 10.0)
        expected: dict[str, Counter[str]] = {"server": Counter(), "device": Counter()}
        rng = random.Random(12)
        for family in FAMILIES:
            if family in ("random-bytes", "mutated"):
                continue  # any reason, or none: bench/fuzz_agents.py counts those
            for agent, kind, topic in fleet_targets(tree):
                if not applies(family, kind):
                    continue
                for _ in range(2):
                    item = hostile(rng, kind, tree, family=family)
                    assert item.reason is not None
                    expected[agent][counted_as(agent, kind, item.reason)] += 1
                    fuzzer.publish(topic, item.data, qos=1)
        for agent, stats in (("server", server.stats), ("device", device.stats)):
            wait_for(bad_input_is(stats, expected[agent]), 30.0,
                     message=f"{agent} counts {stats()['bad_input']} != {dict(expected[agent])}")
        for transport in transports:
            assert transport.connected
            counters = transport.stats()
            assert counters["handler_errors"] == counters["disconnects"] == 0, counters
            assert counters["dropped_dispatch_full"] == 0, counters
        assert device.submit("square", {"x": 7}).result(10.0) == {"y": 49}
        assert server.stats()["completed"].get("ok", 0) >= 1  # the valid task ran on the server
    finally:
        for action in reversed(stop):
            action()


def _start_fleet(target: BrokerEndpoint, tree: TopicTree, stop: list[Callable[[], None]],
                 ) -> tuple[CloudAgent, EdgeAgent, tuple[MqttTransport, MqttTransport], MqttTransport]:
    suffix = tree.prefix[-8:]
    config = CloudConfig.model_validate({"id": "srv", "broker": target.url, "prefix": tree.prefix,
                                         "heartbeat_interval": 0.2, "workers": 2, "grace_period": 0.0})
    server_transport = MqttTransport(target.config(f"srv-{suffix}"), name="srv")
    server = CloudAgent(config, server_transport, load_tasks("agent_common.demo_tasks"))
    server.start()
    stop.append(lambda: server.stop(grace=0.0))
    device_config = EdgeConfig.model_validate({"id": "dev", "broker": target.url, "prefix": tree.prefix,
                                               "policy": "remote", "probe_interval": 0.1,
                                               "heartbeat_interval": 0.5})
    device_transport = MqttTransport(target.config(f"dev-{suffix}"), name="dev")
    device = EdgeAgent(device_config, device_transport, TaskRegistry())
    device.start()
    stop.append(device.stop)
    fuzzer = MqttTransport(target.config(f"fuzz-{suffix}"), name="fuzzer")
    fuzzer.connect()
    stop.append(fuzzer.close)
    return server, device, (server_transport, device_transport), fuzzer
