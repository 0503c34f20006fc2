"""The edge agent against hostile input and its own link failing (issue 12, device side).

* pings answered only on the pinger's own pong topic (a poison ``reply_to`` cannot get the device
  disconnected by Mosquitto);
* absurd numbers from a made-up server, or any exception while deciding, end a task with an outcome;
  every task has one at its deadline at the latest;
* task ids cannot be predicted from the session number heartbeats show;
* attempt timeouts derived from the deadline: a 1 s task can time out a silent server and run locally;
* attempts re-sent when the device's own link comes back (in memory, and with Mosquitto restarted).
"""

from __future__ import annotations

import random
import statistics
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any, Literal

import cbor2
import pytest
from brokers_support import BrokerEndpoint, wait_for

from agent_common.registry import TaskRegistry, load_tasks
from cloud_agent.config import CloudConfig
from cloud_agent.server import CloudAgent
from edge_agent.agent import EdgeAgent, attempt_timeout
from edge_agent.config import EdgeConfig
from edge_agent.records import TaskFailed, TaskRecord
from topics.brokers import MosquittoBroker
from topics.codec import Codec
from topics.memory import MemoryBroker, MemoryTransport
from topics.models import Heartbeat, Load, NodeState, Result, Role, Status, Task, TaskCapability
from topics.mqtt import MqttTransport
from topics.names import TopicTree
from topics.transport import Message, NotConnectedError

PREFIX = "test/hostile"
Cleanup = list[Callable[[], None]]


def square_registry(gate: threading.Event | None = None) -> TaskRegistry:
    registry = TaskRegistry()

    @registry.task("square")
    def square(payload: Any) -> Any:
        if gate is not None:
            gate.wait(10.0)
        return {"value": payload["x"] ** 2}

    return registry


class ScriptedServer:
    """A server built from ``topics`` only: heartbeats on demand; answers tasks unless told not to."""

    def __init__(self, broker: MemoryBroker, node: str, *, answer: bool = True, session: int = 1) -> None:
        self.node, self.answer, self.session, self.seq = node, answer, session, 0
        self.tree, self.codec = TopicTree(PREFIX), Codec("cbor")
        self.received: list[Task] = []
        self.transport = MemoryTransport(broker, node)
        self.transport.connect()
        self.transport.subscribe(self.tree.task_inbox(node), self._on_task)

    def beat(self, **load: Any) -> None:
        self.seq += 1
        heartbeat = Heartbeat(node=self.node, role=Role.SERVER, session=self.session, seq=self.seq,
                              interval=1.0, time=time.time(), capabilities={"square": TaskCapability()},
                              load=Load(service_time={"square": 0.001}, **load))
        self.transport.publish(self.tree.heartbeat(self.node), self.codec.encode(heartbeat))

    def state(self, status: Literal["online", "offline"]) -> None:
        state = NodeState(node=self.node, role=Role.SERVER, status=status,
                          session=self.session, time=time.time())
        self.transport.publish(self.tree.state(self.node), self.codec.encode(state), qos=1, retain=True)

    def _on_task(self, message: Message) -> None:
        task = self.codec.decode(message.payload, Task)
        self.received.append(task)
        if self.answer:
            result = Result(task_id=task.id, status=Status.OK, server=self.node, task=task.task,
                            payload={"value": task.payload["x"] ** 2}, attempt=task.attempt)
            self.transport.publish(task.reply_to, self.codec.encode(result), qos=1)


def make_edge(memory: MemoryBroker, cleanup: Cleanup, *, registry: TaskRegistry | None = None,
              **fields: Any) -> tuple[EdgeAgent, MemoryTransport]:
    values: dict[str, Any] = {"id": f"dev-{uuid.uuid4().hex[:6]}", "prefix": PREFIX, "probe_interval": 0.05,
                              "heartbeat_interval": 0.2}
    values.update(fields)
    config = EdgeConfig.model_validate(values)
    transport = MemoryTransport(memory, config.id)
    agent = EdgeAgent(config, transport, square_registry() if registry is None else registry,
                      rng=random.Random(3))
    cleanup.append(agent.stop)
    agent.start()
    return agent, transport


def scripted(memory: MemoryBroker, cleanup: Cleanup, node: str, **kwargs: Any) -> ScriptedServer:
    server = ScriptedServer(memory, node, **kwargs)
    cleanup.append(server.transport.close)
    return server


def usable(agent: EdgeAgent, node: str) -> Callable[[], bool]:
    def check() -> bool:
        return any(v.node == node and not v.stale for v in agent.servers())

    return check


def completed(server: CloudAgent, count: int) -> Callable[[], bool]:
    """Whether ``server`` has completed ``count`` tasks, whatever their status."""
    def check() -> bool:
        by_status: dict[str, int] = server.stats()["completed"]
        return sum(by_status.values()) == count

    return check


def records_of(agent: EdgeAgent) -> list[TaskRecord]:
    records: list[TaskRecord] = []
    agent.add_record_listener(records.append)
    return records


# ------------------------------------------------------------------------------------ 1. pings


@pytest.mark.mosquitto
def test_poison_ping_reply_to_is_refused_and_the_device_stays_connected(
        mosquitto_broker: MosquittoBroker, topic_prefix: str, cleanup: Cleanup) -> None:
    """Mosquitto disconnects a client publishing to a topic with a control character: the device
    must never answer there, nor into another node's topics; only the pinger's own pong topic."""
    tree = TopicTree(topic_prefix)
    config = EdgeConfig(id="pinged", broker=mosquitto_broker.url, prefix=topic_prefix, heartbeat_interval=5.0)
    edge = EdgeAgent(config, MqttTransport(config.transport_config()), square_registry())
    edge.start()
    cleanup.append(edge.stop)
    seen: list[str] = []
    watcher = MqttTransport(config.transport_config(client_id="watcher"))
    watcher.subscribe(f"{topic_prefix}/#", lambda m: seen.append(m.topic), qos=0)
    watcher.subscribe("homeassistant/#", lambda m: seen.append(m.topic), qos=0)
    watcher.connect()
    cleanup.append(watcher.close)
    attacker = MqttTransport(config.transport_config(client_id="attacker"))
    attacker.connect()
    cleanup.append(attacker.close)

    def ping(reply_to: str, sender: str = "attacker") -> None:  # raw CBOR: no model checks on our side
        message = {"v": 1, "nonce": 1, "sender": sender, "reply_to": reply_to, "sent": 1.5}
        attacker.publish(tree.ping("pinged"), cbor2.dumps(message))

    poisons = [f"{topic_prefix}/node/attacker/po\x01ng", f"{topic_prefix}/node/attacker/pong\x85",
               tree.pong("victim"), tree.task_inbox("victim"), "homeassistant/switch/pump/set"]
    for reply_to in poisons:
        ping(reply_to)
    ping(tree.pong("attacker"))  # the positive control, published after the poisons
    wait_for(lambda: tree.pong("attacker") in seen, message="the control pong")
    answered = [topic for topic in seen if topic in poisons or topic == tree.pong("attacker")]
    assert answered == [tree.pong("attacker")]
    bad = edge.stats()["bad_input"]
    assert sum(count for reason, count in bad.items() if reason.startswith("ping-")) == len(poisons)
    assert edge.connected and edge.stats()["transport"]["disconnects"] == 0


def test_ping_reply_allowlist(cleanup: Cleanup) -> None:
    memory = MemoryBroker()
    edge, _ = make_edge(memory, cleanup, ping_reply_allow=["tools/+/pong"])
    prober = MemoryTransport(memory, "prober")
    prober.connect()
    cleanup.append(prober.close)
    got: list[str] = []
    prober.subscribe("tools/#", lambda m: got.append(m.topic))
    prober.subscribe(f"{PREFIX}/node/+/pong", lambda m: got.append(m.topic))
    tree = TopicTree(PREFIX)
    for reply_to in ("tools/x/other", f"{PREFIX}/node/{edge.id}/state", "tools/x/pong"):
        prober.publish(tree.ping(edge.id), cbor2.dumps({"v": 1, "nonce": 2, "sender": "prober",
                                                         "reply_to": reply_to, "sent": 0.0}))
    wait_for(lambda: got == ["tools/x/pong"])
    assert edge.stats()["bad_input"] == {"ping-reply-to-not-allowed": 2}


# ---------------------------------------------------------------- 2. absurd numbers, broken decisions


def test_heartbeat_with_a_401_digit_queue_cannot_break_submit(cleanup: Cleanup) -> None:
    memory = MemoryBroker()
    edge, _ = make_edge(memory, cleanup, registry=TaskRegistry(), policy="remote")
    good = scripted(memory, cleanup, "good")
    liar = MemoryTransport(memory, "liar")
    liar.connect()
    cleanup.append(liar.close)
    huge = 10**400
    liar_beat = {"v": 1, "node": "liar", "role": "server", "session": 1, "seq": 1, "interval": 1.0,
                 "time": time.time(), "capabilities": {"square": {"executor": "thread"}},
                 "load": {"queue_length": huge, "in_flight": huge, "queue_capacity": huge, "workers": 1}}
    liar.publish(TopicTree(PREFIX).heartbeat("liar"), cbor2.dumps(liar_beat))
    good.beat()
    wait_for(usable(edge, "good"))
    # The liar is either refused by the decoder (bounded models) or clamped by the server table;
    # either way deciding does no arithmetic on a 401-digit number.
    wait_for(lambda: usable(edge, "liar")() or bool(edge.stats()["bad_input"]), message="liar handled")
    records = records_of(edge)
    for x in range(5):
        assert edge.submit("square", {"x": x}, deadline=2.0).result(5) == {"value": x * x}
    wait_for(lambda: len(records) == 5)
    assert {r.target for r in records} == {"good"}
    assert edge.stats().get("decision_errors", 0) == 0


def test_an_exception_while_deciding_ends_the_task_and_never_escapes_submit(
        cleanup: Cleanup, monkeypatch: pytest.MonkeyPatch) -> None:
    memory = MemoryBroker()
    edge, _ = make_edge(memory, cleanup, registry=TaskRegistry(), policy="remote", default_timeout=30.0)
    silent = scripted(memory, cleanup, "silent", answer=False)
    silent.beat()
    wait_for(usable(edge, "silent"))
    in_flight = edge.submit("square", {"x": 2})
    wait_for(lambda: len(silent.received) == 1)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise OverflowError("int too large to convert to float")

    monkeypatch.setattr(type(edge.core.table), "snapshot", broken)
    fresh = edge.submit("square", {"x": 3})  # does not raise
    with pytest.raises(TaskFailed) as failed:
        fresh.result(2)
    assert failed.value.status == "failed" and "OverflowError" in failed.value.error
    started = time.monotonic()
    silent.state("offline")  # its server dies while the decision path is broken
    with pytest.raises(TaskFailed) as died:
        in_flight.result(5)
    assert died.value.status == "failed" and time.monotonic() - started < 2.0  # not the 30 s timeout
    assert edge.stats()["decision_errors"] == 2 and edge.stats()["in_flight"] == 0


def test_every_task_has_its_outcome_at_its_deadline(cleanup: Cleanup) -> None:
    gate = threading.Event()
    cleanup.append(gate.set)
    edge, _ = make_edge(MemoryBroker(), cleanup, registry=square_registry(gate), local_workers=1)
    started = time.monotonic()
    running = edge.submit("square", {"x": 1}, deadline=0.3)  # blocked in the local worker
    queued = edge.submit("square", {"x": 2}, deadline=0.4)   # waits behind it
    for future in (running, queued):
        with pytest.raises(TaskFailed) as failed:
            future.result(3)
        assert failed.value.status == "expired"
    assert time.monotonic() - started < 1.5 and not gate.is_set()
    assert edge.stats()["deadline_outcomes"] == 2


# ------------------------------------------------------------------------------------- 3. task ids


def test_task_ids_are_not_predictable_from_the_session(cleanup: Cleanup) -> None:
    memory = MemoryBroker()
    frozen = 1_700_000_000.0
    records: list[TaskRecord] = []
    for _ in range(2):  # two devices started in the same millisecond: the same session number
        config = EdgeConfig(id=f"twin-{uuid.uuid4().hex[:4]}", prefix=PREFIX)
        agent = EdgeAgent(config, MemoryTransport(memory, config.id), square_registry(), clock=lambda: frozen)
        cleanup.append(agent.stop)
        agent.start()
        agent.add_record_listener(records.append)
        agent.submit("square", {"x": 1}).result(5)
    wait_for(lambda: len(records) == 2)
    ids = [record.task_id for record in records]
    session = f"{int(frozen * 1000):x}"
    assert ids[0] != ids[1]
    assert not any(session in task_id for task_id in ids)
    assert all(len(task_id.split("-")[0]) >= 16 for task_id in ids)  # >= 64 random bits


# ------------------------------------------------------------------------ 4. short deadlines retry


def test_attempt_timeout_is_derived_from_the_deadline() -> None:
    common = {"default_timeout": 5.0, "factor": 4.0, "share": 0.5, "ceiling": 3600.0}
    assert attempt_timeout(0.002, None, alternative=True, **common) == 5.0
    assert attempt_timeout(2.0, None, alternative=True, **common) == 8.0
    assert attempt_timeout(float("inf"), None, alternative=False, **common) == 3600.0
    assert attempt_timeout(0.002, 1.0, alternative=True, **common) == 0.5      # room for a retry
    assert attempt_timeout(0.2, 1.0, alternative=True, **common) == pytest.approx(0.8)
    assert attempt_timeout(0.002, 1.0, alternative=False, **common) == 1.0     # nowhere else to go
    assert attempt_timeout(0.002, 60.0, alternative=True, **common) == 5.0
    assert attempt_timeout(0.002, -1.0, alternative=True, **common) == 0.0


def test_a_one_second_task_times_out_a_silent_server_and_runs_locally(cleanup: Cleanup) -> None:
    memory = MemoryBroker()
    edge, _ = make_edge(memory, cleanup, policy="remote", default_timeout=5.0)
    silent = scripted(memory, cleanup, "silent", answer=False)
    silent.beat()
    wait_for(usable(edge, "silent"))
    records = records_of(edge)
    started = time.monotonic()
    assert edge.submit("square", {"x": 4}, deadline=1.0).result(3) == {"value": 16}
    assert time.monotonic() - started < 1.0
    wait_for(lambda: len(records) == 1)
    assert records[0].targets == ("silent", "local") and records[0].outcome == "ok"
    assert edge.stats()["timeouts"] == 1


# ------------------------------------------------------------------- 5. the device's own link


def test_attempt_is_resent_when_the_link_comes_back_and_the_server_is_heard(cleanup: Cleanup) -> None:
    memory = MemoryBroker()
    edge, transport = make_edge(memory, cleanup, registry=TaskRegistry(), policy="remote",
                                default_timeout=30.0)
    server = scripted(memory, cleanup, "srv", answer=False)  # the first copy's result is "lost"
    server.beat()
    wait_for(usable(edge, "srv"))
    records = records_of(edge)
    future = edge.submit("square", {"x": 5})
    wait_for(lambda: len(server.received) == 1)
    transport.abort()  # the device's link drops (its Will goes out) ...
    transport.connect()  # ... and comes back: the result may have been lost meanwhile
    wait_for(lambda: edge.stats()["waiting_for_resend"] == 1, message="the attempt waits for its server")
    assert not usable(edge, "srv")()  # not offered until heard from over the new link
    server.answer = True
    server.beat()
    assert future.result(5) == {"value": 25}
    wait_for(lambda: len(records) == 1)
    assert [t.attempt for t in server.received] == [1, 1]  # the same attempt, re-sent
    assert records[0].attempts == 1 and edge.stats()["resends"] == 1


class DroppingTransport(MemoryTransport):
    """Refuses the next task publish as if the link had just dropped (the agent decided while it
    was still up)."""

    drop_next_task = False

    def publish(self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False) -> None:
        if self.drop_next_task and topic.endswith("/task"):
            self.drop_next_task = False
            raise NotConnectedError("link dropped", topic=topic)
        super().publish(topic, payload, qos=qos, retain=retain)


def test_attempt_refused_by_a_dropping_link_waits_and_is_resent(cleanup: Cleanup) -> None:
    memory = MemoryBroker()
    config = EdgeConfig(id="dropper", prefix=PREFIX, policy="remote", default_timeout=30.0)
    transport = DroppingTransport(memory, config.id)
    edge = EdgeAgent(config, transport, TaskRegistry())
    cleanup.append(edge.stop)
    edge.start()
    server = scripted(memory, cleanup, "srv")
    server.beat()
    wait_for(usable(edge, "srv"))
    transport.drop_next_task = True
    future = edge.submit("square", {"x": 6}, deadline=10.0)
    wait_for(lambda: edge.stats()["waiting_for_resend"] == 1)
    assert not future.done() and server.received == []
    server.beat()  # heard from again
    assert future.result(5) == {"value": 36}
    assert edge.stats()["resends"] == 1 and [t.attempt for t in server.received] == [1]


def test_server_death_with_no_alternative_waits_for_its_return(cleanup: Cleanup) -> None:
    """A broker restart fires every Will: a task with nowhere else to go waits for its server."""
    memory = MemoryBroker()
    edge, _ = make_edge(memory, cleanup, registry=TaskRegistry(), policy="remote", default_timeout=30.0)
    server = scripted(memory, cleanup, "srv", answer=False)
    server.beat()
    wait_for(usable(edge, "srv"))
    future = edge.submit("square", {"x": 7})
    wait_for(lambda: len(server.received) == 1)
    server.state("offline")
    wait_for(lambda: edge.stats().get("waiting_for_server", 0) == 1)
    assert not future.done()
    server.answer = True
    server.beat()  # the same session is back
    assert future.result(5) == {"value": 49}
    assert edge.stats()["resends"] == 1


# ------------------------------------------------------------------ 5. with Mosquitto restarted


class Gate:
    """A server task ``held`` that runs until the test lets it finish."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()

    def held(self, payload: Any) -> Any:
        self.entered.set()
        if not self.release.wait(30.0):
            raise TimeoutError("the test never released the held task")
        return {"held": payload}


def _stack(endpoint: BrokerEndpoint, cleanup: Cleanup, prefix: str,
           gate: Gate) -> tuple[EdgeAgent, CloudAgent, MqttTransport]:
    server_config = CloudConfig.model_validate({
        "id": "phoenix", "broker": endpoint.url, "prefix": prefix, "heartbeat_interval": 0.5, "workers": 2,
        "grace_period": 0.0})
    server_transport = MqttTransport(endpoint.config("phoenix", reconnect_max_delay=0.5), name="phoenix")
    registry = load_tasks("agent_common.demo_tasks")
    registry.task("held")(gate.held)
    server = CloudAgent(server_config, server_transport, registry)
    server.start()
    cleanup.append(lambda: server.stop(grace=0.0))
    config = EdgeConfig(id="edge-r", broker=endpoint.url, prefix=prefix, policy="remote", probe_interval=0.2,
                        heartbeat_interval=1.0, default_timeout=20.0, reconnect_max_delay=0.5)
    edge = EdgeAgent(config, MqttTransport(config.transport_config(), name="edge-r"), TaskRegistry())
    edge.start()
    cleanup.append(edge.stop)
    return edge, server, server_transport


def _restart_cycles(endpoint: BrokerEndpoint, cleanup: Cleanup, prefix: str, cycles: int,
                    down_for: float) -> list[float]:
    """Take the broker down ``cycles`` times while a task runs on the server, whose result is then
    published into the outage and lost; return the seconds from each restart until a new task was
    offloaded and answered again. The held task can only be answered by a re-send."""
    gate = Gate()
    edge, server, server_link = _stack(endpoint, cleanup, prefix, gate)
    outcomes: Counter[str] = Counter()
    edge.add_record_listener(lambda record: outcomes.update([record.task_id]))
    wait_for(usable(edge, "phoenix"), timeout=10.0)
    assert isinstance(endpoint.broker, MosquittoBroker)
    back: list[float] = []
    for cycle in range(cycles):
        gate.release.clear()
        gate.entered.clear()
        answered = sum(server.stats()["completed"].values())
        in_flight = edge.submit("held", cycle, deadline=down_for + 8.0)
        # Its own start, not the server's in_flight count: the previous cycle's square may still
        # be finishing its bookkeeping after its result went out.
        wait_for(gate.entered.is_set, message="the held task running on the server")
        went_down = time.monotonic()
        endpoint.broker.stop()
        # Released only once the server knows its link is gone: a result handed to paho just before
        # that would be delivered after the reconnect, with no re-send needed.
        wait_for(lambda: not server_link.connected, message="the server noticing the outage")
        gate.release.set()  # its result goes out while the broker is down: lost
        wait_for(completed(server, answered + 1), message="the server's answer into the outage")
        time.sleep(max(0.0, down_for - (time.monotonic() - went_down)))  # the outage itself
        endpoint.broker.start()
        restarted = time.monotonic()
        wait_for(usable(edge, "phoenix"), timeout=10.0, message=f"phoenix usable again (cycle {cycle})")
        assert edge.submit("square", {"x": cycle}, deadline=5.0).result(5) == {"y": cycle * cycle}
        back.append(time.monotonic() - restarted)
        assert in_flight.result(10) == {"held": cycle}  # re-sent after the restart, within its deadline
    assert len(outcomes) == 2 * cycles and set(outcomes.values()) == {1}  # one outcome per task
    stats = edge.stats()
    assert stats["outcome_ok"] == 2 * cycles and stats["resends"] >= cycles
    print(f"\nbroker restarts: {cycles}, down {down_for}s each; offloading back after "
          f"max {max(back):.2f}s, median {statistics.median(back):.2f}s; resends {stats['resends']}")
    return back


@pytest.mark.mosquitto
def test_broker_restarts_offloading_back_and_tasks_in_flight_resent(
        broker_factory: Callable[..., BrokerEndpoint], topic_prefix: str, cleanup: Cleanup) -> None:
    back = _restart_cycles(broker_factory("mosquitto-3.1.1"), cleanup, topic_prefix, cycles=3, down_for=1.0)
    assert max(back) < 5.0


@pytest.mark.slow
@pytest.mark.mosquitto
@pytest.mark.timeout(300)
def test_twenty_broker_restarts_offloading_back_within_five_seconds_each(
        broker_factory: Callable[..., BrokerEndpoint], topic_prefix: str, cleanup: Cleanup) -> None:
    back = _restart_cycles(broker_factory("mosquitto-3.1.1"), cleanup, topic_prefix, cycles=20, down_for=3.0)
    assert max(back) < 5.0

