"""``edge-agent`` command line: config errors, local and offloaded submit, run until SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from brokers_support import wait_for

from agent_common.registry import load_tasks
from cloud_agent.config import CloudConfig
from cloud_agent.server import CloudAgent
from edge_agent.cli import main
from edge_agent.config import load_edge_config
from topics.brokers import EmbeddedBroker
from topics.codec import Codec
from topics.models import Heartbeat, NodeState
from topics.mqtt import MqttTransport
from topics.names import TopicTree
from topics.transport import Message, TransportConfig

REPO = Path(__file__).resolve().parent.parent


def test_bad_policy_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--id", "cam1", "--policy", "fastest"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown policy 'fastest'" in err and "ect" in err


def test_bad_config_file_and_bad_args(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "device.toml"
    broken.write_text('id = "cam1"\nlocal_workers = "many"\n')
    assert main(["run", "--config", str(broken)]) == 2
    assert "local_workers" in capsys.readouterr().err
    assert main(["run", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["run", "--id", "cam/1"]) == 2
    assert main(["submit", "--tasks", "agent_common.demo_tasks", "square", "{not json"]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert main(["submit", "--tasks", "agent_common.demo_tasks", "nope", "{}"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert main(["run", "--id", "cam1", "--tasks", "no_such_module_xyz"]) == 2
    assert main(["frobnicate"]) == 2


def test_submit_locally_without_a_broker(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["submit", "--tasks", "agent_common.demo_tasks", "square", '{"x": 12}']) == 0
    assert json.loads(capsys.readouterr().out) == {"y": 144}
    assert main(["submit", "--tasks", "agent_common.demo_tasks", "square", '{"y": 1}']) == 1
    assert "task failed: error" in capsys.readouterr().err


def test_example_config_and_environment_overrides() -> None:
    config = load_edge_config(REPO / "examples" / "device.toml",
                              environ={"EDGE_AGENT_POLICY": "min_rtt",
                                       "EDGE_AGENT_POLICY_CONFIG__SPREAD_K": "3"})
    assert (config.id, config.policy, config.policy_config.spread_k) == ("cam1", "min_rtt", 3)
    assert config.routes[0].output == "results/{1}/square"
    assert config.peer_id == "cam1-peer"


@pytest.fixture
def amqtt() -> Iterator[EmbeddedBroker]:
    broker = EmbeddedBroker().start()
    yield broker
    broker.close()


def test_submit_offloads_to_a_server(amqtt: EmbeddedBroker, capsys: pytest.CaptureFixture[str]) -> None:
    prefix = f"test/{uuid.uuid4().hex[:8]}"
    config = CloudConfig.model_validate({"id": "cli-srv", "broker": amqtt.url, "prefix": prefix,
                                         "heartbeat_interval": 0.2})
    server = CloudAgent(config, MqttTransport(config.transport_config()),
                        load_tasks("agent_common.demo_tasks"))
    server.start()
    try:
        code = main(["submit", "--broker", amqtt.url, "--prefix", prefix, "--policy", "remote",
                     "--log-level", "info", "square", '{"x": 5}'])
        captured = capsys.readouterr()
        assert code == 0 and json.loads(captured.out) == {"y": 25}
        assert "ran on cli-srv" in captured.err
        assert server.stats()["completed"]["ok"] == 1
    finally:
        server.stop(grace=0.0)


def test_run_heartbeats_and_stops_cleanly_on_sigterm(amqtt: EmbeddedBroker) -> None:
    prefix = f"test/{uuid.uuid4().hex[:8]}"
    tree, codec = TopicTree(prefix), Codec("cbor")
    heartbeats: list[Heartbeat] = []
    states: list[NodeState] = []
    watcher = MqttTransport(TransportConfig.from_url(amqtt.url))

    def on_state(message: Message) -> None:
        if message.payload:
            states.append(codec.decode(message.payload, NodeState))

    watcher.subscribe(tree.heartbeat("cam9"), lambda m: heartbeats.append(codec.decode(m.payload, Heartbeat)))
    watcher.subscribe(tree.state("cam9"), on_state)
    watcher.connect()
    process = subprocess.Popen(
        [sys.executable, "-m", "edge_agent", "run", "--broker", amqtt.url, "--id", "cam9", "--prefix", prefix,
         "--tasks", "agent_common.demo_tasks", "--heartbeat-interval", "0.2"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(heartbeats) >= 1, timeout=20.0, message="a heartbeat from the subprocess")
        assert heartbeats[0].role == "device" and "square" in heartbeats[0].capabilities
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=15)
        assert process.returncode == 0, err
        assert "stopped cleanly" in err and "level=info" in err and "node=cam9" in err
        wait_for(lambda: bool(states) and states[-1].status == "offline", message="clean offline state")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
        watcher.close()


def test_serve_runs_a_peer_server_that_other_devices_use(amqtt: EmbeddedBroker) -> None:
    from edge_agent.agent import EdgeAgent
    from edge_agent.cli import Device

    prefix = f"test/{uuid.uuid4().hex[:8]}"
    common = {"broker": amqtt.url, "prefix": prefix, "heartbeat_interval": 0.2, "probe_interval": 0.1}
    host = Device(load_edge_config(overrides={**common, "id": "pi1", "tasks": ["agent_common.demo_tasks"],
                                              "serve": True}), load_tasks("agent_common.demo_tasks"))
    other_config = load_edge_config(overrides={**common, "id": "pi2", "policy": "remote"})
    other = EdgeAgent(other_config, MqttTransport(other_config.transport_config()),
                      load_tasks("agent_common.demo_tasks"))
    host.start()
    other.start()
    try:
        wait_for(lambda: any(v.node == "pi1-peer" and not v.stale for v in other.servers()), timeout=10.0)
        assert other.submit("square", {"x": 6}).result(10) == {"y": 36}
        assert host.peer is not None and host.peer.stats()["completed"]["ok"] == 1
        assert all(v.node != "pi1-peer" for v in host.agent.servers())  # never offloads to itself
    finally:
        other.stop()
        host.stop()
