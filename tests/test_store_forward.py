"""Store and forward on a real Mosquitto: tasks that cannot run anywhere wait in the spool (on disk)
and are sent when a server is back, also by a restarted agent; the spool full refuses the submit.

The offline period is "until the test starts the server": every wait is on an event.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from brokers_support import (
    BrokerEndpoint,
    MessageLog,
    Stack,
    connected,
    endpoint,
    gate_registry,
    retained_on,
    start_cloud,
    start_edge,
    wait_for,
)

from agent_common.registry import TaskRegistry, UnknownTaskError
from edge_agent.agent import EdgeAgent, SpoolFull, TaskFailed
from edge_agent.config import EdgeConfig
from edge_agent.spool import Spool, SpoolFileError
from topics.brokers import MosquittoBroker
from topics.mqtt import MqttTransport
from topics.names import TopicTree
from topics.transport import ProtocolVersion

N = 200
REPO = Path(__file__).resolve().parents[1]
BrokerFactory = Callable[..., BrokerEndpoint]


def _edge(mosquitto_broker: MosquittoBroker, stack: Stack, prefix: str, spool: Path,
          **fields: Any) -> EdgeAgent:
    """A device that runs nothing itself, with a spool."""
    return start_edge(endpoint(mosquitto_broker), stack, prefix, registry=TaskRegistry(), spool_path=spool,
                      **fields)


def _outcome(future: concurrent.futures.Future[Any]) -> str:
    error = future.exception()
    return "ok" if error is None else error.status if isinstance(error, TaskFailed) else type(error).__name__


def test_tasks_wait_for_a_server_and_short_deadlines_expire(
        mosquitto_broker: MosquittoBroker, stack: Stack, topic_prefix: str, tmp_path: Path) -> None:
    edge = _edge(mosquitto_broker, stack, topic_prefix, tmp_path / "spool.db")
    wait_for(lambda: edge.connected, message="device connected")
    spooling = time.monotonic()
    futures = [edge.submit("square", {"x": i}, deadline=120.0) for i in range(N)]
    spooling = time.monotonic() - spooling
    short = [edge.submit("square", {"x": -1}, deadline=0.2) for _ in range(5)]
    assert edge.stats()["spool"]["tasks"] == N + 5
    assert not any(f.done() for f in futures)
    for future in short:  # answered at their deadline by the spool's expiry timer
        with pytest.raises(TaskFailed) as failed:
            future.result(timeout=15.0)
        assert failed.value.status == "expired"
    assert edge.stats()["spool_expired"] == 5
    began = time.monotonic()
    cloud = start_cloud(endpoint(mosquitto_broker), stack, topic_prefix, "srv-sf")
    results = [future.result(timeout=60.0) for future in futures]
    drained = time.monotonic() - began
    assert results == [{"y": i * i} for i in range(N)]
    wait_for(lambda: edge.stats()["spool"]["tasks"] == 0, message="spool emptied")  # removed after handover
    stats = edge.stats()
    assert stats["spool_forwarded"] == N and stats["outcome_ok"] == N
    wait_for(lambda: cloud.stats()["completed"].get("ok") == N, message="server ran each once")
    assert cloud.stats().get("duplicates", 0) == 0
    print(f"\n{N} tasks spooled in {spooling:.2f} s (submit), answered {drained:.2f} s after the server "
          "started")


def test_a_restarted_agent_sends_what_the_first_one_spooled(
        mosquitto_broker: MosquittoBroker, stack: Stack, topic_prefix: str, tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    first = _edge(mosquitto_broker, stack, topic_prefix, path)
    wait_for(lambda: first.connected, message="device connected")
    futures = [first.submit("square", {"x": i}, deadline=120.0) for i in range(N)]
    expiring = first.submit("square", {"x": 1}, deadline=1.0)
    first.stop()  # the process's callers are told; the tasks stay on disk
    with pytest.raises(TaskFailed, match="stays in the spool"):
        futures[0].result(timeout=5.0)
    with Spool(path) as spool:
        assert len(spool) == N + 1
    assert expiring.done()
    second = _edge(mosquitto_broker, stack, topic_prefix, path, id=first.id)
    assert second.stats()["spool_recovered"] == N + 1
    wait_for(lambda: second.stats().get("spool_expired") == 1, message="the short one expired")
    cloud = start_cloud(endpoint(mosquitto_broker), stack, topic_prefix, "srv-sf2")
    wait_for(lambda: second.stats().get("spool_recovered_ok") == N, timeout=60.0,
             message="every spooled task answered")
    wait_for(lambda: cloud.stats()["completed"].get("ok") == N, message="server ran each once")
    assert cloud.stats().get("duplicates", 0) == 0
    wait_for(lambda: second.stats()["spool"]["tasks"] == 0, message="spool emptied")


def test_a_full_spool_refuses_the_submit(
        mosquitto_broker: MosquittoBroker, stack: Stack, topic_prefix: str, tmp_path: Path) -> None:
    edge = _edge(mosquitto_broker, stack, topic_prefix, tmp_path / "spool.db", spool_max_tasks=3)
    kept = [edge.submit("square", {"x": i}, deadline=60.0) for i in range(3)]
    with pytest.raises(SpoolFull, match="spool full") as full:
        edge.submit("square", {"x": 9}, deadline=60.0)
    assert isinstance(full.value, ValueError)
    stats = edge.stats()
    assert stats["spool_refused"] == 1 and stats["spool"]["tasks"] == 3
    start_cloud(endpoint(mosquitto_broker), stack, topic_prefix, "srv-sf3")
    assert [f.result(timeout=30.0) for f in kept] == [{"y": i * i} for i in range(3)]


def test_without_a_spool_such_a_task_is_refused_as_before(
        mosquitto_broker: MosquittoBroker, stack: Stack, topic_prefix: str) -> None:
    edge = start_edge(endpoint(mosquitto_broker), stack, topic_prefix, registry=TaskRegistry())
    with pytest.raises(UnknownTaskError, match="square"):
        edge.submit("square", {"x": 1})


def test_tasks_submitted_while_the_broker_is_down_are_sent_when_it_is_back(
        broker_factory: BrokerFactory, stack: Stack, topic_prefix: str, tmp_path: Path) -> None:
    target = broker_factory("mosquitto-3.1.1")
    edge = start_edge(target, stack, topic_prefix, registry=TaskRegistry(), spool_path=tmp_path / "spool.db")
    start_cloud(target, stack, topic_prefix, "srv-down")
    assert edge.submit("square", {"x": 2}, deadline=10.0).result(timeout=15.0) == {"y": 4}
    target.broker.stop()
    wait_for(lambda: not edge.connected, message="device saw the broker go")
    futures = [edge.submit("square", {"x": i}, deadline=60.0) for i in range(50)]
    assert edge.stats()["spool"]["tasks"] == 50 and not any(f.done() for f in futures)
    target.broker.start()
    assert [f.result(timeout=30.0) for f in futures] == [{"y": i * i} for i in range(50)]


def test_a_bridged_task_spooled_before_a_restart_is_published_on_its_route(
        mosquitto_broker: MosquittoBroker, stack: Stack, topic_prefix: str, tmp_path: Path) -> None:
    target = endpoint(mosquitto_broker)
    path = tmp_path / "spool.db"
    route = {"filter": f"{topic_prefix}/sensors/+/reading", "task": "square",
             "output": f"{topic_prefix}/results/{{1}}/square", "qos": 1, "deadline": 60.0}
    first = _edge(mosquitto_broker, stack, topic_prefix, path, routes=[route])
    wait_for(lambda: first.connected, message="device connected")
    sensor = connected(target, stack, "sensor")
    for n in range(10):
        sensor.publish(f"{topic_prefix}/sensors/s{n}/reading", json.dumps({"x": n}).encode(), qos=1)
    wait_for(lambda: first.stats()["spool"]["tasks"] == 10, message="bridged tasks spooled")
    first.stop()
    outputs = MessageLog(connected(target, stack, "reader"), f"{topic_prefix}/results/#")
    second = _edge(mosquitto_broker, stack, topic_prefix, path, routes=[route], id=first.id)
    start_cloud(target, stack, topic_prefix, "srv-bridge")
    wait_for(lambda: len(outputs.messages) == 10, timeout=30.0, message="every result on its route")
    got = {m.topic: json.loads(m.payload) for m in outputs.messages}
    assert got == {f"{topic_prefix}/results/s{n}/square": {"y": n * n} for n in range(10)}
    assert second.stats()["bridge"]["recovered"] == 10 and second.stats()["spool_recovered_ok"] == 10


class _Cuttable:
    """A TCP forwarder to the broker that the test can cut (both sides closed, reconnects refused) and
    restore: the device is away for the broker, as over a lost radio link."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._open = threading.Event()
        self._open.set()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self._open.is_set():
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self._port))
            with self._lock:
                self._pairs.append((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self._open.clear()
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for end in pair:
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def restore(self) -> None:
        self._open.set()

    def close(self) -> None:
        self.cut()
        self._listener.close()


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_results_published_while_the_device_was_away_are_matched_once_when_it_returns(
        mosquitto_broker: MosquittoBroker, stack: Stack, topic_prefix: str,
        protocol: ProtocolVersion) -> None:
    target = endpoint(mosquitto_broker, protocol)
    gate = threading.Event()
    stack.append(gate.set)
    cloud = start_cloud(target, stack, topic_prefix, "srv-away", registry=gate_registry(gate))
    link = _Cuttable(mosquitto_broker.port)
    stack.append(link.close)
    node = f"edge-{uuid.uuid4().hex[:6]}"
    config = EdgeConfig(id=node, broker=f"mqtt://127.0.0.1:{link.port}", protocol=protocol,
                        prefix=topic_prefix, heartbeat_interval=0.5, probe_interval=0.1,
                        persistent_session=True, session_expiry=60)
    settings = config.transport_config().model_copy(update={"reconnect_max_delay": 0.3})
    assert settings.persistent_session and settings.client_id == node
    transport = MqttTransport(settings, name=node)
    edge = EdgeAgent(config, transport, TaskRegistry())
    edge.start()
    stack.append(edge.stop)
    wait_for(lambda: edge.core.can_serve("gate", time.monotonic()), message="the server is usable")
    futures = [edge.submit("gate", {"n": n}, deadline=60.0) for n in range(20)]
    wait_for(lambda: cloud.stats()["in_flight"] + cloud.stats()["queue_length"] == 20,
             message="all 20 at the server")
    link.cut()
    wait_for(lambda: not edge.connected, message="device away")
    gate.set()
    wait_for(lambda: cloud.stats()["completed"].get("ok") == 20, message="results published while away")
    assert not any(f.done() for f in futures)
    link.restore()
    assert [f.result(timeout=30.0) for f in futures] == [{"n": n} for n in range(20)]
    stats = edge.stats()
    assert stats["outcome_ok"] == 20 and stats["transport"]["sessions_resumed"] >= 1
    assert cloud.stats()["completed"]["ok"] == 20  # each ran once
    edge.stop()
    clean = MqttTransport(target.config(node))  # the shared broker forgets the session
    clean.connect()
    clean.close()


def _free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port: int = probe.getsockname()[1]
        return port


def _spool_gauge(port: int) -> float | None:
    """``offload_edge_spool_tasks`` of the agent serving metrics on ``port``; None while it is not up."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("offload_edge_spool_tasks "):
            return float(line.split()[1])
    return None


def test_a_killed_agent_process_leaves_its_spool_to_the_next_one(
        mosquitto_broker: MosquittoBroker, stack: Stack, topic_prefix: str, tmp_path: Path) -> None:
    """SIGKILL, no clean stop: the tasks the bridge of the killed process spooled are sent by the next
    agent on the same file and published on their route."""
    target = endpoint(mosquitto_broker)
    path = tmp_path / "spool.db"
    node = f"edge-{uuid.uuid4().hex[:6]}"
    route = {"filter": f"{topic_prefix}/sensors/+/reading", "task": "square",
             "output": f"{topic_prefix}/results/{{1}}/square", "qos": 1, "deadline": 120.0}
    port = _free_port()
    config = tmp_path / "device.toml"
    config.write_text(
        f'id = "{node}"\nbroker = "{mosquitto_broker.url}"\nprefix = "{topic_prefix}"\n'
        f'heartbeat_interval = 0.5\nspool_path = "{path}"\nmetrics_port = {port}\ntasks = []\n'
        f'[[routes]]\nfilter = "{route["filter"]}"\ntask = "square"\noutput = "{route["output"]}"\n'
        'qos = 1\ndeadline = 120.0\n')
    with (tmp_path / "agent.log").open("w") as log:
        process = subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "--config", str(config)],
                                   cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                                   stdout=subprocess.DEVNULL, stderr=log)

    def reap() -> None:
        if process.poll() is None:
            process.kill()
            process.wait(5)

    stack.append(reap)
    wait_for(lambda: _spool_gauge(port) == 0.0, timeout=30.0, message="the agent process is up")
    sensor = connected(target, stack, "sensor")
    wait_for(lambda: any(m.payload for m in retained_on(target, stack, TopicTree(topic_prefix).state(node))),
             message="the agent process announced itself")
    for n in range(N):
        sensor.publish(f"{topic_prefix}/sensors/s{n}/reading", json.dumps({"x": n}).encode(), qos=1)
    wait_for(lambda: _spool_gauge(port) == N, timeout=30.0, message="every bridged task spooled")
    os.kill(process.pid, signal.SIGKILL)
    process.wait(10)
    outputs = MessageLog(connected(target, stack, "reader"), f"{topic_prefix}/results/#")
    again = _edge(mosquitto_broker, stack, topic_prefix, path, routes=[route], id=node)
    assert again.stats()["spool_recovered"] == N
    cloud = start_cloud(target, stack, topic_prefix, "srv-kill")
    wait_for(lambda: len(outputs.messages) == N, timeout=60.0, message="every result on its route")
    got = {m.topic: json.loads(m.payload) for m in outputs.messages}
    assert got == {f"{topic_prefix}/results/s{n}/square": {"y": n * n} for n in range(N)}
    wait_for(lambda: cloud.stats()["completed"].get("ok") == N, message="server ran each once")
    assert again.stats()["spool_recovered_ok"] == N


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_offline_for_60_s_with_a_restart_in_between(
        broker_factory: BrokerFactory, stack: Stack, topic_prefix: str, tmp_path: Path) -> None:
    """The issue's scenario at full length: the broker gone for 60 s, 200 tasks the device cannot run
    spooled meanwhile (5 with a 40 s deadline), the agent's link aborted and the agent stopped after
    30 s, a new agent on the same spool; when the broker is back every task is answered once, the
    short ones `expired`."""
    target = broker_factory("mosquitto-3.1.1")
    path = tmp_path / "spool.db"
    first = start_edge(target, stack, topic_prefix, registry=TaskRegistry(), spool_path=path)
    cloud = start_cloud(target, stack, topic_prefix, "srv-60")
    assert first.submit("square", {"x": 2}, deadline=10.0).result(timeout=15.0) == {"y": 4}
    target.broker.stop()
    offline = time.monotonic()
    wait_for(lambda: not first.connected, message="device saw the broker go")
    [first.submit("square", {"x": i}, deadline=120.0) for i in range(N)]
    [first.submit("square", {"x": -1}, deadline=40.0) for _ in range(5)]  # expire after the restart
    threading.Event().wait(max(0.0, offline + 30.0 - time.monotonic()))  # the scenario's offline time
    first._transport.abort()  # type: ignore[union-attr]  # as a crash leaves the link
    first.stop()
    second = start_edge(target, stack, topic_prefix, registry=TaskRegistry(), spool_path=path, id=first.id)
    assert second.stats()["spool_recovered"] == N + 5
    wait_for(lambda: second.stats().get("spool_recovered_expired") == 5, timeout=30.0,
             message="short deadlines")
    threading.Event().wait(max(0.0, offline + 60.0 - time.monotonic()))
    began = time.monotonic()
    target.broker.start()
    wait_for(lambda: second.stats().get("spool_recovered_ok") == N, timeout=60.0, message="all answered")
    print(f"\n{N} tasks answered {time.monotonic() - began:.2f} s after the broker came back")
    wait_for(lambda: cloud.stats()["completed"].get("ok") == N + 1, message="server ran each once")
    assert cloud.stats().get("duplicates", 0) == 0


def test_a_corrupt_spool_file_is_moved_aside_and_a_busy_one_fails_start(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "spool.db"
    path.write_bytes(b"this is no database, " * 100)
    config = EdgeConfig(id="cam1", spool_path=path)
    with caplog.at_level(logging.WARNING, logger="edge_agent.agent"):
        agent = EdgeAgent(config, None, TaskRegistry())
        agent.start()
    try:
        assert [p.name for p in tmp_path.glob("spool.db.bad-*")] and "not an SQLite database" in caplog.text
        assert agent.stats()["spool"]["tasks"] == 0
        other = EdgeAgent(config, None, TaskRegistry())
        with pytest.raises(SpoolFileError, match="in use"):
            other.start()
    finally:
        agent.stop()
