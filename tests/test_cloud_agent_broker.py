"""CloudAgent against real brokers: amqtt (3.1.1) and Mosquitto (3.1.1 and 5), in-process and as the
``cloud-agent`` subprocess (SIGTERM drain, SIGKILL -> Will)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from brokers_support import BrokerEndpoint, MessageLog, wait_for

from agent_common.registry import TaskRegistry
from cloud_agent.config import CloudConfig
from cloud_agent.server import CloudAgent
from topics.codec import Codec
from topics.models import Heartbeat, NodeState, Result, Task
from topics.mqtt import MqttTransport
from topics.names import TopicTree

CBOR = Codec("cbor")
JSON = Codec("json")


class MqttDevice(MessageLog):
    """A device on a real broker: sends tasks, collects every message under the prefix."""

    def __init__(self, transport: MqttTransport, tree: TopicTree, name: str) -> None:
        super().__init__(transport, f"{tree.prefix}/#")
        self.tree = tree
        self.name = name
        self._count = 0

    def results(self) -> list[Result]:
        return [CBOR.decode(m.payload, Result) for m in self.on(self.tree.result_inbox(self.name))]

    def result_of(self, task_id: str, timeout: float = 10.0) -> Result:
        wait_for(lambda: any(r.task_id == task_id for r in self.results()), timeout,
                 message=f"result of {task_id}")
        return next(r for r in self.results() if r.task_id == task_id)

    def states(self, node: str) -> list[NodeState]:
        return [CBOR.decode(m.payload, NodeState) for m in self.on(self.tree.state(node))]

    def heartbeats(self, node: str) -> list[Heartbeat]:
        return [CBOR.decode(m.payload, Heartbeat) for m in self.on(self.tree.heartbeat(node))]

    def send(self, name: str, payload: Any = None, *, node: str = "srv1", topic: str | None = None,
             task_id: str | None = None, deadline: float | None = None, codec: Codec = CBOR) -> str:
        self._count += 1
        task_id = task_id or f"{self.name}-{self._count}"
        task = Task(id=task_id, task=name, sender=self.name, reply_to=self.tree.result_inbox(self.name),
                    created=time.time(), deadline=deadline, payload=payload)
        self.transport.publish(topic or self.tree.task_inbox(node), codec.encode(task), qos=1)
        return task_id


DeviceFactory = Callable[..., MqttDevice]


@pytest.fixture
def make_device(make_transport: Callable[..., MqttTransport], topic_prefix: str) -> DeviceFactory:
    def make(target: BrokerEndpoint, name: str = "dev1") -> MqttDevice:
        return MqttDevice(make_transport(target, f"{name}-{topic_prefix[-8:]}"), TopicTree(topic_prefix),
                          name)
    return make


class Gate:
    """A task function that blocks until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Semaphore(0)
        self.calls = 0

    def __call__(self, payload: Any) -> Any:
        self.calls += 1
        self.started.release()
        self.release.wait(10.0)
        return payload


def registry_with(gate: Gate) -> TaskRegistry:
    registry = TaskRegistry()
    registry.task("echo")(lambda payload: payload)
    registry.task("block")(gate)

    @registry.task("boom")
    def boom(payload: Any) -> Any:
        raise ValueError("no good")

    return registry


AgentFactory = Callable[..., CloudAgent]


@pytest.fixture
def make_agent(topic_prefix: str) -> Iterator[AgentFactory]:
    agents: list[CloudAgent] = []

    def make(target: BrokerEndpoint, registry: TaskRegistry, **overrides: Any) -> CloudAgent:
        values: dict[str, Any] = {"id": "srv1", "prefix": topic_prefix, "workers": 2,
                                  "queue_size": 3, "heartbeat_interval": 0.1, "protocol": target.protocol}
        values.update(overrides)
        config = CloudConfig(**values)
        client_id = f"{config.id}-{topic_prefix[-8:]}"
        agent = CloudAgent(config, MqttTransport(target.config(client_id)), registry)
        agent.start()
        agents.append(agent)
        return agent

    yield make
    for agent in agents:
        agent.stop(grace=1.0)


def test_round_trip_and_status_paths(broker: BrokerEndpoint, make_agent: AgentFactory,
                                     make_device: DeviceFactory) -> None:
    gate = Gate()
    gate.release.set()
    agent = make_agent(broker, registry_with(gate))
    device = make_device(broker)
    wait_for(lambda: any(s.status == "online" and s.session == agent.session
                         for s in device.states("srv1")), 5.0, message="birth")
    ok = device.result_of(device.send("echo", {"x": 1}))
    assert (ok.status, ok.payload, ok.server) == ("ok", {"x": 1}, "srv1")
    json_id = device.send("echo", "j", codec=JSON)
    wait_for(lambda: any(JSON.decode(m.payload, Result).task_id == json_id
                         for m in device.on(device.tree.result_inbox("dev1"))
                         if m.payload.startswith(b"{")), 5.0, message="JSON answer")
    assert device.result_of(device.send("boom")).error == "ValueError: no good"
    assert device.result_of(device.send("nope")).status == "unknown-task"
    assert device.result_of(device.send("block", deadline=time.time() - 5)).status == "expired"
    first = device.send("block", "once", task_id="dup")
    assert device.result_of(first).payload == "once"
    device.send("block", "once", task_id="dup")  # a retry: the same content under the same id
    wait_for(lambda: len([r for r in device.results() if r.task_id == "dup"]) == 2, 5.0)
    assert [r.payload for r in device.results() if r.task_id == "dup"] == ["once", "once"]
    device.send("block", "twice", task_id="dup")  # the id reused for other work: never "once"
    wait_for(lambda: len([r for r in device.results() if r.task_id == "dup"]) == 3, 5.0)
    reused = [r for r in device.results() if r.task_id == "dup"][2]
    assert reused.status == "error" and "already used" in (reused.error or "")
    assert reused.payload is None
    assert gate.calls == 1


def test_busy_rejection_and_heartbeat_load(broker: BrokerEndpoint, make_agent: AgentFactory,
                                           make_device: DeviceFactory) -> None:
    gate = Gate()
    agent = make_agent(broker, registry_with(gate))
    device = make_device(broker)
    try:
        ids = [device.send("block", n) for n in range(5)]  # 2 workers + 3 queue slots
        for _ in range(2):
            assert gate.started.acquire(timeout=5.0)
        wait_for(lambda: agent.load().queue_length == 3, 5.0)
        wait_for(lambda: any(h.load.queue_length == 3 and h.load.in_flight == 2
                             for h in device.heartbeats("srv1")), 5.0, message="honest heartbeat")
        assert device.result_of(device.send("block", "x")).status == "rejected-busy"
    finally:
        gate.release.set()
    assert [device.result_of(i).status for i in ids] == ["ok"] * 5


def test_shared_pool_splits_work_on_mosquitto5(mosquitto5: BrokerEndpoint, make_agent: AgentFactory,
                                               make_device: DeviceFactory) -> None:
    gate = Gate()
    gate.release.set()
    for name in ("srvA", "srvB"):
        make_agent(mosquitto5, registry_with(gate), id=name, pools=["gpu"])
    device = make_device(mosquitto5)
    wait_for(lambda: device.states("srvA") and device.states("srvB"), 5.0)
    ids = [device.send("echo", n, topic=device.tree.pool_inbox("gpu")) for n in range(20)]
    servers = [device.result_of(i).server for i in ids]
    assert len(device.results()) == 20  # each task answered exactly once
    assert servers.count("srvA") > 0 and servers.count("srvB") > 0, servers


def _agent_process(target: BrokerEndpoint, prefix: str, *extra: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUD_AGENT_")}
    return subprocess.Popen(
        [sys.executable, "-m", "cloud_agent", "run", "--broker", target.url, "--id", "srv1",
         "--prefix", prefix, "--protocol", target.protocol, "--tasks", "agent_common.demo_tasks",
         "--heartbeat-interval", "0.2", "--log-level", "info", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _finish(process: subprocess.Popen[str], timeout: float = 15.0) -> tuple[int, str]:
    try:
        _, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = process.communicate()
        pytest.fail(f"cloud-agent did not exit in {timeout}s:\n{err[-3000:]}")
    return process.returncode, err


def test_sigterm_drains_queued_tasks(broker: BrokerEndpoint, make_device: DeviceFactory,
                                     topic_prefix: str) -> None:
    device = make_device(broker)
    process = _agent_process(broker, topic_prefix, "--workers", "2", "--queue-size", "10",
                             "--grace-period", "10")
    try:
        wait_for(lambda: any(s.status == "online" for s in device.states("srv1")), 15.0,
                 message="the agent's birth")
        ids = [device.send("square", {"x": n, "cost": 0.3}) for n in range(6)]
        wait_for(lambda: any(h.load.in_flight == 2 and h.load.queue_length >= 1
                             for h in device.heartbeats("srv1")), 10.0, message="tasks queued")
        process.send_signal(signal.SIGTERM)
        code, err = _finish(process)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert code == 0, err[-3000:]
    assert [device.result_of(i).payload for i in ids] == [{"y": n * n} for n in range(6)]
    wait_for(lambda: device.states("srv1")[-1].status == "offline", 5.0, message="offline state")
    assert "SIGTERM received" in err and "stopped cleanly" in err


def test_will_marks_killed_agent_offline(broker: BrokerEndpoint, make_device: DeviceFactory,
                                         topic_prefix: str) -> None:
    device = make_device(broker)
    process = _agent_process(broker, topic_prefix, "--keepalive", "2")
    try:
        wait_for(lambda: any(s.status == "online" for s in device.states("srv1")), 15.0,
                 message="the agent's birth")
        session = device.states("srv1")[-1].session
        process.send_signal(signal.SIGKILL)  # it can publish nothing more: an offline is its Will
        process.wait(5.0)
        wait_for(lambda: device.states("srv1")[-1].status == "offline", 3 * 2 * 1.5,
                 message="the Will, sent by the broker 1.5 keepalives after the last packet")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout:
            process.stdout.close()
        if process.stderr:
            process.stderr.close()
    will = device.states("srv1")[-1]
    assert will.session == session


def reconnect_failures_reach(transport: MqttTransport, count: int) -> Callable[[], bool]:
    """Whether ``transport`` has failed at least ``count`` reconnect attempts."""
    def check() -> bool:
        return transport.stats()["reconnect_failures"] >= count

    return check


def length_is(items: list[float], length: int) -> Callable[[], bool]:
    """Whether ``items`` has grown to ``length``."""
    def check() -> bool:
        return len(items) == length

    return check


@pytest.mark.mosquitto
def test_back_within_the_reconnect_cap_after_every_broker_restart(
        broker_factory: Callable[..., BrokerEndpoint], make_device: DeviceFactory,
        topic_prefix: str) -> None:
    """The broker goes down long enough for the backoff to reach its cap (four failed attempts),
    comes back on the same port: the agent is re-subscribed within the cap (plus scheduling slack)
    every time, and answers a task."""
    restarts, slack = 5, 1.0
    target = broker_factory("mosquitto-3.1.1")
    config = CloudConfig(id="srv1", prefix=topic_prefix, workers=2, queue_size=3,
                         heartbeat_interval=0.2, reconnect_max_delay=1.0)
    transport = MqttTransport(config.transport_config(target.url).model_copy(
        update={"client_id": f"srv1-{topic_prefix[-8:]}"}))
    back: list[float] = []
    transport.add_connect_listener(lambda: back.append(time.monotonic()))
    agent = CloudAgent(config, transport, registry_with(Gate()))
    agent.start()
    device = make_device(target)
    delays: list[float] = []
    try:
        wait_for(lambda: len(back) == 1, 5.0, message="the first connect")
        assert device.result_of(device.send("echo", -1)).payload == -1
        for n in range(restarts):
            target.broker.stop()
            wait_for(lambda: not transport.connected, 5.0, message="the agent noticing the outage")
            failed = transport.stats()["reconnect_failures"]
            wait_for(reconnect_failures_reach(transport, failed + 4), 15.0,
                     message="the backoff escalating during the outage")
            target.broker.start()
            answering = time.monotonic()
            wait_for(length_is(back, n + 2), config.reconnect_max_delay + 5.0,
                     message=f"the agent back after restart {n + 1}")
            delays.append(back[-1] - answering)
            wait_for(lambda: device.transport.connected, 10.0, message="the test device back")
            assert device.result_of(device.send("echo", n), timeout=15.0).payload == n
    finally:
        agent.stop(grace=1.0)
    print(f"\nback after each restart (s): {', '.join(f'{d:.3f}' for d in delays)}")
    assert max(delays) <= config.reconnect_max_delay + slack, delays
    assert transport.stats()["reconnects"] == restarts
