"""Floods, bounded in count and time: nothing acknowledged is lost, nothing logs per message.

* The transport's dispatcher never drops a QoS 1 message (it is acknowledged only after its
  handlers ran) and stops reading from the socket instead when it is full.
* A QoS 1 publish that finds the outgoing queue full waits for room.
* Two raw paho publishers flood one CloudAgent with small queues on a real Mosquitto: every task the
  broker acknowledged gets exactly one Result (ok or rejected-busy), and the log stays short.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as paho
import pytest
from brokers_support import BrokerEndpoint, wait_for
from paho.mqtt.enums import CallbackAPIVersion

from agent_common.registry import TaskRegistry
from cloud_agent.config import CloudConfig
from cloud_agent.server import CloudAgent
from topics.brokers import MosquittoBroker
from topics.codec import Codec
from topics.models import Result, Task
from topics.mqtt import MqttTransport
from topics.names import TopicTree
from topics.transport import Message

TransportFactory = Callable[..., MqttTransport]
CBOR = Codec("cbor")
FLOOD_PER_PUBLISHER = 2500
FLOOD_TIMEOUT = 90.0


def test_a_full_dispatcher_never_drops_qos1_and_pauses_reading(
    broker: BrokerEndpoint, make_transport: TransportFactory, topic_prefix: str
) -> None:
    stuck = make_transport(broker, "stuck", dispatch_queue=2)
    publisher = make_transport(broker, "flood")
    release = threading.Event()
    received: list[bytes] = []

    def blocking(message: Message) -> None:
        received.append(message.payload)
        release.wait(10.0)

    stuck.subscribe(f"{topic_prefix}/work", blocking, qos=1)
    try:
        for index in range(12):
            publisher.publish(f"{topic_prefix}/work", str(index).encode(), qos=1)
        wait_for(lambda: received == [b"0"], message="the handler blocked on the first message")
        wait_for(lambda: stuck.stats()["read_pauses"] >= 1, message="reading paused")
        assert received == [b"0"]  # the one dispatch thread is still held by the first
    finally:
        release.set()
    wait_for(lambda: len(received) == 12, timeout=10.0, message="every message after the pause")
    assert received == [str(index).encode() for index in range(12)]
    stats = stuck.stats()
    assert stats["dropped_dispatch_full"] == 0 and stats["delivered"] == 12
    assert stuck.connected and stats["disconnects"] == 0


@pytest.mark.mosquitto
def test_a_publish_waits_for_room_in_a_full_outgoing_queue(
    broker_factory: Callable[..., BrokerEndpoint], make_transport: TransportFactory, topic_prefix: str
) -> None:
    target = broker_factory("mosquitto-3.1.1")
    broker = target.broker
    assert isinstance(broker, MosquittoBroker) and broker.pid is not None
    subscriber = make_transport(target, "reader")
    got: list[bytes] = []
    subscriber.subscribe(f"{topic_prefix}/q", lambda m: got.append(m.payload), qos=1)
    transport = make_transport(target, "patient", max_queued_messages=3, keepalive=30,
                               publish_wait=20.0)
    failures: list[BaseException] = []

    def fourth() -> None:
        try:
            transport.publish(f"{topic_prefix}/q", b"3", qos=1)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            failures.append(exc)

    os.kill(broker.pid, signal.SIGSTOP)  # the broker stops acknowledging
    waiter = threading.Thread(target=fourth)
    try:
        for index in range(3):
            transport.publish(f"{topic_prefix}/q", str(index).encode(), qos=1)
        waiter.start()
        wait_for(lambda: transport.stats()["publish_waited"] == 1, message="the publish waiting")
        assert waiter.is_alive()
    finally:
        os.kill(broker.pid, signal.SIGCONT)
    waiter.join(20.0)
    assert not waiter.is_alive() and failures == []
    wait_for(lambda: len(got) == 4, message="all four delivered")
    assert sorted(got) == [b"0", b"1", b"2", b"3"]
    assert transport.stats()["publish_queue_full"] == 0


class _RawPublisher:
    """A plain paho client that publishes pre-encoded tasks as fast as it can and records which
    ones the broker acknowledged (PUBACK). Fewer than 65,536 tasks: message ids never repeat."""

    def __init__(self, port: int, name: str) -> None:
        self.name = name
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=name)
        self.client.max_inflight_messages_set(100)
        self._ids: dict[int, str] = {}
        self._acked_mids: list[int] = []  # appended on paho's thread (never under our locks)
        self.client.on_publish = lambda client, userdata, mid, *rest: self._acked_mids.append(mid)
        self.client.connect("127.0.0.1", port, 30)
        self.client.loop_start()

    @property
    def acked(self) -> set[str]:
        ids = dict(self._ids)
        return {ids[mid] for mid in list(self._acked_mids) if mid in ids}

    def flood(self, topic: str, tasks: list[tuple[str, bytes]]) -> None:
        for task_id, data in tasks:
            self._ids[self.client.publish(topic, data, qos=1).mid] = task_id

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class _ResultCollector:
    """A plain paho client counting every Result per (sender, task id) and status."""

    def __init__(self, port: int, topic_filter: str) -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="collector")
        self.answers: Counter[tuple[str, str]] = Counter()
        self.statuses: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *args: self._ready.set()
        self.client.connect("127.0.0.1", port, 30)
        self.client.subscribe(topic_filter, qos=1)
        self.client.loop_start()
        assert self._ready.wait(10.0), "collector not subscribed"

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        sender = message.topic.split("/")[-2]
        result = CBOR.decode(bytes(message.payload), Result)
        with self._lock:
            self.answers[(sender, result.task_id)] += 1
            self.statuses[str(result.status)] += 1

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self.answers.values())

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def flood_broker(broker_factory: Callable[..., BrokerEndpoint]) -> BrokerEndpoint:
    return broker_factory("mosquitto-3.1.1")


@pytest.fixture
def flood_agent(flood_broker: BrokerEndpoint, topic_prefix: str) -> Iterator[CloudAgent]:
    registry = TaskRegistry()
    registry.task("echo")(lambda payload: payload)
    config = CloudConfig(id="srv1", prefix=topic_prefix, workers=2, queue_size=4,
                         heartbeat_interval=0.5, publish_wait=10.0)
    transport_config = config.transport_config(flood_broker.url).model_copy(
        update={"max_queued_messages": 50, "dispatch_queue": 64})
    agent = CloudAgent(config, MqttTransport(transport_config), registry)
    agent.start()
    yield agent
    agent.stop(grace=2.0)


def test_flood_every_acknowledged_task_gets_exactly_one_result(
    flood_broker: BrokerEndpoint, flood_agent: CloudAgent, topic_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tree = TopicTree(topic_prefix)
    port = flood_broker.broker.port
    collector = _ResultCollector(port, f"{topic_prefix}/node/+/result")
    publishers = [_RawPublisher(port, f"flood-{n}-{topic_prefix[-8:]}") for n in range(2)]
    batches = [[(f"{p.name}-{i}", CBOR.encode(Task(
        id=f"{p.name}-{i}", task="echo", sender=p.name, reply_to=tree.result_inbox(p.name),
        created=time.time(), payload=i))) for i in range(FLOOD_PER_PUBLISHER)] for p in publishers]
    threads = [threading.Thread(target=p.flood, args=(tree.task_inbox("srv1"), batch))
               for p, batch in zip(publishers, batches, strict=True)]
    total = FLOOD_PER_PUBLISHER * len(publishers)
    try:
        with caplog.at_level(logging.INFO):
            began = time.monotonic()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(FLOOD_TIMEOUT)
            sent_for = time.monotonic() - began
            wait_for(lambda: sum(len(p.acked) for p in publishers) == total, FLOOD_TIMEOUT,
                     message="the broker acknowledging every task")
            wait_for(lambda: collector.total >= total, FLOOD_TIMEOUT, message="a result per task")
            answered_for = time.monotonic() - began
            stats = flood_agent.stats()
        flood_lines = [r for r in caplog.records if r.name.startswith(("cloud_agent", "topics"))
                       and r.created >= time.time() - answered_for]
    finally:
        for publisher in publishers:
            publisher.close()
        collector.close()
    acked = {(p.name, task_id) for p in publishers for task_id in p.acked}
    answers = dict(collector.answers)
    print(f"\nflood: sent {total} in {sent_for:.2f}s, acknowledged {len(acked)}, answered "
          f"{collector.total} in {answered_for:.2f}s: {dict(collector.statuses)}; "
          f"{len(flood_lines)} log lines; transport {stats['transport']}")
    assert len(acked) == total
    assert {key for key, n in answers.items() if n != 1} == set(), "answered more than once"
    assert acked <= set(answers), f"{len(acked - set(answers))} acknowledged tasks never answered"
    assert set(collector.statuses) <= {"ok", "rejected-busy"}
    assert collector.statuses["rejected-busy"] > 0  # the small queue really overflowed
    assert stats["received"] == total and stats.get("results_not_sent", 0) == 0
    assert stats["bad_input"] == {} and stats["transport"]["dropped_dispatch_full"] == 0
    assert sum(stats["completed"].values()) == total
    warnings = [r for r in flood_lines if r.levelno >= logging.WARNING]
    assert len(warnings) <= 2, [r.getMessage() for r in warnings]
    assert len(flood_lines) <= 10, [r.getMessage() for r in flood_lines]
