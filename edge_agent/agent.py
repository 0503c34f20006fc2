"""The edge agent: decides per task where it runs, runs or offloads it, and never loses it.

Flow of one task (:meth:`EdgeAgent.submit`)::

    decide (policy.decide, the simulator's very function) --local--> bounded local pool --> outcome
                 |                                                            ^
                 +--server--> publish Task (QoS 1) --Result ok/error----------+
                                 |  timeout, rejected-busy, expired, unknown-task, server death
                                 +--> decide again, excluding the servers tried (at most max_attempts)

The caller's future gets exactly one outcome: the result payload, or :class:`TaskFailed`, at the
task's deadline at the latest (a watchdog gives it one even if a bug or absurd input broke its
decision). Late and duplicate results are dropped and counted, results for tasks this device never
sent are ignored. When the device's own link comes back, attempts whose message or result may have
been lost are re-sent to their server as soon as it is heard from again.

Threads, all named after the node id: the transport's dispatch thread runs the message handlers,
``<id>-edge`` runs timers (attempt timeouts, stale servers, probes, heartbeats, reconnecting after an
offline start), ``<id>-local_*`` run local tasks. No global state and no signal handlers: many agents
can live in one process (the simulator does that).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import heapq
import itertools
import logging
import random
import secrets
import sys
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent_common.badinput import BadInputLog
from agent_common.registry import TaskRegistry, TaskSpec, UnknownTaskError, run_spec
from edge_agent.bridge import Bridge
from edge_agent.config import EdgeConfig
from edge_agent.policy import LOCAL, Decision, LocalInfo, PolicyConfig, TaskInfo, check_policy, decide
from edge_agent.records import TaskFailed, TaskRecord
from edge_agent.servers import ServerTable, ServerView
from topics.codec import Codec, EncodeError
from topics.errors import DecodeError, TopicError
from topics.models import MAX_TTL, Heartbeat, Load, NodeState, Ping, Pong, Result, Role, Status, Task
from topics.names import Kind, TopicTree, topic_matches, validate_publish_topic
from topics.transport import (
    ConnectError,
    Message,
    NotConnectedError,
    Transport,
    TransportError,
    backoff_delays,
)

log = logging.getLogger(__name__)

RecordListener = Callable[[TaskRecord], None]

RATE_WINDOW = 1.0
"""Seconds over which the local arrival rate (``threshold`` policy) is measured."""
FINISHED_MEMORY = 10_000
"""How many finished task ids are remembered to tell late results from foreign ones."""
SERVICE_GAIN = 0.25
MAX_WAIT = 0.5
"""Longest the timer thread sleeps, so that stop() and stale checks stay prompt."""
RETRYABLE = frozenset({Status.REJECTED_BUSY.value, Status.EXPIRED.value, Status.UNKNOWN_TASK.value})
ANSWERED_FAILURES = RETRYABLE
"""Statuses with which the server itself answered an attempt (it no longer holds the task)."""


def payload_size(value: Any, _depth: int = 0) -> int:
    """A cheap estimate of a payload's encoded size in bytes (exact for bytes and arrays)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return len(value)
    np = sys.modules.get("numpy")  # an array exists only if numpy was imported: never load it here
    if np is not None and isinstance(value, np.ndarray):
        return int(value.nbytes) + 32
    if isinstance(value, str):
        return len(value) + 1
    if value is None or isinstance(value, bool | int | float):
        return 9
    if _depth > 16:
        return 16
    if isinstance(value, dict):
        return 1 + sum(payload_size(k, _depth + 1) + payload_size(v, _depth + 1) for k, v in value.items())
    if isinstance(value, list | tuple):
        return 1 + sum(payload_size(item, _depth + 1) for item in value)
    return 64


def attempt_timeout(expected: float, time_left: float | None, *, alternative: bool, default_timeout: float,
                    factor: float, share: float, ceiling: float) -> float:
    """Seconds an offloaded attempt waits for its result before the task is decided again.

    ``factor x expected`` (the estimated round trip, transfer, queue and service time), at least a
    floor and at most ``ceiling`` and the time left to the deadline. The floor is ``default_timeout``,
    lowered to ``share x time_left`` when the task has a deadline and another option to fall back on,
    so that a silent server still leaves time for the retry or the local run.
    """
    scaled = factor * expected
    if time_left is None:
        return min(ceiling, max(default_timeout, scaled))
    left = max(0.0, time_left)
    floor = min(default_timeout, share * left) if alternative else default_timeout
    return min(left, ceiling, max(floor, scaled))


class _Timers:
    """A heap of (due time, token, task id); a token tells a task's current timer from older ones."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, str]] = []
        self._tokens = itertools.count(1)

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, at: float, task_id: str) -> int:
        token = next(self._tokens)
        heapq.heappush(self._heap, (at, token, task_id))
        return token

    def due(self, now: float) -> list[tuple[int, str]]:
        """Pop every entry due at ``now``: (token, task id), earliest first."""
        popped: list[tuple[int, str]] = []
        while self._heap and self._heap[0][0] <= now:
            _, token, task_id = heapq.heappop(self._heap)
            popped.append((token, task_id))
        return popped

    def next_time(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def prune(self, keep: Callable[[str], bool]) -> None:
        """Drop entries of tasks that no longer need them (finished long before their time)."""
        self._heap = [entry for entry in self._heap if keep(entry[2])]
        heapq.heapify(self._heap)


class PingReplies:
    """Where this device may answer a ping: the pinger's own pong topic, or a configured filter.

    Anything else (a control character, a wildcard, another node's topic, a fleet topic that is not
    a pong) raises :class:`TopicError`: answering there could get this device disconnected by the
    broker or make it publish into someone else's inbox.
    """

    def __init__(self, tree: TopicTree, allow: tuple[str, ...] = ()) -> None:
        self._tree = tree
        self._allow = allow

    def check(self, ping: Ping) -> str:
        topic = validate_publish_topic(ping.reply_to)
        if topic == self._tree.pong(ping.sender):
            return topic
        parsed = self._tree.parse(topic)
        if parsed is not None and parsed.kind is not Kind.PONG:
            raise TopicError(f"reply_to is a {parsed.kind.value} topic of the fleet", topic=topic[:200])
        if any(topic_matches(allowed, topic) for allowed in self._allow):
            return topic
        raise TopicError(f"reply_to is not the pong topic of the pinger {ping.sender!r}", topic=topic[:200])


class _Throttle:
    """At most one log line per key per ``interval``; says how many were held back."""

    def __init__(self, interval: float = 10.0) -> None:
        self._interval = interval
        self._last: dict[str, float] = {}
        self._held: Counter[str] = Counter()
        self._lock = threading.Lock()

    def allow(self, key: str, now: float) -> int | None:
        """None to stay quiet; else the number of lines held back since the last one."""
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self._interval:
                self._held[key] += 1
                return None
            self._last[key] = now
            return self._held.pop(key, 0)


@dataclass(eq=False)
class _Pending:
    """One submitted task until its single outcome."""

    task_id: str
    name: str
    payload: Any
    payload_bytes: int
    stage: int | None
    policy: str
    future: concurrent.futures.Future[Any]
    created: float
    deadline: float | None
    deadline_mono: float | None
    attempts: int = 0
    target: str | None = None
    """The server of the attempt in flight, None when running locally or between attempts."""
    targets: list[str] = field(default_factory=list)
    sent_mono: float = 0.0
    sent_bytes: int = 0
    decision: Decision | None = None
    decided: float | None = None
    sent: float | None = None
    started: float | None = None
    last_status: str = "failed"
    last_error: str = ""
    done: bool = False
    link: int = 0
    """The device's link generation the current attempt was sent on (see ``EdgeAgent._link``)."""
    resend: bool = False
    """The current attempt's message or result may have been lost: re-send it when its server is
    heard from again."""
    timer: int = 0
    """Token of the current attempt's timeout."""
    waited_for_link: bool = False
    """The attempt timeout was already extended once to wait for the link."""


class EdgeAgent:
    """One device: server table, probes, heartbeats, per-task decisions, local pool and retries."""

    def __init__(self, config: EdgeConfig, transport: Transport | None, registry: TaskRegistry, *,
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        self.config = config
        self.id = config.id
        self._transport = transport
        self._registry = registry
        self._clock = clock
        self._mono = monotonic
        self._rng = rng or random.Random()
        self._policy_config: PolicyConfig = config.policy_config.to_policy_config()
        self._tree = TopicTree(config.prefix)
        self._codec = Codec(config.format, max_payload=config.max_payload)
        self._table = ServerTable(stale_after=config.stale_after, half_life=config.failure_half_life,
                                  ignore=frozenset({config.id, config.peer_id}))
        self._bad = BadInputLog(log)
        self._throttle = _Throttle()
        self._ping_replies = PingReplies(self._tree, tuple(config.ping_reply_allow))
        self._lock = threading.RLock()
        self._tasks: dict[str, _Pending] = {}
        self._finished: OrderedDict[str, None] = OrderedDict()
        self._attempt_timers = _Timers()
        self._deadlines = _Timers()
        self._link = 0
        """Link generation: +1 on every (re)connect, on the transport's dispatch thread."""
        self._resend_waiting: set[str] = set()
        """Ids of tasks whose current attempt waits for its server to be heard from (``resend``)."""
        self._previous: dict[str, str] = {}
        self._arrivals: deque[float] = deque()
        self._local_service: dict[str, float] = {}
        self._local_queued = 0
        self._local_running = 0
        self._listeners: list[RecordListener] = []
        self.counters: Counter[str] = Counter()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=config.local_workers,
                                                           thread_name_prefix=f"{config.id}-local")
        self._process_pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._nonces = itertools.count(1)
        self._task_numbers = itertools.count(1)
        self._id_prefix = secrets.token_hex(8)
        """Random per agent: task ids cannot be guessed from anything public (the session number is
        in every heartbeat), so no other client can forge or claim a result for one."""
        self._inboxes: dict[str, str] = {}
        self._next_probe: dict[str, float] = {}
        self._session = max(0, int(clock() * 1000))
        self._seq = 0
        self._next_heartbeat = 0.0
        self._wake = threading.Event()
        self._next_wake = 0.0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._connected_once = False
        self._connects = 0
        self._next_connect: float | None = None
        self._connect_backoff = backoff_delays(0.2, 10.0, self._rng)
        self._result_topic = self._tree.result_inbox(self.id)
        self._pong_topic = self._tree.pong(self.id)
        self.bridge: Bridge | None = None
        """The topic bridge, when the config has routes (created by :meth:`start`)."""

    # ------------------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Register the Will, subscribe, connect (or keep retrying in the background), start timers."""
        if self._thread is not None:
            return
        transport = self._transport
        if transport is not None:
            transport.set_will(self._tree.state(self.id), self._state_bytes("offline"), qos=1, retain=True)
            transport.add_connect_listener(self._on_connect)
            transport.subscribe(self._result_topic, self._on_result, qos=1)
            transport.subscribe(self._tree.all_of(Kind.HEARTBEAT), self._on_heartbeat, qos=0)
            transport.subscribe(self._tree.all_of(Kind.STATE), self._on_state, qos=1)
            transport.subscribe(self._pong_topic, self._on_pong, qos=0)
            transport.subscribe(self._tree.ping(self.id), self._on_ping, qos=0)
            if self.config.routes:
                self.bridge = Bridge(self, self.config.routes)
                self.bridge.start()
            self._try_connect()
        self._thread = threading.Thread(target=self._run_timers, name=f"{self.id}-edge", daemon=True)
        self._thread.start()

    def subscribe(self, topic_filter: str, handler: Callable[[Message], None], *, qos: int = 0) -> None:
        """Subscribe an extra handler on the agent's transport (the bridge uses this)."""
        if self._transport is None:
            raise TransportError("this agent has no broker", topic=topic_filter)
        self._transport.subscribe(topic_filter, handler, qos=qos)

    def publish(self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False) -> None:
        """Publish on the agent's transport; raises :class:`TransportError` when offline."""
        if self._transport is None:
            raise TransportError("this agent has no broker", topic=topic)
        self._transport.publish(topic, payload, qos=qos, retain=retain)

    @property
    def registry(self) -> TaskRegistry:
        """The tasks this device can run itself."""
        return self._registry

    @property
    def connected(self) -> bool:
        return self._transport is not None and self._transport.connected

    def _try_connect(self) -> None:
        assert self._transport is not None
        try:
            self._transport.connect(timeout=self.config.connect_timeout)
        except ConnectError as exc:
            delay = self._connect_backoff()
            self._next_connect = self._mono() + delay
            self.counters["connect_failures"] += 1
            if self.counters["connect_failures"] == 1:
                log.warning("node=%s broker unreachable, running locally and retrying: %s", self.id, exc)
            return
        self._next_connect = None
        self._connected_once = True

    def stop(self) -> None:
        """Fail what is unfinished (one outcome each), publish a clean death, close, stop threads."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._wake.set()
        with self._lock:
            unfinished = list(self._tasks.values())
        for pending in unfinished:
            self._finish(pending, "failed", error="edge agent stopped")
        if self._transport is not None:
            if self._transport.connected:
                with contextlib.suppress(TransportError):
                    self._transport.publish(self._tree.state(self.id), self._state_bytes("offline"),
                                            qos=1, retain=True)
            self._transport.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5.0)
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._process_pool is not None:
            self._process_pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> EdgeAgent:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add_record_listener(self, listener: RecordListener) -> None:
        """Call ``listener`` with one :class:`TaskRecord` per finished task (on the finishing thread)."""
        with self._lock:
            self._listeners.append(listener)

    def remove_record_listener(self, listener: RecordListener) -> None:
        """Stop calling ``listener`` (no error if it was not added)."""
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    # ------------------------------------------------------------------------------ submitting
    def submit(self, name: str, payload: Any, *, deadline: float | None = None, stage: int | None = None,
               policy: str | None = None) -> concurrent.futures.Future[Any]:
        """Run task ``name`` on ``payload`` here or on a server; the future holds the result payload.

        ``deadline``: seconds from now. ``stage``: for a pipeline, run stages ``stage..n-1``.
        Raises :class:`UnknownTaskError` when neither this device nor any server knows ``name`` (with
        the ``local`` policy: when this device does not), ``UnknownPolicyError`` for a bad policy name,
        ``ValueError`` for a bad stage or deadline, ``RuntimeError`` after :meth:`stop`.
        """
        if self._stopping.is_set():
            raise RuntimeError(f"edge agent {self.id} is stopped")
        chosen = check_policy(policy) if policy is not None else self.config.policy
        spec = self._spec(name)
        if spec is None and (chosen == LOCAL or not self._table.announces(name)):
            raise UnknownTaskError(name, self._registry.names())
        if spec is not None:
            spec.check_stage(stage)
        elif stage is not None and stage < 0:
            raise ValueError(f"stage must be >= 0, got {stage}")
        if deadline is not None and not deadline > 0:
            raise ValueError(f"deadline must be a positive number of seconds, got {deadline}")
        now, mono = self._clock(), self._mono()
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        future.set_running_or_notify_cancel()
        pending = _Pending(
            task_id=f"{self._id_prefix}-{next(self._task_numbers)}", name=name, payload=payload,
            payload_bytes=payload_size(payload),
            stage=stage, policy=chosen, future=future, created=now,
            deadline=None if deadline is None else now + deadline,
            deadline_mono=None if deadline is None else mono + deadline)
        with self._lock:
            self._tasks[pending.task_id] = pending
            self._arrivals.append(mono)
            self.counters["submitted"] += 1
            if pending.deadline_mono is not None:
                self._deadlines.push(pending.deadline_mono, pending.task_id)
                if len(self._deadlines) > 2 * len(self._tasks) + 1024:
                    self._deadlines.prune(self._tasks.__contains__)
        if pending.deadline_mono is not None and pending.deadline_mono < self._next_wake:
            self._wake.set()
        self._dispatch(pending)
        return future

    def _spec(self, name: str) -> TaskSpec | None:
        return self._registry.get(name) if name in self._registry else None

    def _local_info(self, name: str, capable: bool, mono: float) -> LocalInfo:
        with self._lock:
            while self._arrivals and self._arrivals[0] < mono - RATE_WINDOW:
                self._arrivals.popleft()
            return LocalInfo(capable=capable, queue_length=self._local_queued,
                             in_flight=self._local_running, workers=self.config.local_workers,
                             service_time=self._local_service.get(name),
                             rate=len(self._arrivals) / RATE_WINDOW)

    def _dispatch(self, pending: _Pending) -> None:
        """Decide the next attempt of ``pending`` and launch it, or give it its final outcome.

        Whatever goes wrong in deciding (a bug, absurd numbers from a made-up server) ends this one
        task with a ``failed`` outcome; it never escapes to the caller or leaves the task hanging.
        """
        try:
            self._decide_and_launch(pending)
        except Exception as exc:  # one task's broken decision must not lose it
            what = f"{type(exc).__name__}: {exc}"[:500]
            with self._lock:
                self.counters["decision_errors"] += 1
            held = self._throttle.allow("decision-error", self._mono())
            if held is not None:
                log.error("node=%s cannot decide task %s (%s): %s%s", self.id, pending.task_id, pending.name,
                          what, f" ({held} more since the last report)" if held else "", exc_info=True)
            self._finish(pending, "failed", error=f"internal error while deciding: {what}")

    def _decide_and_launch(self, pending: _Pending) -> None:
        if pending.done:
            return
        if pending.attempts >= self.config.max_attempts:
            self._finish(pending, pending.last_status, error=pending.last_error or "no attempt left")
            return
        mono = self._mono()
        time_left = None if pending.deadline_mono is None else pending.deadline_mono - mono
        if time_left is not None and time_left <= 0:
            status = pending.last_status if pending.last_status in ("timeout", "expired") else "expired"
            self._finish(pending, status, error="deadline passed before the task could run")
            return
        spec = self._spec(pending.name)
        local_ok = spec is not None
        servers = self._table.snapshot(pending.name, mono) if self.connected else []
        exclude = frozenset(t for t in pending.targets if t != LOCAL)
        info = TaskInfo(pending.name, pending.payload_bytes, time_left)
        local = self._local_info(pending.name, local_ok, mono)
        with self._lock:
            previous = self._previous.get(pending.name)
        decision = decide(pending.policy, info, local, servers, now=mono, rng=self._rng, previous=previous,
                          exclude=exclude, allow_local=local_ok, config=self._policy_config)
        if decision.target is None and local_ok and self._local_full():
            self.counters["local_full"] += 1
            alternative = decide(pending.policy, info, local, servers, now=mono, rng=self._rng,
                                 previous=previous, exclude=exclude, allow_local=False,
                                 config=self._policy_config)
            if alternative.target is None:
                pending.last_status, pending.last_error = "rejected-busy", "local queue full, no server"
                self._finish(pending, "rejected-busy", error="local queue is full and no server is usable")
                return
            decision = alternative
        pending.decision = decision
        pending.decided = self._clock()
        if decision.target is None and not local_ok:
            self._finish(pending, "failed",
                         error=f"no usable server for {pending.name!r} ({decision.reason})")
            return
        with self._lock:
            self._previous[pending.name] = decision.target or LOCAL
        if decision.target is None:
            self._run_local(pending, spec)  # type: ignore[arg-type]  # local_ok implies spec
        else:
            self._send(pending, decision.target, decision)

    # ------------------------------------------------------------------------------ local runs
    def _local_full(self) -> bool:
        with self._lock:
            return (self._local_queued + self._local_running
                    >= self.config.local_workers + self.config.local_queue_size)

    def _run_local(self, pending: _Pending, spec: TaskSpec) -> None:
        with self._lock:
            pending.attempts += 1
            pending.targets.append(LOCAL)
            pending.target = None
            self._local_queued += 1
            self.counters["local_runs"] += 1
        try:
            self._pool.submit(self._local_worker, pending, spec)
        except RuntimeError:  # pool shut down by stop()
            with self._lock:
                self._local_queued -= 1
            self._finish(pending, "failed", error="edge agent stopped")

    def _local_worker(self, pending: _Pending, spec: TaskSpec) -> None:
        with self._lock:
            self._local_queued -= 1
            self._local_running += 1
        try:
            if pending.done:
                return
            if pending.deadline_mono is not None and self._mono() >= pending.deadline_mono:
                self._finish(pending, "expired", error="deadline passed while queued locally")
                return
            pending.started = self._clock()
            begin = self._mono()
            try:
                if spec.executor == "process":
                    value = self._processes().submit(run_spec, spec, pending.payload, pending.stage).result()
                else:
                    value = run_spec(spec, pending.payload, pending.stage)
            except Exception as exc:  # noqa: BLE001  # the task's own failure: an error outcome
                self._note_service(pending.name, self._mono() - begin)
                self._finish(pending, "error", error=f"{type(exc).__name__}: {exc}"[:4096],
                             service_time=self._mono() - begin)
                return
            elapsed = self._mono() - begin
            self._note_service(pending.name, elapsed)
            self._finish(pending, "ok", value=value, service_time=elapsed)
        finally:
            with self._lock:
                self._local_running -= 1

    def _processes(self) -> concurrent.futures.ProcessPoolExecutor:
        with self._lock:
            if self._process_pool is None:
                self._process_pool = concurrent.futures.ProcessPoolExecutor(self.config.local_workers)
            return self._process_pool

    def _note_service(self, name: str, elapsed: float) -> None:
        with self._lock:
            old = self._local_service.get(name)
            self._local_service[name] = elapsed if old is None else old + SERVICE_GAIN * (elapsed - old)

    # ------------------------------------------------------------------------------ offloading
    def _attempt_timeout(self, pending: _Pending, decision: Decision, target: str, mono: float) -> float:
        """See :func:`attempt_timeout`; the estimate is the decision's for ``target``."""
        # The failure penalty steers choices; it says nothing of how long this server will take.
        penalty = self._policy_config.failure_penalty * self._table.recent_failures(target, mono)
        expected = max(0.0, (decision.estimate(target) or 0.0) - penalty)
        alternative = pending.attempts < self.config.max_attempts and (
            self._spec(pending.name) is not None or any(option != target for option, _ in decision.estimates))
        time_left = None if pending.deadline_mono is None else pending.deadline_mono - mono
        return attempt_timeout(expected, time_left, alternative=alternative,
                               default_timeout=self.config.default_timeout, factor=self.config.timeout_factor,
                               share=self.config.attempt_share, ceiling=self.config.max_timeout)

    def _task_message(self, pending: _Pending, attempt: int) -> bytes | None:
        """The encoded Task of ``attempt``; None (and a ``failed`` outcome) if it cannot be sent."""
        task = Task(id=pending.task_id, task=pending.name, sender=self.id, reply_to=self._result_topic,
                    created=max(0.0, self._clock()), attempt=attempt,  # ttl: immune to clock offsets
                    ttl=None if pending.deadline_mono is None
                    else min(MAX_TTL, max(0.0, pending.deadline_mono - self._mono())),
                    payload=pending.payload, stage=pending.stage)
        try:
            return self._codec.encode(task)
        except EncodeError as exc:
            self._bad.record("unencodable-payload", str(exc), task_id=pending.task_id)
            self._finish(pending, "failed", error=f"payload cannot be sent: {exc}")
            return None

    def _arm(self, pending: _Pending, timeout: float, mono: float) -> None:
        """(Re)start the current attempt's timeout (caller holds the lock)."""
        due = mono + timeout
        pending.timer = self._attempt_timers.push(due, pending.task_id)
        if due < self._next_wake:
            self._wake.set()  # the timer thread sleeps past this timeout: wake it (short deadlines)

    def _send(self, pending: _Pending, target: str, decision: Decision) -> None:
        assert self._transport is not None
        with self._lock:
            pending.attempts += 1
            pending.targets.append(target)
            attempt = pending.attempts
        data = self._task_message(pending, attempt)
        if data is None:
            return
        mono = self._mono()
        timeout = self._attempt_timeout(pending, decision, target, mono)
        with self._lock:
            pending.target = target
            pending.sent_mono = mono
            pending.sent_bytes = len(data)
            pending.sent = self._clock()
            pending.link = self._link
            pending.resend = False
            pending.waited_for_link = False
            self._arm(pending, timeout, mono)
            self.counters["offloaded"] += 1
        self._table.task_sent(target)
        self._publish_attempt(pending, attempt, target, data)

    def _publish_attempt(self, pending: _Pending, attempt: int, target: str, data: bytes) -> None:
        """Publish an attempt. With the link down, a task that can run here is decided again at
        once; any other waits (its timeout running) to be re-sent when the link and ``target`` are back."""
        assert self._transport is not None
        try:
            self._transport.publish(self._inbox(target), data, qos=1)
        except NotConnectedError as exc:
            self.counters["publish_failures"] += 1
            if self._spec(pending.name) is not None:
                self._attempt_failed(pending, attempt, "failed", f"cannot publish to {target}: {exc}",
                                     penalise=False)
            else:
                self._wait_for_resend(pending, attempt)
        except TransportError as exc:
            self.counters["publish_failures"] += 1
            self._attempt_failed(pending, attempt, "failed", f"cannot publish to {target}: {exc}",
                                 penalise=False)

    def _wait_for_resend(self, pending: _Pending, attempt: int) -> None:
        with self._lock:
            if pending.done or pending.attempts != attempt or pending.target is None:
                return
            pending.resend = True
            self._resend_waiting.add(pending.task_id)

    def _resend_to(self, node: str) -> None:
        """``node`` was heard from over the current link: re-send the attempts waiting for it, as the
        same attempt (the server answers a duplicate from its result cache), with a fresh timeout."""
        waiting: list[_Pending] = []
        with self._lock:
            for task_id in list(self._resend_waiting):
                pending = self._tasks.get(task_id)
                if pending is None or pending.done or not pending.resend:
                    self._resend_waiting.discard(task_id)
                elif pending.target == node:
                    self._resend_waiting.discard(task_id)
                    waiting.append(pending)
        for pending in waiting:
            self._resend(pending, node)

    def _resend(self, pending: _Pending, node: str) -> None:
        with self._lock:
            attempt = pending.attempts
            decision = pending.decision
        data = self._task_message(pending, attempt)
        if data is None or decision is None:
            return
        mono = self._mono()
        timeout = self._attempt_timeout(pending, decision, node, mono)
        with self._lock:
            if pending.done or pending.attempts != attempt or pending.target != node:
                return
            pending.resend = False
            pending.link = self._link
            pending.sent_mono = mono
            pending.waited_for_link = False
            self._arm(pending, timeout, mono)
            self.counters["resends"] += 1
        log.debug("node=%s re-sending task %s attempt %d to %s", self.id, pending.task_id, attempt, node)
        self._publish_attempt(pending, attempt, node, data)

    def _inbox(self, node: str) -> str:
        topic = self._inboxes.get(node)
        if topic is None:
            topic = self._inboxes[node] = self._tree.task_inbox(node)
        return topic

    def _attempt_failed(self, pending: _Pending, attempt: int, status: str, error: str, *,
                        penalise: bool = True) -> None:
        """The attempt ``attempt`` of ``pending`` will not answer: count it and try the next option."""
        with self._lock:
            if pending.done or pending.attempts != attempt or pending.target is None:
                return
            target = pending.target
            pending.target = None
            pending.resend = False
            pending.last_status, pending.last_error = status, error
            self.counters["retries"] += 1
        self._table.task_done(target, answered=status in ANSWERED_FAILURES)
        if penalise:
            self._table.failure(target, self._mono())
        log.debug("node=%s task=%s id=%s attempt=%d target=%s failed status=%s: %s", self.id, pending.name,
                  pending.task_id, attempt, target, status, error)
        self._dispatch(pending)

    # ------------------------------------------------------------------------------ outcomes
    def _finish(self, pending: _Pending, outcome: str, *, value: Any = None, error: str | None = None,
                service_time: float | None = None, queue_wait: float | None = None,
                received: float | None = None) -> bool:
        """Give ``pending`` its one outcome; False if it already had one."""
        with self._lock:
            if pending.done:
                return False
            pending.done = True
            target = pending.target
            pending.target = None
            pending.resend = False
            self._tasks.pop(pending.task_id, None)
            self._resend_waiting.discard(pending.task_id)
            self._finished[pending.task_id] = None
            if len(self._finished) > FINISHED_MEMORY:
                self._finished.popitem(last=False)
            self.counters[f"outcome_{outcome}"] += 1
            listeners = list(self._listeners)
        if target is not None:
            self._table.task_done(target, answered=received is not None)
        finished = self._clock()
        decision = pending.decision
        record = TaskRecord(
            task_id=pending.task_id, name=pending.name, device=self.id, policy=pending.policy,
            target=pending.targets[-1] if pending.targets else LOCAL,
            reason=decision.reason if decision else "none", outcome=outcome,  # type: ignore[arg-type]
            attempts=pending.attempts, created=pending.created, decided=pending.decided, sent=pending.sent,
            started=pending.started, finished=finished, received=received,
            estimates=decision.estimates if decision else (), error=error, queue_wait=queue_wait,
            service_time=service_time, payload_bytes=pending.payload_bytes, targets=tuple(pending.targets))
        if outcome == "ok":
            pending.future.set_result(value)
        else:
            pending.future.set_exception(TaskFailed(outcome, error or outcome, pending.attempts,
                                                    task_id=pending.task_id, name=pending.name))
        for listener in listeners:
            try:
                listener(record)
            except Exception:
                self.counters["listener_errors"] += 1
                log.exception("node=%s record listener failed", self.id)
        return True

    # ------------------------------------------------------------------------------ handlers
    def _on_result(self, message: Message) -> None:
        received_mono, received = self._mono(), self._clock()
        try:
            result = self._codec.decode(message.payload, Result, topic=message.topic)
        except DecodeError as exc:
            self._bad.record(f"result-{exc.reason}", exc.detail, topic=message.topic)
            return
        with self._lock:
            pending = self._tasks.get(result.task_id)
            if pending is None:
                key = "late_results" if result.task_id in self._finished else "unknown_results"
                self.counters[key] += 1
                return
            if result.server not in pending.targets:
                self.counters["unknown_results"] += 1
                return
            current = pending.target == result.server and pending.attempts == result.attempt
            final = result.status in (Status.OK.value, Status.ERROR.value)
            if not current and not final:
                self.counters["late_results"] += 1
                return
            if not current:
                self.counters["late_results_used"] += 1
            sent_mono, sent_bytes = pending.sent_mono, pending.sent_bytes
            attempt = pending.attempts
        if final:
            if current:
                self._table.transfer_observed(result.server, sent_bytes + len(message.payload),
                                              received_mono - sent_mono,
                                              result.queue_wait + result.service_time)
            if result.status == Status.OK.value:
                self._finish(pending, "ok", value=result.payload, service_time=result.service_time,
                             queue_wait=result.queue_wait, received=received)
            else:
                self._finish(pending, "error", error=result.error or "task failed on the server",
                             service_time=result.service_time, queue_wait=result.queue_wait,
                             received=received)
            return
        if result.status not in RETRYABLE:  # not reachable with the current Status enum
            self.counters["unknown_results"] += 1
            return
        self._attempt_failed(pending, attempt, str(result.status),
                             result.error or f"{result.server} answered {result.status}")

    def _on_heartbeat(self, message: Message) -> None:
        try:
            heartbeat = self._codec.decode(message.payload, Heartbeat, topic=message.topic)
        except DecodeError as exc:
            self._bad.record(f"heartbeat-{exc.reason}", exc.detail, topic=message.topic)
            return
        parsed = self._tree.parse(message.topic)
        if parsed is None or parsed.node != heartbeat.node:
            self._bad.record("heartbeat-topic", f"heartbeat of {heartbeat.node} on a foreign topic",
                             topic=message.topic)
            return
        fresh = heartbeat.node not in self._next_probe
        if not self._table.on_heartbeat(heartbeat, self._mono()):
            return
        if fresh:
            self._wake.set()  # probe a new server at once
        self._resend_to(heartbeat.node)

    def _on_state(self, message: Message) -> None:
        if not message.payload:
            return  # a cleared retained state
        try:
            state = self._codec.decode(message.payload, NodeState, topic=message.topic)
        except DecodeError as exc:
            self._bad.record(f"state-{exc.reason}", exc.detail, topic=message.topic)
            return
        parsed = self._tree.parse(message.topic)
        if parsed is None or parsed.node != state.node:
            self._bad.record("state-topic", f"state of {state.node} on a foreign topic", topic=message.topic)
            return
        live = not message.retain
        if self._table.on_state(state, self._mono(), live=live):
            log.info("node=%s server=%s session=%d went offline", self.id, state.node, state.session)
            self._fail_in_flight({state.node}, f"server {state.node} went offline")
        elif live and state.status == "online" and not self._table.awaiting(state.node):
            self._resend_to(state.node)

    def _on_pong(self, message: Message) -> None:
        try:
            pong = self._codec.decode(message.payload, Pong, topic=message.topic)
        except DecodeError as exc:
            self._bad.record(f"pong-{exc.reason}", exc.detail, topic=message.topic)
            return
        self._table.on_pong(pong.responder, pong.nonce, pong.sent, self._mono())

    def _on_ping(self, message: Message) -> None:
        try:
            ping = self._codec.decode(message.payload, Ping, topic=message.topic)
            data = self._codec.encode(Pong(nonce=ping.nonce, responder=self.id, sent=ping.sent))
        except DecodeError as exc:
            self._bad.record(f"ping-{exc.reason}", exc.detail, topic=message.topic)
            return
        try:
            reply_to = self._ping_replies.check(ping)
        except TopicError as exc:
            self._bad.record("ping-reply-to-not-allowed", f"{exc} (reply_to {ping.reply_to[:100]!r})",
                             topic=message.topic)
            return
        try:
            self.publish(reply_to, data)
        except (TransportError, ValueError) as exc:
            self._bad.record("ping-reply", str(exc), topic=message.topic)

    def _on_connect(self) -> None:
        """After every (re)connect, on the dispatch thread, before any message of the new link."""
        self._connected_once = True
        self._connects += 1
        with self._lock:
            self._link += 1
            lost = [p for p in self._tasks.values() if p.target is not None and p.link < self._link]
            for pending in lost:  # sent over an earlier link: the task or its result may be lost
                pending.resend = True
                self._resend_waiting.add(pending.task_id)
            self.counters["link_lost_attempts"] += len(lost)
        if self._connects > 1:
            self.counters["reconnects"] += 1
            self._table.link_restored(self._mono())
        try:
            self.publish(self._tree.state(self.id), self._state_bytes("online"), qos=1, retain=True)
        except TransportError as exc:
            log.warning("node=%s cannot publish birth: %s", self.id, exc)
        self._next_heartbeat = 0.0
        self._wake.set()

    def _fail_in_flight(self, nodes: set[str], error: str) -> None:
        """``nodes`` died or fell silent: decide again the tasks in flight to them. A task with nowhere
        else to go keeps waiting instead (the death may be a broker restart, which fires every Will):
        it is re-sent when its server is heard from again, and its timeout still bounds the wait."""
        with self._lock:
            victims = [(p, p.attempts) for p in self._tasks.values() if p.target in nodes and not p.resend]
            self.counters["server_deaths_in_flight"] += len(victims)
        for pending, attempt in victims:
            if self._has_alternative(pending, nodes):
                self._attempt_failed(pending, attempt, "failed", error)
            else:
                self.counters["waiting_for_server"] += 1
                self._wait_for_resend(pending, attempt)

    def _has_alternative(self, pending: _Pending, unusable: set[str]) -> bool:
        """Could ``pending`` run somewhere else now: locally, or on a usable server not yet tried?"""
        if self._spec(pending.name) is not None:
            return True
        if not self.connected or pending.attempts >= self.config.max_attempts:
            return False
        tried = unusable.union(pending.targets)
        try:
            servers = self._table.snapshot(pending.name, self._mono())
        except Exception:  # noqa: BLE001 - decide again: _dispatch gives a broken decision its outcome
            return True
        return any(s.capable and not s.stale and s.node not in tried for s in servers)

    # ------------------------------------------------------------------------------ timers
    def _run_timers(self) -> None:
        while not self._stopping.is_set():
            try:
                wait = self._tick()
            except Exception:  # a bug here must not kill timeouts for good
                self.counters["timer_errors"] += 1
                log.exception("node=%s timer tick failed", self.id)
                wait = MAX_WAIT
            wait = max(0.0, min(wait, MAX_WAIT))
            self._next_wake = self._mono() + wait
            self._wake.wait(wait)
            self._wake.clear()

    def _tick(self) -> float:
        """Run what is due; return seconds until the next thing is due."""
        mono = self._mono()
        due: list[float] = []
        if self._transport is not None and not self._transport.connected and self._next_connect is not None:
            if mono >= self._next_connect:
                self._try_connect()
            if self._next_connect is not None:
                due.append(self._next_connect)
        due.append(self._expire_attempts(mono))
        due.append(self._expire_deadlines(mono))
        stale = self._table.next_stale_time()
        if self.connected:  # while the device's own link is down, silence is not the servers' fault
            with self._lock:
                targets = {p.target for p in self._tasks.values() if p.target is not None and not p.resend}
            dead = {node for node in targets if self._table.silent(node, mono)}
            if dead:
                self._fail_in_flight(dead, "server stopped sending heartbeats")
        if stale is not None:
            due.append(stale + 0.001)
        if self.connected:
            due.append(self._probe(mono))
            if mono >= self._next_heartbeat:
                self._send_heartbeat()
                self._next_heartbeat = mono + self.config.heartbeat_interval
            due.append(self._next_heartbeat)
        return min(due) - mono

    def _expire_attempts(self, mono: float) -> float:
        expired: list[tuple[_Pending, int]] = []
        with self._lock:
            for token, task_id in self._attempt_timers.due(mono):
                pending = self._tasks.get(task_id)
                if pending is not None and pending.timer == token and pending.target is not None:
                    expired.append((pending, pending.attempts))
            following = self._attempt_timers.next_time()
        for pending, attempt in expired:
            if self._extend_for_link(pending, mono):
                continue
            with self._lock:
                self.counters["timeouts"] += 1
                ours = pending.resend or pending.link != self._link  # our link may have lost it
            self._attempt_failed(pending, attempt, "timeout", f"no result from {pending.target} in time",
                                 penalise=not ours)
        return mono + MAX_WAIT if following is None else following

    def _extend_for_link(self, pending: _Pending, mono: float) -> bool:
        """An attempt waiting for the device's own link, of a task that cannot run here: rather than
        fail it while nothing can be done, wait (once) until its deadline for the link to come back."""
        with self._lock:
            if (not pending.resend or pending.waited_for_link or self.connected
                    or pending.deadline_mono is None or pending.deadline_mono <= mono
                    or self._spec(pending.name) is not None):
                return False
            pending.waited_for_link = True
            pending.timer = self._attempt_timers.push(pending.deadline_mono, pending.task_id)
            self.counters["waited_for_link"] += 1
            return True

    def _expire_deadlines(self, mono: float) -> float:
        """Every task still unfinished at its deadline gets its outcome now (a local run's thread keeps
        running until it returns; its late output is discarded, as a server does)."""
        with self._lock:
            due = [pending for _, task_id in self._deadlines.due(mono)
                   if (pending := self._tasks.get(task_id)) is not None and not pending.done]
            following = self._deadlines.next_time()
        for pending in due:
            if pending.target is not None:
                status, error = "timeout", f"no result from {pending.target} before the deadline"
            elif pending.targets and pending.targets[-1] == LOCAL:
                where = "running" if pending.started is not None else "queued"
                status, error = "expired", f"deadline passed while {where} locally"
            else:
                status, error = "expired", "deadline passed before the task could run"
            if self._finish(pending, status, error=error):
                with self._lock:
                    self.counters["deadline_outcomes"] += 1
        return mono + MAX_WAIT if following is None else following

    def _probe(self, mono: float) -> float:
        following = mono + self.config.probe_interval
        alive = self._table.probe_targets(mono)
        for node in list(self._next_probe):
            if node not in alive:
                del self._next_probe[node]
        for node in alive:
            due = self._next_probe.get(node, mono)
            if due <= mono:
                nonce = next(self._nonces)
                sent = self._mono()
                self._table.ping_sent(node, nonce, sent)
                ping = Ping(nonce=nonce, sender=self.id, reply_to=self._pong_topic, sent=sent)
                try:
                    self.publish(self._tree.ping(node), self._codec.encode(ping))
                except TransportError:
                    break
                due = mono + self.config.probe_interval * self._rng.uniform(0.75, 1.25)
                self._next_probe[node] = due
            following = min(following, due)
        return following

    def _send_heartbeat(self) -> None:
        with self._lock:
            self._seq += 1
            load = Load(queue_length=self._local_queued, queue_capacity=self.config.local_queue_size,
                        in_flight=self._local_running, workers=self.config.local_workers,
                        service_time={name: round(value, 6) for name, value in self._local_service.items()})
            seq = self._seq
        heartbeat = Heartbeat(node=self.id, role=Role.DEVICE, session=self._session, seq=seq,
                              interval=self.config.heartbeat_interval, time=max(0.0, self._clock()),
                              capabilities=self._registry.capabilities(), load=load)
        try:
            self.publish(self._tree.heartbeat(self.id), self._codec.encode(heartbeat))
        except TransportError:
            self.counters["heartbeat_failures"] += 1

    def _state_bytes(self, status: str) -> bytes:
        state = NodeState(node=self.id, role=Role.DEVICE, status=status,  # type: ignore[arg-type]
                          session=self._session, time=max(0.0, self._clock()))
        return self._codec.encode(state)

    # ------------------------------------------------------------------------------ views
    def servers(self) -> list[ServerView]:
        """Snapshot of the server table (rtt, bandwidth, load, staleness) for fleet views."""
        return self._table.views(self._mono())

    def stats(self) -> dict[str, Any]:
        """Counters of this agent, its bad input, its server table and its transport."""
        with self._lock:
            values: dict[str, Any] = dict(self.counters)
            values["in_flight"] = len(self._tasks)
            values["waiting_for_resend"] = len(self._resend_waiting)
            values["local_queued"] = self._local_queued
            values["local_running"] = self._local_running
        values["bad_input"] = self._bad.snapshot()
        values["servers"] = self._table.counters | {
            "known": len(self._table.views(self._mono())),
            "usable": len(self._table.probe_targets(self._mono()))}
        values["connected"] = self.connected
        if self.bridge is not None:
            values["bridge"] = self.bridge.stats()
        values["transport"] = self._transport.stats() if self._transport is not None else {}
        return values


__all__ = ["EdgeAgent", "RecordListener", "TaskFailed", "TaskRecord", "payload_size"]
