"""The device core: what a device knows and decides, as a state machine without I/O ("sans-I/O").

:class:`DeviceCore` takes **events** with an explicit ``now`` (a task submitted, a server heartbeat,
a birth or death, a result, a pong, a local run starting or finishing, a timer firing, the device's
own link coming up or going down) and returns **actions** for its driver to perform:

=================  ==================================================================================
:class:`Send`      publish attempt ``attempt`` of ``task`` to ``server`` (``resend``: the same attempt
                   again, after the link came back) and arm its ``timer``
:class:`Ping`      publish a round-trip probe to ``server``
:class:`RunLocal`  queue ``task`` on the local pool (and arm its deadline ``timer``, if any); when a
                   worker takes it, call :meth:`local_start`
:class:`Execute`   run ``task`` now (the answer to :meth:`local_start`); then :meth:`local_done`
:class:`Complete`  ``task`` has its one outcome; :attr:`Complete.record` is its :class:`TaskRecord`
:class:`Timer`     call :meth:`fire` with this timer at ``at`` (stale timers are ignored there)
:class:`Fault`     deciding ``task`` raised ``error`` (the task is already completed ``failed``)
:class:`Park`      ``task`` has no usable option now (no server serves it, the link is down, it cannot
                   run here): keep it (store and forward) and :meth:`submit` it again later; the core
                   has forgotten it, without an outcome. Only with :attr:`DeviceCore.parking` on.
=================  ==================================================================================

It reads no clock, starts no thread, does no I/O and draws randomness only from the ``rng`` it is
given, so the live agent (:class:`~edge_agent.agent.EdgeAgent`: MQTT, threads, a pool, futures) and
the discrete-event simulator (:mod:`sim.des`: an event queue and a simulated clock) run the same
rules. The rules, in one place:

* **Decisions** are :func:`edge_agent.policy.decide` on the server table (no server while the link
  is down), the local pool and the previous choice for the task name; servers already tried are
  excluded. A local choice with the local pool full is decided again without it, else
  ``rejected-busy``.
* **Attempt timeouts** (:func:`attempt_timeout`): ``timeout_factor`` x the estimate without the
  failure penalty, at least a floor, at most ``max_timeout`` and the time left; the floor is
  ``default_timeout``, lowered to ``attempt_share`` x time left when another option remains. An
  attempt whose server falls silent before its timeout is given up at the server's stale time.
* **Retries**: a timeout, ``rejected-busy``, ``expired``, ``unknown-task`` or the server's death
  counts a failure against the server and decides again, up to ``max_attempts``. A task with nowhere
  else to go waits for its dead server instead (a broker restart fires every Will), bounded by its
  timeout; one sent over an earlier link is re-sent when its server is heard from again.
* **Pinned tasks** (``target``, ``pool``; :mod:`edge_agent.pinning`): every attempt goes to that
  server, or to that pool's inbox, never local; a dead pinned server ends the task at once; a pool
  attempt is retried only on ``rejected-busy`` or ``unknown-task`` (anything else could run it twice).
* **Hedges** (``ect`` only; :attr:`~edge_agent.policy.PolicyConfig.hedge`): when the chosen server's
  measured loss (:meth:`~edge_agent.servers.ServerTable.loss`) is above the budget, the attempt is
  also sent, at once or ``hedge_delay`` later if still unanswered, to the best other server of the
  decision that can meet the deadline: a second :class:`Send`, the newer attempt, while the first
  stays in flight as the task's *side* attempt. Both count as in flight to their servers and both
  answers teach the table; the first final answer gives the outcome, the other attempt is given up
  (a loss sample for its server if no answer comes by its timeout; its late answer is counted and
  learned from, never a second outcome). When the newer attempt fails and the task has no attempt
  left or nowhere else to go, it waits for the side attempt until that one's timeout (or its
  server's death) instead of ending at once. ``hedge_share`` below 1 caps the hedges: each task
  submitted adds that much to a bucket of at most :data:`HEDGE_BURST`, each hedge takes one.
* **One outcome per task**: the first ``ok``/``error`` result wins, also from an earlier attempt;
  anything later is counted (``late_results``, ``unknown_results``). A timer at or after the deadline
  gives a task still without an outcome the deadline outcome: ``timeout`` if a server has it,
  ``expired`` if it is queued or running locally (the local run goes on; its output is dropped).

Times in records are core times plus ``epoch`` (the agent passes wall clock minus monotonic).
The core is not thread-safe: its driver serialises the calls.
"""

from __future__ import annotations

import random
from collections import Counter, OrderedDict, deque
from collections.abc import Container, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from edge_agent.pinning import (
    POOL_RETRIED,
    check_pool,
    check_target,
    pinned_decision,
    pool_decision,
    pool_key,
)
from edge_agent.policy import (
    DEFAULT_POLICY,
    LOCAL,
    Decision,
    LocalInfo,
    PolicyConfig,
    ServerInfo,
    TaskInfo,
    check_policy,
    decide,
)
from edge_agent.records import TaskRecord
from edge_agent.servers import STALE_MARGIN, ServerReport, ServerTable, ServerView
from edge_agent.tuning import DEFAULT_TUNING, Tuning

__all__ = [
    "ANSWERED_FAILURES", "ATTEMPT", "DEADLINE", "PROBE", "Action", "Complete", "CoreTask", "Decider",
    "DeviceCore", "Execute", "Fault", "Leg", "Park", "Ping", "RunLocal", "Send", "Timer", "attempt_timeout",
]

RATE_WINDOW = 1.0
"""Seconds over which the local arrival rate (``threshold`` policy) is measured."""
FINISHED_MEMORY = 10_000
"""How many finished task ids are remembered to tell late results from foreign ones."""
GIVEN_UP_MEMORY = 1024
"""How many attempts given up without an answer (timeouts, hedges made unneeded) are remembered, so
that a late answer still teaches the table (and takes back a loss sample)."""
ANSWERED_FAILURES = frozenset({"rejected-busy", "expired", "unknown-task"})
"""Statuses with which a server answered an attempt without doing it: retried elsewhere."""
HEDGE_BURST = 10.0
"""Hedges a device may send back to back when :attr:`~edge_agent.policy.PolicyConfig.hedge_share` caps
them: the bucket's size (it starts full)."""
_FINAL = frozenset({"ok", "error"})
_NONE: frozenset[str] = frozenset()
_INF = float("inf")

ATTEMPT, DEADLINE, PROBE = range(3)
"""The kinds of :class:`Timer`: an attempt's timeout (or its server's stale time), a task's deadline,
the next round of probes."""
_ATTEMPT, _DEADLINE, _PROBE = ATTEMPT, DEADLINE, PROBE


def attempt_timeout(expected: float, time_left: float | None, *, alternative: bool, default_timeout: float,
                    factor: float, share: float, ceiling: float) -> float:
    """Seconds an offloaded attempt waits for its result before the task is decided again.

    ``factor x expected`` (the estimated round trip, transfer, queue and service time), at least a
    floor and at most ``ceiling`` and the time left to the deadline. The floor is ``default_timeout``,
    lowered to ``share x time_left`` when the task has a deadline and another option to fall back on,
    so that a silent server still leaves time for the retry or the local run.
    """
    return _timeout(expected, time_left, alternative, default_timeout, factor, share, ceiling)


def _timeout(expected: float, time_left: float | None, alternative: bool, default_timeout: float,
             factor: float, share: float, ceiling: float) -> float:
    """:func:`attempt_timeout` with positional arguments and no builtin calls (the simulator's hot path)."""
    timeout = factor * expected
    if time_left is None:
        if timeout < default_timeout:
            timeout = default_timeout
        return ceiling if timeout > ceiling else timeout
    left = time_left if time_left > 0.0 else 0.0
    floor = default_timeout
    if alternative and share * left < floor:
        floor = share * left
    if timeout < floor:
        timeout = floor
    if timeout > ceiling:
        timeout = ceiling
    return left if timeout > left else timeout


class CoreTask:
    """One submitted task until its single outcome, as the core tracks it.

    ``context`` is the driver's own: the core never reads it (the simulator keeps its job there).
    Times are core times.
    """

    __slots__ = ("attempts", "context", "created", "deadline", "deadline_armed", "decided", "decision",
                 "done", "error", "finished", "generation", "hedge_at", "last_error", "last_status", "link",
                 "local_ok", "name", "outcome", "payload_bytes", "pin", "policy", "pool", "predicted",
                 "queue_wait", "received", "resend", "sent", "sent_at", "service_time", "side", "started",
                 "target", "targets", "task_id", "timeout_at", "timer", "transfer", "waited_for_link")

    def __init__(self, task_id: str, name: str, payload_bytes: int, policy: str, created: float,
                 deadline: float | None, local_ok: bool, context: Any) -> None:
        self.task_id, self.name, self.payload_bytes, self.policy = task_id, name, payload_bytes, policy
        self.created = created
        """Core time of submission."""
        self.deadline = deadline
        """Absolute, in core time; ``None``: no deadline."""
        self.local_ok = local_ok
        self.context = context
        self.attempts = 0
        self.target: str | None = None
        """The server of the attempt in flight; ``None`` when running locally or between attempts."""
        self.targets: list[str] = []
        self.decision: Decision | None = None
        self.decided: float | None = None
        self.sent: float | None = None
        self.started: float | None = None
        self.sent_at = 0.0
        """When the current attempt was last (re-)sent: the start of its measured round trip."""
        self.transfer = 0.0
        """Seconds the current attempt's payload was expected to take on the uplink, backlog included."""
        self.predicted: float | None = None
        """The completion time (s after sending) the decision expected of the current attempt."""
        self.generation = -1
        self.last_status = "failed"
        self.last_error = ""
        self.done = False
        self.link = 0
        """The link generation the current attempt was sent on."""
        self.resend = False
        """The current attempt's message or result may have been lost: re-send it when its server is
        heard from again."""
        self.timer = 0
        self.timeout_at = _INF
        self.hedge_at = _INF
        """When the current attempt is to be hedged if still unanswered (infinity: not at all)."""
        self.side: Leg | None = None
        """A hedged task's earlier attempt, still in flight beside the current one (the hedge)."""
        self.waited_for_link = False
        self.deadline_armed = False
        self.outcome: str | None = None
        self.error: str | None = None
        self.finished: float | None = None
        self.received: float | None = None
        self.service_time: float | None = None
        self.queue_wait: float | None = None
        self.pin: str | None = None
        """The server every attempt must go to (``submit(target=...)``), else ``None``."""
        self.pool: str | None = None
        """The pool every attempt is published to (``submit(pool=...)``), else ``None``."""


@dataclass(slots=True, eq=False)
class Leg:
    """One attempt in flight that is not the task's current one: a hedged task's side attempt, or an
    attempt given up without an answer (remembered for its late answer). Times are core times."""

    task_id: str
    server: str
    attempt: int
    sent_at: float
    transfer: float
    predicted: float | None
    generation: int
    timeout_at: float
    link: int
    counted: bool = False
    """Its loss sample was counted (at its timeout): a late answer takes it back."""
    hedged: bool = False
    """A hedged task's attempt the other answer made unneeded: its late answer teaches the table."""

    @classmethod
    def current(cls, task: CoreTask) -> Leg:
        """The current attempt of ``task`` (``task.target`` set) as a leg."""
        assert task.target is not None
        return cls(task.task_id, task.target, task.attempts, task.sent_at, task.transfer, task.predicted,
                   task.generation, task.timeout_at, task.link)


@dataclass(slots=True, eq=False)
class Send:
    """Publish attempt ``attempt`` of ``task`` to ``server`` (``resend``: again, as the same attempt),
    and arm ``timer``, the attempt's timeout. For a task pinned to a pool (``task.pool``), ``server``
    reads ``pool/<pool>``: publish to that pool's inbox."""

    task: CoreTask
    server: str
    attempt: int
    resend: bool
    timer: Timer


@dataclass(slots=True, eq=False)
class Ping:
    """Publish a round-trip probe to ``server``; its pong must echo ``nonce`` and ``sent``."""

    server: str
    nonce: int
    sent: float


@dataclass(slots=True, eq=False)
class RunLocal:
    """Queue ``task`` on the local pool (FIFO); call :meth:`DeviceCore.local_start` when a worker takes it.
    Arm ``timer`` (the task's deadline) when there is one."""

    task: CoreTask
    timer: Timer | None = None


@dataclass(slots=True, eq=False)
class Execute:
    """Run ``task`` now, on the worker that asked; then call :meth:`DeviceCore.local_done`."""

    task: CoreTask


@dataclass(slots=True, eq=False)
class Complete:
    """``task`` has its one outcome (``task.outcome``, ``task.error``)."""

    task: CoreTask
    device: str
    epoch: float

    @property
    def record(self) -> TaskRecord:
        """The task's :class:`TaskRecord`, times on the driver's clock (core time + ``epoch``)."""
        task, epoch = self.task, self.epoch
        decision = task.decision
        return TaskRecord(
            task_id=task.task_id, name=task.name, device=self.device, policy=task.policy,
            target=task.targets[-1] if task.targets else LOCAL,
            reason=decision.reason if decision else "none", outcome=task.outcome,  # type: ignore[arg-type]
            attempts=task.attempts, created=task.created + epoch, decided=_shift(task.decided, epoch),
            sent=_shift(task.sent, epoch), started=_shift(task.started, epoch),
            finished=_shift(task.finished, epoch), received=_shift(task.received, epoch),
            estimates=decision.estimates if decision else (), error=task.error, queue_wait=task.queue_wait,
            service_time=task.service_time, payload_bytes=task.payload_bytes, targets=tuple(task.targets))


@dataclass(slots=True, eq=False)
class Timer:
    """Call :meth:`DeviceCore.fire` with this timer at ``at`` (core time)."""

    at: float
    kind: int
    task: CoreTask | None
    token: int


@dataclass(slots=True, eq=False)
class Fault:
    """Deciding ``task`` raised ``error`` (a bug or absurd numbers); the task was completed ``failed``."""

    task: CoreTask
    error: BaseException


@dataclass(slots=True, eq=False)
class Park:
    """``task`` cannot run anywhere now and was never tried: the driver keeps it (its spool) and
    submits it again, same id, when :meth:`DeviceCore.can_serve` says so. The core has forgotten it:
    no outcome, no timer of it is live any more."""

    task: CoreTask


Action = Send | Ping | RunLocal | Execute | Complete | Timer | Fault | Park


def _shift(value: float | None, epoch: float) -> float | None:
    return None if value is None else value + epoch


class Decider(Protocol):
    """Where the next attempt of ``task`` goes (the simulator's oracle plugs in here)."""

    def __call__(self, task: CoreTask, info: TaskInfo, local: LocalInfo, servers: Sequence[ServerInfo], *,
                 now: float, previous: str | None, exclude: frozenset[str], allow_local: bool
                 ) -> Decision: ...


class _LocalPool:
    """What the policy knows of the device's own pool: queued and running tasks, service times, arrivals."""

    __slots__ = ("arrivals", "capacity", "deviation", "gain", "info_name", "info_of", "queued", "running",
                 "service", "workers")

    def __init__(self, workers: int, queue_size: int, gain: float) -> None:
        self.workers = workers
        self.capacity = workers + queue_size
        self.gain = gain
        self.queued = 0
        self.running = 0
        self.service: dict[str, float] = {}
        self.deviation: dict[str, float] = {}
        """Mean deviation of the service time by task name."""
        self.arrivals: deque[float] | None = None
        """Submission times over the last :data:`RATE_WINDOW`, kept from the first ``threshold`` task on
        (the only policy that reads the rate)."""
        self.info_of: LocalInfo | None = None
        """The last :class:`LocalInfo` built (without the arrival rate), until the pool changes..."""
        self.info_name = ""
        """... and the task name it is for."""

    def arrived(self, now: float) -> None:
        arrivals = self.arrivals
        if arrivals is not None:
            arrivals.append(now)
            if arrivals[0] < now - RATE_WINDOW:
                self.forget_arrivals(now)

    def forget_arrivals(self, now: float) -> None:
        arrivals, horizon = self.arrivals, now - RATE_WINDOW
        while arrivals and arrivals[0] < horizon:
            arrivals.popleft()

    def info(self, name: str, capable: bool, now: float, with_rate: bool) -> LocalInfo:
        if with_rate:
            if self.arrivals is None:
                self.arrivals = deque([now])
            self.forget_arrivals(now)
            return LocalInfo(capable, self.queued, self.running, self.workers, self.service.get(name),
                             len(self.arrivals) / RATE_WINDOW, self.deviation.get(name, 0.0))
        info = self.info_of
        if info is None or info.capable is not capable or self.info_name != name:
            info = self.info_of = LocalInfo(capable, self.queued, self.running, self.workers,
                                            self.service.get(name), 0.0, self.deviation.get(name, 0.0))
            self.info_name = name
        return info

    def full(self) -> bool:
        return self.queued + self.running >= self.capacity

    def changed(self) -> None:
        self.info_of = None

    def note_service(self, name: str, elapsed: float) -> None:
        old = self.service.get(name)
        if old is None:
            self.service[name] = elapsed
            self.deviation[name] = elapsed / 2
        else:
            deviation = self.deviation.get(name, 0.0)
            self.deviation[name] = deviation + self.gain * (abs(elapsed - old) - deviation)
            self.service[name] = old + self.gain * (elapsed - old)


class DeviceCore:
    """One device's rules: server table, local pool, decisions, attempts, timeouts and outcomes.

    ``local_tasks``: the task names this device runs itself. ``table``: its server table (the
    simulator passes one over shared entries). ``probes``: ping the servers itself (the simulator
    probes per device group instead). ``watchdog``: arm a timer at every task's deadline at
    submission, a safety net for the driver; without it a deadline timer is armed only for local
    runs, since an offloaded attempt's timeout never passes the deadline. ``decider`` replaces
    :func:`~edge_agent.policy.decide` (the simulator's oracle). ``finished_memory``: how many finished
    task ids it remembers to tell late results from foreign ones. ``counters``: where to count (the
    simulator gives all its devices one).
    """

    __slots__ = ("_decider", "_epoch", "_expiring", "_finished", "_finished_memory", "_given_up", "_hedge",
                 "_hedge_delay", "_hedge_share", "_hedge_tokens", "_link", "_links_up", "_local_tasks",
                 "_max_attempts", "_min_bandwidth_bytes", "_nonces", "_penalty", "_pool", "_previous",
                 "_probe_due", "_probe_token", "_probes", "_resend_waiting", "_tasks", "_tokens", "_unhedged",
                 "_uplink_free", "_watchdog", "connected", "counters", "node", "parking", "policy",
                 "policy_config", "rng", "table", "tuning")

    def __init__(self, node: str, *, local_tasks: Container[str], local_workers: int = 1,
                 tuning: Tuning = DEFAULT_TUNING, policy_config: PolicyConfig | None = None,
                 policy: str = DEFAULT_POLICY, rng: random.Random | None = None,
                 table: ServerTable | None = None, ignore: frozenset[str] = frozenset(), probes: bool = True,
                 watchdog: bool = True, decider: Decider | None = None, epoch: float = 0.0,
                 finished_memory: int = FINISHED_MEMORY, counters: Counter[str] | None = None) -> None:
        self.node = node
        self.tuning = tuning
        self.policy = check_policy(policy)
        self.policy_config = policy_config or PolicyConfig()
        self.rng = rng or random.Random()
        self.table = table or ServerTable(stale_after=tuning.stale_after, half_life=tuning.failure_half_life,
                                          ignore=ignore, estimators=tuning.estimators)
        self.counters: Counter[str] = Counter() if counters is None else counters
        self.connected = False
        self._local_tasks = local_tasks
        self._pool = _LocalPool(local_workers, tuning.local_queue_size, tuning.estimators.local_service_gain)
        self._probes = probes
        self._watchdog = watchdog
        self._decider = decider
        self._epoch = epoch
        self._max_attempts = tuning.max_attempts
        self._min_bandwidth_bytes = tuning.estimators.min_bandwidth_bytes
        self._penalty = self.policy_config.failure_penalty
        self._hedge = self.policy_config.hedge if decider is None else 0.0
        self._hedge_delay = self.policy_config.hedge_delay
        self._hedge_share = self.policy_config.hedge_share
        self._unhedged = replace(self.policy_config, hedge=0.0, loss_cost=tuning.default_timeout)
        """What a decision goes by while no hedge is left in the bucket: doubt counts as caution again."""
        self._hedge_tokens = HEDGE_BURST if self._hedge_share < 1.0 else _INF
        """Hedges this device may still send: the bucket of ``hedge_share`` (infinite: no cap)."""
        self._given_up: OrderedDict[tuple[str, int], Leg] = OrderedDict()
        """(task id, attempt) -> an attempt given up without an answer, for its late answer."""
        self._expiring: deque[Leg] = deque()
        """Hedged attempts given up, until their timeout says whether they were lost."""
        self._tasks: dict[str, CoreTask] = {}
        self._finished: OrderedDict[str, None] = OrderedDict()
        self._finished_memory = finished_memory
        self._previous: dict[str, str] = {}
        self._resend_waiting: set[str] = set()
        self._link = 0
        self._links_up = 0
        self._tokens = 0
        self._nonces = 0
        self._probe_due: dict[str, float] = {}
        self._probe_token = 0
        self._uplink_free = 0.0
        """When the device's uplink will have sent every payload given to it, as the core expects."""
        self.parking = False
        """Store and forward: a task never tried that has no usable option now is handed to the
        driver as :class:`Park` instead of being finished ``failed`` (the agent sets it with a spool)."""

    # ------------------------------------------------------------------------------ reading
    @property
    def tasks(self) -> Sequence[CoreTask]:
        """The tasks without an outcome yet."""
        return list(self._tasks.values())

    def task(self, task_id: str) -> CoreTask | None:
        return self._tasks.get(task_id)

    def runs(self, name: str) -> bool:
        """This device runs ``name`` itself."""
        return name in self._local_tasks

    def announced(self, name: str) -> bool:
        """Some server announced ``name``."""
        return self.table.announces(name)

    def local_load(self) -> tuple[int, int, int, int, dict[str, float]]:
        """(queued, running, workers, queue capacity, EWMA service time by task) of the local pool."""
        pool = self._pool
        return (pool.queued, pool.running, pool.workers, pool.capacity - pool.workers, dict(pool.service))

    def views(self, now: float) -> list[ServerView]:
        """The server table as :class:`~edge_agent.servers.ServerView` rows, with this device's attempts."""
        in_flight = Counter(task.target for task in self._tasks.values() if task.target is not None)
        in_flight.update(task.side.server for task in self._tasks.values() if task.side is not None)
        return self.table.views(now, in_flight)

    def live(self, timer: Timer) -> bool:
        """Whether ``timer`` can still do something (drivers prune their timer queues with it)."""
        if timer.kind == _PROBE:
            return timer.token == self._probe_token
        task = timer.task
        return task is not None and not task.done and (timer.kind == _DEADLINE or timer.token == task.timer)

    def stats(self, now: float) -> dict[str, Any]:
        values: dict[str, Any] = dict(self.counters)
        values["in_flight"] = len(self._tasks)
        values["waiting_for_resend"] = len(self._resend_waiting)
        values["local_queued"] = self._pool.queued
        values["local_running"] = self._pool.running
        values["servers"] = self.table.counters | {"known": len(self.table.views(now)),
                                                   "usable": len(self.table.probe_targets(now))}
        return values

    # ------------------------------------------------------------------------------ events
    def submit(self, task_id: str, name: str, payload_bytes: int, now: float, *,
               deadline: float | None = None, policy: str | None = None, context: Any = None,
               target: str | None = None, pool: str | None = None) -> list[Action]:
        """A task was submitted; ``deadline`` is relative (seconds from ``now``), ``policy`` checked.
        ``target`` / ``pool``: pinned (:meth:`check_pin` first: here a bad pin just fails the task)."""
        if self._expiring and self._expiring[0].timeout_at <= now:
            self._expire(now)
        pinned = target is not None or pool is not None
        local_ok = not pinned and name in self._local_tasks
        task = CoreTask(task_id, name, payload_bytes, policy or self.policy, now,
                        None if deadline is None else now + deadline, local_ok, context)
        task.pin, task.pool = target, pool
        self._tasks[task_id] = task
        self.counters["submitted"] += 1
        if self._hedge_tokens < HEDGE_BURST:
            self._hedge_tokens = min(HEDGE_BURST, self._hedge_tokens + self._hedge_share)
        local_pool = self._pool
        if local_pool.arrivals is not None:
            local_pool.arrived(now)
        elif task.policy == "threshold":
            local_pool.arrivals = deque([now])
        out: list[Action] = []
        if task.deadline is not None and self._watchdog:
            task.deadline_armed = True
            out.append(Timer(task.deadline, _DEADLINE, task, 0))
        self._dispatch(task, now, out)
        return out

    def check_pin(self, name: str, *, target: str | None = None, pool: str | None = None) -> None:
        """Raise :class:`~edge_agent.pinning.PinError` (a ``LookupError``) naming the reason when
        ``target`` is no known server announcing ``name``, or no live server announces ``pool``."""
        if target is not None and pool is not None:
            raise ValueError("a task is pinned to a server or to a pool, not both")
        if target is not None:
            check_target(self.table, target, name)
        elif pool is not None:
            check_pool(self.table, pool, name)

    def heartbeat(self, report: ServerReport, now: float) -> list[Action]:
        """A server heartbeat, decoded (the driver checks the topic names the same node)."""
        node = report.node
        fresh = node not in self._probe_due
        if not self.table.on_heartbeat(report, now):
            return []
        out: list[Action] = []
        if fresh and self._probes and self.connected:
            self._probe_due[node] = now
            self._arm_probe(now, out)  # probe a new server at once
        self._resend_to(node, now, out)
        return out

    def state(self, node: str, session: int, online: bool, now: float, *, live: bool = False,
              tasks: frozenset[str] = frozenset(), interval: float | None = None,
              pools: frozenset[str] = frozenset()) -> list[Action]:
        """A server's birth (``online``, naming the ``tasks`` it serves and its heartbeat
        ``interval``) or death; ``live``: published now, not a retained copy."""
        out: list[Action] = []
        if self.table.on_state_of(node, session, online, live=live, tasks=tasks, now=now,
                                  interval=interval, pools=pools):
            self.server_gone({node}, now, f"server {node} went offline", out)
        elif live and online and not self.table.awaiting(node):
            self._resend_to(node, now, out)
        return out

    def pong(self, node: str, nonce: int, sent: float, now: float) -> float | None:
        """A pong: updates the round trip; returns the sample, or None for an unknown nonce."""
        return self.table.on_pong(node, nonce, sent, now)

    def result(self, task_id: str, server: str, attempt: int, status: str, now: float, *, nbytes: int = 0,
               queue_wait: float = 0.0, service_time: float = 0.0, error: str | None = None) -> list[Action]:
        """A result from ``server`` for attempt ``attempt``; ``nbytes``: task and result bytes moved."""
        task = self._tasks.get(task_id)
        counters = self.counters
        if self._expiring and self._expiring[0].timeout_at <= now:
            self._expire(now)
        given_up = self._given_up
        if task is None:
            if given_up and self._late_answer(task_id, server, attempt, status, now, nbytes, queue_wait,
                                              service_time):
                counters["late_results"] += 1
                return []
            counters["late_results" if task_id in self._finished else "unknown_results"] += 1
            return []
        if task.pool is not None:
            if not self._pool_answer(task, server, attempt):
                counters["unknown_results"] += 1
                return []
            current = task.target is not None and task.attempts == attempt
        elif server not in task.targets:
            counters["unknown_results"] += 1
            return []
        else:
            current = task.target == server and task.attempts == attempt
            if not current:
                side = task.side
                if side is not None and side.server == server and side.attempt == attempt:
                    return self._side_answer(task, side, status, now, nbytes, queue_wait, service_time, error)
                if given_up:
                    self._late_answer(task_id, server, attempt, status, now, nbytes, queue_wait, service_time)
        final = status in _FINAL
        if not current and not final:
            counters["late_results"] += 1
            return []
        out: list[Action] = []
        if final:
            if not current:
                counters["late_results_used"] += 1
            elif task.pool is None:
                self._learn(server, now, now - task.sent_at, nbytes, queue_wait, service_time, task.transfer,
                            task.predicted)
            self._answered(task, status, error, now, queue_wait, service_time, out)
            return out
        if status not in ANSWERED_FAILURES:
            counters["unknown_results"] += 1
            return out
        if status != "unknown-task":
            self.table.busy(server, now)
        self._attempt_failed(task, task.attempts, status, error or f"{server} answered {status}", now, out)
        return out

    def _learn(self, server: str, now: float, wall: float, nbytes: int, queue_wait: float,
               service_time: float, transfer: float, predicted: float | None) -> None:
        """What a final answer from ``server``, ``wall`` s after its attempt was sent, teaches the table."""
        if nbytes >= self._min_bandwidth_bytes:
            self.table.transfer_observed(server, nbytes, wall, queue_wait + service_time)
        self.table.answered(server, now, wall=wall, queue_wait=queue_wait, service_time=service_time,
                            transfer=transfer, predicted=predicted)

    def _side_answer(self, task: CoreTask, side: Leg, status: str, now: float, nbytes: int, queue_wait: float,
                     service_time: float, error: str | None) -> list[Action]:
        """An answer to a hedged task's side attempt: it teaches the table; a final one gives the task its
        outcome (the hedge in flight is given up), any other leaves the hedge to answer."""
        server = side.server
        task.side = None
        table = self.table
        table.settled(server)
        self._leg_answered(side, status, now, nbytes, queue_wait, service_time)
        out: list[Action] = []
        if status not in _FINAL:
            self.counters["hedge_side_failed"] += 1
            return out
        self.counters["hedge_side_won"] += 1
        if task.target is not None:  # the hedge lost the race: it may still be answered
            table.settled(task.target)
            self._give_up(Leg.current(task), hedged=True)
            task.target = None
        targets = task.targets
        targets.remove(server)
        targets.append(server)  # the record names where it ran
        self._answered(task, status, error, now, queue_wait, service_time, out)
        return out

    def _answered(self, task: CoreTask, status: str, error: str | None, now: float, queue_wait: float,
                  service_time: float, out: list[Action]) -> None:
        """A final answer gives ``task`` its outcome."""
        task.received = now
        task.service_time, task.queue_wait = service_time, queue_wait
        if status == "ok":
            self._finish(task, "ok", None, now, out)
        else:
            self._finish(task, "error", error or "task failed on the server", now, out)

    def _give_up(self, leg: Leg, *, hedged: bool = False) -> None:
        """Remember ``leg``, given up without an answer, for its late answer; a hedged one is a loss
        sample once its timeout passes unanswered (:meth:`_expire`)."""
        leg.hedged = hedged
        memory = self._given_up
        memory[(leg.task_id, leg.attempt)] = leg
        if len(memory) > GIVEN_UP_MEMORY:
            memory.popitem(last=False)
        if hedged and not leg.counted and leg.link == self._link:
            self._expiring.append(leg)

    def _expire(self, now: float) -> None:
        """Hedged attempts given up whose timeout passed without an answer: loss samples."""
        expiring, memory = self._expiring, self._given_up
        while expiring and expiring[0].timeout_at <= now:
            leg = expiring.popleft()
            if not leg.counted and memory.get((leg.task_id, leg.attempt)) is leg:
                leg.counted = True
                self.table.unanswered(leg.server, now)
                self.counters["hedge_unanswered"] += 1

    def _late_answer(self, task_id: str, server: str, attempt: int, status: str, now: float, nbytes: int,
                     queue_wait: float, service_time: float) -> bool:
        """A late answer to an attempt given up: it was not lost (its loss sample is taken back); one of a
        hedge teaches the table as any answer. False if no such attempt is remembered."""
        leg = self._given_up.get((task_id, attempt))
        if leg is None or leg.server != server:
            return False
        del self._given_up[(task_id, attempt)]
        table = self.table
        if leg.counted:
            table.late_answer(server)
        if leg.hedged:
            self._leg_answered(leg, status, now, nbytes, queue_wait, service_time)
            self.counters["hedge_late_answers"] += 1
        return True

    def _leg_answered(self, leg: Leg, status: str, now: float, nbytes: int, queue_wait: float,
                      service_time: float) -> None:
        """What an answer to attempt ``leg`` (not the task's current one) tells the table: it is no longer
        in flight; a final answer teaches as any answer, a busy one is load."""
        self.table.task_done(leg.server, answered=True, generation=leg.generation)
        if status in _FINAL:
            self._learn(leg.server, now, now - leg.sent_at, nbytes, queue_wait, service_time, leg.transfer,
                        leg.predicted)
        elif status in ANSWERED_FAILURES and status != "unknown-task":
            self.table.busy(leg.server, now)

    def awaits(self, task_id: str, attempt: int) -> bool:
        """Whether the core remembers attempt ``attempt`` of the finished task ``task_id`` as given up
        without an answer (a driver that drops results of finished tasks passes these on)."""
        return (task_id, attempt) in self._given_up

    def local_start(self, task: CoreTask, now: float) -> list[Action]:
        """A local worker took ``task`` from the queue: :class:`Execute` it, or it is already decided."""
        pool = self._pool
        pool.queued -= 1
        pool.changed()
        if task.done:
            return []
        out: list[Action] = []
        if task.deadline is not None and now >= task.deadline:
            self._finish(task, "expired", "deadline passed while queued locally", now, out)
            return out
        pool.running += 1
        task.started = now
        out.append(Execute(task))
        return out

    def local_done(self, task: CoreTask, now: float, *, elapsed: float, error: str | None = None
                   ) -> list[Action]:
        """The local run of ``task`` (after :class:`Execute`) took ``elapsed`` s; ``error``: it raised."""
        pool = self._pool
        pool.running -= 1
        pool.note_service(task.name, elapsed)
        pool.changed()
        out: list[Action] = []
        if not task.done:
            task.service_time = elapsed
            if error is None:
                self._finish(task, "ok", None, now, out)
            else:
                self._finish(task, "error", error, now, out)
        return out

    def fire(self, timer: Timer, now: float) -> list[Action]:
        """A timer from an earlier :class:`Timer` action came due (or later)."""
        out: list[Action] = []
        kind, task = timer.kind, timer.task
        if kind == _PROBE:
            if timer.token == self._probe_token:
                self._probe(now, out)
            return out
        if task is None or task.done or (kind == _ATTEMPT and timer.token != task.timer):
            return out
        if task.deadline is not None and now >= task.deadline:
            self._deadline_outcome(task, now, out)
        elif kind == _ATTEMPT:
            self._check_attempt(task, now, out)
        return out

    def link_up(self, now: float) -> list[Action]:
        """A new connection to the broker (the first, or a reconnect): attempts sent over an earlier one
        may be lost and wait for their server; every server must be heard from again."""
        self.connected = True
        self._link += 1
        self._links_up += 1
        lost = [task for task in self._tasks.values() if task.target is not None and task.link < self._link]
        for task in lost:
            task.resend = True
            self._resend_waiting.add(task.task_id)
        self.counters["link_lost_attempts"] += len(lost)
        if self._links_up > 1:
            self.counters["reconnects"] += 1
            self.table.link_restored(now)
        return []

    def link_down(self, now: float) -> list[Action]:
        """The connection is down: no server is offered, silence is not the servers' fault."""
        self.connected = False
        return []

    def publish_failed(self, task: CoreTask, attempt: int, now: float, *, not_connected: bool, error: str
                       ) -> list[Action]:
        """A :class:`Send` could not be published. With the link down, a task that can run here is
        decided again at once; any other waits (its timeout running) to be re-sent."""
        self.counters["publish_failures"] += 1
        out: list[Action] = []
        if not_connected and not task.local_ok and task.pool is None:
            self._wait_for_resend(task, attempt)
        else:
            self._attempt_failed(task, attempt, "failed", error, now, out, penalise=False)
        return out

    def local_refused(self, task: CoreTask, now: float, error: str) -> list[Action]:
        """The local pool refused ``task`` after :class:`RunLocal` (it is shutting down): it fails."""
        self._pool.queued -= 1
        self._pool.changed()
        return self.unsendable(task, now, error)

    def unsendable(self, task: CoreTask, now: float, error: str) -> list[Action]:
        """The driver cannot encode ``task`` for the wire: it fails."""
        out: list[Action] = []
        self._finish(task, "failed", error, now, out)
        return out

    def stop(self, now: float) -> list[Action]:
        """The device stops: every task without an outcome fails."""
        out: list[Action] = []
        for task in list(self._tasks.values()):
            self._finish(task, "failed", "edge agent stopped", now, out)
        return out

    def server_gone(self, nodes: set[str], now: float, error: str, out: list[Action] | None = None
                    ) -> list[Action]:
        """``nodes`` died or fell silent: decide again the tasks in flight to them. A task with nowhere
        else to go keeps waiting instead: it is re-sent when its server is heard from again, and its
        timeout still bounds the wait. (The simulator calls this when a shared entry heard a death.)"""
        if out is None:
            out = []
        orphans: list[CoreTask] = []
        for task in self._tasks.values():
            side = task.side
            if side is not None and side.server in nodes:  # its answer will not come: no loss either
                task.side = None
                self.table.settled(side.server)
                if task.target is None:  # it waited for this one alone (_wait_for_side)
                    orphans.append(task)
        for task in orphans:
            task.last_status, task.last_error = "failed", error
            self._dispatch(task, now, out)
        victims = [(task, task.attempts) for task in self._tasks.values()
                   if task.target in nodes and not task.resend]
        if not victims:
            return out
        self.counters["server_deaths_in_flight"] += len(victims)
        for task, attempt in victims:
            if task.pin is not None or self._has_alternative(task, nodes, now):
                self._attempt_failed(task, attempt, "failed", error, now, out)
            else:
                self.counters["waiting_for_server"] += 1
                self._wait_for_resend(task, attempt)
        return out

    # ------------------------------------------------------------------------------ deciding
    def _dispatch(self, task: CoreTask, now: float, out: list[Action]) -> None:
        """Decide the next attempt of ``task`` and launch it, or give it its final outcome. Whatever goes
        wrong in deciding ends this one task ``failed``; it never escapes or leaves the task hanging."""
        try:
            self._decide_and_launch(task, now, out)
        except Exception as exc:  # noqa: BLE001 - one task's broken decision must not lose it
            what = f"{type(exc).__name__}: {exc}"[:500]
            self.counters["decision_errors"] += 1
            self._finish(task, "failed", f"internal error while deciding: {what}", now, out)
            out.append(Fault(task, exc))

    def _decide_and_launch(self, task: CoreTask, now: float, out: list[Action]) -> None:
        if task.done:
            return
        if task.attempts >= self._max_attempts:
            if task.side is not None:
                self._wait_for_side(task, now, out)  # no attempt left, but the first one may answer
                return
            self._finish(task, task.last_status, task.last_error or "no attempt left", now, out)
            return
        deadline = task.deadline
        time_left = None if deadline is None else deadline - now
        if time_left is not None and time_left <= 0.0:
            status = task.last_status if task.last_status in ("timeout", "expired") else "expired"
            self._finish(task, status, "deadline passed before the task could run", now, out)
            return
        if task.pin is not None or task.pool is not None:
            self._launch_pinned(task, time_left, now, out)
            return
        local_ok = task.local_ok
        name = task.name
        servers = self.table.snapshot(name, now) if self.connected else []
        targets = task.targets
        exclude = frozenset(t for t in targets if t != LOCAL) if targets else _NONE
        backlog = self._uplink_free - now
        info = TaskInfo(name, task.payload_bytes, time_left, backlog if backlog > 0.0 else 0.0)
        pool = self._pool
        local = pool.info_of
        rate = task.policy == "threshold"
        if local is None or local.capable is not local_ok or pool.info_name != name or rate:
            local = pool.info(name, local_ok, now, rate)
        previous = self._previous.get(name)
        decider = self._decider
        if decider is None:
            decision = decide(task.policy, info, local, servers, now=now, rng=self.rng, previous=previous,
                              exclude=exclude, allow_local=local_ok, config=self._config(),
                              previous_at=None if previous is None else self.table.index_of(previous))
        else:
            decision = decider(task, info, local, servers, now=now, previous=previous, exclude=exclude,
                               allow_local=local_ok)
        if decision.target is None and local_ok and pool.queued + pool.running >= pool.capacity:
            self.counters["local_full"] += 1
            decision = self._decide(task, info, local, servers, now, previous, exclude, False)
            if decision.target is None:
                task.last_status, task.last_error = "rejected-busy", "local queue full, no server"
                self._finish(task, "rejected-busy", "local queue is full and no server is usable", now, out)
                return
        task.decision = decision
        task.decided = now
        target = decision.target
        if target is None and not local_ok:
            if self.parking and not targets:
                self._park(task, out)
                return
            if task.side is not None:
                self._wait_for_side(task, now, out)  # nowhere else to go, but the first one may answer
                return
            self._finish(task, "failed", f"no usable server for {name!r} ({decision.reason})", now, out)
            return
        self._previous[name] = target or LOCAL
        if target is None:
            self._run_local(task, now, out)
        else:
            self._send(task, target, decision, now, out)

    def _park(self, task: CoreTask, out: list[Action]) -> None:
        """Hand ``task`` to the driver to keep (store and forward) and forget it, without an outcome."""
        task.done = True  # its timers are dead; it comes back as a new submission
        del self._tasks[task.task_id]
        self.counters["parked"] += 1
        out.append(Park(task))

    def can_serve(self, name: str, now: float) -> bool:
        """Whether a task ``name`` has a usable option now: it runs here, or a usable server (fresh,
        not dead) serves it over the current link. The driver re-submits parked tasks when it does."""
        if name in self._local_tasks:
            return True
        if not self.connected:
            return False
        return any(s.capable and not s.stale for s in self.table.snapshot(name, now))

    def _config(self) -> PolicyConfig:
        """The policy's tuning for the decision at hand: as configured, unless the hedge bucket is
        empty (``hedge_share`` below 1), when the attempt cannot be hedged and is decided as such."""
        if self._hedge_tokens < 1.0:
            return self._unhedged
        return self.policy_config

    def _decide(self, task: CoreTask, info: TaskInfo, local: LocalInfo, servers: Sequence[ServerInfo],
                now: float, previous: str | None, exclude: frozenset[str], allow_local: bool) -> Decision:
        if self._decider is not None:
            return self._decider(task, info, local, servers, now=now, previous=previous, exclude=exclude,
                                 allow_local=allow_local)
        return decide(task.policy, info, local, servers, now=now, rng=self.rng, previous=previous,
                      exclude=exclude, allow_local=allow_local, config=self._config(),
                      previous_at=None if previous is None else self.table.index_of(previous))

    def _run_local(self, task: CoreTask, now: float, out: list[Action]) -> None:
        task.attempts += 1
        task.targets.append(LOCAL)
        task.target = None
        pool = self._pool
        pool.queued += 1
        pool.info_of = None
        self.counters["local_runs"] += 1
        timer = None
        if task.deadline is not None and not task.deadline_armed:
            task.deadline_armed = True
            timer = Timer(task.deadline, _DEADLINE, task, 0)
        out.append(RunLocal(task, timer))

    def _send(self, task: CoreTask, target: str, decision: Decision, now: float, out: list[Action], *,
              resend: bool = False) -> None:
        """Arm the attempt's timer and publish it: a new attempt, or (``resend``) the current one again.

        The timeout (:func:`attempt_timeout`) takes the decision's estimate for ``target`` without the
        failure penalty: it steers choices; it says nothing of how long this server will take. The
        timer comes due at the timeout, or earlier when the server would turn stale first.
        """
        if resend:
            stale_at, failures = self.table.stale_at(target), self.table.recent_failures(target, now)
        else:
            task.attempts += 1
            task.targets.append(target)
            task.target = target
            task.sent = now
            task.resend = False
            task.waited_for_link = False
            task.generation, stale_at, failures = self.table.sending(target, now)
            self.counters["offloaded"] += 1
            start = self._uplink_free if self._uplink_free > now else now
            bandwidth = self.table.bandwidth(target) or self.policy_config.default_bandwidth
            self._uplink_free = start + task.payload_bytes / bandwidth
            task.transfer = self._uplink_free - now
        task.link = self._link
        task.sent_at = now
        if decision.target == target:
            task.predicted = decision.expected
            expected = decision.quantile if decision.quantile is not None else decision.expected
        else:
            expected = task.predicted = decision.estimate(target)
        expected = (expected or 0.0) - self._penalty * failures
        if expected < 0.0:
            expected = 0.0
        estimates = decision.estimates
        alternative = task.attempts < self._max_attempts and (
            task.local_ok or len(estimates) > 1 or (len(estimates) == 1 and estimates[0][0] != target))
        tuning = self.tuning
        deadline = task.deadline
        at = task.timeout_at = now + _timeout(
            expected, None if deadline is None else deadline - now, alternative, tuning.default_timeout,
            tuning.timeout_factor, tuning.attempt_share, tuning.max_timeout)
        if not resend:
            self.table.expect(target, now + expected)
        stale_at += STALE_MARGIN
        if now < stale_at < at and self.connected and not task.resend:
            at = stale_at
        hedge_at = _INF
        if (self._hedge and not resend and task.side is None and task.policy == "ect"
                and task.attempts < self._max_attempts and self.table.loss(target, now) > self._hedge):
            hedge_at = now + self._hedge_delay
            if hedge_at < at and hedge_at > now:
                at = hedge_at
        task.hedge_at = hedge_at
        out.append(Send(task, target, task.attempts, resend, self._attempt_timer(task, at)))
        if hedge_at <= now:
            task.hedge_at = _INF
            self._hedge_attempt(task, now, out)

    def _hedge_attempt(self, task: CoreTask, now: float, out: list[Action]) -> bool:
        """Send the current attempt of ``task`` also to the best other server its decision drew that is
        usable, can meet the deadline and shows no loss above the budget (else the best lossy one): it
        becomes the current attempt, the first one stays in flight as ``task.side``."""
        decision, target = task.decision, task.target
        if decision is None or target is None or not self.connected or task.attempts >= self._max_attempts:
            return False
        deadline = task.deadline
        left = None if deadline is None else deadline - now
        table, budget, targets = self.table, self._hedge, task.targets
        chosen = fallback = None
        for node, expected in decision.estimates:
            if (node == LOCAL or node in targets or (left is not None and expected > left)
                    or table.stale(node, now)):
                continue
            if table.loss(node, now) <= budget:
                chosen = node
                break
            if fallback is None:
                fallback = node
        if chosen is None:
            chosen = fallback
        if chosen is None:
            self.counters["hedge_no_alternative"] += 1
            return False
        if self._hedge_tokens < 1.0:
            self.counters["hedge_over_budget"] += 1
            return False
        self._hedge_tokens -= 1.0
        task.side = Leg.current(task)
        self.counters["hedges"] += 1
        self._send(task, chosen, decision, now, out)
        return True

    def _attempt_timer(self, task: CoreTask, at: float) -> Timer:
        """A new attempt timer of ``task`` due at ``at``; every earlier one of it is dead from now on."""
        self._tokens += 1
        task.timer = self._tokens
        return Timer(at, _ATTEMPT, task, self._tokens)

    def _rearm(self, task: CoreTask, now: float, out: list[Action]) -> None:
        """The attempt's timer again: at its timeout, or earlier at its server's (new) stale time."""
        at = task.timeout_at
        if task.hedge_at < at:
            at = task.hedge_at
        target = task.target
        if target is not None and self.connected and not task.resend:
            stale_at = self.table.stale_at(target) + STALE_MARGIN
            if now < stale_at < at:
                at = stale_at
        out.append(self._attempt_timer(task, at))

    # ------------------------------------------------------------------------------ failing
    def _check_attempt(self, task: CoreTask, now: float, out: list[Action]) -> None:
        target = task.target
        if target is None:
            if task.side is not None:
                self._check_side(task, now, out)
            return
        if now < task.timeout_at:
            if task.hedge_at <= now:
                task.hedge_at = _INF
                if self._hedge_attempt(task, now, out):
                    return
            if self.connected and not task.resend and task.pool is None and self.table.silent(target, now):
                self.server_gone({target}, now, "server stopped sending heartbeats", out)
            else:
                self._rearm(task, now, out)
            return
        if self._extend_for_link(task, now, out):
            return
        self.counters["timeouts"] += 1
        ours = task.resend or task.link != self._link  # our own link may have lost it
        if not ours:
            self._timed_out(Leg.current(task), now)
        self._attempt_failed(task, task.attempts, "timeout", f"no result from {target} in time", now, out,
                             penalise=not ours)

    def _extend_for_link(self, task: CoreTask, now: float, out: list[Action]) -> bool:
        """An attempt waiting for the device's own link, of a task that cannot run here: rather than
        fail it while nothing can be done, wait (once) until its deadline for the link to come back."""
        deadline = task.deadline
        if (not task.resend or task.waited_for_link or self.connected or deadline is None
                or deadline <= now or task.local_ok):
            return False
        task.waited_for_link = True
        task.timeout_at = deadline
        out.append(self._attempt_timer(task, deadline))
        self.counters["waited_for_link"] += 1
        return True

    def _attempt_failed(self, task: CoreTask, attempt: int, status: str, error: str, now: float,
                        out: list[Action], *, penalise: bool = True) -> None:
        """Attempt ``attempt`` of ``task`` will not answer: count it and try the next option."""
        if task.done or task.attempts != attempt or task.target is None:
            return
        target = task.target
        task.target = None
        task.resend = False
        task.last_status, task.last_error = status, error
        self.counters["retries"] += 1
        self.table.settled(target)
        self.table.task_done(target, answered=status in ANSWERED_FAILURES, generation=task.generation)
        if penalise:
            self.table.failure(target, now)
        if task.pool is not None and status not in POOL_RETRIED:
            self._finish(task, status, error, now, out)  # the pool rule: a retry could run it twice
            return
        self._dispatch(task, now, out)

    def _timed_out(self, leg: Leg, now: float) -> None:
        """Attempt ``leg`` got no answer by its timeout: uncertainty and a loss sample for its server,
        taken back if the answer still comes (:meth:`_late_answer`)."""
        self.table.timed_out(leg.server, now, now - leg.sent_at)
        leg.counted = True
        self._give_up(leg)

    def _wait_for_side(self, task: CoreTask, now: float, out: list[Action]) -> None:
        """The current attempt of a hedged task failed and there is no attempt left or nowhere else to
        send it: rather than end the task, wait for its side attempt, still in flight, until that
        one's timeout."""
        side = task.side
        assert side is not None
        self.counters["hedge_waited_for_side"] += 1
        out.append(self._attempt_timer(task, side.timeout_at if side.timeout_at > now else now))

    def _check_side(self, task: CoreTask, now: float, out: list[Action]) -> None:
        """The timer of a task waiting for its side attempt (:meth:`_wait_for_side`): at the side's
        timeout, a timeout like any other attempt's, and the task gets its outcome."""
        side = task.side
        assert side is not None
        if now < side.timeout_at:
            out.append(self._attempt_timer(task, side.timeout_at))
            return
        task.side = None
        self.counters["timeouts"] += 1
        table = self.table
        table.settled(side.server)
        table.task_done(side.server, answered=False, generation=side.generation)
        if side.link == self._link:  # else our own link may have lost it
            self._timed_out(side, now)
            table.failure(side.server, now)
        else:
            self._give_up(side)
        task.last_status, task.last_error = "timeout", f"no result from {side.server} in time"
        self._dispatch(task, now, out)

    def _wait_for_resend(self, task: CoreTask, attempt: int) -> None:
        if task.done or task.attempts != attempt or task.target is None:
            return
        task.resend = True
        self._resend_waiting.add(task.task_id)

    def _resend_to(self, node: str, now: float, out: list[Action]) -> None:
        """``node`` was heard from over the current link: re-send the attempts waiting for it, as the
        same attempt (the server answers a duplicate from its result cache), with a fresh timeout."""
        if not self._resend_waiting:
            return
        for task_id in list(self._resend_waiting):
            task = self._tasks.get(task_id)
            if task is None or task.done or not task.resend:
                self._resend_waiting.discard(task_id)
            elif task.target == node and task.decision is not None:
                self._resend_waiting.discard(task_id)
                task.resend = False
                task.waited_for_link = False
                self.counters["resends"] += 1
                self._send(task, node, task.decision, now, out, resend=True)

    def _has_alternative(self, task: CoreTask, unusable: set[str], now: float) -> bool:
        """Could ``task`` run somewhere else now: locally, or on a usable server not yet tried?"""
        if task.local_ok:
            return True
        if not self.connected or task.attempts >= self._max_attempts:
            return False
        tried = unusable.union(task.targets)
        try:
            servers = self.table.snapshot(task.name, now)
        except Exception:  # noqa: BLE001 - decide again: _dispatch gives a broken decision its outcome
            return True
        return any(s.capable and not s.stale and s.node not in tried for s in servers)

    # ------------------------------------------------------------------------------ pinned tasks
    def _launch_pinned(self, task: CoreTask, time_left: float | None, now: float, out: list[Action]) -> None:
        """The next attempt of a task pinned to a server or a pool (:mod:`edge_agent.pinning`)."""
        table = self.table
        backlog = self._uplink_free - now
        info = TaskInfo(task.name, task.payload_bytes, time_left, backlog if backlog > 0.0 else 0.0)
        rows = table.snapshot(task.name, now) if self.connected else ()
        pin, pool = task.pin, task.pool
        if pin is not None:
            index = table.index_of(pin) if rows else None
            decision = pinned_decision(task.policy, info, None if index is None else rows[index],
                                       self.policy_config)
        else:
            assert pool is not None
            indices = [table.index_of(node) for node in table.pool_members(pool)] if rows else []
            decision = pool_decision(task.policy, info, pool, [rows[i] for i in indices if i is not None],
                                     self.policy_config)
        task.decision, task.decided = decision, now
        target = decision.target
        if target is None:
            where = f"server {pin}" if pin is not None else f"pool {pool}"
            why = ("the device is not connected" if not self.connected else "it is offline" if
                   pin is not None and table.dead(pin) else "it is stale or does not run the task")
            if task.last_error:
                why = f"{why}; last attempt: {task.last_error}"
            self._finish(task, "failed", f"pinned to {where}, which cannot take it: {why}", now, out)
        elif pool is None:
            self._send(task, target, decision, now, out)
        else:
            self._send_pool(task, target, decision, now, out)

    def _send_pool(self, task: CoreTask, key: str, decision: Decision, now: float, out: list[Action]) -> None:
        """Publish an attempt to a pool's inbox and arm its timeout (no table bookkeeping: the broker
        picks the member; the one that answers is written into ``targets``)."""
        task.attempts += 1
        task.targets.append(key)
        task.target = key
        task.sent = task.sent_at = now
        task.resend = task.waited_for_link = False
        task.link = self._link
        task.transfer = 0.0
        task.predicted = decision.expected
        self.counters["offloaded"] += 1
        self.counters["pool_sends"] += 1
        tuning, deadline = self.tuning, task.deadline
        at = task.timeout_at = now + _timeout(
            decision.expected or 0.0, None if deadline is None else deadline - now, False,
            tuning.default_timeout, tuning.timeout_factor, tuning.attempt_share, tuning.max_timeout)
        out.append(Send(task, key, task.attempts, False, self._attempt_timer(task, at)))

    def _pool_answer(self, task: CoreTask, server: str, attempt: int) -> bool:
        """Whether a result from ``server`` for ``attempt`` of a pool task is one: ``server`` announces
        the pool and the attempt went to it. The answering server replaces the pool in ``targets``
        (the attempt's own target stays the pool: the table counted nothing against the server)."""
        assert task.pool is not None
        index = attempt - 1
        if not 0 <= index < len(task.targets) or task.targets[index] not in (pool_key(task.pool), server):
            return False
        if server not in self.table.pool_members(task.pool):
            return False
        task.targets[index] = server
        return True

    # ------------------------------------------------------------------------------ outcomes
    def _deadline_outcome(self, task: CoreTask, now: float, out: list[Action]) -> None:
        waited_for = task.target if task.target is not None else (
            task.side.server if task.side is not None else None)
        if waited_for is not None:
            status, error = "timeout", f"no result from {waited_for} before the deadline"
        elif task.targets and task.targets[-1] == LOCAL:
            where = "running" if task.started is not None else "queued"
            status, error = "expired", f"deadline passed while {where} locally"
        else:
            status, error = "expired", "deadline passed before the task could run"
        self.counters["deadline_outcomes"] += 1
        self._finish(task, status, error, now, out)

    def _finish(self, task: CoreTask, outcome: str, error: str | None, now: float, out: list[Action]) -> None:
        """Give ``task`` its one outcome."""
        if task.done:
            return
        task.done = True
        task.outcome, task.error, task.finished = outcome, error, now
        target = task.target
        task.target = None
        task.resend = False
        task_id = task.task_id
        del self._tasks[task_id]
        if self._resend_waiting:
            self._resend_waiting.discard(task_id)
        if self._finished_memory:
            finished = self._finished
            finished[task_id] = None
            if len(finished) > self._finished_memory:
                finished.popitem(last=False)
        self.counters["outcome_" + outcome] += 1
        if target is not None:
            self.table.settled(target)
            if task.received is not None:
                self.table.task_done(target, answered=True, generation=task.generation)
        side = task.side
        if side is not None:  # a hedged task's other attempt: no longer needed, it may still be answered
            task.side = None
            self.table.settled(side.server)
            self._give_up(side, hedged=True)
        out.append(Complete(task, self.node, self._epoch))

    # ------------------------------------------------------------------------------ probes
    def _arm_probe(self, at: float, out: list[Action]) -> None:
        self._probe_token += 1
        out.append(Timer(at, _PROBE, None, self._probe_token))

    def _probe(self, now: float, out: list[Action]) -> None:
        if not self.connected or not self._probes:
            self._probe_due.clear()  # a server heard again is probed at once
            return
        alive = self.table.probe_targets(now)
        due = self._probe_due
        for node in [node for node in due if node not in alive]:
            del due[node]
        interval = self.tuning.probe_interval
        following = now + interval
        for node in alive:
            when = due.get(node, now)
            if when <= now:
                self._nonces += 1
                self.table.ping_sent(node, self._nonces, now)
                out.append(Ping(node, self._nonces, now))
                when = due[node] = now + interval * self.rng.uniform(0.75, 1.25)
            following = min(following, when)
        if alive:
            self._arm_probe(following, out)

