"""The ``cloud-agent`` command line: help, one-line errors with the right exit codes, the embedded
broker, config files and environment variables."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from brokers_support import BrokerEndpoint, wait_for

from cloud_agent.cli import main
from topics.brokers import free_port, mqtt_answers
from topics.codec import Codec
from topics.memory import MemoryBroker
from topics.models import NodeState, Result, Task
from topics.mqtt import MqttTransport
from topics.names import TopicTree
from topics.transport import Message, TransportConfig


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30.0
            ) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CLOUD_AGENT_")}
    clean.update(env or {})
    return subprocess.run([sys.executable, "-m", "cloud_agent", *args], capture_output=True, text=True,
                          timeout=timeout, env=clean)


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--queue-size" in out and "--broker" in out and "CLOUD_AGENT_" in out


def test_python_m_help() -> None:
    done = run_cli("--help")
    assert done.returncode == 0 and "run" in done.stdout


@pytest.mark.parametrize("args", [
    ["run", "--bogus"],
    ["run"],                                                  # no --id
    ["run", "--id", "bad/id"],
    ["run", "--id", "s1", "--workers", "zero"],
    ["run", "--id", "s1", "--tasks", "no.such.module"],
    ["run", "--id", "s1", "--broker", "http://127.0.0.1:1"],
    ["run", "--id", "s1", "--protocol", "5"],                 # embedded broker is 3.1.1 only
    ["run", "--config", "/nonexistent/server.toml"],
    [],
])
def test_bad_arguments_one_line_exit_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    if args:
        assert len(err.splitlines()) == 1 and err.startswith("cloud-agent: error: "), err


def test_bad_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "server.toml"
    path.write_text('id = "s1"\nqueue_size = -3\n')
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "queue_size" in err
    path.write_text("id = [unclosed\n")
    assert main(["run", "--config", str(path)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_unreachable_broker_exit_1() -> None:
    done = run_cli("run", "--id", "s1", "--broker", f"mqtt://127.0.0.1:{free_port()}")
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("cloud-agent: error")]
    assert len(errors) == 1, done.stderr


def test_wrong_password_exit_1(broker_factory: object) -> None:
    make = broker_factory
    assert callable(make)
    secured: BrokerEndpoint = make("mosquitto-3.1.1", users={"srv": "right"})
    done = run_cli("run", "--id", "s1", "--broker", secured.url, "--username", "srv",
                   env={"CLOUD_AGENT_PASSWORD": "wrong"})
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("cloud-agent: error")]
    assert len(errors) == 1, done.stderr


def test_config_file_env_and_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   memory_broker: MemoryBroker) -> None:
    from agent_common.settings import load_settings
    from cloud_agent.cli import _overrides, build_parser
    from cloud_agent.config import CloudConfig

    path = tmp_path / "server.toml"
    path.write_text('id = "file"\nworkers = 3\nqueue_size = 5\npools = ["a"]\n')
    monkeypatch.setenv("CLOUD_AGENT_QUEUE_SIZE", "7")
    args = build_parser().parse_args(["run", "--config", str(path), "--id", "flag", "--pools", "b,c",
                                      "--pools", "d"])
    config = load_settings(CloudConfig, config_file=args.config, env_prefix="CLOUD_AGENT_",
                           overrides=_overrides(args))
    assert (config.id, config.workers, config.queue_size, config.pools) == ("flag", 3, 7,
                                                                             ["b", "c", "d"])
    example = Path(__file__).parent.parent / "examples" / "server.toml"
    assert load_settings(CloudConfig, config_file=example).id == "srv1"


def test_embedded_broker_serves_a_task(topic_prefix: str) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "cloud_agent", "run", "--id", "solo", "--embedded-port", str(port),
         "--prefix", topic_prefix, "--log-level", "info"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("CLOUD_AGENT_")})
    tree = TopicTree(topic_prefix)
    codec = Codec("json")
    got: list[Message] = []
    lock = threading.Lock()
    device = MqttTransport(TransportConfig.from_url(f"mqtt://127.0.0.1:{port}",
                                                   client_id=f"dev-{topic_prefix[-8:]}"))
    try:
        wait_for(lambda: process.poll() is not None or mqtt_answers("127.0.0.1", port), 20.0,
                 interval=0.1, message="the embedded broker")
        assert process.poll() is None, process.communicate()[1][-2000:]
        device.connect(timeout=5.0)

        def collect(message: Message) -> None:
            with lock:
                got.append(message)

        device.subscribe(f"{topic_prefix}/#", collect)
        wait_for(lambda: any(m.topic == tree.state("solo") for m in list(got)), 10.0)
        task = Task(id="t1", task="square", sender="dev", reply_to=tree.result_inbox("dev"),
                    created=time.time(), payload={"x": 12})
        device.publish(tree.task_inbox("solo"), codec.encode(task), qos=1)
        wait_for(lambda: any(m.topic == tree.result_inbox("dev") for m in list(got)), 10.0)
        result = codec.decode(next(m for m in got if m.topic == tree.result_inbox("dev")).payload,
                              Result)
        assert result.status == "ok" and result.payload == {"y": 144}
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=15.0)
        assert process.returncode == 0, err[-2000:]
        assert f"embedded broker on mqtt://127.0.0.1:{port}" in err
        assert " node=solo " in err  # timestamps and the node id on every line (one log format)
    finally:
        device.close(timeout=1.0)
        if process.poll() is None:
            process.kill()
            process.communicate()
    states = [Codec().decode(m.payload, NodeState) for m in got if m.topic == tree.state("solo")]
    assert states[0].status == "online"


def test_reply_allowlist_and_reconnect_settings_from_flags_and_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from agent_common.settings import load_settings
    from cloud_agent.cli import _overrides, build_parser
    from cloud_agent.config import CloudConfig

    monkeypatch.setenv("CLOUD_AGENT_RECONNECT_MAX_DELAY", "0.5")
    monkeypatch.setenv("CLOUD_AGENT_PUBLISH_WAIT", "2")
    args = build_parser().parse_args(["run", "--id", "s", "--reply-allowlist", "apps/{sender}/#",
                                      "--reply-allowlist", "ui/{sender}/+"])
    config = load_settings(CloudConfig, env_prefix="CLOUD_AGENT_", overrides=_overrides(args))
    assert config.reply_allowlist == ["apps/{sender}/#", "ui/{sender}/+"]
    transport = config.transport_config("mqtt://127.0.0.1:1883")
    assert (transport.reconnect_max_delay, transport.reconnect_min_delay, transport.publish_wait) == (
        0.5, 0.1, 2.0)
    assert CloudConfig(id="d").transport_config("mqtt://h").reconnect_max_delay == 1.0
