"""Helpers shared by broker tests: endpoints, broker start-up, and condition waits."""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent_common.registry import TaskRegistry, load_tasks
from cloud_agent.config import CloudConfig
from cloud_agent.server import CloudAgent
from edge_agent.agent import EdgeAgent
from edge_agent.config import EdgeConfig
from topics.brokers import EmbeddedBroker, MosquittoBroker, mosquitto_binary
from topics.codec import Codec
from topics.models import NodeState, Ping, Pong, Result, Task
from topics.mqtt import MqttTransport
from topics.names import TopicTree
from topics.transport import Message, ProtocolVersion, TransportConfig

MOSQUITTO_MISSING = "mosquitto not installed: apt-get install -y mosquitto"

Broker = EmbeddedBroker | MosquittoBroker

# Parametrisation ids: broker kind and protocol the clients speak.
BROKER_IDS = ("amqtt-3.1.1", "mosquitto-3.1.1", "mosquitto-5")


@dataclass(frozen=True)
class BrokerEndpoint:
    """A running broker plus the MQTT version a test's clients should speak to it."""

    kind: str
    url: str
    protocol: ProtocolVersion
    broker: Broker

    @property
    def id(self) -> str:
        return f"{self.kind}-{self.protocol}"

    def config(self, client_id: str = "", **overrides: Any) -> TransportConfig:
        """A TransportConfig for this broker; ``overrides`` replace any field (e.g. keepalive=1)."""
        values: dict[str, Any] = {"protocol": self.protocol, "client_id": client_id}
        values.update(overrides)
        return TransportConfig.from_url(self.url, **values)


def endpoint(broker: Broker, protocol: ProtocolVersion = "3.1.1") -> BrokerEndpoint:
    return BrokerEndpoint(kind=broker.kind, url=broker.url, protocol=protocol, broker=broker)


def split_id(broker_id: str) -> tuple[str, ProtocolVersion]:
    kind, _, protocol = broker_id.partition("-")
    if protocol == "3.1.1":
        return kind, "3.1.1"
    if protocol == "5":
        return kind, "5"
    raise ValueError(f"unknown broker id {broker_id!r}")


def require(present: bool, missing: str) -> None:
    """Skip the test when something it needs is missing (``missing`` says what), or fail it under
    CI=true, where the test command installs everything."""
    if not present:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(missing)
        pytest.skip(missing)


def require_mosquitto() -> None:
    """Skip the test when Mosquitto is missing, or fail it under CI=true."""
    require(mosquitto_binary() is not None, MOSQUITTO_MISSING)


def start_broker(kind: str, *, users: dict[str, str] | None = None, port: int = 0) -> Broker:
    """Start a fresh broker of ``kind`` ("amqtt" or "mosquitto"); the caller must close() it."""
    if kind == "amqtt":
        return EmbeddedBroker(port=port, users=users).start()
    if kind == "mosquitto":
        require_mosquitto()
        return MosquittoBroker(port=port, users=users).start()
    raise ValueError(f"unknown broker kind {kind!r}")


def wait_for(predicate: Callable[[], object], timeout: float = 15.0, interval: float = 0.01,
             message: str = "") -> None:
    """Return as soon as ``predicate()`` is truthy; fail the test after ``timeout`` seconds.

    The timeout only bounds a failure: a passing test returns at the event, so the default is
    generous enough for a machine whose cores are all busy (threads can starve for seconds there).
    """
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() >= deadline:
            what = message or getattr(predicate, "__name__", "condition")
            pytest.fail(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


@dataclass(frozen=True)
class TestCertificates:
    """A throw-away CA and a server certificate for 127.0.0.1 (EC P-256, valid one day)."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def make_test_certificates(directory: Path) -> TestCertificates:
    """Create a CA and a server certificate with ``openssl``; skip the test if openssl is missing."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed: needed to create test certificates")
    ca_key, ca_cert = directory / "ca.key", directory / "ca.crt"
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.crt"
    extensions = directory / "server.ext"
    extensions.write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    commands = [
        [openssl, "req", "-x509", *ec, "-keyout", ca_key, "-out", ca_cert, "-days", "1",
         "-subj", "/CN=mqtt-offload test CA", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        [openssl, "req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        [openssl, "x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key, "-CAcreateserial",
         "-out", cert, "-days", "1", "-extfile", extensions],
    ]
    for command in commands:
        subprocess.run([str(part) for part in command], check=True, capture_output=True, timeout=30)
    return TestCertificates(ca_cert, cert, key)


class MessageLog:
    """Every message a transport receives on ``topic_filter`` (QoS 1), kept in arrival order."""

    def __init__(self, transport: MqttTransport, topic_filter: str) -> None:
        self.transport = transport
        self.messages: list[Message] = []
        self._lock = threading.Lock()
        transport.subscribe(topic_filter, self._collect, qos=1)

    def _collect(self, message: Message) -> None:
        with self._lock:
            self.messages.append(message)

    def on(self, topic: str) -> list[Message]:
        with self._lock:
            return [m for m in self.messages if m.topic == topic]


Stack = list[Callable[[], None]]
"""Undo actions a test registers; the ``stack`` fixture runs them last-in first-out."""


def start_cloud(target: BrokerEndpoint, stack: Stack, prefix: str, node: str, *,
                registry: TaskRegistry | None = None, clock: Callable[[], float] = time.time,
                transport: MqttTransport | None = None, **fields: Any) -> CloudAgent:
    """A started cloud agent ``node`` on ``target`` (demo tasks unless ``registry``), stopped last;
    on ``transport`` if given (a test that crashes the server holds it)."""
    values: dict[str, Any] = {"id": node, "broker": target.url, "protocol": target.protocol,
                              "prefix": prefix, "heartbeat_interval": 0.2, "workers": 2, "grace_period": 0.0}
    values.update(fields)
    config = CloudConfig.model_validate(values)
    if transport is None:
        transport = MqttTransport(target.config(node, reconnect_max_delay=0.5), name=node)
    agent = CloudAgent(config, transport, load_tasks("agent_common.demo_tasks") if registry is None
                       else registry, clock=clock)
    agent.start()
    stack.append(lambda: agent.stop(grace=0.0))
    return agent


def start_servers(target: BrokerEndpoint, stack: Stack, prefix: str, nodes: Sequence[str], *,
                  heartbeat_interval: float, formats: Mapping[str, str] | None = None
                  ) -> dict[str, MqttTransport]:
    """Cloud agents ``nodes`` on ``target`` (each in ``formats``' wire format, default CBOR); their
    transports, for a test that crashes one (``abort()``) or cuts it off (``close()``)."""
    links = {}
    for node in nodes:
        links[node] = MqttTransport(target.config(node, reconnect_max_delay=0.5), name=node)
        start_cloud(target, stack, prefix, node, transport=links[node], heartbeat_interval=heartbeat_interval,
                    format=(formats or {}).get(node, "cbor"))
    return links


def start_edge(target: BrokerEndpoint, stack: Stack, prefix: str, *, registry: TaskRegistry | None = None,
               clock: Callable[[], float] = time.time, **fields: Any) -> EdgeAgent:
    """A started edge agent on ``target`` (demo tasks unless ``registry``; give an empty one for a
    device that runs nothing itself), stopped last."""
    values: dict[str, Any] = {"id": f"edge-{uuid.uuid4().hex[:6]}", "broker": target.url,
                              "protocol": target.protocol, "prefix": prefix, "probe_interval": 0.1,
                              "heartbeat_interval": 0.5}
    values.update(fields)
    config = EdgeConfig.model_validate(values)
    transport = MqttTransport(target.config(config.id, reconnect_max_delay=0.5), name=config.id)
    agent = EdgeAgent(config, transport, load_tasks("agent_common.demo_tasks") if registry is None
                      else registry, clock=clock)
    agent.start()
    stack.append(agent.stop)
    return agent


def connected(target: BrokerEndpoint, stack: Stack, name: str) -> MqttTransport:
    transport = MqttTransport(target.config(f"{name}-{uuid.uuid4().hex[:4]}"))
    transport.connect()
    stack.append(transport.close)
    return transport


def retained_on(target: BrokerEndpoint, stack: Stack, topic_filter: str) -> list[Message]:
    """Every retained message the broker holds under ``topic_filter``.

    A marker published after the subscription is acknowledged comes back after the retained
    messages the broker sent for it (one connection, in order), so its arrival ends the wait.
    """
    marker = f"{topic_filter.rstrip('#/')}/marker-{uuid.uuid4().hex[:6]}"
    got: list[Message] = []
    done = threading.Event()

    def collect(message: Message) -> None:
        if message.topic == marker:
            done.set()
        elif message.retain:
            got.append(message)

    look = connected(target, stack, "look")
    look.subscribe(topic_filter, collect, qos=1)
    look.subscribe(marker, collect, qos=1)
    look.publish(marker, b"x", qos=1)
    assert done.wait(15.0), "marker never came back"
    return got


def gate_registry(gate: threading.Event) -> TaskRegistry:
    """The demo tasks plus ``gate``: returns once the test sets ``gate`` (a task held in flight)."""
    registry = TaskRegistry()
    registry.merge(load_tasks("agent_common.demo_tasks"))

    @registry.task("gate")
    def hold(payload: Any) -> Any:
        gate.wait(30.0)
        return payload

    return registry


class RawClient:
    """A bare MQTT client speaking the protocol by hand: tasks, pings, state."""

    def __init__(self, target: BrokerEndpoint, prefix: str, stack: Stack) -> None:
        self.id = f"raw-{uuid.uuid4().hex[:6]}"
        self.tree = TopicTree(prefix)
        self.codec = Codec("cbor")
        self.results: queue.Queue[Result] = queue.Queue()
        self.pongs: queue.Queue[Pong] = queue.Queue()
        self.states: queue.Queue[tuple[NodeState, bool]] = queue.Queue()
        self.transport = MqttTransport(target.config(self.id), name=self.id)
        self.transport.connect(timeout=5.0)
        stack.append(lambda: self.transport.close(timeout=2.0))
        self.transport.subscribe(self.tree.result_inbox(self.id), self._on_result, qos=1)
        self.transport.subscribe(self.tree.pong(self.id), self._on_pong, qos=0)
        self._nonce = 0
        self._tasks = 0

    def _on_result(self, message: Message) -> None:
        self.results.put(self.codec.decode(message.payload, Result, topic=message.topic))

    def _on_pong(self, message: Message) -> None:
        self.pongs.put(self.codec.decode(message.payload, Pong, topic=message.topic))

    def _on_state(self, message: Message) -> None:
        if message.payload:
            self.states.put((self.codec.decode(message.payload, NodeState, topic=message.topic),
                             message.retain))

    def watch_states(self) -> None:
        self.transport.subscribe(f"{self.tree.prefix}/node/+/state", self._on_state, qos=1)

    def send_task(self, topic: str, name: str, payload: Any, *, task_id: str | None = None,
                  ttl: float | None = 10.0, **fields: Any) -> str:
        """Publish a hand-built Task to ``topic``; its id (``<client>-<n>`` unless given)."""
        self._tasks += 1
        task_id = task_id or f"{self.id}-{self._tasks}"
        task = Task(id=task_id, task=name, sender=self.id, reply_to=self.tree.result_inbox(self.id),
                    created=time.time(), payload=payload, ttl=ttl, **fields)
        self.transport.publish(topic, self.codec.encode(task), qos=1)
        return task_id

    def task(self, topic: str, name: str, payload: Any, **options: Any) -> Result:
        """:meth:`send_task`, then its Result (the next one to arrive: send one at a time)."""
        task_id = self.send_task(topic, name, payload, **options)
        result = self.results.get(timeout=10.0)
        assert result.task_id == task_id
        return result

    def ping(self, server: str) -> float:
        """One ping round trip to ``server``, in seconds."""
        self._nonce += 1
        sent = time.monotonic()
        ping = Ping(nonce=self._nonce, sender=self.id, reply_to=self.tree.pong(self.id), sent=sent)
        self.transport.publish(self.tree.ping(server), self.codec.encode(ping), qos=0)
        pong = self.pongs.get(timeout=5.0)
        assert pong.nonce == self._nonce
        return time.monotonic() - sent
