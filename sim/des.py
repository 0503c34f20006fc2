"""Discrete-event mode: the fleet on a simulated clock, no broker, for fleets of 10,000+ devices.

Every device is the edge agent's own :class:`~edge_agent.core.DeviceCore`, driven by this event queue
instead of MQTT and threads: the same server table, estimates, decisions
(:func:`edge_agent.policy.decide`), attempt timeouts, retries and outcome rules. The simulator
performs the core's actions and models the rest, cheaply (plain slotted objects and tuples on a heap,
no pydantic in the loop):

* **Devices** create tasks from the scenario workload (:func:`sim.scenario.iter_arrivals`: the same
  tasks for every policy) and hand them to their core; its ``RunLocal`` runs on a bounded pool of
  simulated workers, its ``Send`` goes over the device's uplink (one payload at a time).
* **Links** add one-way delay, uniform jitter, loss and bandwidth, as :mod:`sim.linkemu` does in
  emulation.
* **Servers** run tasks on ``workers`` with a bounded queue (``rejected-busy`` beyond it), expire tasks
  whose deadline passed before they start, answer with their queue wait and service time, and publish
  a heartbeat every interval with their load *as it was then*: devices decide on old numbers, which
  is what makes herding appear. A crashed server loses its queue and running tasks; its death message
  (when it has a Will) reaches each device after the link's delay.
* **What devices know** is only what a device could: heartbeats as they arrive, round trips from
  simulated pings, bandwidth estimated by the core from its own transfers.

Fast paths, each with an equivalence test in ``tests/test_des.py``: devices of a group hear the same
heartbeats at the same times, so they share one :class:`~edge_agent.servers.ServerEntry` per server
(fed once per heartbeat, not once per device), and one prober per group and server measures the
round trip for all of them (devices of a group share their links). A death message reaches the shared
entry once, and the cores of the group's devices are told with :meth:`DeviceCore.server_gone`. Every
device's next arrival waits in a queue of its own (:class:`_Calendar`: time slices, only the earliest
kept as a heap), so the event heap stays as deep as the work in flight, not as the fleet.

The ``oracle`` policy (:mod:`sim.oracle`) decides on the true state instead, plugged into each core as
its decider; the simulation keeps that state current on its events (sends, arrivals, local admissions,
slowdowns, crashes, link changes). Its attempts follow the same timeouts and retries, except that
tried servers stay options: it knows the truth.
"""

from __future__ import annotations

import dataclasses
import gc
import heapq
import itertools
import math
import random
import time as wallclock
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from heapq import heappush
from typing import Any, NamedTuple

from agent_common.smoothing import fold_service
from edge_agent.core import Action, Complete, CoreTask, DeviceCore, Execute, RunLocal, Send, Timer
from edge_agent.policy import LOCAL, Decision, LocalInfo, PolicyConfig, ServerInfo, TaskInfo, check_policy
from edge_agent.servers import ServerEntry, ServerReport, ServerTable
from sim.oracle import ORACLE, LocalTruth, Pool, Reach, ServerTruth, TaskTruth, choose
from sim.report import NO_OPTION, UNFINISHED, RunResult, TaskRecord
from sim.scenario import (
    Arrival,
    CrashEvent,
    DeviceGroup,
    LinkEvent,
    LinkSpec,
    OfflineEvent,
    Scenario,
    SlowdownEvent,
    device_rng,
    group_arrivals,
)

__all__ = ["DesResult", "run_des"]

# Event kinds, in the order they are handled when two fall on the same instant and sequence.
(_ARRIVE, _SRV_RECV, _SRV_DONE, _RES_RECV, _TIMER, _LOCAL_DONE, _HEARTBEAT, _HEARD, _PING, _PONG, _WILL,
 _EVENT) = range(12)
_OK, _REJECTED, _EXPIRED = "ok", "rejected-busy", "expired"
_INF = math.inf
_ANSWER_BYTES = 100
"""Size of a result that carries no payload (busy, expired)."""


@dataclass(slots=True)
class DesResult(RunResult):
    """A :class:`~sim.report.RunResult` plus what the discrete-event run cost."""

    events: int = 0
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0
    """CPU time of the run (one core; unlike wall time, not inflated by other processes)."""
    sim_seconds: float = 0.0

    @property
    def tasks_per_second(self) -> float:
        """Simulated tasks per CPU second."""
        return len(self.records) / self.cpu_seconds if self.cpu_seconds > 0 else 0.0


@dataclass(slots=True, eq=False)
class _Server:
    index: int
    node: str
    group: int
    workers: int
    queue_size: int
    speed: float
    capabilities: frozenset[str]
    factor: float = 1.0
    alive: bool = True
    epoch: int = 0
    busy: int = 0
    seq: int = 0
    queue: deque[tuple[_Job, int, float]] = field(default_factory=deque)
    """``(job, attempt, arrival time)`` waiting for a worker."""
    service: dict[str, float] = field(default_factory=dict)
    service_at: dict[str, float] = field(default_factory=dict)
    """Task name -> when its last run ended (what ages ``service``)."""
    phase: float = 0.0
    """Delay from the birth heartbeat to the second one; then every interval."""


@dataclass(slots=True, eq=False)
class _Device:
    index: int
    node: str
    group: int
    spec: DeviceGroup
    known: list[int]
    arrivals: Iterator[Arrival]
    core: DeviceCore
    busy: int = 0
    queue: deque[CoreTask] = field(default_factory=deque)
    """Tasks the core put on the local pool, waiting for a worker."""
    uplink_free: float = 0.0
    created: int = 0
    capacity: int = 0
    """Local tasks it holds at most: workers plus the local queue size."""


class _Reconnect(NamedTuple):
    """The end of an offline event: these device groups are connected again."""

    groups: tuple[int, ...]


class _Rejoined(NamedTuple):
    """The first heartbeat of a server that a device group hears after its reconnect."""

    group: int
    server: int
    report: ServerReport


@dataclass(slots=True, eq=False)
class _Job:
    """What the simulator keeps of a task beside its core state (the core task's ``context``)."""

    record: TaskRecord
    device: _Device
    work: float
    payload_bytes: int
    held: tuple[Timer, int] | None = None
    """The current attempt's timer and its place in the event order, not in the event queue yet (see
    :meth:`_Simulation.release`)."""
    fate: tuple[float, float] | None = None
    """On a lossy scenario, the draws deciding whether the next attempt's task and its result are lost
    (lost when a draw is under the link's loss), drawn before the oracle decides so that it knows them."""
    result_fates: dict[int, float] | None = None
    """Per attempt on the wire, the draw deciding whether its result is lost."""


class _Simulation:
    """One policy over one scenario; :meth:`run` returns the result."""

    def __init__(self, scenario: Scenario, policy: str, config: PolicyConfig, seed: int) -> None:
        self.scenario = scenario
        self.oracle = policy == ORACLE
        self.policy = policy if self.oracle else check_policy(policy)
        self.config = config
        self.seed = seed
        self.net_rng = random.Random(f"{seed}:network")
        self.decide_rng = random.Random(f"{seed}:decide:{policy}")
        # (time, sequence, kind, subject, value): the sequence keeps same-time events in push order.
        self.heap: list[tuple[float, int, int, Any, Any]] = []
        self.arrivals = _Calendar(self.slice_width or _slice_width(scenario))
        """The devices' next arrivals, one per device, in a queue of their own (same entries, same
        order as if in :attr:`heap`: see :meth:`_events`)."""
        self.order = itertools.count()
        self.now = 0.0
        self.records: list[TaskRecord] = []
        self.queue_series: list[tuple[float, str, int, int]] = []
        self.counters: dict[str, int] = {}
        self.open = 0
        self.pending_arrivals = 0
        self.interval = scenario.heartbeat_interval
        self.message_delay = scenario.message_delay
        """The broker's and the agents' handling of each task, result and pong, on top of its link."""
        self.costs = {name: cost.service_time for name, cost in scenario.tasks.items()}
        self.result_bytes = {name: cost.result_bytes for name, cost in scenario.tasks.items()}
        self.nonces = itertools.count(1)
        self.offline: set[int] = set()
        """Device groups without their broker connection now (offline events)."""
        self.rejoined: dict[int, set[int]] = {}
        """Per device group back from offline: the servers it has not heard from since."""

        self.device_groups = list(scenario.devices)
        self.server_groups = list(scenario.servers)
        group_index = {group.name: i for i, group in enumerate(self.server_groups)}
        every_task = frozenset(scenario.tasks)
        self.servers = [
            _Server(node.index, node.node, group_index[node.group.name], node.group.workers,
                    node.group.queue_size, node.group.speed,
                    every_task if node.group.capabilities is None else frozenset(node.group.capabilities))
            for node in scenario.server_nodes()]
        self.server_index = {server.node: server.index for server in self.servers}
        # links[device group][server group] = (delay, jitter, loss, bandwidth)
        self.links = [[self._link_tuple(scenario.link(dg.name, sg.name)) for sg in self.server_groups]
                      for dg in self.device_groups]
        self.lossy = any(link.loss for link in (scenario.links.default, *scenario.links.pairs,
                                                *(e for e in scenario.events if isinstance(e, LinkEvent))))
        """Some link may lose messages: the oracle then decides knowing each attempt's loss draws."""
        tunings = [scenario.device_tuning(group) for group in self.device_groups]
        self.table_counters: dict[str, int] = Counter()
        # What the devices of a group have heard of each server: one entry, shared (see the docstring).
        self.entries: list[list[ServerEntry]] = [
            [ServerEntry(server.node, stale_after=tuning.stale_after, estimators=tuning.estimators,
                         counters=self.table_counters) for server in self.servers]
            for tuning in tunings]
        lookups = [{entry.node: entry for entry in entries} for entries in self.entries]
        self.core_counters: Counter[str] = Counter()
        """What the devices' cores counted, all together (one hot object instead of one per device)."""
        device_index = {group.name: i for i, group in enumerate(self.device_groups)}
        self.devices: list[_Device] = []
        decider = self.oracle_decide if self.oracle else None
        # The oracle's estimates carry no failure penalty, so its timeouts must not take one off.
        core_config = dataclasses.replace(config, failure_penalty=0.0) if self.oracle else config
        for node in scenario.device_nodes():
            group = device_index[node.group.name]
            known = scenario.known_servers(node)
            tuning = tunings[group]
            table = ServerTable(stale_after=tuning.stale_after, half_life=tuning.failure_half_life,
                                estimators=tuning.estimators, lookup=lookups[group])
            for index in known:
                table.adopt(self.entries[group][index])
            core = DeviceCore(node.node, local_tasks={node.group.task} if node.group.capable else frozenset(),
                              local_workers=node.group.workers, tuning=tuning, policy_config=core_config,
                              policy="ect" if self.oracle else policy, rng=self.decide_rng, table=table,
                              probes=False, watchdog=False, decider=decider, finished_memory=0,
                              counters=self.core_counters)
            core.link_up(0.0)
            self.devices.append(_Device(
                node.index, node.node, group, node.group, known,
                group_arrivals(scenario, node.group, device_rng(scenario, node.index)), core,
                capacity=node.group.workers + tuning.local_queue_size))
        self.truths: list[ServerTruth] = []
        self.local_truths: list[LocalTruth] = []
        self.device_reach: list[list[Reach]] = []
        self.reaches: list[tuple[int, int, Reach]] = []
        """``(device group, server group, reach)`` of every :class:`Reach`, for link and slowdown events."""
        if self.oracle:
            self._init_oracle()

    def _init_oracle(self) -> None:
        """The true state the oracle decides on: one truth per server and device, and what each device
        reaches (devices that know the same servers share one list)."""
        self.truths = [ServerTruth(server.index, server.node, server.workers, server.queue_size, server.speed)
                       for server in self.servers]
        self.local_truths = [LocalTruth(Pool(device.spec.workers), device.spec.speed)
                             for device in self.devices]
        shared: dict[tuple[int, tuple[int, ...]], list[Reach]] = {}
        for device in self.devices:
            key = (device.group, tuple(device.known))
            reach = shared.get(key)
            if reach is None:
                reach = shared[key] = self._reach(device.group, device.known)
            self.device_reach.append(reach)

    def _reach(self, group: int, known: list[int]) -> list[Reach]:
        """The capable server groups among ``known``, as devices of ``group`` reach them."""
        task = self.device_groups[group].task
        members: dict[int, list[ServerTruth]] = {}
        for index in known:
            server = self.servers[index]
            if task in server.capabilities:
                members.setdefault(server.group, []).append(self.truths[index])
        reach: list[Reach] = []
        for server_group, truths in members.items():
            delay, _jitter, loss, bandwidth = self.links[group][server_group]
            speed = self.server_groups[server_group].speed
            entry = Reach(truths, delay + self.message_delay, bandwidth, speed, loss=loss)
            self.reaches.append((group, server_group, entry))
            reach.append(entry)
        return reach

    @staticmethod
    def _link_tuple(link: LinkSpec) -> tuple[float, float, float, float]:
        return (link.delay, link.jitter, link.loss, link.bandwidth)

    def push(self, when: float, kind: int, subject: Any, value: Any = 0) -> None:
        heapq.heappush(self.heap, (when, next(self.order), kind, subject, value))

    def count(self, name: str, amount: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + amount

    # --- the devices' cores ----------------------------------------------------------------------

    def perform(self, device: _Device, actions: Sequence[Action], now: float) -> None:
        """Do what ``device``'s core asked for."""
        for action in actions:
            kind = type(action)
            if kind is Send or kind is RunLocal:
                timer = action.timer  # type: ignore[union-attr]
                if timer is not None:  # the new attempt's timer: held, see release()
                    if self.hold_timers:
                        action.task.context.held = (timer, next(self.order))  # type: ignore[union-attr]
                    else:
                        heappush(self.heap, (timer.at, next(self.order), _TIMER, device, timer))
                if kind is Send:
                    self.send(device, action, now)  # type: ignore[arg-type]
                else:
                    self.run_local(device, action.task, now)  # type: ignore[union-attr, arg-type]
            elif kind is Complete:
                self.complete(action.task, now)  # type: ignore[union-attr, arg-type]
            elif kind is Timer:
                heappush(self.heap, (action.at, next(self.order), _TIMER, device, action))  # type: ignore[union-attr]

    # A new attempt's timer is held on its job rather than put in the event queue: most attempts are
    # answered before their timer, which then does nothing. It goes into the queue as soon as the
    # simulation can no longer promise an answer before it (a lost message, a dead or busy server, a
    # result due after it, a local run that would end after the deadline), always no later than its
    # time, with the place in the event order it got when it was armed, so it fires exactly when and
    # in the order it would have. ``hold_timers = False`` queues every timer at once (the equivalence
    # test runs both).
    hold_timers = True
    slice_width: float | None = None
    """Seconds per slice of the arrivals' queue (:class:`_Calendar`); ``None``: about 256 arrivals at
    the scenario's nominal rate. Any width gives the same order (the equivalence test varies it)."""

    def release(self, job: _Job, by: float = _INF) -> None:
        """The answer of ``job``'s current attempt comes at ``by`` at the earliest (callers on the hot
        paths check it first): queue its held timer unless it is due before."""
        held = job.held
        if held is not None and by >= held[0].at:
            job.held = None
            timer, order = held
            heappush(self.heap, (timer.at, order, _TIMER, job.device, timer))

    def arrive(self, device: _Device, arrival: Arrival, now: float) -> None:
        following = next(device.arrivals, None)
        if following is None:
            self.pending_arrivals -= 1
        else:
            self.arrivals.push((following.time, next(self.order), _ARRIVE, device, following))
        device.created += 1
        relative = arrival.deadline
        task_id = f"{device.node}:{device.created}"
        record = TaskRecord(task_id, device.node, arrival.task, now, self.policy,
                            None if relative is None else now + relative)
        self.records.append(record)
        self.open += 1
        job = _Job(record, device, arrival.work, arrival.payload_bytes)
        self.perform(device, device.core.submit(task_id, arrival.task, arrival.payload_bytes, now,
                                                deadline=relative, context=job), now)

    @staticmethod
    def attempt_record(task: CoreTask, record: TaskRecord, target: str | None) -> None:
        """The trace row follows the task's latest attempt."""
        decision = task.decision
        record.attempts = task.attempts
        record.decided = task.decided
        record.target = target
        record.started = record.finished = None
        if decision is not None:
            record.reason = decision.reason
            record.estimate = decision.expected

    def send(self, device: _Device, action: Send, now: float) -> None:
        task = action.task
        job: _Job = task.context
        record = job.record
        decision = task.decision
        # The trace row follows the task's latest attempt.
        record.attempts, record.decided, record.target = task.attempts, task.decided, action.server
        record.sent = now
        record.started = record.finished = None
        if decision is not None:
            record.reason, record.estimate = decision.reason, decision.expected
        index = self.server_index[action.server]
        server = self.servers[index]
        delay, jitter, loss, bandwidth = self.links[device.group][server.group]
        start = device.uplink_free
        if start < now:
            start = now
        transfer = task.payload_bytes / bandwidth
        device.uplink_free = start + transfer
        random = self.net_rng.random
        if loss:
            fate = job.fate
            job.fate = None
            if fate is None:
                fate = (random(), random())
            if fate[0] < loss:
                self.count("lost_task_messages")
                self.release(job)
                return
            fates = job.result_fates
            if fates is None:
                fates = job.result_fates = {}
            fates[action.attempt] = fate[1]
        if jitter:
            delay += jitter * (2.0 * random() - 1.0)
            if delay < 0.0:
                delay = 0.0
        arrival = start + transfer + delay + self.message_delay
        held = job.held
        if held is not None and arrival >= held[0].at:
            self.release(job)
        if self.oracle:
            self.truths[index].send(arrival, self.costs[record.task] * job.work, task.deadline)
        heappush(self.heap, (arrival, next(self.order), _SRV_RECV, (job, server), action.attempt))

    def run_local(self, device: _Device, task: CoreTask, now: float) -> None:
        job: _Job = task.context
        record = job.record
        self.attempt_record(task, record, None)
        record.sent = None
        if self.oracle:
            self.local_truths[device.index].pool.admit(
                now, self.costs[record.task] * job.work / device.spec.speed, task.deadline)
        if device.busy < device.spec.workers:
            self.start_local(device, task, now)
        else:
            self.release(job)  # when it starts is not known yet
            device.queue.append(task)

    def start_local(self, device: _Device, task: CoreTask, now: float) -> None:
        actions = device.core.local_start(task, now)
        if actions and type(actions[0]) is Execute:
            device.busy += 1
            job: _Job = task.context
            job.record.started = now
            cost = self.costs[job.record.task] * job.work / device.spec.speed
            held = job.held
            if held is not None and now + cost >= held[0].at:
                self.release(job)
            heappush(self.heap, (now + cost, next(self.order), _LOCAL_DONE, task, cost))
        else:
            self.perform(device, actions, now)

    def next_local(self, device: _Device, now: float) -> None:
        while device.queue and device.busy < device.spec.workers:
            self.start_local(device, device.queue.popleft(), now)

    def local_done(self, task: CoreTask, cost: float, now: float) -> None:
        job: _Job = task.context
        device = job.device
        device.busy -= 1
        if not task.done:
            job.record.finished = now
        self.perform(device, device.core.local_done(task, now, elapsed=cost), now)
        self.next_local(device, now)

    def complete(self, task: CoreTask, now: float) -> None:
        job: _Job = task.context
        job.held = None  # its timer refers back to the task: no cycle may outlive it (see run())
        record = job.record
        outcome = task.outcome or "failed"
        if outcome == _OK:
            record.received = now
        elif outcome == "failed" and task.decision is not None and task.decision.reason == "no-option":
            outcome = NO_OPTION
        record.outcome = outcome
        self.open -= 1

    def result(self, job: _Job, answer: tuple[str, int, str, float, float, float], now: float) -> None:
        node, attempt, status, queue_wait, service, answered = answer
        if job.device.group in self.offline:
            self.count("lost_offline")  # published while its device was away: a clean session
            return
        record = job.record
        device = job.device
        size = self.result_bytes[record.task] if status == _OK else _ANSWER_BYTES
        if record.outcome != UNFINISHED:
            core = device.core
            if core.awaits(record.task_id, attempt):  # a given-up attempt: its answer teaches
                core.result(record.task_id, node, attempt, status, now, nbytes=job.payload_bytes + size,
                            queue_wait=queue_wait, service_time=service)
                return
            # What the core would say of a result for a task it finished (it need not remember them).
            self.count("late_results")
            return
        self.perform(device, device.core.result(record.task_id, node, attempt, status, now,
                                                nbytes=job.payload_bytes + size, queue_wait=queue_wait,
                                                service_time=service), now)
        if status == _OK and record.received == now and record.outcome == _OK:
            # This answer completed the task (perhaps from an earlier attempt): where and when it ran.
            record.target, record.started, record.finished = node, answered - service, answered

    def timer(self, device: _Device, timer: Timer, now: float) -> None:
        self.perform(device, device.core.fire(timer, now), now)

    def oracle_decide(self, task: CoreTask, info: TaskInfo, local: LocalInfo, servers: Sequence[ServerInfo],
                      *, now: float, previous: str | None, exclude: frozenset[str], allow_local: bool
                      ) -> Decision:
        """The :func:`sim.oracle.choose` pick for ``task`` on the true state, as the core's decision."""
        job: _Job = task.context
        device = job.device
        spec = device.spec
        truth = None
        if allow_local and spec.capable and len(device.queue) + device.busy < device.capacity:
            truth = self.local_truths[device.index]
        name = job.record.task
        truth_of_task = TaskTruth(now, self.costs[name] * job.work, task.payload_bytes,
                                  self.result_bytes[name], task.deadline, device.uplink_free)
        fate = None
        if self.lossy:
            fate = job.fate = (self.net_rng.random(), self.net_rng.random())
        choice = choose(truth_of_task, truth, self.device_reach[device.index], self.decide_rng, fate)
        if choice is None:
            return Decision(ORACLE, None, "no-option", (), False)  # given up: nothing would complete it
        target = None if choice.server is None else choice.server.node
        expected = choice.completion - now
        reason = "true-fastest" if choice.meets_deadline else "true-fastest-late"
        return Decision(ORACLE, target, reason, ((target or LOCAL, expected),), choice.meets_deadline,
                        expected)

    # --- servers -----------------------------------------------------------------------------------

    def server_receive(self, packed: tuple[_Job, _Server], attempt: int, now: float) -> None:
        job, server = packed
        current = job.held is not None and attempt == job.record.attempts
        if not server.alive:
            self.count("sent_to_dead_server")
            if current:
                self.release(job)
            return
        deadline = job.record.deadline
        if self.oracle:
            self.truths[server.index].receive(now, self.costs[job.record.task] * job.work, deadline)
        if deadline is not None and now > deadline:
            self.reply(server, job, attempt, _EXPIRED, 0.0, 0.0, now)
        elif server.busy < server.workers:
            self.server_start(server, job, attempt, now, now)
        elif len(server.queue) < server.queue_size:
            if current:
                self.release(job)  # when it starts is not known yet
            server.queue.append((job, attempt, now))
        else:
            self.reply(server, job, attempt, _REJECTED, 0.0, 0.0, now)

    def server_start(self, server: _Server, job: _Job, attempt: int, arrived: float, now: float) -> None:
        server.busy += 1
        cost = self.costs[job.record.task] * job.work / server.speed * server.factor
        held = job.held
        if held is not None and now + cost >= held[0].at and attempt == job.record.attempts:
            self.release(job)
        heappush(self.heap, (now + cost, next(self.order), _SRV_DONE, (server, job, attempt, arrived, now),
                             server.epoch))

    def server_done(self, packed: tuple[_Server, _Job, int, float, float], epoch: int, now: float) -> None:
        server, job, attempt, arrived, started = packed
        if epoch != server.epoch:
            return  # the server crashed while this ran
        server.busy -= 1
        record = job.record
        task = record.task
        measured = now - started
        server.service[task] = fold_service(server.service.get(task), measured,
                                            started - server.service_at.get(task, started))
        server.service_at[task] = now
        self.reply(server, job, attempt, _OK, started - arrived, measured, now)
        while server.queue and server.busy < server.workers:
            waiting, waiting_attempt, waiting_arrived = server.queue.popleft()
            deadline = waiting.record.deadline
            if deadline is not None and now > deadline:
                self.reply(server, waiting, waiting_attempt, _EXPIRED, now - waiting_arrived, 0.0, now)
            else:
                self.server_start(server, waiting, waiting_attempt, waiting_arrived, now)

    def _result_fate(self, job: _Job, attempt: int) -> float:
        """The loss draw of ``attempt``'s result: drawn when the attempt was sent (a fresh one for an
        attempt sent while its link had no loss)."""
        fates = job.result_fates
        fate = fates.pop(attempt, None) if fates else None
        return self.net_rng.random() if fate is None else fate

    def reply(self, server: _Server, job: _Job, attempt: int, status: str, queue_wait: float, service: float,
              now: float) -> None:
        delay, jitter, loss, bandwidth = self.links[job.device.group][server.group]
        current = job.held is not None and attempt == job.record.attempts
        if loss and self._result_fate(job, attempt) < loss:
            self.count("lost_result_messages")
            if current:
                self.release(job)
            return
        if jitter:
            delay += jitter * (2.0 * self.net_rng.random() - 1.0)
            if delay < 0.0:
                delay = 0.0
        size = self.result_bytes[job.record.task] if status == _OK else _ANSWER_BYTES
        back = now + size / bandwidth + delay + self.message_delay
        if current and back >= job.held[0].at:  # type: ignore[index]  # current: it holds one
            self.release(job)
        heappush(self.heap, (back, next(self.order), _RES_RECV, job,
                             (server.node, attempt, status, queue_wait, service, now)))

    def heartbeat(self, server: _Server, epoch: int, now: float) -> None:
        if not server.alive or epoch != server.epoch:
            return
        server.seq += 1
        report = ServerReport(server.node, 1, server.seq, self.interval, server.capabilities,
                              queue_length=len(server.queue), in_flight=server.busy, workers=server.workers,
                              service_time=dict(server.service))
        self.queue_series.append((now, server.node, len(server.queue), server.busy))
        for group, entries in enumerate(self.entries):
            if group in self.offline:
                continue
            delay = self.links[group][server.group][0]
            pending = self.rejoined.get(group)
            if pending and server.index in pending:
                pending.discard(server.index)
                self.push(now + delay, _EVENT, _Rejoined(group, server.index, report), 0)
                continue
            heappush(self.heap, (now + delay, next(self.order), _HEARD, entries[server.index], report))
        # After the birth heartbeat each server keeps its own phase, as agents started at different moments.
        following = now + (server.phase if server.seq == 1 else self.interval)
        self.push(following, _HEARTBEAT, server, epoch)

    @staticmethod
    def heard(entry: ServerEntry, report: ServerReport, now: float) -> None:
        entry.on_report(report, now)

    def ping(self, pair: tuple[int, int], _: int, now: float) -> None:
        """One prober per device group and server: the devices of a group share its links."""
        group, index = pair
        server = self.servers[index]
        self.push(now + self.scenario.ping_interval, _PING, pair, 0)
        if not server.alive or group in self.offline:
            return
        entry = self.entries[group][index]
        nonce = next(self.nonces)
        entry.ping_sent(nonce, now)
        delay, jitter, loss, _bandwidth = self.links[group][server.group]
        if loss and (self.net_rng.random() < loss or self.net_rng.random() < loss):
            return
        sample = 2.0 * self.message_delay
        for _direction in range(2):
            sample += max(0.0, delay + jitter * (2.0 * self.net_rng.random() - 1.0))
        self.push(now + sample, _PONG, entry, (nonce, now))

    @staticmethod
    def pong(entry: ServerEntry, echo: tuple[int, float], now: float) -> None:
        entry.on_pong(echo[0], echo[1], now)

    def will(self, pair: tuple[int, int], _: int, now: float) -> None:
        """A crashed server's death message reaches the devices of one group."""
        group, index = pair
        server = self.servers[index]
        if group in self.offline:
            return  # it hears the retained death when it reconnects
        if not self.entries[group][index].on_state(1, False, live=True):
            return
        error = f"server {server.node} went offline"
        for device in self.devices:
            if device.group == group and index in device.known:
                self.perform(device, device.core.server_gone({server.node}, now, error), now)

    # --- scenario events ---------------------------------------------------------------------------

    def scenario_event(self, event: CrashEvent | SlowdownEvent | LinkEvent | OfflineEvent | _Reconnect
                       | _Rejoined, _: int, now: float) -> None:
        if isinstance(event, OfflineEvent | _Reconnect):
            self.device_link(event, now)
            return
        if isinstance(event, _Rejoined):
            self.rejoined_heard(event, now)
            return
        if isinstance(event, LinkEvent):
            devices = [i for i, g in enumerate(self.device_groups) if g.name == event.devices]
            servers = [i for i, g in enumerate(self.server_groups) if g.name == event.servers]
            for group in devices:
                for server_group in servers:
                    self.links[group][server_group] = self._link_tuple(event)
            for group, server_group, reach in self.reaches:
                if group in devices and server_group in servers:
                    reach.delay, reach.bandwidth = event.delay + self.message_delay, event.bandwidth
                    reach.loss = event.loss
            return
        server = self.servers[self.server_index[event.server]]
        if isinstance(event, SlowdownEvent):
            server.factor = event.factor
            if self.oracle:
                self.reprice(server, now)
            return
        if not server.alive:
            return
        if self.oracle:
            self.truths[server.index].crash()
        running = [subject[1] for _, _, kind, subject, epoch in self.heap
                   if kind == _SRV_DONE and subject[0] is server and epoch == server.epoch]
        for job in running + [job for job, _, _ in server.queue]:
            self.release(job)  # its answer never comes (held only for the current attempt)
        server.alive = False
        server.epoch += 1
        self.count("crashed_servers")
        self.count("lost_in_crash", server.busy + len(server.queue))
        server.busy = 0
        server.queue.clear()
        if event.will:
            for group in range(len(self.device_groups)):
                self.push(now + self.links[group][server.group][0], _WILL, (group, server.index))

    def device_link(self, event: OfflineEvent | _Reconnect, now: float) -> None:
        """A device group loses its broker connection (what is published to it meanwhile is lost),
        or gets it back: then it hears the retained deaths of servers that crashed meanwhile."""
        if isinstance(event, OfflineEvent):
            groups = tuple(i for i, g in enumerate(self.device_groups) if g.name == event.devices)
            self.offline.update(groups)
            self.count("offline_periods", len(groups))
            for device in self.devices:
                if device.group in groups:
                    self.perform(device, device.core.link_down(now), now)
            self.push(now + event.duration, _EVENT, _Reconnect(groups), 0)
            return
        self.offline.difference_update(event.groups)
        for group in event.groups:
            self.rejoined[group] = {server.index for server in self.servers}
        for device in self.devices:
            if device.group in event.groups:
                self.perform(device, device.core.link_up(now), now)
        for group in event.groups:
            for server in self.servers:
                if not server.alive and self.entries[group][server.index].on_state(1, False):
                    error = f"server {server.node} went offline"
                    for device in self.devices:
                        if device.group == group and server.index in device.known:
                            self.perform(device, device.core.server_gone({server.node}, now, error), now)

    def rejoined_heard(self, event: _Rejoined, now: float) -> None:
        """What the agent's heartbeat handler does after a reconnect, for each device of the group:
        the server is heard again, and what waited for the link goes to it again."""
        entry = self.entries[event.group][event.server]
        entry.on_report(event.report, now)
        node = self.servers[event.server].node
        for device in self.devices:
            if device.group == event.group and event.server in device.known:
                self.perform(device, device.core.state(node, event.report.session, True, now, live=True), now)

    def reprice(self, server: _Server, now: float) -> None:
        """After a slowdown: the server's truth from its running tasks' end times (the pending events;
        this scan is once per slowdown) and its queue, and the new lowest factor of its group."""
        if server.alive:
            running = [when for when, _, kind, subject, epoch in self.heap
                       if kind == _SRV_DONE and subject[0] is server and epoch == server.epoch]
            queued = [(self.costs[job.record.task] * job.work, job.record.deadline)
                      for job, _, _ in server.queue]
            self.truths[server.index].reprice(server.factor, now, running, queued)
        lowest = min(other.factor for other in self.servers if other.group == server.group)
        for _group, server_group, reach in self.reaches:
            if server_group == server.group:
                reach.min_factor = lowest

    # --- main loop -----------------------------------------------------------------------------------

    def run(self, progress: Callable[[float], None] | None = None) -> DesResult:
        started = wallclock.perf_counter()
        cpu_started = wallclock.process_time()
        # The run makes no reference cycles worth collecting while it runs: the cyclic collector would
        # only rescan the growing records over and over (a seventh of the CPU time at 10,000 devices),
        # so it is paused for the run; its one pass over what the run kept is charged to the run, here.
        collecting = gc.isenabled()
        gc.disable()
        try:
            events = self._events(progress)
        finally:
            if collecting:
                gc.enable()
        if collecting:
            gc.collect(0)
        counters = dict(self.counters)
        for name, value in self.core_counters.items():
            counters[name] = counters.get(name, 0) + value
        for name in [name for name in counters if name.startswith("outcome_") or name == "submitted"]:
            del counters[name]  # the records say it
        for name, value in self.table_counters.items():
            if value:
                counters[name] = counters.get(name, 0) + value
        unfinished = sum(record.outcome == UNFINISHED for record in self.records)
        if unfinished:
            counters["unfinished"] = unfinished
        wall = wallclock.perf_counter() - started
        cpu = wallclock.process_time() - cpu_started
        return DesResult(self.policy, self.records, self.scenario.duration, self.queue_series,
                         dict(counters), events=events, wall_seconds=wall, cpu_seconds=cpu,
                         sim_seconds=self.now)

    def _events(self, progress: Callable[[float], None] | None) -> int:
        """Handle events until every task has its outcome; returns how many were handled."""
        scenario = self.scenario
        for device in self.devices:
            first = next(device.arrivals, None)
            if first is not None:
                self.pending_arrivals += 1
                self.arrivals.push((first.time, next(self.order), _ARRIVE, device, first))
        phase_rng = random.Random(f"{self.seed}:phase")
        for server in self.servers:
            self.push(0.0, _HEARTBEAT, server, 0)  # birth: the first heartbeat on connect
            server.phase = self.interval * (1.0 - phase_rng.random())  # in (0, interval]
            for group in range(len(self.device_groups)):
                first_ping = phase_rng.uniform(0.0, min(0.05, scenario.ping_interval))
                self.push(first_ping, _PING, (group, server.index))
        for index, event in enumerate(scenario.events):
            self.push(event.at, _EVENT, event, index)
        horizon = scenario.duration + max(60.0, 10.0 * scenario.duration)
        events = 0
        # Two queues, one order: every device has its next arrival queued, so at 10,000 devices the
        # arrivals alone would make one heap 10,000 deep, and every pop would walk that depth through
        # memory. Entries are unique (time, sequence) pairs, so taking the smaller head of the event
        # heap and of the arrivals' current slice gives the order of one queue holding both.
        heap, calendar = self.heap, self.arrivals
        arrivals = calendar.heap
        pop = heapq.heappop
        handlers: tuple[Callable[[Any, Any, float], None], ...] = (
            self.arrive, self.server_receive, self.server_done, self.result, self.timer, self.local_done,
            self.heartbeat, self.heard, self.ping, self.pong, self.will, self.scenario_event)
        duration = scenario.duration
        when = 0.0
        while True:
            if not arrivals and calendar.slices:
                arrivals = calendar.advance()
            if arrivals and (not heap or arrivals[0] < heap[0]):
                when, _, kind, subject, value = pop(arrivals)
            elif heap:
                when, _, kind, subject, value = pop(heap)
            else:
                break
            if when > horizon:
                break
            events += 1
            handlers[kind](subject, value, when)
            if when >= duration and not self.open and not self.pending_arrivals:
                break
            if progress is not None and not events & 0x3FFF:
                progress(min(when, duration))
        self.now = when if events else 0.0
        return events


class _Calendar:
    """A queue of ``(time, sequence, ...)`` entries, exact like one heap, for many entries spread over
    time (every device's next arrival): entries fall into slices ``width`` seconds long, and only the
    earliest slice is kept as a heap (:attr:`heap`, a few hundred entries, not the whole fleet).

    :attr:`heap` holds every entry of the slices up to the current one, later slices wait unsorted;
    :meth:`advance` makes the next one current when :attr:`heap` is empty.
    """

    __slots__ = ("current", "heap", "later", "slices", "width")

    def __init__(self, width: float) -> None:
        self.width = width
        self.current = -1
        self.heap: list[tuple[float, int, int, Any, Any]] = []
        self.later: dict[int, list[tuple[float, int, int, Any, Any]]] = {}
        self.slices: list[int] = []
        """The indices of the slices in :attr:`later` (a heap)."""

    def push(self, entry: tuple[float, int, int, Any, Any]) -> None:
        index = int(entry[0] / self.width)
        if index <= self.current:
            heappush(self.heap, entry)
            return
        waiting = self.later.get(index)
        if waiting is None:
            self.later[index] = [entry]
            heappush(self.slices, index)
        else:
            waiting.append(entry)

    def advance(self) -> list[tuple[float, int, int, Any, Any]]:
        """Make the earliest waiting slice current (call with :attr:`heap` empty); returns its heap."""
        self.current = heapq.heappop(self.slices)
        entries = self.later.pop(self.current)
        heapq.heapify(entries)
        self.heap = entries
        return entries


def _slice_width(scenario: Scenario) -> float:
    """A :class:`_Calendar` slice holding about 256 arrivals at the scenario's nominal task rate."""
    rate = 0.0
    for group in scenario.devices:
        workload = group.workload
        if workload.kind == "poisson":
            per_device = workload.rate
        elif workload.kind == "fps":
            per_device = workload.fps
        elif workload.kind == "bursts":
            per_device = workload.burst_size / workload.interval
        else:
            per_device = 2.0 / (workload.min_gap + workload.max_gap)
        rate += group.count * per_device
    return 256.0 / rate if rate > 0.0 else max(scenario.duration, 1.0)


def run_des(scenario: Scenario, policy: str, *, config: PolicyConfig | None = None, seed: int | None = None,
            label: str = "", progress: Callable[[float], None] | None = None) -> DesResult:
    """Simulate ``scenario`` under ``policy``; every created task has exactly one outcome in the records.

    ``config`` defaults to the scenario's policy settings; ``seed`` replaces the scenario seed (workload,
    network and decisions all derive from it). Policies run on one scenario see the same tasks.
    ``progress`` is called now and then with the simulated time reached (up to the duration).
    """
    if seed is not None and seed != scenario.seed:
        scenario = scenario.model_copy(update={"seed": seed})
    simulation = _Simulation(scenario, policy, config or scenario.policy_config(), scenario.seed)
    result = simulation.run(progress)
    result.label = label
    return result
