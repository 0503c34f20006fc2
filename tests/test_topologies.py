"""More than one broker: a site Mosquitto bridged to a cloud Mosquitto (``topics.brokers.MosquittoBridge``).

Devices connect to the site broker, servers to the cloud broker, and the same end-to-end checks as on
one broker pass: an offload round trip, a pool task shared among the cloud broker's subscribers, a
killed server's Will reaching the device (which falls back to local), retained state seen by a device
that starts late. The extra round trip of the bridge is measured against a single broker in the same
run and printed (``pytest -s``); no timing is asserted.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypedDict

import pytest
from brokers_support import (
    BrokerEndpoint,
    RawClient,
    Stack,
    endpoint,
    require,
    require_mosquitto,
    start_cloud,
    start_edge,
    wait_for,
)

from agent_common.registry import TaskRegistry
from edge_agent.agent import EdgeAgent
from edge_agent.records import TaskRecord
from topics.brokers import MosquittoBridge, MosquittoBroker, free_port, mqtt_answers, write_mosquitto_config
from topics.models import NodeState
from topics.mqtt import MqttTransport
from topics.transport import Message

REPO = Path(__file__).resolve().parent.parent


class BridgeArguments(TypedDict, total=False):
    """The MosquittoBridge arguments test_bridge_configuration gives wrong values."""

    address: str
    prefixes: tuple[str, ...]
    keepalive_interval: int
    remote_password: str


def test_bridge_configuration(tmp_path: Path) -> None:
    """The bridge section comes last in mosquitto.conf (it takes every following bridge option)."""
    bridge = MosquittoBridge(address="cloud.example.net:1883", prefixes=("offload/v1", "lab/x"),
                             name="site-1", remote_username="site", remote_password="pw")
    text = write_mosquitto_config(tmp_path / "m.conf", port=1883, bridge=bridge).read_text()
    lines = text.splitlines()
    section = lines[lines.index("connection site-1"):]
    for line in ("address cloud.example.net:1883", "remote_clientid site-1", "try_private true",
                 "cleansession true", "notifications false", "restart_timeout 1",
                 "remote_username site", "remote_password pw", "topic offload/v1/# out 1",
                 "topic offload/v1/# in 0", "topic lab/x/# out 1", "topic lab/x/# in 0"):
        assert line in section
    assert "set_tcp_nodelay true" in lines[:lines.index("connection site-1")]
    bad_cases: list[BridgeArguments] = [
        {"address": "cloud"}, {"address": "h:x"}, {"prefixes": ()}, {"prefixes": ("a/#",)},
        {"prefixes": ("a/",)}, {"prefixes": ("a b",)}, {"keepalive_interval": 4},
        {"remote_password": "pw"}]
    for bad in bad_cases:
        arguments: BridgeArguments = {"address": "h:1883", **bad}
        with pytest.raises(ValueError):
            MosquittoBridge(**arguments)


@dataclass(frozen=True)
class Topology:
    """A cloud broker, and a site broker bridged to it for the test's prefix."""

    cloud: BrokerEndpoint
    site: BrokerEndpoint
    prefix: str


def wait_bridged(source: BrokerEndpoint, target: BrokerEndpoint, prefix: str, stack: Stack) -> None:
    """Publish probes on ``source`` until one arrives on ``target`` (the bridge is up that way)."""
    seen: queue.Queue[Message] = queue.Queue()
    name = f"probe-{uuid.uuid4().hex[:6]}"
    listener = MqttTransport(target.config(f"{name}-rx"), name=f"{name}-rx")
    sender = MqttTransport(source.config(f"{name}-tx"), name=f"{name}-tx")
    for transport in (listener, sender):
        transport.connect(timeout=5.0)
        stack.append(partial(transport.close, timeout=2.0))
    topic = f"{prefix}/probe/{name}"
    listener.subscribe(topic, seen.put, qos=0)
    deadline = time.monotonic() + 15.0
    while time.monotonic() < deadline:
        sender.publish(topic, b"probe", qos=0)
        try:
            seen.get(timeout=0.1)  # the probe's own answer, not a fixed sleep
            return
        except queue.Empty:
            continue
    pytest.fail(f"bridge {source.url} -> {target.url} not up after 15 s")


@pytest.fixture
def topology(topic_prefix: str, stack: Stack) -> Topology:
    require_mosquitto()
    cloud = MosquittoBroker().start()
    stack.append(cloud.close)
    bridge = MosquittoBridge(address=f"{cloud.host}:{cloud.port}", prefixes=(topic_prefix,),
                             name=f"site-{uuid.uuid4().hex[:6]}")
    site = MosquittoBroker(bridge=bridge).start()
    stack.append(site.close)
    result = Topology(endpoint(cloud), endpoint(site), topic_prefix)
    wait_bridged(result.site, result.cloud, topic_prefix, stack)
    wait_bridged(result.cloud, result.site, topic_prefix, stack)
    return result


def serving(edge: EdgeAgent, node: str, task: str = "square") -> Callable[[], bool]:
    return lambda: any(v.node == node and not v.stale and not v.dead and task in v.tasks
                       for v in edge.servers())


def recorded(edge: EdgeAgent) -> list[TaskRecord]:
    records: list[TaskRecord] = []
    edge.add_record_listener(records.append)
    return records


@pytest.mark.mosquitto
def test_offload_round_trip_across_the_bridge(topology: Topology, stack: Stack) -> None:
    start_cloud(topology.cloud, stack, topology.prefix, "srv-cloud")
    edge = start_edge(topology.site, stack, topology.prefix, registry=TaskRegistry(), policy="remote")
    records = recorded(edge)
    wait_for(serving(edge, "srv-cloud"), timeout=10.0, message="the cloud server seen from the site")
    results = [edge.submit("square", {"x": x}, deadline=5.0).result(10) for x in range(5)]
    assert results == [{"y": x * x} for x in range(5)]
    wait_for(lambda: len(records) == 5)
    assert {(r.outcome, r.target, r.attempts) for r in records} == {("ok", "srv-cloud", 1)}
    wait_for(lambda: any(v.rtt is not None for v in edge.servers()), message="an rtt sample")


@pytest.mark.mosquitto
def test_pool_is_shared_by_the_cloud_brokers_subscribers(topology: Topology, stack: Stack) -> None:
    """``$share`` across a bridge: the bridge forwards the pool task once, and the cloud broker gives
    it to one member of the group (the site broker has no shared subscriber of its own)."""
    servers = ("pool-a", "pool-b")
    for node in servers:
        start_cloud(topology.cloud, stack, topology.prefix, node, pools=["gpu"])
    client = RawClient(topology.site, topology.prefix, stack)
    watcher = RawClient(topology.site, topology.prefix, stack)
    for node in servers:  # both servers' pool subscriptions are live once they answer a ping
        wait_for(partial(_answers, watcher, node), timeout=10.0, message=f"{node} through the bridge")
    count = 40
    ids = [client.send_task(client.tree.pool_inbox("gpu"), "square", {"x": i}) for i in range(count)]
    answers = [client.results.get(timeout=10.0) for _ in ids]
    assert sorted(a.task_id for a in answers) == sorted(ids)  # each exactly once...
    assert all(a.status == "ok" for a in answers)
    by_server = {node: sum(a.server == node for a in answers) for node in servers}
    assert all(by_server.values()), by_server  # ...and shared between the two servers
    # A later control task through the same path: no duplicate of a pool task arrived before it.
    assert client.task(client.tree.task_inbox("pool-a"), "square", {"x": 2}).payload == {"y": 4}
    assert client.results.empty()


def _answers(client: RawClient, node: str) -> bool:
    try:
        client.ping(node)
    except queue.Empty:
        return False
    return True


@pytest.mark.mosquitto
def test_killed_servers_will_crosses_the_bridge_and_the_device_falls_back(
        topology: Topology, stack: Stack) -> None:
    """The cloud broker publishes the Will; the bridge carries it (retained) to the site broker."""
    server = subprocess.Popen(
        [sys.executable, "-m", "cloud_agent", "run", "--broker", topology.cloud.url, "--id", "victim",
         "--tasks", "examples.tasks", "--prefix", topology.prefix, "--heartbeat-interval", "5",
         "--keepalive", "1", "--workers", "2", "--log-level", "warning"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)

    def reap() -> None:
        if server.poll() is None:
            server.kill()
        server.wait(5)

    stack.append(reap)
    watcher = RawClient(topology.site, topology.prefix, stack)
    watcher.watch_states()
    edge = start_edge(topology.site, stack, topology.prefix, policy="remote", default_timeout=30.0)
    records = recorded(edge)
    wait_for(serving(edge, "victim", "sleep"), timeout=15.0, message="the server subprocess")
    futures = [edge.submit("sleep", {"seconds": 3.0}) for _ in range(2)]
    wait_for(lambda: any(v.node == "victim" and v.in_flight == 2 for v in edge.servers()),
             message="both tasks sent to the server")
    killed = time.monotonic()
    os.kill(server.pid, signal.SIGKILL)
    server.wait(5)
    assert [f.result(20) for f in futures] == [{"slept": 3.0}] * 2
    wait_for(lambda: len(records) == 2)
    assert all(r.targets[0] == "victim" and r.targets[-1] == "local" for r in records)
    assert edge.stats()["server_deaths_in_flight"] == 2
    view = next(v for v in edge.servers() if v.node == "victim")
    # Dead by its Will, not stale: 3 missed 5 s heartbeats would take 15 s.
    assert view.dead and time.monotonic() - killed < 15.0
    offline = _drain_states(watcher, "victim", "offline")
    assert offline, "the Will never reached the site broker"

    # A device that starts late on the site broker learns the death from the retained state.
    late = RawClient(topology.site, topology.prefix, stack)
    late.watch_states()
    wait_for(lambda: _seen(late, "victim", "offline", retained=True), message="the retained Will")


def _drain_states(client: RawClient, node: str, status: str) -> list[NodeState]:
    found: list[NodeState] = []
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and not found:
        try:
            state, _ = client.states.get(timeout=0.1)
        except queue.Empty:
            continue
        if state.node == node and state.status == status:
            found.append(state)
    return found


def _seen(client: RawClient, node: str, status: str, *, retained: bool) -> bool:
    while True:
        try:
            state, retain = client.states.get_nowait()
        except queue.Empty:
            return False
        if state.node == node and state.status == status and retain == retained:
            return True


@pytest.mark.mosquitto
def test_late_device_sees_retained_state_across_the_bridge(topology: Topology, stack: Stack) -> None:
    """A server's retained birth crosses the bridge retained (``try_private``): a device that
    connects to the site broker later gets it at once, before any heartbeat."""
    start_cloud(topology.cloud, stack, topology.prefix, "srv-early", heartbeat_interval=30.0)
    first = RawClient(topology.site, topology.prefix, stack)
    first.watch_states()
    wait_for(lambda: _seen(first, "srv-early", "online", retained=True) or _answers(first, "srv-early"),
             timeout=10.0, message="the server up")
    late = RawClient(topology.site, topology.prefix, stack)
    late.watch_states()
    wait_for(lambda: _seen(late, "srv-early", "online", retained=True), timeout=5.0,
             message="the retained birth on the site broker")
    edge = start_edge(topology.site, stack, topology.prefix, registry=TaskRegistry(), policy="remote")
    wait_for(lambda: any(v.node == "srv-early" for v in edge.servers()), timeout=5.0,
             message="the late device knowing the server")


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@pytest.mark.mosquitto
def test_bridge_round_trip_against_a_single_broker(topology: Topology, stack: Stack) -> None:
    """The same server on the cloud broker, pinged and given tasks from a client on the cloud broker
    (one broker) and from one on the site broker (bridged), interleaved in the same run."""
    start_cloud(topology.cloud, stack, topology.prefix, "srv-rtt")
    single = RawClient(topology.cloud, topology.prefix, stack)
    bridged = RawClient(topology.site, topology.prefix, stack)
    for client in (single, bridged):
        wait_for(partial(_answers, client, "srv-rtt"), timeout=10.0)
    pings: dict[str, list[float]] = {"single": [], "bridged": []}
    tasks: dict[str, list[float]] = {"single": [], "bridged": []}
    inbox = single.tree.task_inbox("srv-rtt")
    for i in range(200):
        for label, client in (("single", single), ("bridged", bridged)):
            pings[label].append(client.ping("srv-rtt"))
            if i % 2 == 0:
                started = time.monotonic()
                assert client.task(inbox, "square", {"x": i}).status == "ok"
                tasks[label].append(time.monotonic() - started)
    print()
    for what, samples in (("ping (QoS 0)", pings), ("square task (QoS 1)", tasks)):
        for label in ("single", "bridged"):
            values = samples[label]
            print(f"{what:20} {label:8} n={len(values):3} p50 {1000 * statistics.median(values):.3f} ms"
                  f"  p90 {1000 * _percentile(values, 0.9):.3f} ms")
        extra = statistics.median(samples["bridged"]) - statistics.median(samples["single"])
        print(f"{what:20} bridge adds {1000 * extra:.3f} ms (p50)")


# ------------------------------------------------------------------ a two-node RabbitMQ cluster

RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
RABBITMQCTL = Path("/usr/lib/rabbitmq/bin/rabbitmqctl")


class RabbitCluster:
    """Two RabbitMQ nodes (MQTT plugin) on loopback, clustered with ``rabbitmqctl join_cluster``.

    Every process is ours: a private epmd on its own port, each node in its own session, stopped
    with ``rabbitmqctl stop`` and then by process group id."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.cookie = uuid.uuid4().hex
        home = base / "home"
        home.mkdir(parents=True)
        (home / ".erlang.cookie").write_text(self.cookie)
        (home / ".erlang.cookie").chmod(0o400)
        self.epmd_port = free_port()
        self.mqtt_ports = [free_port(), free_port()]
        self.nodes = [f"offload{i}-{uuid.uuid4().hex[:4]}@localhost" for i in (1, 2)]
        self._processes: list[subprocess.Popen[bytes]] = []
        self._env = {**os.environ, "HOME": str(home), "ERL_EPMD_ADDRESS": "127.0.0.1",
                     "ERL_EPMD_PORT": str(self.epmd_port)}

    def _node_env(self, index: int) -> dict[str, str]:
        directory = self.base / f"n{index}"
        (directory / "log").mkdir(parents=True, exist_ok=True)
        (directory / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        (directory / "advanced.config").write_text("[].\n")
        (directory / "rabbitmq-env.conf").write_text("")
        amqp = free_port()
        (directory / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{amqp}\n"
            f"mqtt.listeners.tcp.default = 127.0.0.1:{self.mqtt_ports[index]}\n"
            "mqtt.allow_anonymous = true\nloopback_users = none\n")
        return {**self._env, "RABBITMQ_NODENAME": self.nodes[index], "RABBITMQ_NODE_PORT": str(amqp),
                "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1", "RABBITMQ_DIST_PORT": str(free_port()),
                "RABBITMQ_BASE": str(directory), "RABBITMQ_MNESIA_BASE": str(directory / "mnesia"),
                "RABBITMQ_LOG_BASE": str(directory / "log"),
                "RABBITMQ_CONFIG_FILE": str(directory / "rabbitmq.conf"),
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(directory / "advanced.config"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(directory / "enabled_plugins"),
                "RABBITMQ_CONF_ENV_FILE": str(directory / "rabbitmq-env.conf"),
                "RABBITMQ_PID_FILE": str(directory / "pid"),
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}"}

    def url(self, index: int) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_ports[index]}"

    def ctl(self, index: int, *args: str) -> None:
        subprocess.run([str(RABBITMQCTL), "--erlang-cookie", self.cookie, "-n", self.nodes[index], *args],
                       env=self._env, check=True, capture_output=True, timeout=120)

    def join(self, *, attempts: int) -> None:
        """Node 2 joins node 1; "unavailable" (exit 69, seen on a loaded machine while node 1's
        distribution port settles) is retried after node 1 answers ``await_startup`` again."""
        for attempt in range(attempts):
            try:
                self.ctl(1, "join_cluster", self.nodes[0])
                return
            except subprocess.CalledProcessError as exc:
                if exc.returncode != 69 or attempt == attempts - 1:
                    raise
                self.ctl(0, "await_startup")

    def start(self) -> RabbitCluster:
        self._processes.append(subprocess.Popen(
            ["epmd", "-address", "127.0.0.1", "-port", str(self.epmd_port)], env=self._env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        for index in (0, 1):
            with (self.base / f"node{index}.out").open("wb") as out:
                self._processes.append(subprocess.Popen(
                    [str(RABBITMQ_SERVER)], env=self._node_env(index), stdin=subprocess.DEVNULL,
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
        for index in (0, 1):
            wait_for(partial(mqtt_answers, "127.0.0.1", self.mqtt_ports[index]),
                     timeout=120.0, interval=0.2, message=f"RabbitMQ node {index + 1} answering MQTT")
        for index in (0, 1):
            self.ctl(index, "await_startup")  # MQTT answers before the node takes cluster commands
        self.ctl(1, "stop_app")
        self.join(attempts=5)
        self.ctl(1, "start_app")
        wait_for(lambda: mqtt_answers("127.0.0.1", self.mqtt_ports[1]), timeout=120.0, interval=0.2,
                 message="node 2 answering MQTT after joining the cluster")
        return self

    def close(self) -> None:
        for index in (1, 0):
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self.ctl(index, "stop")
        for process in reversed(self._processes):
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)  # the session we started, by its id
            process.wait(10)


@pytest.fixture
def rabbit_cluster(tmp_path: Path, stack: Stack) -> RabbitCluster:
    require(RABBITMQ_SERVER.exists(), "RabbitMQ not installed: apt-get install -y rabbitmq-server "
            "(make test-all installs it as root)")
    cluster = RabbitCluster(tmp_path / "rabbit")
    stack.append(cluster.close)
    return cluster.start()


def rabbit_endpoint(cluster: RabbitCluster, index: int) -> BrokerEndpoint:
    return BrokerEndpoint("rabbitmq", cluster.url(index), "3.1.1", None)  # type: ignore[arg-type]


@pytest.mark.slow
def test_rabbitmq_cluster_servers_and_devices_on_different_nodes(rabbit_cluster: RabbitCluster,
                                                                 topic_prefix: str, stack: Stack) -> None:
    """Server on node 1, device on node 2: round trip, Will across nodes, local fallback; and what
    RabbitMQ 3.10 does not do (checked, as documented): ``$share`` pools, retained state on the
    other node."""
    node1, node2 = rabbit_endpoint(rabbit_cluster, 0), rabbit_endpoint(rabbit_cluster, 1)
    server = start_cloud(node1, stack, topic_prefix, "srv-r1", pools=["gpu"])
    edge = start_edge(node2, stack, topic_prefix, policy="remote")
    records = recorded(edge)
    wait_for(serving(edge, "srv-r1"), timeout=20.0, message="the server on the other node")
    assert [edge.submit("square", {"x": x}, deadline=5.0).result(10) for x in range(5)] == [
        {"y": x * x} for x in range(5)]
    wait_for(lambda: len(records) == 5)
    assert {(r.outcome, r.target) for r in records} == {("ok", "srv-r1")}

    client = RawClient(node2, topic_prefix, stack)
    pool_id = client.send_task(client.tree.pool_inbox("gpu"), "square", {"x": 3})
    direct = client.task(client.tree.task_inbox("srv-r1"), "square", {"x": 4})  # the later control
    assert direct.payload == {"y": 16}
    assert client.results.empty(), "a $share pool task was answered on RabbitMQ 3.10"
    assert pool_id

    here, there = RawClient(node1, topic_prefix, stack), RawClient(node2, topic_prefix, stack)
    for watcher in (here, there):
        watcher.transport.subscribe(watcher.tree.state("srv-r1"), watcher._on_state, qos=1)
    wait_for(lambda: _seen(here, "srv-r1", "online", retained=True), message="retained birth, node 1")
    assert there.ping("srv-r1") > 0  # node 2's subscription is live: a retained copy would be here
    assert there.states.empty(), "retained state replicated to the other node"

    server._transport.abort()  # a crash: node 1 publishes the Will, the cluster routes it
    wait_for(lambda: any(v.node == "srv-r1" and v.dead for v in edge.servers()), timeout=10.0,
             message="the Will on node 2")
    assert edge.submit("square", {"x": 9}, deadline=5.0).result(10) == {"y": 81}
    wait_for(lambda: len(records) == 6)
    assert records[-1].target == "local"
