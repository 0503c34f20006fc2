"""The in-memory broker and transport: the MQTT semantics unit tests rely on."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from typing import Protocol

import pytest
from brokers_support import wait_for

from topics.errors import TopicError
from topics.memory import MemoryBroker, MemoryTransport
from topics.transport import ConnectError, Message, NotConnectedError

WAIT = 5.0


class Connect(Protocol):
    """Creates a connected transport on the test's broker (closed after the test)."""

    def __call__(self, client_id: str = "") -> MemoryTransport: ...


class Inbox:
    """A handler that collects messages, with waits bounded in time."""

    def __init__(self) -> None:
        self.messages: queue.Queue[Message] = queue.Queue()

    def __call__(self, message: Message) -> None:
        self.messages.put(message)

    def get(self) -> Message:
        return self.messages.get(timeout=WAIT)

    def take(self, count: int) -> list[Message]:
        return [self.get() for _ in range(count)]

    def assert_empty(self, transports: list[MemoryTransport]) -> None:
        """Nothing more arrives once every dispatcher has drained what was queued before."""
        for transport in transports:
            flushed = threading.Event()
            probe = f"probe/{id(flushed)}"

            def mark_flushed(_message: Message, done: threading.Event = flushed) -> None:
                done.set()

            transport.subscribe(probe, mark_flushed)
            transport.publish(probe, b"x")
            assert flushed.wait(WAIT)
            transport.unsubscribe(probe)
        assert self.messages.empty(), list(self.messages.queue)


@pytest.fixture
def broker() -> MemoryBroker:
    return MemoryBroker()


@pytest.fixture
def clients(broker: MemoryBroker) -> Iterator[list[MemoryTransport]]:
    created: list[MemoryTransport] = []
    yield created
    for transport in created:
        transport.close()


@pytest.fixture
def connect(broker: MemoryBroker, clients: list[MemoryTransport]) -> Connect:
    def make(client_id: str = "") -> MemoryTransport:
        transport = MemoryTransport(broker, client_id)
        clients.append(transport)
        transport.connect()
        return transport

    return make


def test_publish_reaches_exact_and_wildcard_subscribers(connect: Connect) -> None:
    publisher, subscriber = connect("pub"), connect("sub")
    exact, plus, hash_all, other = Inbox(), Inbox(), Inbox(), Inbox()
    subscriber.subscribe("offload/v1/node/srv1/task", exact)
    subscriber.subscribe("offload/v1/node/+/task", plus)
    subscriber.subscribe("offload/#", hash_all)
    subscriber.subscribe("offload/v1/node/+/result", other)
    publisher.publish("offload/v1/node/srv1/task", b"\xa0", qos=1)
    for inbox in (exact, plus, hash_all):
        message = inbox.get()
        assert message == Message("offload/v1/node/srv1/task", b"\xa0", qos=1, retain=False)
    other.assert_empty([subscriber])


def test_messages_arrive_in_publish_order(connect: Connect) -> None:
    publisher, subscriber = connect(), connect()
    inbox = Inbox()
    subscriber.subscribe("seq/+", inbox)
    for index in range(200):
        publisher.publish(f"seq/{index % 3}", str(index).encode())
    assert [int(m.payload) for m in inbox.take(200)] == list(range(200))


def test_dollar_topics_not_matched_by_leading_wildcards(broker: MemoryBroker, connect: Connect) -> None:
    subscriber = connect()
    everything, system = Inbox(), Inbox()
    subscriber.subscribe("#", everything)
    subscriber.subscribe("$SYS/#", system)
    broker.route(Message("$SYS/broker/uptime", b"1"))
    assert system.get().topic == "$SYS/broker/uptime"
    everything.assert_empty([])


def test_retained_message_is_delivered_to_later_subscribers_and_cleared_by_empty(connect: Connect) -> None:
    publisher = connect()
    publisher.publish("offload/v1/node/srv1/state", b"online", qos=1, retain=True)
    publisher.publish("offload/v1/node/srv2/state", b"old", retain=True)
    publisher.publish("offload/v1/node/srv2/state", b"new", retain=True)
    late = connect()
    inbox = Inbox()
    late.subscribe("offload/v1/node/+/state", inbox)
    received = {m.topic: m for m in inbox.take(2)}
    assert received["offload/v1/node/srv1/state"].payload == b"online"
    assert received["offload/v1/node/srv2/state"].payload == b"new"
    assert all(m.retain for m in received.values())
    publisher.publish("offload/v1/node/srv1/state", b"", retain=True)  # clears, and is still delivered
    live = inbox.get()
    assert (live.payload, live.retain) == (b"", False)
    later, second = connect(), Inbox()
    later.subscribe("offload/v1/node/+/state", second)
    assert second.get().topic == "offload/v1/node/srv2/state"
    second.assert_empty([later])


def test_will_is_sent_on_abort_not_on_close(connect: Connect, broker: MemoryBroker) -> None:
    watcher = connect("watcher")
    inbox = Inbox()
    watcher.subscribe("offload/v1/node/+/state", inbox)

    polite = MemoryTransport(broker, "polite")
    polite.set_will("offload/v1/node/polite/state", b"offline", qos=1, retain=True)
    polite.connect()
    polite.close()
    inbox.assert_empty([watcher])

    crashing = MemoryTransport(broker, "crashing")
    crashing.set_will("offload/v1/node/crashing/state", b"offline", qos=1, retain=True)
    crashing.connect()
    crashing.abort()
    will = inbox.get()
    assert (will.topic, will.payload, will.qos) == ("offload/v1/node/crashing/state", b"offline", 1)
    assert broker.retained["offload/v1/node/crashing/state"].payload == b"offline"
    assert not crashing.connected
    crashing.abort()  # a second abort sends nothing more
    inbox.assert_empty([watcher])
    crashing.close()


def test_will_topic_is_validated() -> None:
    with pytest.raises(TopicError):
        MemoryTransport(MemoryBroker()).set_will("a/+/b", b"")


def test_shared_subscription_round_robin_and_plain_subscribers_get_everything(connect: Connect) -> None:
    device = connect("device")
    servers = [connect(f"srv{index}") for index in range(3)]
    inboxes = [Inbox() for _ in servers]
    for server, inbox in zip(servers, inboxes, strict=True):
        server.subscribe("$share/gpu/offload/v1/pool/gpu/task", inbox)
    monitor = Inbox()
    device.subscribe("offload/v1/pool/+/task", monitor)
    for index in range(9):
        device.publish("offload/v1/pool/gpu/task", bytes([index]), qos=1)
    shares = [sorted(m.payload[0] for m in inbox.take(3)) for inbox in inboxes]
    assert sorted(index for share in shares for index in share) == list(range(9))
    assert all(len(share) == 3 for share in shares)
    assert len(monitor.take(9)) == 9
    for inbox in inboxes:
        inbox.assert_empty(servers)


def test_shared_group_skips_disconnected_members_and_retained_is_not_replayed(connect: Connect) -> None:
    device = connect()
    device.publish("offload/v1/pool/gpu/task", b"retained", retain=True)
    first, second = connect("a"), connect("b")
    first_inbox, second_inbox = Inbox(), Inbox()
    first.subscribe("$share/gpu/offload/v1/pool/gpu/task", first_inbox)
    second.subscribe("$share/gpu/offload/v1/pool/gpu/task", second_inbox)
    first.abort()
    for index in range(4):
        device.publish("offload/v1/pool/gpu/task", bytes([index]))
    assert [m.payload for m in second_inbox.take(4)] == [b"\x00", b"\x01", b"\x02", b"\x03"]
    first_inbox.assert_empty([])
    second_inbox.assert_empty([second])


def test_publish_while_disconnected_raises_and_sends_nothing(broker: MemoryBroker, connect: Connect) -> None:
    subscriber = connect()
    inbox = Inbox()
    subscriber.subscribe("x", inbox)
    idle = MemoryTransport(broker, "idle")
    with pytest.raises(NotConnectedError) as info:
        idle.publish("x", b"lost")
    assert info.value.topic == "x"
    idle.connect()
    idle.close()
    with pytest.raises(NotConnectedError):
        idle.publish("x", b"lost")
    inbox.assert_empty([subscriber])
    assert idle.stats().get("published", 0) == 0


def test_invalid_topics_and_filters_are_refused(connect: Connect) -> None:
    transport = connect()
    with pytest.raises(TopicError):
        transport.publish("a/+", b"")
    with pytest.raises(TopicError):
        transport.publish("$SYS/x", b"")
    with pytest.raises(TopicError):
        transport.subscribe("a/#/b", Inbox())


def test_connect_to_offline_broker_raises(broker: MemoryBroker) -> None:
    broker.online = False
    transport = MemoryTransport(broker)
    with pytest.raises(ConnectError):
        transport.connect()
    assert not transport.connected


def test_handler_exceptions_are_counted_not_fatal(connect: Connect, caplog: pytest.LogCaptureFixture) -> None:
    publisher, subscriber = connect(), connect()
    inbox = Inbox()

    def explode(message: Message) -> None:
        if message.payload == b"bad":
            raise RuntimeError("handler bug")
        inbox(message)

    subscriber.subscribe("work", explode)
    with caplog.at_level(logging.ERROR, logger="topics.transport"):
        publisher.publish("work", b"bad")
        publisher.publish("work", b"good")
        assert inbox.get().payload == b"good"
    stats = subscriber.stats()
    assert stats["handler_errors"] == 1
    assert stats["delivered"] == 1
    assert "handler failed" in caplog.text
    assert publisher.stats()["published"] == 2


def test_duplicate_client_id_takes_over_the_session(broker: MemoryBroker, connect: Connect) -> None:
    watcher = connect("watcher")
    states = Inbox()
    watcher.subscribe("state/+", states)
    old = MemoryTransport(broker, "srv1")
    old.set_will("state/srv1", b"offline-old", retain=True)
    old.connect()
    old_inbox = Inbox()
    old.subscribe("jobs", old_inbox)
    new = connect("srv1")
    new_inbox = Inbox()
    new.subscribe("jobs", new_inbox)
    assert not old.connected and new.connected
    assert states.get().payload == b"offline-old"  # the taken-over session's Will fires
    watcher.publish("jobs", b"j1")
    assert new_inbox.get().payload == b"j1"
    old_inbox.assert_empty([new])
    old.close()
    assert new.connected  # closing the old one does not unregister the new one
    watcher.publish("jobs", b"j2")
    assert new_inbox.get().payload == b"j2"


def test_subscriptions_and_connect_listeners_survive_a_reconnect(connect: Connect,
                                                                 broker: MemoryBroker) -> None:
    publisher = connect()
    transport = MemoryTransport(broker, "flaky")
    connected = Inbox()
    transport.add_connect_listener(lambda: connected(Message("connected", b"")))
    inbox = Inbox()
    transport.subscribe("jobs", inbox)  # before connect: kept and applied on connect
    transport.connect()
    assert connected.get().topic == "connected"
    publisher.publish("jobs", b"1")
    assert inbox.get().payload == b"1"
    transport.abort()
    publisher.publish("jobs", b"missed")
    transport.connect()
    assert connected.get().topic == "connected"
    publisher.publish("jobs", b"2")
    assert inbox.get().payload == b"2"
    inbox.assert_empty([transport])
    transport.close()


def test_unsubscribe_stops_delivery(connect: Connect) -> None:
    publisher, subscriber = connect(), connect()
    kept, dropped = Inbox(), Inbox()
    subscriber.subscribe("a/+", kept)
    subscriber.subscribe("a/b", dropped)
    subscriber.unsubscribe("a/b")
    publisher.publish("a/b", b"x")
    assert kept.get().payload == b"x"
    dropped.assert_empty([subscriber])


def test_resubscribing_a_filter_replaces_its_handler(connect: Connect) -> None:
    publisher, subscriber = connect(), connect()
    first, second = Inbox(), Inbox()
    subscriber.subscribe("a", first)
    subscriber.subscribe("a", second)
    publisher.publish("a", b"x")
    assert second.get().payload == b"x"
    first.assert_empty([subscriber])


def test_payload_is_copied_into_bytes(connect: Connect) -> None:
    publisher, subscriber = connect(), connect()
    inbox = Inbox()
    subscriber.subscribe("a", inbox)
    buffer = bytearray(b"abc")
    publisher.publish("a", buffer)  # type: ignore[arg-type]
    buffer[0] = ord("z")
    message = inbox.get()
    assert message.payload == b"abc" and type(message.payload) is bytes


def test_client_ids_are_unique_by_default() -> None:
    broker = MemoryBroker()
    assert MemoryTransport(broker).client_id != MemoryTransport(broker).client_id
    assert MemoryTransport(broker, "named").client_id == "named"


def test_a_full_dispatcher_drops_qos0_but_never_qos1(broker: MemoryBroker, connect: Connect,
                                                     clients: list[MemoryTransport]) -> None:
    publisher = connect()
    stuck = MemoryTransport(broker, "stuck", dispatch_queue=2)
    clients.append(stuck)
    stuck.connect()
    release = threading.Event()
    got: list[bytes] = []

    def blocking(message: Message) -> None:
        got.append(message.payload)
        release.wait(WAIT)

    stuck.subscribe("reliable", blocking, qos=1)
    stuck.subscribe("lossy", blocking, qos=0)
    try:
        publisher.publish("reliable", b"first", qos=1)
        wait_for(lambda: got == [b"first"], WAIT, message="the handler to block")
        for index in range(5):  # lossy: QoS 1 on a QoS 0 subscription, i.e. at most once
            publisher.publish("lossy", f"l{index}".encode(), qos=1)
            publisher.publish("reliable", f"r{index}".encode(), qos=1)
    finally:
        release.set()
    # Queue of 2: l0 fits, r0 always does, then every lossy message finds it full.
    wait_for(lambda: len(got) == 7, WAIT, message="every message that was kept")
    assert got == [b"first", b"l0"] + [f"r{index}".encode() for index in range(5)]
    assert stuck.stats()["dropped_dispatch_full"] == 4


def test_failing_handlers_are_counted_and_logged_once_per_interval(
        connect: Connect, caplog: pytest.LogCaptureFixture) -> None:
    publisher, subscriber = connect(), connect()
    inbox = Inbox()

    def explode(message: Message) -> None:
        if message.payload != b"last":
            raise RuntimeError("handler bug")
        inbox(message)

    subscriber.subscribe("work", explode)
    with caplog.at_level(logging.ERROR, logger="topics.transport"):
        for _ in range(20):
            publisher.publish("work", b"bad")
        publisher.publish("work", b"last")
        assert inbox.get().payload == b"last"
    assert subscriber.stats()["handler_errors"] == 20
    assert len([r for r in caplog.records if "handler failed" in r.getMessage()]) == 1
