"""Persistent sessions on Mosquitto (3.1.1 and 5): what is published while a client is away reaches it
when it returns with the same client id, once each and in order; without the option it is gone."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable

import pytest
from brokers_support import BrokerEndpoint, endpoint, wait_for

from edge_agent.config import EdgeConfig
from topics.brokers import MosquittoBroker
from topics.mqtt import MqttTransport
from topics.transport import Message, ProtocolVersion, TransportConfig

TransportFactory = Callable[..., MqttTransport]
BrokerFactory = Callable[..., BrokerEndpoint]
COUNT = 20


class Inbox:
    """Messages received by one transport, with an event per expected payload."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self._lock = threading.Lock()
        self.marker = threading.Event()

    def __call__(self, message: Message) -> None:
        with self._lock:
            self.messages.append(message)
        if message.payload == b"end":
            self.marker.set()

    def payloads(self) -> list[bytes]:
        with self._lock:
            return [m.payload for m in self.messages]


@pytest.fixture(params=["3.1.1", "5"])
def mosquitto(request: pytest.FixtureRequest, mosquitto_broker: MosquittoBroker) -> BrokerEndpoint:
    protocol: ProtocolVersion = request.param
    return endpoint(mosquitto_broker, protocol)


def away_and_back(target: BrokerEndpoint, make_transport: TransportFactory, topic_prefix: str,
                  **session: object) -> tuple[MqttTransport, Inbox]:
    """A client subscribes at QoS 1, crashes, COUNT messages are published meanwhile, and a new
    transport with the same client id (a restarted process) connects; returns it and its inbox once
    an end marker published after the reconnect has arrived."""
    client_id = f"dev-{uuid.uuid4().hex[:8]}"
    results = f"{topic_prefix}/node/{client_id}/result"
    first = make_transport(target, client_id, **session)
    first.subscribe(results, Inbox(), qos=1)
    first.abort()  # no DISCONNECT: as a crash or a power cut would leave it

    witness = Inbox()  # another subscriber: once it has every message, the broker has routed them all
    make_transport(target, f"witness-{uuid.uuid4().hex[:8]}").subscribe(results, witness, qos=1)
    publisher = make_transport(target, f"srv-{uuid.uuid4().hex[:8]}")
    for n in range(COUNT):
        publisher.publish(results, b"r%d" % n, qos=1)
    # publish() only queues: on a busy machine the publisher's network thread may send them after the
    # new transport below subscribed, which would then get them live, session or not.
    wait_for(lambda: len(witness.payloads()) >= COUNT, message="the broker routed every message")

    inbox = Inbox()
    again = make_transport(target, client_id, connect=False, **session)
    again.subscribe(results, inbox, qos=1)  # before connecting, as the agents do
    again.connect()
    publisher.publish(results, b"end", qos=1)
    assert inbox.marker.wait(15), f"end marker not received; got {inbox.payloads()}"
    return again, inbox


def forget_session(target: BrokerEndpoint, transport: MqttTransport) -> None:
    """Close ``transport``, then connect once with a clean session under its id: the shared broker
    discards the session instead of keeping it for the rest of the test run."""
    transport.close()
    clean = MqttTransport(target.config(transport.client_id))
    clean.connect()
    clean.close()


def test_messages_queued_while_away_arrive_once_each_and_in_order(
    mosquitto: BrokerEndpoint, make_transport: TransportFactory, topic_prefix: str
) -> None:
    again, inbox = away_and_back(mosquitto, make_transport, topic_prefix, persistent_session=True,
                                 session_expiry=60)
    # Every message queued while away came before the marker (one subscription: broker order).
    assert inbox.payloads() == [b"r%d" % n for n in range(COUNT)] + [b"end"]
    assert all(m.qos == 1 and not m.retain for m in inbox.messages)
    assert again.session_present is True
    assert again.stats()["sessions_resumed"] == 1 and again.stats()["sessions_lost"] == 0
    forget_session(mosquitto, again)


def test_without_a_persistent_session_they_are_gone(
    mosquitto: BrokerEndpoint, make_transport: TransportFactory, topic_prefix: str
) -> None:
    again, inbox = away_and_back(mosquitto, make_transport, topic_prefix)
    assert inbox.payloads() == [b"end"]
    assert again.session_present is False
    assert again.stats()["sessions_resumed"] == 0


def test_a_new_session_then_a_resumed_one_on_the_same_transport(
    mosquitto: BrokerEndpoint, make_transport: TransportFactory, topic_prefix: str
) -> None:
    """The first connect of a never-seen client id finds no session; after the broker drops the link
    (a client id taken over, then given back) the transport's own reconnect resumes it."""
    client_id = f"dev-{uuid.uuid4().hex[:8]}"
    topic = f"{topic_prefix}/node/{client_id}/result"
    inbox = Inbox()
    device = make_transport(mosquitto, client_id, connect=False, persistent_session=True,
                            reconnect_max_delay=0.2)
    device.subscribe(topic, inbox, qos=1)
    device.connect()
    assert device.session_present is False
    assert device.stats()["sessions_resumed"] == 0
    # Another connection with the same id takes the session over: the broker closes the device's link.
    thief = make_transport(mosquitto, client_id, persistent_session=True)
    wait_for(lambda: device.stats()["disconnects"] >= 1, message="device pushed off")
    thief.abort()  # the session stays on the broker, with the device's subscription in it
    wait_for(lambda: device.connected and device.stats()["sessions_resumed"] >= 1, message="resumed")
    make_transport(mosquitto, "pub-" + client_id).publish(topic, b"end", qos=1)
    assert inbox.marker.wait(15)
    assert device.session_present is True and device.stats()["sessions_lost"] == 0
    forget_session(mosquitto, device)


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_a_broker_restarted_without_persistence_lost_the_session_and_the_transport_says_so(
    protocol: str, broker_factory: BrokerFactory, make_transport: TransportFactory, topic_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    target = broker_factory(f"mosquitto-{protocol}")  # the test brokers run with persistence false
    device = make_transport(target, f"dev-{uuid.uuid4().hex[:8]}", persistent_session=True,
                            reconnect_max_delay=0.2)
    device.subscribe(f"{topic_prefix}/x", Inbox(), qos=1)
    assert device.session_present is False
    with caplog.at_level(logging.WARNING, logger="topics.mqtt"):
        target.broker.restart()
        wait_for(lambda: device.stats()["reconnects"] >= 1, message="reconnected after the restart")
    assert device.session_present is False
    assert device.stats()["sessions_lost"] == 1 and device.stats()["sessions_resumed"] == 0
    assert any("kept no session" in record.getMessage() for record in caplog.records)


def test_a_persistent_session_needs_a_client_id() -> None:
    with pytest.raises(ValueError, match="needs a client_id"):
        TransportConfig(persistent_session=True)
    config = TransportConfig(client_id="cam1", persistent_session=True, session_expiry=0.5)
    assert config.session_expiry == 0.5


def test_the_edge_config_asks_for_it_with_its_stable_id() -> None:
    config = EdgeConfig(id="cam1", broker="mqtt://127.0.0.1:1883", persistent_session=True,
                        session_expiry=120.0)
    transport = config.transport_config()
    assert transport.client_id == "cam1"  # the node id: the same after every restart
    assert (transport.persistent_session, transport.session_expiry) == (True, 120.0)
    assert config.transport_config(client_id="cam1-x").client_id == "cam1-x"
    default = EdgeConfig(id="cam1", broker="mqtt://127.0.0.1:1883").transport_config()
    assert default.persistent_session is False
