"""Edge agent component tests on the in-memory broker, with real cloud agents and scripted servers.

Scripted servers (:class:`FakeServer`, built from ``topics`` only) make the cases a real server
cannot produce on demand: busy rejections, silence, duplicate answers.
"""

from __future__ import annotations

import concurrent.futures
import random
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

import pytest
from brokers_support import wait_for

from agent_common.registry import TaskRegistry, UnknownTaskError
from agent_common.smoothing import aged_gain
from cloud_agent.config import CloudConfig
from cloud_agent.server import CloudAgent
from edge_agent.agent import EdgeAgent, payload_size
from edge_agent.config import EdgeConfig
from edge_agent.policy import UnknownPolicyError
from edge_agent.records import TaskFailed, TaskRecord
from topics.codec import Codec
from topics.memory import MemoryBroker, MemoryTransport
from topics.models import Heartbeat, Load, NodeState, Result, Role, Status, Task, TaskCapability
from topics.names import Kind, TopicTree

PREFIX = "test/edge"


def make_registry(gate: threading.Event | None = None) -> TaskRegistry:
    registry = TaskRegistry()

    @registry.task("square")
    def square(payload: Any) -> Any:
        return {"value": payload["x"] * payload["x"]}

    @registry.task("slow")
    def slow(payload: Any) -> Any:
        if gate is not None:
            gate.wait(5.0)
        else:
            time.sleep(float(payload.get("seconds", 0.2)))
        return {"done": True}

    @registry.task("boom")
    def boom(payload: Any) -> Any:
        raise RuntimeError("exploded on purpose")

    return registry


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


class FakeServer:
    """A scripted server: heartbeats on demand, answers according to ``mode``.

    modes: ``ok`` (answer the square), ``busy`` (rejected-busy), ``silent`` (never answer),
    ``duplicate`` (answer ok twice), ``expired`` (answer expired).
    """

    def __init__(self, broker: MemoryBroker, node: str, *, mode: str = "ok",
                 tasks: tuple[str, ...] = ("square",), service_time: float = 0.01,
                 interval: float = 1.0, session: int = 1) -> None:
        self.node = node
        self.mode = mode
        self.tasks = tasks
        self.service_time = service_time
        self.interval = interval
        self.session = session
        self.seq = 0
        self.tree = TopicTree(PREFIX)
        self.codec = Codec("cbor")
        self.received: list[Task] = []
        self.transport = MemoryTransport(broker, node)
        self.transport.connect()
        self.transport.subscribe(self.tree.task_inbox(node), self._on_task)

    def beat(self, queue_length: int = 0) -> None:
        self.seq += 1
        heartbeat = Heartbeat(node=self.node, role=Role.SERVER, session=self.session, seq=self.seq,
                              interval=self.interval, time=time.time(),
                              capabilities={name: TaskCapability() for name in self.tasks},
                              load=Load(queue_length=queue_length, workers=1,
                                        service_time={name: self.service_time for name in self.tasks}))
        self.transport.publish(self.tree.heartbeat(self.node), self.codec.encode(heartbeat))

    def state(self, status: Literal["online", "offline"], session: int | None = None) -> None:
        state = NodeState(node=self.node, role=Role.SERVER, status=status,
                          session=self.session if session is None else session, time=time.time())
        self.transport.publish(self.tree.state(self.node), self.codec.encode(state), qos=1, retain=True)

    def _on_task(self, message: Any) -> None:
        task = self.codec.decode(message.payload, Task)
        self.received.append(task)
        if self.mode == "silent":
            return
        status = {"busy": Status.REJECTED_BUSY, "expired": Status.EXPIRED}.get(self.mode, Status.OK)
        payload = {"value": task.payload["x"] ** 2} if status == Status.OK else None
        result = Result(task_id=task.id, status=status, server=self.node, task=task.task, payload=payload,
                        attempt=task.attempt, service_time=self.service_time)
        data = self.codec.encode(result)
        for _ in range(2 if self.mode == "duplicate" else 1):
            self.transport.publish(task.reply_to, data, qos=1)

    def close(self) -> None:
        self.transport.close()


@pytest.fixture
def memory() -> MemoryBroker:
    return MemoryBroker()


Cleanup = list[Callable[[], None]]


EdgeFactory = Callable[..., EdgeAgent]


@pytest.fixture
def make_edge(memory: MemoryBroker, cleanup: Cleanup) -> EdgeFactory:
    def make(*, registry: TaskRegistry | None = None, start: bool = True,
             monotonic: Callable[[], float] | None = None, **fields: Any) -> EdgeAgent:
        values: dict[str, Any] = {"id": f"dev-{uuid.uuid4().hex[:6]}", "prefix": PREFIX,
                                  "probe_interval": 0.05, "heartbeat_interval": 0.2}
        values.update(fields)
        config = EdgeConfig.model_validate(values)
        extra: dict[str, Any] = {"monotonic": monotonic} if monotonic is not None else {}
        agent = EdgeAgent(config, MemoryTransport(memory, config.id),
                          make_registry() if registry is None else registry, rng=random.Random(7), **extra)
        cleanup.append(agent.stop)
        if start:
            agent.start()
        return agent

    return make


@pytest.fixture
def make_cloud(memory: MemoryBroker, cleanup: Cleanup) -> Callable[..., tuple[CloudAgent, MemoryTransport]]:
    def make(node: str, **fields: Any) -> tuple[CloudAgent, MemoryTransport]:
        values: dict[str, Any] = {"id": node, "prefix": PREFIX, "heartbeat_interval": 0.1, "workers": 2,
                                  "grace_period": 0.0}
        values.update(fields)
        transport = MemoryTransport(memory, node)
        agent = CloudAgent(CloudConfig.model_validate(values), transport, make_registry())
        agent.start()
        cleanup.append(lambda: agent.stop(grace=0.0))
        return agent, transport

    return make


def fake(memory: MemoryBroker, cleanup: Cleanup, node: str, **kwargs: Any) -> FakeServer:
    server = FakeServer(memory, node, **kwargs)
    cleanup.append(server.close)
    return server


def collect(agent: EdgeAgent) -> list[TaskRecord]:
    records: list[TaskRecord] = []
    agent.add_record_listener(records.append)
    return records


def knows(agent: EdgeAgent, node: str, *, rtt: bool = False) -> Callable[[], bool]:
    def check() -> bool:
        return any(v.node == node and not v.stale and (v.rtt is not None or not rtt) for v in agent.servers())

    return check


# ---------------------------------------------------------------------------------------------- tests


def test_offload_happy_path_with_a_real_cloud_agent(make_edge: EdgeFactory, make_cloud: Any) -> None:
    make_cloud("srv1")
    edge = make_edge(registry=TaskRegistry(), policy="remote")
    records = collect(edge)
    wait_for(knows(edge, "srv1", rtt=True), message="srv1 probed")
    assert edge.submit("square", {"x": 7}).result(5) == {"value": 49}
    wait_for(lambda: len(records) == 1)
    record = records[0]
    assert (record.outcome, record.target, record.attempts) == ("ok", "srv1", 1)
    assert record.sent is not None and record.received is not None and record.received >= record.sent
    view = next(v for v in edge.servers() if v.node == "srv1")
    assert view.rtt is not None and view.rtt > 0 and "square" in view.tasks


def test_local_run_when_no_server_and_local_errors(make_edge: EdgeFactory) -> None:
    edge = make_edge()
    records = collect(edge)
    assert edge.submit("square", {"x": 3}).result(5) == {"value": 9}
    with pytest.raises(TaskFailed) as failed:
        edge.submit("boom", {}).result(5)
    assert failed.value.status == "error" and "exploded" in failed.value.error
    wait_for(lambda: len(records) == 2)
    assert [r.target for r in records] == ["local", "local"]
    assert records[0].service_time is not None


def test_unknown_task_and_policy_are_clear_errors(make_edge: EdgeFactory, memory: MemoryBroker,
                                                  cleanup: Cleanup) -> None:
    edge = make_edge()
    with pytest.raises(UnknownTaskError, match="unknown task 'nope'"):
        edge.submit("nope", {})
    with pytest.raises(UnknownPolicyError):
        edge.submit("square", {"x": 1}, policy="fastest")
    with pytest.raises(ValueError, match="stage"):
        edge.submit("square", {"x": 1}, stage=2)
    server = fake(memory, cleanup, "only-remote", tasks=("remote_only",))
    server.beat()
    wait_for(knows(edge, "only-remote"))
    with pytest.raises(UnknownTaskError):  # the local policy never offloads, so it must know the task
        edge.submit("remote_only", {"x": 1}, policy="local")


def test_timeout_falls_back_to_local(make_edge: EdgeFactory, memory: MemoryBroker, cleanup: Cleanup) -> None:
    server = fake(memory, cleanup, "mute", mode="silent")
    edge = make_edge(policy="remote", default_timeout=0.2)
    records = collect(edge)
    server.beat()
    wait_for(knows(edge, "mute"))
    assert edge.submit("square", {"x": 4}).result(5) == {"value": 16}
    wait_for(lambda: len(records) == 1)
    assert records[0].targets == ("mute", "local")
    assert records[0].attempts == 2
    assert edge.stats()["timeouts"] == 1
    assert len(server.received) == 1


def test_rejected_busy_retries_on_the_next_server(make_edge: EdgeFactory, memory: MemoryBroker,
                                                  cleanup: Cleanup) -> None:
    busy = fake(memory, cleanup, "busy", mode="busy", service_time=0.001)
    good = fake(memory, cleanup, "good", service_time=0.05)
    edge = make_edge(registry=TaskRegistry(), policy="ect")
    records = collect(edge)
    busy.beat()
    good.beat()
    wait_for(lambda: knows(edge, "busy")() and knows(edge, "good")())
    assert edge.submit("square", {"x": 5}).result(5) == {"value": 25}
    wait_for(lambda: len(records) == 1)
    assert records[0].targets == ("busy", "good")
    assert edge.stats()["retries"] == 1
    penalised = {v.node: v.recent_failures for v in edge.servers()}
    assert penalised["busy"] > 0.5 and penalised["good"] == 0


def test_attempts_are_bounded(make_edge: EdgeFactory, memory: MemoryBroker, cleanup: Cleanup) -> None:
    edge = make_edge(registry=TaskRegistry(), max_attempts=3)
    for node in ("b1", "b2", "b3", "b4"):
        fake(memory, cleanup, node, mode="busy").beat()
    wait_for(lambda: sum(not v.stale for v in edge.servers()) == 4)
    with pytest.raises(TaskFailed) as failed:
        edge.submit("square", {"x": 1}).result(5)
    assert failed.value.status == "rejected-busy" and failed.value.attempts == 3


def test_server_death_with_tasks_in_flight_gives_each_task_one_outcome(
        make_edge: EdgeFactory, make_cloud: Any) -> None:
    cloud, cloud_transport = make_cloud("dying", workers=1)
    edge = make_edge(policy="remote", default_timeout=30.0)
    records = collect(edge)
    wait_for(knows(edge, "dying"))
    futures = [edge.submit("slow", {"seconds": 0.3}) for _ in range(5)]
    wait_for(lambda: edge.stats().get("offloaded", 0) == 5)
    cloud_transport.abort()  # a crash: the broker publishes the Will (NodeState offline)
    for future in futures:
        assert future.result(10) == {"done": True}
    wait_for(lambda: len(records) == 5)
    # The dying server's worker finishes every task and tries to answer: none of it may count.
    wait_for(lambda: sum(cloud.stats()["completed"].values()) == 5, message="the server's answers")
    assert len(records) == 5 and len({r.task_id for r in records}) == 5
    assert all(r.targets[0] == "dying" and r.targets[-1] == "local" for r in records)
    assert edge.stats()["server_deaths_in_flight"] == 5
    assert next(v for v in edge.servers() if v.node == "dying").dead


def test_duplicate_late_unknown_and_malformed_results(make_edge: EdgeFactory, memory: MemoryBroker,
                                                      cleanup: Cleanup) -> None:
    server = fake(memory, cleanup, "echo2", mode="duplicate")
    edge = make_edge(registry=TaskRegistry())
    records = collect(edge)
    server.beat()
    wait_for(knows(edge, "echo2"))
    assert edge.submit("square", {"x": 6}).result(5) == {"value": 36}
    wait_for(lambda: edge.stats().get("late_results", 0) == 1, message="the duplicate counted")
    tree, codec = TopicTree(PREFIX), Codec("cbor")
    stranger = Result(task_id="never-sent", status=Status.OK, server="echo2", payload=1)
    server.transport.publish(tree.result_inbox(edge.id), codec.encode(stranger), qos=1)
    server.transport.publish(tree.result_inbox(edge.id), b"\xa1garbage", qos=1)
    wait_for(lambda: edge.stats().get("unknown_results", 0) == 1)
    wait_for(lambda: sum(edge.stats()["bad_input"].values()) == 1)
    assert len(records) == 1 and edge.stats()["outcome_ok"] == 1


def test_stale_server_is_not_chosen_and_a_new_session_revives_it(
        make_edge: EdgeFactory, memory: MemoryBroker, cleanup: Cleanup) -> None:
    clock = FakeClock()
    server = fake(memory, cleanup, "fading", interval=1.0)
    edge = make_edge(policy="remote", monotonic=clock, stale_after=3)
    records = collect(edge)
    server.beat()
    wait_for(knows(edge, "fading"))
    clock.advance(3.5)  # three missed heartbeats of 1 s
    assert all(v.stale for v in edge.servers())
    assert edge.submit("square", {"x": 2}).result(5) == {"value": 4}
    server.state("offline", session=0)  # a late Will of an older session changes nothing
    server.session = 2
    server.beat()
    wait_for(knows(edge, "fading"))
    assert edge.submit("square", {"x": 3}).result(5) == {"value": 9}
    wait_for(lambda: len(records) == 2)
    assert [r.target for r in records] == ["local", "fading"]
    assert records[0].reason == "stale"
    server.state("offline", session=1)  # old session's death: still alive
    # Messages reach the device in publish order: once a later heartbeat of another server is
    # known, the old death has been handled.
    fake(memory, cleanup, "marker").beat()
    wait_for(knows(edge, "marker"), message="the marker heartbeat")
    assert knows(edge, "fading")()
    server.state("offline", session=2)
    wait_for(lambda: not knows(edge, "fading")())


def test_hysteresis_keeps_the_previous_server(make_edge: EdgeFactory, memory: MemoryBroker,
                                              cleanup: Cleanup) -> None:
    servers = [fake(memory, cleanup, node) for node in ("twin-a", "twin-b")]
    edge = make_edge(registry=TaskRegistry(), policy="remote")  # ect draws instead: no herd to keep
    records = collect(edge)
    for server in servers:
        server.beat()
    wait_for(lambda: knows(edge, "twin-a")() and knows(edge, "twin-b")())
    for x in range(8):
        assert edge.submit("square", {"x": x}).result(5) == {"value": x * x}
        for server in servers:  # reports reset sent_since_report, as a real fleet would
            server.beat()
        wait_for(lambda: all(v.sent_since_report == 0 for v in edge.servers()))
    wait_for(lambda: len(records) == 8)
    assert len({r.target for r in records}) == 1
    # Kept by hysteresis, or because its answers measured it (the twin is known from pings only).
    assert {r.reason for r in records[1:]} <= {"keep-previous", "lowest-ect"}


def test_offline_start_runs_locally_then_resumes_offloading(make_edge: EdgeFactory, memory: MemoryBroker,
                                                           make_cloud: Any) -> None:
    memory.online = False
    edge = make_edge(policy="remote")
    records = collect(edge)
    assert not edge.connected
    assert edge.submit("square", {"x": 8}).result(5) == {"value": 64}
    memory.online = True
    wait_for(lambda: edge.connected, timeout=10.0, message="edge reconnected")
    make_cloud("late-server")
    wait_for(knows(edge, "late-server"))
    assert edge.submit("square", {"x": 9}).result(5) == {"value": 81}
    wait_for(lambda: len(records) == 2)
    assert [r.target for r in records] == ["local", "late-server"]


def test_full_local_queue_rejects_and_stop_gives_one_outcome(make_edge: EdgeFactory) -> None:
    gate = threading.Event()
    edge = make_edge(registry=make_registry(gate), local_workers=1, local_queue_size=1)
    records = collect(edge)
    first = edge.submit("slow", {})
    second = edge.submit("slow", {})
    with pytest.raises(TaskFailed) as failed:
        edge.submit("slow", {}).result(5)
    assert failed.value.status == "rejected-busy"
    edge.stop()
    gate.set()
    for future in (first, second):
        with pytest.raises(TaskFailed, match="stopped"):
            future.result(5)
    # The released local run ends after its task was failed: its late finish must add nothing.
    wait_for(lambda: edge.stats()["local_running"] == 0, message="the local run to end")
    assert len(records) == 3 and len({r.task_id for r in records}) == 3
    with pytest.raises(RuntimeError):
        edge.submit("square", {"x": 1})


def test_deadline_expires_and_bounds_the_attempt(make_edge: EdgeFactory, memory: MemoryBroker,
                                                 cleanup: Cleanup) -> None:
    clock = FakeClock()  # frozen: only the deadline can end the attempt, not the 30 s timeout
    server = fake(memory, cleanup, "late", mode="silent")
    edge = make_edge(registry=TaskRegistry(), default_timeout=30.0, monotonic=clock)
    server.beat()
    wait_for(knows(edge, "late"))
    future = edge.submit("square", {"x": 1}, deadline=0.2)
    wait_for(lambda: len(server.received) == 1, message="the task reached the silent server")
    assert not future.done()
    clock.advance(0.25)  # past the deadline, far short of the default timeout
    with pytest.raises(TaskFailed) as failed:
        future.result(5)
    assert failed.value.status in ("timeout", "expired")
    assert server.received[0].ttl is not None and server.received[0].deadline is None  # relative on the wire


def test_device_heartbeats_and_birth_are_published(make_edge: EdgeFactory, memory: MemoryBroker) -> None:
    seen: list[Heartbeat] = []
    codec, tree = Codec("cbor"), TopicTree(PREFIX)
    watcher = MemoryTransport(memory, "watcher")
    watcher.connect()
    watcher.subscribe(tree.all_of(Kind.HEARTBEAT),
                      lambda m: seen.append(codec.decode(m.payload, Heartbeat)))
    edge = make_edge(heartbeat_interval=0.05)
    edge.submit("square", {"x": 1}).result(5)
    # Heartbeats sent before the local run finished carry no service time yet: wait for one that does.
    wait_for(lambda: len(seen) >= 2 and any("square" in beat.load.service_time for beat in seen))
    beat = next(beat for beat in reversed(seen) if "square" in beat.load.service_time)
    assert beat.role == "device" and beat.node == edge.id and "square" in beat.capabilities
    assert tree.state(edge.id) in memory.retained
    watcher.close()


def test_payload_size_estimates() -> None:
    import numpy as np

    assert payload_size(b"abc") == 3
    assert payload_size(np.zeros((4, 4), dtype=np.uint8)) >= 16
    assert payload_size({"x": [1, 2, 3]}) > payload_size({"x": 1})


def test_server_table_sessions_probes_bandwidth_and_failures() -> None:
    from edge_agent.servers import MIN_BANDWIDTH_BYTES, ServerTable

    table = ServerTable(stale_after=3, half_life=10.0, ignore=frozenset({"me-peer"}))

    def beat(node: str, session: int, seq: int, role: Role = Role.SERVER) -> bool:
        return table.on_heartbeat(Heartbeat(node=node, role=role, session=session, seq=seq, interval=1.0,
                                            time=0.0, capabilities={"square": TaskCapability()}), 0.0)

    def state(status: Literal["online", "offline"], session: int) -> bool:
        return table.on_state(NodeState(node="s", role=Role.SERVER, status=status,
                                        session=session, time=0.0), 0.0)

    assert not beat("me-peer", 1, 1) and not beat("phone", 1, 1, Role.DEVICE)  # never servers
    assert beat("s", 5, 1) and not beat("s", 5, 1) and not beat("s", 4, 9)  # duplicate, old session
    assert not state("offline", 4)  # a late Will of an older session
    assert not table.stale("s", 0.0)
    assert state("offline", 5) and table.stale("s", 0.0)
    assert not beat("s", 5, 1)  # sent before the death
    assert beat("s", 5, 2) and not table.stale("s", 0.0)  # newer: the same session reconnected
    assert beat("s", 6, 1) and table.counters["sessions_replaced"] == 1
    assert table.stale("s", 3.01) and not table.stale("s", 2.99)

    table.ping_sent("s", 1, 10.0)
    assert table.on_pong("s", 1, 10.0, 10.004) == pytest.approx(0.004)
    assert table.on_pong("s", 1, 10.0, 10.004) is None  # answered twice
    table.ping_sent("s", 2, 11.0)
    table.on_pong("s", 2, 11.0, 11.012)
    view = table.views(11.0)[0]
    # Pings are sparse: gain 1/2, and more as the previous pong ages (a second here).
    assert view.rtt == pytest.approx(0.004 + aged_gain(0.5, 11.012 - 10.004, 2.0) * (0.012 - 0.004))
    assert view.rtt_dev > 0

    table.transfer_observed("s", 100, 0.5, 0.0)  # too small to say anything about bandwidth
    assert table.views(11.0)[0].bandwidth is None
    table.transfer_observed("s", MIN_BANDWIDTH_BYTES * 10, 0.105, 0.0)
    assert view.rtt is not None
    assert table.views(11.0)[0].bandwidth == pytest.approx(MIN_BANDWIDTH_BYTES * 10 / (0.105 - view.rtt))

    table.failure("s", 20.0)
    table.failure("s", 20.0)
    assert table.snapshot("square", 30.0)[0].recent_failures == pytest.approx(1.0)  # halved in 10 s
    table.task_sent("s")
    assert table.snapshot("square", 30.0)[0].sent_since_report == 1
    beat("s", 6, 2)
    assert table.snapshot("square", 30.0)[0].sent_since_report == 0
    assert table.announces("square") and not table.announces("cube")


def test_sent_since_report_counts_only_tasks_still_waiting_on_the_server() -> None:
    from edge_agent.servers import ServerTable

    table = ServerTable(stale_after=3, half_life=10.0)
    table.on_heartbeat(Heartbeat(node="s", role=Role.SERVER, session=1, seq=1, interval=1.0, time=0.0,
                                 capabilities={"square": TaskCapability()}), 0.0)

    def waiting() -> int:
        return table.snapshot("square", 0.0)[0].sent_since_report

    for _ in range(5):
        table.task_sent("s")
    assert waiting() == 5
    table.task_done("s", answered=True)      # a result came back: no longer queued there
    table.task_done("s", answered=True)
    table.task_done("s")                     # timed out: it may still wait on the server
    assert waiting() == 3
    table.on_heartbeat(Heartbeat(node="s", role=Role.SERVER, session=1, seq=2, interval=1.0, time=0.0,
                                 capabilities={"square": TaskCapability()}), 0.5)
    assert waiting() == 0                    # the report counts them now
    table.task_done("s", answered=True)
    assert waiting() == 0                    # never below zero


def test_attempt_timeout_ignores_the_failure_penalty() -> None:
    from edge_agent.core import DeviceCore, Send
    from edge_agent.policy import PolicyConfig
    from edge_agent.servers import ServerReport
    from edge_agent.tuning import Tuning

    core = DeviceCore("dev", local_tasks=set(), tuning=Tuning(default_timeout=0.1, timeout_factor=4.0),
                      policy_config=PolicyConfig(default_rtt=0.01, default_service_time=0.04,
                                                 failure_penalty=0.5),
                      rng=random.Random(1))
    core.link_up(0.0)
    core.heartbeat(ServerReport("s", 1, 1, 1.0, frozenset({"square"})), 0.0)
    for _ in range(4):
        core.table.failure("s", 0.0)
    penalty = core.policy_config.failure_penalty * core.table.recent_failures("s", 0.0)
    assert penalty > 1.0
    actions = core.submit("t", "square", 0, 0.0)
    send = next(a for a in actions if isinstance(a, Send))
    decision = send.task.decision
    assert decision is not None and decision.expected == pytest.approx(0.05 + penalty)
    # The timeout derives from the quantile: 50 ms + 2 x (10 + 40 ms of spread for the unknown figures).
    assert decision.quantile == pytest.approx(0.15 + penalty)
    assert send.timer.at == pytest.approx(4.0 * 0.15)


def test_submit_returns_a_handle_with_the_task_id_and_its_record(make_edge: EdgeFactory,
                                                                 make_cloud: Any) -> None:
    make_cloud("srv-h")
    edge = make_edge(registry=TaskRegistry(), policy="remote")
    wait_for(knows(edge, "srv-h"))
    handle = edge.submit("square", {"x": 3})
    assert isinstance(handle, concurrent.futures.Future) and handle.record is None
    assert handle.result(5) == {"value": 9}
    record = handle.record
    assert record is not None and record.task_id == handle.task_id
    assert (record.target, record.outcome, record.attempts) == ("srv-h", "ok", 1)


def test_from_config_reads_a_file_loads_its_tasks_and_is_a_context_manager(tmp_path: Any) -> None:
    path = tmp_path / "device.toml"
    path.write_text('id = "cam-from-file"\ntasks = ["examples.tasks"]\nlocal_workers = 2\n')
    with EdgeAgent.from_config(path) as agent:
        assert agent.config.local_workers == 2 and not agent.connected  # no broker: all local
        handle = agent.submit("square", {"x": 4})
        assert handle.result(5) == {"y": 16}
        assert handle.record is not None and handle.record.target == "local"
    with pytest.raises(RuntimeError):
        agent.submit("square", {"x": 1})  # stopped on exit
