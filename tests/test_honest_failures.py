"""Failures said as they are: a refused login is fatal, an unreachable broker is not "unknown task"."""

from __future__ import annotations

import pytest
from brokers_support import BrokerEndpoint, wait_for
from conftest import BrokerFactory
from pydantic import SecretStr

from agent_common.registry import TaskRegistry
from cloud_agent.cli import main as cloud_main
from edge_agent.agent import EdgeAgent
from edge_agent.cli import main as edge_main
from edge_agent.config import EdgeConfig
from topics.brokers import MosquittoBroker, free_port
from topics.mqtt import MqttTransport
from topics.transport import BrokerRefused, ConnectError

USERS = {"cam1": "right-password", "srv1": "server-password"}


@pytest.fixture(params=["mosquitto-3.1.1", "mosquitto-5"])
def guarded(request: pytest.FixtureRequest, broker_factory: BrokerFactory) -> BrokerEndpoint:
    """A Mosquitto that wants a user name and password."""
    return broker_factory(request.param, users=USERS)


def test_a_wrong_password_is_a_refusal_not_an_unreachable_broker(guarded: BrokerEndpoint) -> None:
    transport = MqttTransport(guarded.config("cam1", username="cam1", password="wrong"), name="cam1")
    with pytest.raises(BrokerRefused, match="not authorised"):
        transport.connect(timeout=5.0)
    transport.close()
    elsewhere = MqttTransport(guarded.config("cam1").model_copy(update={"port": free_port()}))
    with pytest.raises(ConnectError) as unreachable:
        elsewhere.connect(timeout=2.0)
    assert not isinstance(unreachable.value, BrokerRefused)
    elsewhere.close()


def test_the_edge_agent_does_not_start_with_refused_credentials(guarded: BrokerEndpoint) -> None:
    config = EdgeConfig(id="cam1", broker=guarded.url, protocol=guarded.protocol, username="cam1",
                        password=SecretStr("wrong"))
    agent = EdgeAgent(config, MqttTransport(config.transport_config()), TaskRegistry())
    with pytest.raises(BrokerRefused, match="not authorised"):
        agent.start()
    agent.stop()  # nothing left running; stopping is still safe


def test_both_clis_exit_non_zero_with_one_line_on_a_refused_login(
        guarded: BrokerEndpoint, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("EDGE_AGENT_PASSWORD", "wrong")
    monkeypatch.setenv("CLOUD_AGENT_PASSWORD", "wrong")
    common = ["--broker", guarded.url, "--protocol", guarded.protocol]
    assert edge_main(["run", *common, "--id", "cam1", "--username", "cam1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("edge-agent: error: ") and "not authorised" in err[-1], err
    assert cloud_main(["run", *common, "--id", "srv1", "--username", "srv1",
                       "--tasks", "agent_common.demo_tasks"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("cloud-agent: error: ") and "not authorised" in err[-1], err


def test_submit_to_an_unreachable_broker_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"
    assert edge_main(["submit", "--broker", url, "--discover", "0.5", "square", '{"x": 7}']) == 1
    err = capsys.readouterr().err
    assert "cannot connect" in err and "unknown task" not in err, err


def test_a_stopping_agent_waits_for_its_death_record_to_be_acknowledged(
        broker_factory: BrokerFactory) -> None:
    target = broker_factory("mosquitto-3.1.1")
    broker = target.broker
    assert isinstance(broker, MosquittoBroker)
    nodes = [f"dev-{n}" for n in range(10)]
    for node in nodes:
        config = EdgeConfig(id=node, broker=target.url)
        agent = EdgeAgent(config, MqttTransport(config.transport_config()), TaskRegistry())
        agent.start()
        agent.stop()  # publishes the death (QoS 1, retained), then disconnects

    def disconnects() -> list[str]:
        return [line for line in broker.log_file.read_text().splitlines()
                if "disconnected" in line and any(f"Client {node} " in line for node in nodes)]

    wait_for(lambda: len(disconnects()) == len(nodes), message="ten disconnects in Mosquitto's log")
    # Closing with the death still in flight made Mosquitto log 3 in 10 of these (measured).
    assert not [line for line in disconnects() if "out of memory" in line]
