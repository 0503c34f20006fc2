"""The oracle: a reference policy for the discrete-event mode that decides on the true state.

At each decision it computes, for running the task locally and for every capable live server the device
can reach, when the task would truly complete, and takes the earliest; that one meets the deadline
whenever any option does. An option where the task would be rejected (a full queue) or would expire
before it starts does not complete it; nor does a server whose result would come back after the
deadline (the device's attempt times out at the deadline and drops it), while a late local run does.
When no option completes the task, the oracle gives it up at once rather than spend the uplink and a
server on it. It is greedy: the best option for this task given everything already decided, with no
plan for the tasks still to come. It is simulator only; the device agent never offers it.

The simulator hands it the true state through the small types below and keeps them current on events:

* :class:`Pool` - a FIFO queue in front of ``workers`` identical workers, kept as the time each worker
  frees after everything it has accepted (updated on each admission, O(log workers), never a scan);
* :class:`ServerTruth` - a server's accepted pool, the tasks on the wire to it (sent, not yet arrived,
  with their true arrival times) and the pool projected with them in arrival order; alive or crashed;
  speed and current slowdown factor;
* :class:`Reach` - the servers of one group that run the task, as a device reaches them: the link's
  true one-way delay and bandwidth, their speed and lowest slowdown factor;
* :class:`LocalTruth` - the device's own pool and speed; :class:`TaskTruth` - the task's true work,
  sizes, deadline and the device's uplink backlog.

Costs follow the simulator: a task's work ``base`` (seconds on a speed-1.0 node) costs
``base / speed * factor`` on a server and ``base / speed`` on the device; a result comes back after
``result_bytes / bandwidth + delay``. Jitter is a future random draw: the oracle takes the mean delay.
Loss it knows: on a lossy scenario the simulator draws whether an attempt's task and result will be
lost before the oracle decides (``fate`` of :func:`choose`), and the oracle never picks a link that
would lose either; the other policies meet the same loss process, drawn when they send.
"""

from __future__ import annotations

import bisect
import heapq
import math
import random
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["ORACLE", "Choice", "LocalTruth", "Pool", "Reach", "ServerTruth", "TaskTruth", "choose"]

ORACLE = "oracle"
"""The oracle's policy name in runs, tables and plots."""

_INF = math.inf


class Pool:
    """A FIFO queue of at most ``queue_size`` waiting tasks (``None``: unbounded) before ``workers``.

    ``free`` is a heap of the times each worker frees after every accepted task has run (a time in the
    past means idle); ``waiting`` holds, in order, when each accepted task leaves the queue (starts, or
    expires because its deadline passed before a worker freed). Both follow from the admissions alone.
    """

    __slots__ = ("free", "queue_size", "waiting", "workers")

    def __init__(self, workers: int, queue_size: int | None = None, busy_until: Iterable[float] = ()
                 ) -> None:
        if workers < 1:
            raise ValueError(f"Pool.workers must be >= 1, got {workers}")
        running = sorted(busy_until)
        if len(running) > workers:
            raise ValueError(f"{len(running)} running tasks on {workers} workers")
        self.workers = workers
        self.queue_size = queue_size
        self.free: list[float] = [-_INF] * (workers - len(running)) + running
        self.waiting: deque[float] = deque()

    def copy(self) -> Pool:
        twin = Pool.__new__(Pool)
        twin.workers, twin.queue_size = self.workers, self.queue_size
        twin.free, twin.waiting = list(self.free), deque(self.waiting)
        return twin

    def full_at(self, at: float) -> bool:
        """Whether ``queue_size`` accepted tasks are still waiting at ``at``."""
        size = self.queue_size
        if size is None:
            return False
        waiting = self.waiting
        return size == 0 or (len(waiting) >= size and waiting[-size] > at)

    def start_at(self, at: float, deadline: float | None) -> float:
        """When a task arriving at ``at`` would start; infinity if rejected (full) or it would expire."""
        start = self.free[0]
        if start <= at:
            start = at
        elif self.full_at(at):
            return _INF
        if deadline is not None and start > deadline:
            return _INF
        return start

    def admit(self, at: float, cost: float, deadline: float | None) -> float:
        """Accept a task arriving at ``at`` as the node does; returns its start (infinity: not run).

        As the simulated nodes: a task past its deadline on arrival is answered ``expired``; with a
        worker idle it starts at once; else it waits if the queue has room (else ``rejected-busy``)
        and, when a worker frees, it expires if its deadline has passed, or starts.
        """
        if deadline is not None and at > deadline:
            return _INF
        free = self.free
        start = free[0]
        if start <= at:
            heapq.heapreplace(free, at + cost)
            return at
        if self.full_at(at):
            return _INF
        self._enqueue(at, start)
        if deadline is not None and start > deadline:
            return _INF  # leaves the queue at ``start`` without taking the worker
        heapq.heapreplace(free, start + cost)
        return start

    def requeue(self, now: float, cost: float, deadline: float | None) -> None:
        """Re-admit a task already waiting at ``now`` (no capacity or arrival check): for rebuilding."""
        free = self.free
        start = free[0]
        if start <= now:
            heapq.heapreplace(free, now + cost)
            return
        self._enqueue(now, start)
        if deadline is None or start <= deadline:
            heapq.heapreplace(free, start + cost)

    def _enqueue(self, at: float, leaves: float) -> None:
        waiting = self.waiting
        while waiting and waiting[0] <= at:
            waiting.popleft()  # left the queue before ``at``: no longer counts against its size
        waiting.append(leaves)


@dataclass(frozen=True, slots=True)
class _OnWire:
    arrival: float
    base: float
    deadline: float | None


class ServerTruth:
    """One server's true state, kept by the simulator through :meth:`send`, :meth:`receive`,
    :meth:`reprice` and :meth:`crash`."""

    __slots__ = ("accepted", "alive", "factor", "index", "node", "projected", "speed", "wire")

    def __init__(self, index: int, node: str, workers: int, queue_size: int, speed: float) -> None:
        self.index = index
        self.node = node
        self.speed = speed
        self.factor = 1.0
        self.alive = True
        self.accepted = Pool(workers, queue_size)
        """What the server has received."""
        self.wire: list[_OnWire] = []
        """Tasks sent to it and not yet arrived, by arrival time (ties in sending order)."""
        self.projected = self.accepted.copy()
        """:attr:`accepted` plus every task on the wire, admitted in arrival order."""

    def cost(self, base: float) -> float:
        """Seconds a task of work ``base`` runs here (as the simulator computes it)."""
        return base / self.speed * self.factor

    def send(self, arrival: float, base: float, deadline: float | None) -> None:
        """A task is on its way and arrives at ``arrival`` (a lost message is never sent here)."""
        wire = self.wire
        entry = _OnWire(arrival, base, deadline)
        if not wire or arrival >= wire[-1].arrival:
            wire.append(entry)
            self.projected.admit(arrival, self.cost(base), deadline)
        else:
            bisect.insort_right(wire, entry, key=_arrival)
            self._project()

    def receive(self, now: float, base: float, deadline: float | None) -> None:
        """The earliest task on the wire arrived (at a live server); with none on the wire, one that was
        never announced by :meth:`send`, which the projection then takes in too."""
        cost = self.cost(base)
        self.accepted.admit(now, cost, deadline)
        if self.wire:
            del self.wire[0]
        else:
            self.projected.admit(now, cost, deadline)

    def reprice(self, factor: float, now: float, busy_until: Iterable[float],
                queued: Iterable[tuple[float, float | None]]) -> None:
        """A slowdown: the running tasks keep their end times, the waiting ones (``(base, deadline)``
        in queue order) and those on the wire will run at ``factor``."""
        self.factor = factor
        pool = Pool(self.accepted.workers, self.accepted.queue_size, busy_until)
        for base, deadline in queued:
            pool.requeue(now, self.cost(base), deadline)
        self.accepted = pool
        self._project()

    def crash(self) -> None:
        """Crashed: never an option again; what it held and what is on the wire is lost."""
        self.alive = False
        self.wire.clear()

    def start_at(self, arrival: float, deadline: float | None) -> float:
        """When a task arriving at ``arrival`` would start, counting the tasks on the wire that arrive
        no later; infinity when it would be rejected or expire."""
        wire = self.wire
        if not wire or wire[-1].arrival <= arrival:
            return self.projected.start_at(arrival, deadline)
        pool = self.accepted.copy()
        for entry in wire:
            if entry.arrival > arrival:
                break
            pool.admit(entry.arrival, self.cost(entry.base), entry.deadline)
        return pool.start_at(arrival, deadline)

    def _project(self) -> None:
        pool = self.accepted.copy()
        for entry in self.wire:
            pool.admit(entry.arrival, self.cost(entry.base), entry.deadline)
        self.projected = pool


def _arrival(entry: _OnWire) -> float:
    return entry.arrival


@dataclass(slots=True)
class Reach:
    """A group of servers as a device reaches them: the link's true delay (one way) and bandwidth,
    the group's speed and the lowest slowdown factor among them (a bound that skips the group)."""

    servers: Sequence[ServerTruth]
    delay: float
    bandwidth: float
    speed: float
    min_factor: float = 1.0
    loss: float = 0.0
    """The link's loss probability, each way."""


@dataclass(slots=True)
class LocalTruth:
    """The device's own workers and queue (room in the queue is the simulator's check) and speed."""

    pool: Pool
    speed: float


@dataclass(frozen=True, slots=True)
class TaskTruth:
    """The task being decided, as it truly is."""

    now: float
    base: float
    """Its work: seconds on a speed-1.0 node."""
    payload_bytes: int
    result_bytes: int
    deadline: float | None
    """Absolute, on the simulation clock."""
    uplink_free: float = 0.0
    """When the device's uplink has sent what it already queued."""


@dataclass(frozen=True, slots=True)
class Choice:
    """The oracle's pick: ``server`` (``None`` = local) and when the task would complete there."""

    server: ServerTruth | None
    completion: float
    """Absolute time the result would be back; infinity when no option completes the task."""
    meets_deadline: bool


@dataclass(slots=True)
class _Best:
    completion: float = _INF
    server: ServerTruth | None = None
    """``None`` with a finite completion: run locally."""


def choose(task: TaskTruth, local: LocalTruth | None, reach: Sequence[Reach],
           rng: random.Random | None = None, fate: tuple[float, float] | None = None) -> Choice | None:
    """The option where ``task`` truly completes first; ``None`` when no option completes it.

    ``local=None``: the device cannot run it now (incapable, or its queue is full). An option does not
    complete the task when a full queue rejects it or it would start only after its deadline (it
    expires); nor does a server whose result would come back after the deadline, since the device's
    attempt times out at the deadline and drops it (a late local run still completes). The earliest
    completion meets the deadline whenever any option does. Dead servers are never chosen (leave
    incapable ones out of ``reach``). Ties go to the first found; ``rng`` rotates where each group's
    scan starts, so equal servers share the work. ``fate``: the uniform draws that decide whether this
    attempt's task and its result are lost (each lost on a link whose ``loss`` exceeds its draw): a
    group that would lose either is not an option. Cost: O(log workers) per server plus the tasks on the
    wire that arrive before this one; a group whose earliest possible completion cannot beat the best
    so far is skipped.
    """
    best = _Best()
    if local is not None:
        start = local.pool.start_at(task.now, task.deadline)
        if start < _INF:
            best.completion = start + task.base / local.speed
    uplink = task.uplink_free if task.uplink_free > task.now else task.now
    for group in reach:
        if fate is not None and (fate[0] < group.loss or fate[1] < group.loss):
            continue  # this attempt's task or result would be lost on that link
        _consider_group(best, task, group, uplink, rng)
    if best.completion == _INF:
        return None
    deadline = task.deadline
    return Choice(best.server, best.completion, deadline is None or best.completion <= deadline)


def _consider_group(best: _Best, task: TaskTruth, group: Reach, uplink: float,
                    rng: random.Random | None) -> None:
    delay, bandwidth = group.delay, group.bandwidth
    arrival = uplink + task.payload_bytes / bandwidth + delay
    transfer_back = task.result_bytes / bandwidth
    base = task.base / group.speed
    floor = arrival + base * group.min_factor + transfer_back + delay
    deadline = task.deadline
    if floor >= best.completion or (deadline is not None and floor > deadline):
        return
    servers = group.servers
    count = len(servers)
    if count > 1 and rng is not None:
        first = int(rng.random() * count)
        servers = [*servers[first:], *servers[:first]]
    for server in servers:
        if not server.alive:
            continue
        cost = base * server.factor
        if arrival + cost + transfer_back + delay >= best.completion:
            continue
        start = server.start_at(arrival, deadline)
        if start == _INF:
            continue
        completion = start + cost + transfer_back + delay
        if completion >= best.completion or (deadline is not None and completion > deadline):
            continue
        best.completion, best.server = completion, server
        if completion <= floor:
            return  # no server of this group can do better
