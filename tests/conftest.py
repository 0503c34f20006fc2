"""Shared fixtures: brokers (amqtt, Mosquitto), endpoints per protocol, transports, topic prefixes.

Session brokers are shared by every test (unique topic prefixes keep tests apart); tests that kill or
restart a broker use ``broker_factory`` for a fresh, function-scoped one.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from brokers_support import (
    BROKER_IDS,
    Broker,
    BrokerEndpoint,
    Stack,
    endpoint,
    require_mosquitto,
    split_id,
    start_broker,
)

from topics.brokers import EmbeddedBroker, MosquittoBroker
from topics.memory import MemoryBroker
from topics.mqtt import MqttTransport

_MOSQUITTO_FIXTURES = {"mosquitto_broker", "mosquitto5"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that runs against Mosquitto ``mosquitto`` (``-m "not mosquitto"`` skips them)."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        callspec = getattr(item, "callspec", None)
        params = callspec.params.values() if callspec is not None else ()
        if fixtures & _MOSQUITTO_FIXTURES or any(
            isinstance(value, str) and value.startswith("mosquitto") for value in params
        ):
            item.add_marker(pytest.mark.mosquitto)


@pytest.fixture(scope="session")
def amqtt_broker() -> Iterator[EmbeddedBroker]:
    """One amqtt broker (MQTT 3.1.1) in a thread for the whole session."""
    broker = EmbeddedBroker().start()
    yield broker
    broker.close()


@pytest.fixture(scope="session")
def mosquitto_broker() -> Iterator[MosquittoBroker]:
    """One Mosquitto subprocess for the whole session (skips without mosquitto; fails under CI)."""
    require_mosquitto()
    broker = MosquittoBroker().start()
    yield broker
    broker.close()


@pytest.fixture(params=BROKER_IDS)
def broker(request: pytest.FixtureRequest) -> BrokerEndpoint:
    """The session broker of each kind and protocol: amqtt-3.1.1, mosquitto-3.1.1, mosquitto-5."""
    kind, protocol = split_id(request.param)
    running: Broker = request.getfixturevalue(f"{kind}_broker")
    return endpoint(running, protocol)


@pytest.fixture
def mosquitto5(mosquitto_broker: MosquittoBroker) -> BrokerEndpoint:
    """Mosquitto over MQTT 5 (shared subscriptions, MQTT 5 specifics)."""
    return endpoint(mosquitto_broker, "5")


@pytest.fixture
def topic_prefix() -> str:
    """A prefix no other test uses, e.g. ``test/1a2b3c4d``."""
    return f"test/{uuid.uuid4().hex[:8]}"


BrokerFactory = Callable[..., BrokerEndpoint]


@pytest.fixture
def broker_factory() -> Iterator[BrokerFactory]:
    """Start fresh brokers owned by one test: ``broker_factory("mosquitto-5", users={"u": "p"})``.

    The endpoint's ``.broker`` can be stopped, restarted (same port) or, for Mosquitto, killed; every
    broker started here is closed when the test ends.
    """
    started: list[Broker] = []

    def make(broker_id: str, *, users: dict[str, str] | None = None) -> BrokerEndpoint:
        kind, protocol = split_id(broker_id)
        running = start_broker(kind, users=users)
        started.append(running)
        return endpoint(running, protocol)

    yield make
    for running in reversed(started):
        running.close()


@pytest.fixture
def fresh_broker(request: pytest.FixtureRequest, broker_factory: BrokerFactory) -> BrokerEndpoint:
    """A function-scoped broker: parametrise indirectly with an id; mosquitto-3.1.1 by default."""
    broker_id: str = getattr(request, "param", "mosquitto-3.1.1")
    return broker_factory(broker_id)


TransportFactory = Callable[..., MqttTransport]


@pytest.fixture
def make_transport() -> Iterator[TransportFactory]:
    """Build (and by default connect) MqttTransports; all are closed at teardown.

    ``make_transport(endpoint, client_id="", *, connect=True, **config_overrides)``; pass
    ``connect=False`` to set a Will or listeners first.
    """
    made: list[MqttTransport] = []

    def make(target: BrokerEndpoint, client_id: str = "", *, connect: bool = True,
             **overrides: Any) -> MqttTransport:
        transport = MqttTransport(target.config(client_id, **overrides), name=client_id)
        made.append(transport)
        if connect:
            transport.connect()
        return transport

    yield make
    for transport in reversed(made):
        transport.close(timeout=2.0)


@pytest.fixture
def memory_broker() -> MemoryBroker:
    """A fresh in-process broker for MemoryTransport tests."""
    return MemoryBroker()


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """CLI entry points configure the root logger for a process (in tests: on pytest's captured
    stderr, closed after the test); put the test run's handlers and level back after every test, so
    background threads of later tests never log into a closed stream."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)


@pytest.fixture
def stack() -> Iterator[Stack]:
    """Undo actions (stop an agent, close a broker), run last-in first-out when the test ends."""
    actions: Stack = []
    yield actions
    for action in reversed(actions):
        action()


@pytest.fixture
def cleanup(stack: Stack) -> Stack:
    """The same undo stack, under the name the edge agent tests use."""
    return stack
