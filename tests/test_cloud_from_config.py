"""CloudAgent.from_config: from a config or a TOML file, with its own MQTT transport, as a context."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from brokers_support import wait_for

from cloud_agent import CloudAgent, CloudConfig, TaskRegistry
from topics.brokers import EmbeddedBroker
from topics.codec import Codec
from topics.models import NodeState
from topics.mqtt import MqttTransport
from topics.names import TopicTree
from topics.transport import Message, TransportConfig


def test_from_a_toml_file_as_a_context_manager(amqtt_broker: EmbeddedBroker, topic_prefix: str,
                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in os.environ if name.startswith("CLOUD_AGENT_")]:
        monkeypatch.delenv(name)
    path = tmp_path / "server.toml"
    path.write_text(f'id = "fc-srv"\nbroker = "{amqtt_broker.url}"\nprefix = "{topic_prefix}"\n'
                    'tasks = ["agent_common.demo_tasks"]\nheartbeat_interval = 0.2\n')
    tree, seen = TopicTree(topic_prefix), []
    watcher = MqttTransport(TransportConfig.from_url(amqtt_broker.url, client_id="fc-watch"))

    def on_state(message: Message) -> None:
        if message.payload:
            seen.append(Codec().decode(message.payload, NodeState).status)

    watcher.subscribe(tree.state("fc-srv"), on_state, qos=1)
    watcher.connect()
    try:
        with CloudAgent.from_config(path) as agent:
            assert agent.config.id == "fc-srv" and agent.config.prefix == topic_prefix
            wait_for(lambda: "online" in seen, 10.0, message="the birth")
        wait_for(lambda: seen[-1] == "offline", 10.0, message="the offline state")
    finally:
        watcher.close()


def test_from_a_config_with_a_registry_of_its_own() -> None:
    registry = TaskRegistry()
    registry.task("echo")(lambda payload: payload)
    agent = CloudAgent.from_config(CloudConfig(id="fc-2", broker="mqtt://127.0.0.1:1"), registry=registry)
    assert agent.config.id == "fc-2"


def test_without_a_broker_url_it_says_so() -> None:
    with pytest.raises(ValueError, match="no broker URL"):
        CloudAgent.from_config(CloudConfig(id="fc-3"), registry=TaskRegistry())
