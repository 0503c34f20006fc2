"""Home Assistant discovery: the configs a server publishes, their templates rendered on its own
messages (as Home Assistant renders them: Jinja with ``value_json``), on a real broker."""

from __future__ import annotations

import json
from typing import Any

import jinja2.sandbox
import pytest
from brokers_support import BrokerEndpoint, Stack, connected, endpoint, retained_on, start_cloud, wait_for
from pydantic import ValidationError

from cloud_agent.config import CloudConfig
from cloud_agent.home_assistant import discovery_messages, object_id
from topics.brokers import MosquittoBroker
from topics.codec import Codec
from topics.models import Heartbeat, Load, NodeState, Role
from topics.names import TopicTree
from topics.transport import Message

TREE = TopicTree("offload/v1")
JINJA = jinja2.sandbox.SandboxedEnvironment()


def render(template: str, payload: bytes) -> str:
    return JINJA.from_string(template).render(value_json=json.loads(payload)).strip()


def configs(messages: list[tuple[str, bytes]]) -> dict[str, dict[str, Any]]:
    return {topic: json.loads(data) for topic, data in messages}


def test_one_device_with_an_online_sensor_and_load_sensors_per_server() -> None:
    found = configs(discovery_messages("srv.1", TREE, ["square", "noop"], version="1.2"))
    topics = sorted(found)
    assert "homeassistant/binary_sensor/srv_1/online/config" in topics
    assert {"homeassistant/sensor/srv_1/queue_length/config", "homeassistant/sensor/srv_1/in_flight/config",
            "homeassistant/sensor/srv_1/service_square/config",
            "homeassistant/sensor/srv_1/service_noop/config"} <= set(topics)
    devices = {json.dumps(config["device"], sort_keys=True) for config in found.values()}
    assert len(devices) == 1  # every sensor belongs to the one device of this server
    unique = [config["unique_id"] for config in found.values()]
    assert len(set(unique)) == len(unique)
    for config in found.values():
        assert config["availability_topic"] == TREE.state("srv.1")
        assert config["state_topic"] in (TREE.state("srv.1"), TREE.heartbeat("srv.1"))


def test_the_templates_read_the_servers_own_json_messages() -> None:
    codec = Codec("json")
    heartbeat = codec.encode(Heartbeat(
        node="srv1", role=Role.SERVER, session=1, seq=3, interval=1.0, time=1.0,
        load=Load(queue_length=4, queue_capacity=64, in_flight=2, workers=8, cpu=0.25,
                  service_time={"square": 0.0042})))
    online = codec.encode(NodeState(node="srv1", role=Role.SERVER, status="online", session=1, time=1.0))
    found = configs(discovery_messages("srv1", TREE, ["square", "blur"], version="1.2"))
    sensor = "homeassistant/sensor/srv1/{}/config".format
    assert render(found[sensor("queue_length")]["value_template"], heartbeat) == "4"
    assert render(found[sensor("in_flight")]["value_template"], heartbeat) == "2"
    assert render(found[sensor("workers")]["value_template"], heartbeat) == "8"
    assert render(found[sensor("cpu")]["value_template"], heartbeat) == "25.0"
    assert render(found[sensor("service_square")]["value_template"], heartbeat) == "4.2"
    assert render(found[sensor("service_blur")]["value_template"], heartbeat) == "0"  # not run yet
    binary = found["homeassistant/binary_sensor/srv1/online/config"]
    assert render(binary["value_template"], online) == binary["payload_on"]
    assert render(binary["availability_template"], online) == binary["payload_available"]


def test_a_task_name_cannot_break_out_of_its_template() -> None:
    name = "x') }}{{ 7*7 }}{{ ('"
    found = configs(discovery_messages("srv1", TREE, [name], version="1"))
    (template,) = [c["value_template"] for t, c in found.items() if "service_" in t]
    heartbeat = json.dumps({"load": {"service_time": {name: 0.001}}}).encode()
    assert render(template, heartbeat) == "1.0"
    assert object_id(name) == "x________7_7________"


def test_the_discovery_prefix_is_a_topic_name() -> None:
    with pytest.raises(ValidationError, match="home_assistant_prefix"):
        CloudConfig(id="srv1", home_assistant_prefix="home/#")


@pytest.fixture
def mosquitto(mosquitto_broker: MosquittoBroker) -> BrokerEndpoint:
    return endpoint(mosquitto_broker, "3.1.1")


def test_a_server_announces_itself_and_its_sensors_read_what_it_publishes(
        mosquitto: BrokerEndpoint, stack: Stack, topic_prefix: str) -> None:
    ha_prefix = f"ha-{topic_prefix.replace('/', '-')}"
    heartbeats: list[Message] = []
    reader = connected(mosquitto, stack, "reader")
    reader.subscribe(TopicTree(topic_prefix).heartbeat("srv-ha"), heartbeats.append, qos=0)
    start_cloud(mosquitto, stack, topic_prefix, "srv-ha", home_assistant=True,
                home_assistant_prefix=ha_prefix)
    wait_for(lambda: heartbeats, message="a heartbeat of srv-ha")
    held = {m.topic: json.loads(m.payload) for m in retained_on(mosquitto, stack, f"{ha_prefix}/#")}
    queue = held[f"{ha_prefix}/sensor/srv-ha/queue_length/config"]
    assert queue["state_topic"] == TopicTree(topic_prefix).heartbeat("srv-ha")
    assert render(queue["value_template"], heartbeats[0].payload) == "0"
    assert f"{ha_prefix}/sensor/srv-ha/service_square/config" in held  # a demo task it serves
    (state,) = retained_on(mosquitto, stack, TopicTree(topic_prefix).state("srv-ha"))
    online = held[f"{ha_prefix}/binary_sensor/srv-ha/online/config"]
    assert render(online["value_template"], state.payload) == "online"
