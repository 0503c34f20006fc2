"""A hedged task on a real broker: a fast server that drops a share of its tasks beside a clean one."""

from __future__ import annotations

import threading
import time

import pytest
from brokers_support import BrokerEndpoint, Stack, start_cloud, start_edge, wait_for

from agent_common.registry import TaskRegistry
from edge_agent.core import HEDGE_BURST
from edge_agent.records import TaskRecord
from topics.codec import Codec
from topics.models import Heartbeat, Load, Result, Role, Status, Task, TaskCapability
from topics.mqtt import MqttTransport
from topics.names import TopicTree
from topics.transport import Message


class DroppingServer:
    """A server made of ``topics`` only that answers ``square`` at once but drops every ``every``-th
    task it receives, the first one included; heartbeats every 0.2 s from a thread."""

    def __init__(self, target: BrokerEndpoint, prefix: str, node: str, *, every: int) -> None:
        self.node, self.every = node, every
        self.tree, self.codec = TopicTree(prefix), Codec("cbor")
        self.received: list[tuple[str, int]] = []
        self.dropped: list[tuple[str, int]] = []
        self.stopped = threading.Event()
        self.transport = MqttTransport(target.config(node), name=node)
        self.transport.connect()
        self.transport.subscribe(self.tree.task_inbox(node), self._on_task)
        self.beats = threading.Thread(target=self._beat, daemon=True)
        self.beats.start()

    def _beat(self) -> None:
        seq = 0
        while not self.stopped.is_set():
            seq += 1
            heartbeat = Heartbeat(node=self.node, role=Role.SERVER, session=1, seq=seq, interval=0.2,
                                  time=time.time(), capabilities={"square": TaskCapability()},
                                  load=Load(workers=4, service_time={"square": 0.001}))
            self.transport.publish(self.tree.heartbeat(self.node), self.codec.encode(heartbeat))
            self.stopped.wait(0.2)

    def _on_task(self, message: Message) -> None:
        task = self.codec.decode(message.payload, Task)
        key = (task.id, task.attempt)
        index = len(self.received)
        self.received.append(key)
        if index % self.every == 0:
            self.dropped.append(key)
            return
        result = Result(task_id=task.id, status=Status.OK, server=self.node, task=task.task,
                        payload={"y": task.payload["x"] ** 2}, attempt=task.attempt)
        self.transport.publish(task.reply_to, self.codec.encode(result), qos=1)

    def close(self) -> None:
        self.stopped.set()
        self.beats.join(2.0)
        self.transport.close()


def test_a_hedged_task_completes_once_when_the_lossy_server_drops_it(
        broker: BrokerEndpoint, topic_prefix: str, stack: Stack) -> None:
    lossy = DroppingServer(broker, topic_prefix, "lossy", every=4)
    stack.append(lossy.close)
    start_cloud(broker, stack, topic_prefix, "clean")
    edge = start_edge(broker, stack, topic_prefix, registry=TaskRegistry(), default_timeout=0.3,
                      probe_interval=0.2)
    records: list[TaskRecord] = []
    edge.add_record_listener(records.append)
    def both() -> bool:
        return {v.node for v in edge.servers() if not v.stale and "square" in v.tasks} == {"lossy", "clean"}

    wait_for(both, timeout=10.0, message="both servers")
    results = [edge.submit("square", {"x": x, "cost": 0.05}).result(10) for x in range(12)]
    assert results == [{"y": x * x} for x in range(12)]
    wait_for(lambda: len(records) == 12, message="12 records")
    assert sorted(r.task_id for r in records) == sorted({r.task_id for r in records})  # one outcome each
    stats = edge.stats()
    assert stats["hedges"] >= 1
    by_id = {r.task_id: r for r in records}
    hedged_and_dropped = [by_id[task_id] for task_id, attempt in lossy.dropped
                          if task_id in by_id and by_id[task_id].targets == ("lossy", "clean")
                          and by_id[task_id].attempts == attempt + 1]
    # The first drop came before any loss was seen (a timeout); later ones were hedged: the clean
    # server's answer completed the task with no timeout of its own.
    assert stats["timeouts"] >= 1 and hedged_and_dropped
    assert all(r.outcome == "ok" and r.target == "clean" for r in hedged_and_dropped)
    assert stats["timeouts"] < len(lossy.dropped)


@pytest.mark.parametrize("share", [1.0, 0.0])
def test_hedge_share_caps_the_hedges_of_the_real_agent(
        broker: BrokerEndpoint, topic_prefix: str, stack: Stack, share: float) -> None:
    """A fast server that drops every other task: uncapped, nearly every task to it is hedged;
    with ``hedge_share = 0`` only the burst is, and the rest go where no loss is priced in."""
    lossy = DroppingServer(broker, topic_prefix, "lossy", every=2)
    stack.append(lossy.close)
    start_cloud(broker, stack, topic_prefix, "clean")
    edge = start_edge(broker, stack, topic_prefix, registry=TaskRegistry(), default_timeout=0.3,
                      probe_interval=0.2, policy_config={"hedge_share": share})

    def both() -> bool:
        return {v.node for v in edge.servers() if not v.stale and "square" in v.tasks} == {"lossy", "clean"}

    wait_for(both, timeout=10.0, message="both servers")
    tasks = 30
    results = [edge.submit("square", {"x": x, "cost": 0.02}).result(10) for x in range(tasks)]
    assert results == [{"y": x * x} for x in range(tasks)]
    hedges = edge.stats()["hedges"]
    if share == 1.0:
        assert hedges > HEDGE_BURST  # the cap below is one the agent would otherwise exceed
    else:
        assert 1 <= hedges <= HEDGE_BURST
