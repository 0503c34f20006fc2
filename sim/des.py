"""Discrete-event mode: the fleet on a simulated clock, no broker, for fleets of 10,000+ devices.

The decision is :func:`edge_agent.policy.decide`, imported, so the simulator judges the code the agents
run. Everything else is modelled, cheaply (plain slotted objects and tuples on a heap, no pydantic in the
loop):

* **Devices** create tasks from the scenario workload (:func:`sim.scenario.iter_arrivals`: the same
  tasks for every policy), decide, run locally on a bounded pool of workers or send to a server.
* **Links** add one-way delay, uniform jitter, loss and bandwidth (a device's uplink sends one payload
  at a time), as :mod:`sim.linkemu` does in emulation.
* **Servers** run tasks on ``workers`` with a bounded queue (``rejected-busy`` beyond it), expire tasks
  whose deadline passed before they start, and publish a heartbeat every interval with their load *as it
  was then*: devices decide on old numbers, which is what makes herding appear.
* **Round trips** come from simulated pings: one prober per device group and server (devices of a group
  share their links), EWMA and mean deviation as on a device.
* **Failures**: an attempt times out after ``timeout_factor`` x its estimate (bounded by the deadline);
  timeouts and ``rejected-busy`` are retried on the next best option (tried servers excluded) up to
  ``max_attempts``; a crashed server loses its queue and running tasks. Late and duplicate results are
  counted and dropped. Every task ends with exactly one outcome.

The ``oracle`` policy (:mod:`sim.oracle`) decides on the true state instead; the simulation keeps that
state current on its events (sends, arrivals, local admissions, slowdowns, crashes, link changes). Its
attempts follow the same timeouts and retries, except that tried servers stay options: it knows the
truth.
"""

from __future__ import annotations

import gc
import heapq
import itertools
import math
import random
import time as wallclock
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from heapq import heappush
from typing import Any

from edge_agent.policy import (
    LOCAL,
    Decision,
    LocalInfo,
    PolicyConfig,
    ServerInfo,
    TaskInfo,
    check_policy,
    decide,
)
from sim.oracle import ORACLE, LocalTruth, Pool, Reach, ServerTruth, TaskTruth, choose
from sim.report import (
    EXPIRED,
    NO_OPTION,
    OK,
    REJECTED,
    TIMEOUT,
    UNFINISHED,
    RunResult,
    TaskRecord,
)
from sim.scenario import (
    Arrival,
    CrashEvent,
    DeviceGroup,
    LinkEvent,
    LinkSpec,
    Scenario,
    SlowdownEvent,
    device_rng,
    group_arrivals,
)

__all__ = ["DesResult", "run_des"]

# Event kinds, in the order they are handled when two fall on the same instant and sequence.
_ARRIVE, _SRV_RECV, _SRV_DONE, _RES_RECV, _TIMEOUT, _LOCAL_DONE, _HEARTBEAT, _PING, _EVENT = range(9)
# Result statuses carried in a _RES_RECV event.
_ST_OK, _ST_REJECTED, _ST_EXPIRED = 0, 1, 2
_STATUS_OUTCOME = {_ST_REJECTED: REJECTED, _ST_EXPIRED: EXPIRED}
_INF = math.inf
_EWMA = 0.2
_FAILURE_HALF_LIFE = 5.0
_SNAPSHOTS_KEPT = 6


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
    capabilities: frozenset[str] | None
    factor: float = 1.0
    alive: bool = True
    died: float = _INF
    """When devices hear its death message (Will); infinity when none."""
    epoch: int = 0
    busy: int = 0
    queue: deque[tuple[_Job, int]] = field(default_factory=deque)
    service: dict[str, float] = field(default_factory=dict)
    snapshots: list[tuple[float, int, int, int, dict[str, float]]] = field(default_factory=list)
    """``(time, seq, queue length, in flight, service EWMA by task)`` of recent heartbeats."""
    next_heartbeat: float = 0.0
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
    entries: list[list[Any]] = field(default_factory=list)
    """The group's view entries of the known servers (shared, refreshed in place)."""
    busy: int = 0
    queue: deque[_Job] = field(default_factory=deque)
    service: float | None = None
    previous: str | None = None
    uplink_free: float = 0.0
    sent: dict[int, list[int]] = field(default_factory=dict)
    """Server -> [heartbeat seq the count refers to, tasks sent since]."""
    failures: dict[int, list[float]] = field(default_factory=dict)
    """Server -> [decayed failure count, time of that value]."""
    window: deque[float] = field(default_factory=deque)
    created: int = 0
    capacity: int = 0
    """Local tasks it holds at most: workers plus the local queue size."""
    local: LocalInfo | None = None
    """Its :class:`LocalInfo` for the policy; ``None`` once the queue, workers or service time changed."""


@dataclass(slots=True, eq=False)
class _Job:
    record: TaskRecord
    device: _Device
    payload_bytes: int
    work: float
    deadline: float | None
    attempt: int = 0
    server: int = -1
    tried: frozenset[str] = frozenset()
    sent_seq: int = -1
    """Heartbeat seq the device had seen from the server when this attempt was sent."""
    done: bool = False
    last_failure: str = TIMEOUT


class _Simulation:
    """One policy over one scenario; :meth:`run` returns the result."""

    def __init__(self, scenario: Scenario, policy: str, config: PolicyConfig, seed: int) -> None:
        self.scenario = scenario
        self.oracle = policy == ORACLE
        self.policy = policy if self.oracle else check_policy(policy)
        self.threshold = policy == "threshold"  # the only policy that reads the local arrival rate
        self.config = config
        self.seed = seed
        self.net_rng = random.Random(f"{seed}:network")
        self.decide_rng = random.Random(f"{seed}:decide:{policy}")
        # (time, sequence, kind, subject, value): the sequence keeps same-time events in push order.
        self.heap: list[tuple[float, int, int, Any, Any]] = []
        self.order = itertools.count()
        self.now = 0.0
        self.records: list[TaskRecord] = []
        self.queue_series: list[tuple[float, str, int, int]] = []
        self.counters: dict[str, int] = {}
        self.open = 0
        self.pending_arrivals = 0
        self.interval = scenario.heartbeat_interval
        self.stale_after = scenario.stale_after * scenario.heartbeat_interval
        self.costs = {name: cost.service_time for name, cost in scenario.tasks.items()}
        self.timeout_min = scenario.timeout_min
        self.timeout_factor = scenario.timeout_factor
        self.failure_penalty = config.failure_penalty
        self.result_bytes = {name: cost.result_bytes for name, cost in scenario.tasks.items()}

        self.device_groups = list(scenario.devices)
        self.server_groups = list(scenario.servers)
        group_index = {group.name: i for i, group in enumerate(self.server_groups)}
        self.servers = [
            _Server(node.index, node.node, group_index[node.group.name], node.group.workers,
                    node.group.queue_size, node.group.speed,
                    None if node.group.capabilities is None else frozenset(node.group.capabilities))
            for node in scenario.server_nodes()]
        self.server_index = {server.node: server.index for server in self.servers}
        device_index = {group.name: i for i, group in enumerate(self.device_groups)}
        self.devices = [
            _Device(node.index, node.node, device_index[node.group.name], node.group,
                    scenario.known_servers(node),
                    group_arrivals(scenario, node.group, device_rng(scenario, node.index)))
            for node in scenario.device_nodes()]
        # links[device group][server group] = (delay, jitter, loss, bandwidth)
        self.links = [[self._link_tuple(scenario.link(dg.name, sg.name)) for sg in self.server_groups]
                      for dg in self.device_groups]
        # Round-trip estimate per (device group, server): [rtt or None, deviation].
        self.rtt: list[list[list[float | None]]] = [
            [[None, 0.0] for _ in self.servers] for _ in self.device_groups]
        # What a device group sees of each server: [valid until, ServerInfo or None, heartbeat seq,
        # server index, device group]; refreshed in place by view().
        self.views: list[list[list[Any]]] = [
            [[-_INF, None, -1, index, group] for index in range(len(self.servers))]
            for group in range(len(self.device_groups))]
        for device in self.devices:
            views = self.views[device.group]
            device.entries = [views[index] for index in device.known]
            device.capacity = device.spec.workers + device.spec.local_queue_size
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
            if server.capabilities is None or task in server.capabilities:
                members.setdefault(server.group, []).append(self.truths[index])
        reach: list[Reach] = []
        for server_group, truths in members.items():
            delay, _jitter, _loss, bandwidth = self.links[group][server_group]
            entry = Reach(delay, bandwidth, self.server_groups[server_group].speed, truths)
            self.reaches.append((group, server_group, entry))
            reach.append(entry)
        return reach

    @staticmethod
    def _link_tuple(link: LinkSpec) -> tuple[float, float, float, float]:
        return (link.delay, link.jitter, link.loss, link.bandwidth)

    def push(self, when: float, kind: int, subject: Any, value: Any = 0) -> None:
        heapq.heappush(self.heap, (when, next(self.order), kind, subject, value))

    def count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    # --- what devices see -------------------------------------------------------------------------

    def view(self, entry: list[Any], now: float) -> None:
        """Refresh a device group's view ``entry`` of one server at ``now``."""
        index, group = entry[3], entry[4]
        server = self.servers[index]
        delay = self.links[group][server.group][0]
        snapshots = server.snapshots
        visible = None
        next_visible = _INF
        for position in range(len(snapshots) - 1, -1, -1):
            if snapshots[position][0] + delay <= now:
                visible = snapshots[position]
                break
            next_visible = snapshots[position][0] + delay
        if visible is None:
            entry[0], entry[1], entry[2] = next_visible, None, -1
            return
        if next_visible == _INF and server.alive:
            next_visible = server.next_heartbeat + delay
        stale_at = visible[0] + delay + self.stale_after
        death_heard = server.died + delay
        stale = now >= stale_at or now >= death_heard
        valid_until = next_visible
        if not stale:
            valid_until = min(valid_until, stale_at, death_heard)
        task = self.device_groups[group].task
        rtt, deviation = self.rtt[group][index]
        entry[0] = valid_until
        entry[1] = ServerInfo(
            server.node, capable=server.capabilities is None or task in server.capabilities, stale=stale,
            rtt=rtt, rtt_dev=deviation or 0.0, bandwidth=self.links[group][server.group][3],
            queue_length=visible[2], in_flight=visible[3], workers=server.workers,
            service_time=visible[4].get(task))
        entry[2] = visible[1]

    def server_table(self, device: _Device, now: float) -> list[ServerInfo]:
        entries = device.entries
        for entry in entries:
            if entry[0] <= now:
                self.view(entry, now)
        sent = device.sent
        failures = device.failures
        if not sent and not failures:
            # The common case: nothing unanswered, no recent failure, so the group's views as they are.
            return [entry[1] for entry in entries if entry[1] is not None]
        table: list[ServerInfo] = []
        append = table.append
        for entry in entries:
            base: ServerInfo | None = entry[1]
            if base is None:
                continue
            index = entry[3]
            since = 0
            mine = sent.get(index)
            if mine is not None:
                if mine[0] == entry[2]:
                    since = mine[1]
                else:
                    del sent[index]
            failed = 0.0
            if failures:
                record = failures.get(index)
                if record is not None:
                    failed = record[0] * 0.5 ** ((now - record[1]) / _FAILURE_HALF_LIFE)
                    if failed < 0.05:
                        del failures[index]
                        failed = 0.0
            if since or failed:
                base = ServerInfo(base.node, base.capable, base.stale, base.rtt, base.rtt_dev, base.bandwidth,
                                  base.queue_length, base.in_flight, base.workers, base.service_time,
                                  since, failed)
            append(base)
        return table

    def add_failure(self, device: _Device, server: int, now: float) -> None:
        if self.oracle:
            return  # failures only steer the device's own policy (and shorten its timeouts)
        record = device.failures.get(server)
        if record is None:
            device.failures[server] = [1.0, now]
        else:
            record[0] = record[0] * 0.5 ** ((now - record[1]) / _FAILURE_HALF_LIFE) + 1.0
            record[1] = now

    # --- task life cycle ---------------------------------------------------------------------------

    def arrive(self, device: _Device, arrival: Arrival, now: float) -> None:
        following = next(device.arrivals, None)
        if following is None:
            self.pending_arrivals -= 1
        else:
            heappush(self.heap, (following.time, next(self.order), _ARRIVE, device, following))
        device.created += 1
        deadline = None if arrival.deadline is None else now + arrival.deadline
        record = TaskRecord(f"{device.node}:{device.created}", device.node, arrival.task, now, self.policy,
                            deadline)
        self.records.append(record)
        self.open += 1
        job = _Job(record, device, arrival.payload_bytes, arrival.work, deadline)
        if self.threshold:
            window = device.window
            window.append(now)
            while window[0] <= now - 1.0:
                window.popleft()
            device.local = None
        self.attempt(job, now)

    def attempt(self, job: _Job, now: float) -> None:
        """Decide and launch the next attempt of ``job`` (or give it its final outcome)."""
        device = job.device
        record = job.record
        first = not job.attempt
        time_left = None if job.deadline is None else job.deadline - now
        if time_left is not None and time_left <= 0.0 and not first:
            self.finish(job, self.deadline_outcome(job), now)
            return
        decision = self.decision(job, time_left, now)
        target = decision.target
        if target is None:
            if device.spec.capable and len(device.queue) + device.busy >= device.capacity:
                # As the edge agent does: the local queue is full, so the best server instead, if any.
                self.count("local_full")
                decision = self.decision(job, time_left, now, allow_local=False)
                target = decision.target
                if target is None:
                    self.finish(job, REJECTED, now)
                    return
            elif decision.reason == "no-option":
                self.finish(job, NO_OPTION if first else job.last_failure, now)
                return
        attempt = job.attempt = job.attempt + 1
        record.attempts = attempt
        record.decided = now
        record.reason = decision.reason
        record.target = target
        record.started = record.finished = None
        expected = record.estimate = decision.expected
        if target is None:
            device.previous = LOCAL
            job.server = -1
            record.sent = None
            if self.oracle:
                self.local_truths[device.index].pool.admit(
                    now, self.costs[record.task] * job.work / device.spec.speed, job.deadline)
            if device.busy < device.spec.workers:
                self.start_local(job, now)
            else:
                device.queue.append(job)
                device.local = None
            return
        device.previous = target
        index = self.server_index[target]
        job.server = index
        server = self.servers[index]
        group = device.group
        delay, jitter, loss, bandwidth = self.links[group][server.group]
        start = device.uplink_free
        if start < now:
            start = now
        transfer = job.payload_bytes / bandwidth
        device.uplink_free = start + transfer
        record.sent = now
        seq = job.sent_seq = self.views[group][index][2]
        sent = device.sent
        mine = sent.get(index)
        if mine is None or mine[0] != seq:
            sent[index] = [seq, 1]
        else:
            mine[1] += 1
        # The timeout follows the plain estimate: the failure penalty steers choices, it does not make
        # the server slower.
        estimate = expected if expected is not None else self.timeout_min
        failures = device.failures
        if failures:
            failed = failures.get(index)
            if failed is not None:
                decayed = failed[0] * 0.5 ** ((now - failed[1]) / _FAILURE_HALF_LIFE)
                estimate = max(estimate - decayed * self.failure_penalty, 0.0)
        timeout = self.timeout_factor * estimate
        if timeout < self.timeout_min:
            timeout = self.timeout_min
        if time_left is not None:
            # timeout = min(timeout, max(left, 0.0)), without the two calls
            left = time_left - (start - now)
            if left < 0.0:
                left = 0.0
            if left < timeout:
                timeout = left
        heap, order = self.heap, self.order
        heappush(heap, (start + timeout, next(order), _TIMEOUT, job, attempt))
        random = self.net_rng.random
        if loss and random() < loss:
            self.count("lost_task_messages")
            return
        if jitter:
            delay += jitter * (2.0 * random() - 1.0)
            if delay < 0.0:
                delay = 0.0
        arrival = start + transfer + delay
        if self.oracle:
            self.truths[index].send(arrival, self.costs[record.task] * job.work, job.deadline)
        heappush(heap, (arrival, next(order), _SRV_RECV, (job, server), attempt))

    def decision(self, job: _Job, time_left: float | None, now: float, allow_local: bool = True
                 ) -> Decision:
        """Where the next attempt of ``job`` goes: the policy's :func:`decide` on what the device knows,
        or the oracle's pick on the true state."""
        if self.oracle:
            return self.oracle_decision(job, now)  # it never offers a full local queue
        device = job.device
        local = device.local
        if local is None:
            spec = device.spec
            local = device.local = LocalInfo(spec.capable, len(device.queue), device.busy, spec.workers,
                                             device.service, len(device.window))
        return decide(self.policy, TaskInfo(job.record.task, job.payload_bytes, time_left), local,
                      self.server_table(device, now), now=now, rng=self.decide_rng,
                      previous=device.previous, exclude=job.tried, allow_local=allow_local,
                      config=self.config)

    def oracle_decision(self, job: _Job, now: float) -> Decision:
        """The :func:`sim.oracle.choose` pick for ``job``, as a :class:`Decision` for the attempt."""
        device = job.device
        spec = device.spec
        local = None
        if spec.capable and len(device.queue) + device.busy < device.capacity:
            local = self.local_truths[device.index]
        name = job.record.task
        task = TaskTruth(now, self.costs[name] * job.work, job.payload_bytes, self.result_bytes[name],
                         job.deadline, device.uplink_free)
        choice = choose(task, local, self.device_reach[device.index], self.decide_rng)
        if choice is None:
            return Decision(ORACLE, None, "no-option", (), False)  # given up: nothing would complete it
        target = None if choice.server is None else choice.server.node
        expected = choice.completion - now
        reason = "true-fastest" if choice.meets_deadline else "true-fastest-late"
        return Decision(ORACLE, target, reason, ((target or LOCAL, expected),), choice.meets_deadline,
                        expected)

    def start_local(self, job: _Job, now: float) -> None:
        device = job.device
        if job.deadline is not None and now > job.deadline:
            self.finish(job, EXPIRED, now)
            return
        device.busy += 1
        device.local = None
        job.record.started = now
        cost = self.costs[job.record.task] * job.work / device.spec.speed
        self.push(now + cost, _LOCAL_DONE, job, 0)

    def next_local(self, device: _Device, now: float) -> None:
        while device.queue and device.busy < device.spec.workers:
            device.local = None
            self.start_local(device.queue.popleft(), now)

    def local_done(self, job: _Job, _: int, now: float) -> None:
        device = job.device
        device.busy -= 1
        device.local = None
        record = job.record
        measured = now - (record.started or now)
        device.service = measured if device.service is None else (
            device.service + _EWMA * (measured - device.service))
        record.finished = now
        record.received = now
        self.finish(job, OK, now)
        self.next_local(device, now)

    def finish(self, job: _Job, outcome: str, now: float) -> None:
        job.done = True
        job.record.outcome = outcome
        self.open -= 1

    def server_receive(self, packed: tuple[_Job, _Server], attempt: int, now: float) -> None:
        job, server = packed
        if not server.alive:
            self.count("sent_to_dead_server")
            return
        if self.oracle:
            self.truths[server.index].receive(now, self.costs[job.record.task] * job.work, job.deadline)
        if job.deadline is not None and now > job.deadline:
            self.reply(server, job, attempt, _ST_EXPIRED, now)
        elif server.busy < server.workers:
            self.server_start(server, job, attempt, now)
        elif len(server.queue) < server.queue_size:
            server.queue.append((job, attempt))
        else:
            self.reply(server, job, attempt, _ST_REJECTED, now)

    def server_start(self, server: _Server, job: _Job, attempt: int, now: float) -> None:
        server.busy += 1
        if attempt == job.attempt and not job.done:
            job.record.started = now
        cost = self.costs[job.record.task] * job.work / server.speed * server.factor
        heappush(self.heap, (now + cost, next(self.order), _SRV_DONE, (server, job, attempt, now),
                             server.epoch))

    def server_done(self, packed: tuple[_Server, _Job, int, float], epoch: int, now: float) -> None:
        server, job, attempt, started = packed
        if epoch != server.epoch:
            return  # the server crashed while this ran
        server.busy -= 1
        task = job.record.task
        measured = now - started
        previous = server.service.get(task)
        server.service[task] = measured if previous is None else previous + _EWMA * (measured - previous)
        if attempt == job.attempt and not job.done:
            job.record.finished = now
        self.reply(server, job, attempt, _ST_OK, now)
        while server.queue and server.busy < server.workers:
            waiting, waiting_attempt = server.queue.popleft()
            if waiting.deadline is not None and now > waiting.deadline:
                self.reply(server, waiting, waiting_attempt, _ST_EXPIRED, now)
            else:
                self.server_start(server, waiting, waiting_attempt, now)

    def reply(self, server: _Server, job: _Job, attempt: int, status: int, now: float) -> None:
        delay, jitter, loss, bandwidth = self.links[job.device.group][server.group]
        if loss and self.net_rng.random() < loss:
            self.count("lost_result_messages")
            return
        if jitter:
            delay += jitter * (2.0 * self.net_rng.random() - 1.0)
            if delay < 0.0:
                delay = 0.0
        size = self.result_bytes[job.record.task] if status == _ST_OK else 100
        heappush(self.heap, (now + size / bandwidth + delay, next(self.order), _RES_RECV, job,
                             attempt * 8 + status))

    def result(self, job: _Job, code: int, now: float) -> None:
        attempt, status = code >> 3, code & 7
        if job.done or attempt != job.attempt:
            self.count("late_or_duplicate_results")
            return
        # Answered: no longer in that server's queue, so no longer counted "sent since the report".
        mine = job.device.sent.get(job.server)
        if mine is not None and mine[0] == job.sent_seq and mine[1] > 0:
            mine[1] -= 1
            if not mine[1]:
                del job.device.sent[job.server]  # a zero count adds nothing; keeps the table's fast path
        if status == _ST_OK:
            job.record.received = now
            self.finish(job, OK, now)
            return
        outcome = _STATUS_OUTCOME[status]
        if status == _ST_EXPIRED:
            self.finish(job, outcome, now)
            return
        job.last_failure = outcome
        self.add_failure(job.device, job.server, now)
        self.retry(job, now)

    def timeout(self, job: _Job, attempt: int, now: float) -> None:
        if job.done or attempt != job.attempt or job.server < 0:
            return
        self.count("timeouts")
        job.last_failure = TIMEOUT
        self.add_failure(job.device, job.server, now)
        self.retry(job, now)

    def deadline_outcome(self, job: _Job) -> str:
        """The outcome of a task whose deadline passed between attempts (as the edge agent reports it)."""
        return job.last_failure if job.last_failure in (TIMEOUT, EXPIRED) else EXPIRED

    def retry(self, job: _Job, now: float) -> None:
        if job.attempt >= self.scenario.max_attempts:
            self.finish(job, job.last_failure, now)
            return
        if job.deadline is not None and now >= job.deadline:
            self.finish(job, self.deadline_outcome(job), now)
            return
        self.count("retries")
        # Tried servers are excluded from now on (added here, the only way to a further attempt).
        job.tried = job.tried | {self.servers[job.server].node}
        self.attempt(job, now)

    # --- servers, probes, scenario events ------------------------------------------------------------

    def heartbeat(self, server: _Server, epoch: int, now: float) -> None:
        if not server.alive or epoch != server.epoch:
            return
        seq = len(server.snapshots) and server.snapshots[-1][1] + 1
        server.snapshots.append((now, seq, len(server.queue), server.busy, dict(server.service)))
        if len(server.snapshots) > _SNAPSHOTS_KEPT:
            del server.snapshots[0]
        self.queue_series.append((now, server.node, len(server.queue), server.busy))
        # After the birth heartbeat each server keeps its own phase, as agents started at different moments.
        server.next_heartbeat = now + (server.phase if seq == 0 else self.interval)
        self.push(server.next_heartbeat, _HEARTBEAT, server, epoch)
        self.invalidate(server.index)

    def invalidate(self, index: int) -> None:
        for views in self.views:
            entry = views[index]
            if entry[0] == _INF:
                entry[0] = -_INF

    def ping(self, pair: tuple[int, int], _: int, now: float) -> None:
        group, index = pair
        server = self.servers[index]
        self.push(now + self.scenario.ping_interval, _PING, pair, 0)
        if not server.alive:
            return
        delay, jitter, loss, _bandwidth = self.links[group][server.group]
        if loss and (self.net_rng.random() < loss or self.net_rng.random() < loss):
            return
        sample = 0.0
        for _direction in range(2):
            sample += max(0.0, delay + jitter * (2.0 * self.net_rng.random() - 1.0))
        estimate = self.rtt[group][index]
        if estimate[0] is None:
            estimate[0], estimate[1] = sample, sample / 2
        else:
            rtt = estimate[0]
            estimate[1] = 0.75 * (estimate[1] or 0.0) + 0.25 * abs(sample - rtt)
            estimate[0] = rtt + 0.125 * (sample - rtt)
        self.views[group][index][0] = -_INF

    def scenario_event(self, event: CrashEvent | SlowdownEvent | LinkEvent, _: int, now: float) -> None:
        if isinstance(event, LinkEvent):
            devices = [i for i, g in enumerate(self.device_groups) if g.name == event.devices]
            servers = [i for i, g in enumerate(self.server_groups) if g.name == event.servers]
            for group in devices:
                for server_group in servers:
                    self.links[group][server_group] = self._link_tuple(event)
            for views in self.views:
                for entry in views:
                    entry[0] = -_INF
            for group, server_group, reach in self.reaches:
                if group in devices and server_group in servers:
                    reach.delay, reach.bandwidth = event.delay, event.bandwidth
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
        server.alive = False
        server.epoch += 1
        if event.will:
            server.died = now
        self.count("crashed_servers")
        lost = server.busy + len(server.queue)
        self.counters["lost_in_crash"] = self.counters.get("lost_in_crash", 0) + lost
        server.busy = 0
        server.queue.clear()
        self.invalidate(server.index)
        for views in self.views:
            views[server.index][0] = -_INF

    def reprice(self, server: _Server, now: float) -> None:
        """After a slowdown: the server's truth from its running tasks' end times (the pending events;
        this scan is once per slowdown) and its queue, and the new lowest factor of its group."""
        if server.alive:
            running = [when for when, _, kind, subject, epoch in self.heap
                       if kind == _SRV_DONE and subject[0] is server and epoch == server.epoch]
            queued = [(self.costs[job.record.task] * job.work, job.deadline) for job, _ in server.queue]
            self.truths[server.index].reprice(server.factor, now, running, queued)
        lowest = min(other.factor for other in self.servers if other.group == server.group)
        for _group, server_group, reach in self.reaches:
            if server_group == server.group:
                reach.min_factor = lowest

    # --- main loop -----------------------------------------------------------------------------------

    def run(self, progress: Callable[[float], None] | None = None) -> DesResult:
        started = wallclock.perf_counter()
        cpu_started = wallclock.process_time()
        # The run makes no reference cycles: events, jobs and decisions are all freed by reference
        # counting. The cyclic collector would only rescan the growing records over and over (a seventh of
        # the CPU time at 10,000 devices), so it is paused for the run; its one pass over what the run
        # kept is charged to the run, here.
        collecting = gc.isenabled()
        gc.disable()
        try:
            events = self._events(progress)
        finally:
            if collecting:
                gc.enable()
        if collecting:
            gc.collect(0)
        unfinished = sum(record.outcome == UNFINISHED for record in self.records)
        if unfinished:
            self.counters["unfinished"] = unfinished
        wall = wallclock.perf_counter() - started
        cpu = wallclock.process_time() - cpu_started
        return DesResult(self.policy, self.records, self.scenario.duration, self.queue_series,
                         dict(self.counters), events=events, wall_seconds=wall, cpu_seconds=cpu,
                         sim_seconds=self.now)

    def _events(self, progress: Callable[[float], None] | None) -> int:
        """Handle events until every task has its outcome; returns how many were handled."""
        scenario = self.scenario
        for device in self.devices:
            first = next(device.arrivals, None)
            if first is not None:
                self.pending_arrivals += 1
                self.push(first.time, _ARRIVE, device, first)
        phase_rng = random.Random(f"{self.seed}:phase")
        for server in self.servers:
            self.push(0.0, _HEARTBEAT, server, 0)  # birth: the first heartbeat on connect
            server.phase = self.interval * (1.0 - phase_rng.random())  # in (0, interval]
            server.next_heartbeat = 0.0
            for group in range(len(self.device_groups)):
                first_ping = phase_rng.uniform(0.0, min(0.05, scenario.ping_interval))
                self.push(first_ping, _PING, (group, server.index))
        for index, event in enumerate(scenario.events):
            self.push(event.at, _EVENT, event, index)
        horizon = scenario.duration + max(60.0, 10.0 * scenario.duration)
        events = 0
        heap = self.heap
        pop = heapq.heappop
        handlers: tuple[Callable[[Any, Any, float], None], ...] = (
            self.arrive, self.server_receive, self.server_done, self.result, self.timeout, self.local_done,
            self.heartbeat, self.ping, self.scenario_event)
        duration = scenario.duration
        while heap:
            when, _, kind, subject, value = pop(heap)
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
