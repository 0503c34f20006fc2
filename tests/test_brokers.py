"""The brokers themselves: start-up, readiness, restart on the same port, config, users."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from brokers_support import BROKER_IDS, BrokerEndpoint, require_mosquitto

from topics.brokers import (
    BrokerError,
    EmbeddedBroker,
    MosquittoBroker,
    free_port,
    mosquitto_binary,
    mqtt_answers,
    write_mosquitto_config,
)
from topics.mqtt import MqttTransport
from topics.transport import ConnectError

BrokerFactory = Callable[..., BrokerEndpoint]


def test_free_port_is_bindable_on_loopback() -> None:
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_nothing_listening_does_not_answer_mqtt() -> None:
    assert mqtt_answers("127.0.0.1", free_port(), timeout=0.5) is False


@pytest.mark.parametrize("broker_id", BROKER_IDS)
def test_broker_serves_its_protocols_and_restarts_on_the_same_port(
    broker_id: str, broker_factory: BrokerFactory
) -> None:
    target = broker_factory(broker_id)
    broker = target.broker
    assert target.protocol in broker.protocols
    assert broker.url == f"mqtt://127.0.0.1:{broker.port}" == target.url
    assert mqtt_answers("127.0.0.1", broker.port)

    client = MqttTransport(target.config("probe"))
    client.connect(timeout=5.0)
    client.close()

    port = broker.port
    broker.restart()
    assert broker.port == port
    assert mqtt_answers("127.0.0.1", port)
    broker.stop()
    broker.stop()  # idempotent
    assert not broker.running
    with pytest.raises(ConnectError, match="refused"):
        MqttTransport(target.config("late")).connect(timeout=2.0)


def test_embedded_broker_describes_itself() -> None:
    with EmbeddedBroker() as broker:
        assert broker.kind == "amqtt"
        assert broker.protocols == ("3.1.1",)
        assert broker.running
    assert not broker.running


def test_embedded_broker_reports_a_port_in_use() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        broker = EmbeddedBroker(port=taken.getsockname()[1])
        with pytest.raises(BrokerError, match=r"(?i)address already in use"):
            broker.start(timeout=3.0)
        assert not broker.running


@pytest.mark.mosquitto
def test_mosquitto_binary_is_found() -> None:
    require_mosquitto()
    binary = mosquitto_binary()
    assert binary is not None and Path(binary).name == "mosquitto"


def test_mosquitto_config_sets_nodelay_queue_and_loopback(tmp_path: Path) -> None:
    path = write_mosquitto_config(tmp_path / "m.conf", port=18830, max_queued_messages=5000,
                                  log_file=tmp_path / "m.log")
    lines = path.read_text().splitlines()
    settings = [line for line in lines if line and not line.startswith("#")]
    assert "listener 18830 127.0.0.1" in settings
    assert "set_tcp_nodelay true" in settings
    assert "max_queued_messages 5000" in settings
    assert "persistence false" in settings
    assert "allow_anonymous true" in settings
    assert f"log_dest file {tmp_path / 'm.log'}" in settings
    assert any("44 ms" in line for line in lines if line.startswith("#"))
    assert any("silently drops" in line for line in lines if line.startswith("#"))


@pytest.mark.mosquitto
def test_mosquitto_with_users_writes_a_password_file_and_refuses_anonymous(
    tmp_path: Path,
) -> None:
    require_mosquitto()
    secret = "not-a-hash-char"  # '-' is no base64 character: it can only appear if stored plain
    with MosquittoBroker(users={"edge": secret}, workdir=tmp_path) as broker:
        config = broker.config_file.read_text()
        assert "allow_anonymous false" in config
        assert f"password_file {tmp_path / 'passwd'}" in config
        assert (tmp_path / "passwd").read_text().startswith("edge:")
        assert secret not in (tmp_path / "passwd").read_text().split(":", 1)[1]
        assert mqtt_answers("127.0.0.1", broker.port)  # a refused CONNACK still means "up"
    assert tmp_path.exists()  # a workdir we were given is left in place
    assert "mosquitto version" in (tmp_path / "mosquitto.log").read_text()


@pytest.mark.mosquitto
def test_mosquitto_kill_and_restart_change_the_process_not_the_port() -> None:
    require_mosquitto()
    broker = MosquittoBroker().start()
    workdir = broker.workdir
    try:
        first_pid, port = broker.pid, broker.port
        broker.kill()
        assert not broker.running and broker.pid is None
        assert not mqtt_answers("127.0.0.1", port, timeout=0.5)
        broker.start()
        assert broker.pid != first_pid and broker.port == port
        assert mqtt_answers("127.0.0.1", port)
    finally:
        broker.close()
    assert not workdir.exists()  # our own temporary workdir is removed


@pytest.mark.mosquitto
def test_mosquitto_reports_a_port_in_use() -> None:
    require_mosquitto()
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        broker = MosquittoBroker(port=taken.getsockname()[1])
        try:
            with pytest.raises(BrokerError, match=r"(?i)address already in use"):
                broker.start(timeout=3.0)
            assert not broker.running
        finally:
            broker.close()
