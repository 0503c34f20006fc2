"""The edge agent: the device core (:mod:`edge_agent.core`) driven by MQTT, threads, a pool and futures.

Flow of one task (:meth:`EdgeAgent.submit`)::

    decide (policy.decide, the simulator's very function) --local--> bounded local pool --> outcome
                 |                                                            ^
                 +--server--> publish Task (QoS 1) --Result ok/error----------+
                                 |  timeout, rejected-busy, expired, unknown-task, server death
                                 +--> decide again, excluding the servers tried (at most max_attempts)

Every rule (the server table, estimates, timeouts, retries, outcomes) is the core's; the discrete-event
simulator runs the same core. This module performs its actions: it decodes messages into events,
encodes and publishes tasks and pings, runs local tasks on a thread (or process) pool, keeps the
core's timers, and completes each caller's :class:`~edge_agent.records.TaskHandle` with its one
outcome, at the task's deadline at the latest.

Threads, all named after the node id: the transport's dispatch thread runs the message handlers,
``<id>-edge`` runs timers (the core's, heartbeats, reconnecting after an offline start),
``<id>-local_*`` run local tasks. Every call into the core holds one lock; publishing, running tasks
and completing futures happen outside it. No global state and no signal handlers: many agents can
live in one process (the simulator does that).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import heapq
import itertools
import json
import logging
import random
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent_common.badinput import BadInputLog
from agent_common.decoding import decode_or_count
from agent_common.heap import freeze_startup_objects
from agent_common.registry import TaskRegistry, TaskSpec, UnknownTaskError, load_tasks, run_spec
from edge_agent.bridge import Bridge
from edge_agent.config import EdgeConfig, load_edge_config
from edge_agent.core import (
    Action,
    Complete,
    CoreTask,
    DeviceCore,
    Execute,
    Fault,
    Park,
    Ping,
    RunLocal,
    Send,
    Timer,
    attempt_timeout,
)
from edge_agent.policy import LOCAL, check_policy
from edge_agent.records import TaskFailed, TaskHandle, TaskRecord
from edge_agent.servers import ServerReport, ServerView
from edge_agent.spool import Spool, SpooledTask, SpoolError, SpoolFull, open_spool
from edge_agent.tuning import Tuning
from topics.codec import Codec, EncodeError
from topics.errors import DecodeError, TopicError
from topics.models import MAX_TTL, Heartbeat, Load, NodeState, Pong, Result, Role, Task
from topics.models import Ping as PingMessage
from topics.names import DELIVERY, Kind, TopicTree, topic_matches, validate_node_id, validate_publish_topic
from topics.task_wire import TaskEncoder
from topics.transport import (
    BrokerRefused,
    ConnectError,
    Message,
    NotConnectedError,
    Transport,
    TransportError,
    backoff_delays,
)

if TYPE_CHECKING:
    from agent_common.metrics import MetricsServer
    from edge_agent.http_endpoint import HttpEndpoint

log = logging.getLogger(__name__)

RecordListener = Callable[[TaskRecord], None]
NodeListener = Callable[[str, "Heartbeat | NodeState | None", str], None]
"""``(topic, record, problem)`` for each heartbeat and state heard, of any node; ``record`` is None
(and ``problem`` says why) when the message could not be read."""

MAX_WAIT = 0.5
"""Longest the timer thread sleeps, so that stop() stays prompt and a jumping clock is noticed."""
_NO_VALUE = object()
_STATE = DELIVERY[Kind.STATE]


def payload_size(value: Any, _depth: int = 0) -> int:
    """A cheap estimate of a payload's encoded size in bytes (exact for bytes and arrays)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return len(value)
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
    nbytes = getattr(value, "nbytes", None)  # a numpy array, without importing numpy
    if isinstance(nbytes, int):
        return nbytes + 32
    return 64


class PingReplies:
    """Where this device may answer a ping: the pinger's own pong topic, or a configured filter.

    Anything else (a control character, a wildcard, another node's topic, a fleet topic that is not
    a pong) raises :class:`TopicError`: answering there could get this device disconnected by the
    broker or make it publish into someone else's inbox.
    """

    def __init__(self, tree: TopicTree, allow: tuple[str, ...] = ()) -> None:
        self._tree = tree
        self._allow = allow

    def check(self, ping: PingMessage) -> str:
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


class _Timers:
    """The core's timers, earliest first; stale ones are dropped when they come due or on pruning."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Timer]] = []
        self._order = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, timer: Timer) -> None:
        heapq.heappush(self._heap, (timer.at, next(self._order), timer))

    def due(self, now: float) -> list[Timer]:
        popped: list[Timer] = []
        while self._heap and self._heap[0][0] <= now:
            popped.append(heapq.heappop(self._heap)[2])
        return popped

    def next_time(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def prune(self, keep: Callable[[Timer], bool]) -> None:
        self._heap = [entry for entry in self._heap if keep(entry[2])]
        heapq.heapify(self._heap)


@dataclass(eq=False)
class _Job:
    """What the driver holds of one task beyond the core's state: the caller's handle and the payload."""

    handle: TaskHandle
    payload: Any
    stage: int | None
    deadline: float | None
    """Absolute, on the agent's clock: what the wire carries."""
    sent_bytes: int = 0
    name: str = ""
    policy: str = ""
    spooled: bool = False
    """In the spool (store and forward), not in the core: waits for a server."""
    reparked: bool = False
    """Handed back to the core from the spool, the core parked it again (no server after all)."""
    refused: Exception | None = None
    """Why it could not be spooled at submit (:class:`SpoolFull`...): submit raises it."""
    created: float = 0.0
    """Wall time of submission."""
    recovered: bool = False
    """Taken from a spool an earlier run left: no caller in this process."""
    origin: str | None = None
    """The caller's reference, kept with it in the spool."""


class EdgeAgent:
    """One device: a :class:`~edge_agent.core.DeviceCore` on MQTT, with a local pool, heartbeats, probes."""

    def __init__(self, config: EdgeConfig, transport: Transport | None, registry: TaskRegistry, *,
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None, tuning: Tuning | None = None) -> None:
        self.config = config
        self.id = config.id
        self._transport = transport
        self._registry = registry
        self._clock = clock
        self._mono = monotonic
        self._rng = rng or random.Random()
        self.tuning = tuning or Tuning.of(config)
        """The tuning numbers of its core (from ``config`` unless given)."""
        self._core = DeviceCore(
            config.id, local_tasks=registry, local_workers=config.local_workers, tuning=self.tuning,
            policy_config=config.policy_config.to_policy_config(), policy=config.policy, rng=self._rng,
            ignore=frozenset({config.id, config.peer_id}), epoch=clock() - monotonic())
        self._core.parking = config.spool_path is not None
        self._tree = TopicTree(config.prefix)
        self._codec = Codec(config.format, max_payload=config.max_payload)
        self._json = self._codec if config.format == "json" else Codec("json", max_payload=config.max_payload)
        """What heartbeats and states go out in (DELIVERY fixes JSON for the operators' channels)."""
        self._bad = BadInputLog(log)
        self._throttle = _Throttle()
        self._ping_replies = PingReplies(self._tree, tuple(config.ping_reply_allow))
        self._lock = threading.RLock()
        self._jobs: dict[str, _Job] = {}
        self._timers = _Timers()
        self._listeners: list[RecordListener] = []
        self._node_listeners: list[NodeListener] = []
        self._fatal_error: BrokerRefused | None = None
        self._connect_problem: str | None = None
        self.counters: Counter[str] = Counter()
        """The driver's own counters (connections, heartbeats, listeners); :meth:`stats` has all."""
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=config.local_workers,
                                                           thread_name_prefix=f"{config.id}-local")
        self._process_pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._task_numbers = itertools.count(1)
        self._id_prefix = secrets.token_hex(8)
        """Random per agent: task ids cannot be guessed from anything public (the session number is
        in every heartbeat), so no other client can forge or claim a result for one."""
        self._inboxes: dict[str, str] = {}
        self._session = max(0, int(clock() * 1000))
        self._seq = 0
        self._next_heartbeat = 0.0
        self._wake = threading.Event()
        self._next_wake = 0.0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_connect: float | None = None
        self._connect_backoff = backoff_delays(0.2, 10.0, self._rng)
        self._result_topic = self._tree.result_inbox(self.id)
        self._tasks_out = TaskEncoder(self._codec, sender=self.id, reply_to=self._result_topic)
        self._pong_topic = self._tree.pong(self.id)
        self.bridge: Bridge | None = None
        """The topic bridge, when the config has routes (created by :meth:`start`)."""
        self.http_endpoint: HttpEndpoint | None = None
        """The local HTTP endpoint, when the config has ``http_port`` (bound by :meth:`start`)."""
        self.metrics: MetricsServer | None = None
        """The Prometheus metrics server, when the config has ``metrics_port`` (started by :meth:`start`)."""
        self._spool: Spool | None = None
        """The store-and-forward spool, when the config has ``spool_path`` (opened by :meth:`start`)."""
        self._drain_due = False
        self._spool_expiry: float | None = None
        """Wall time of the spool's next expiry, or None (under ``_expiry_lock``)."""
        self._expiry_lock = threading.Lock()

    @classmethod
    def from_config(cls, config: EdgeConfig | str | Path, *, registry: TaskRegistry | None = None,
                    **options: Any) -> EdgeAgent:
        """An agent built from ``config`` (or the TOML file at that path, with ``EDGE_AGENT_*`` on top):
        its MQTT transport from the config's broker (none: everything runs locally), its tasks from
        ``config.tasks`` unless ``registry`` is given. ``options`` go to the constructor."""
        if not isinstance(config, EdgeConfig):
            config = load_edge_config(config)
        transport: Transport | None = None
        if config.broker:
            from topics.mqtt import MqttTransport  # paho only when there is a broker to talk to

            transport = MqttTransport(config.transport_config())
        return cls(config, transport, load_tasks(*config.tasks) if registry is None else registry, **options)

    # ------------------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Register the Will, subscribe, connect (or keep retrying in the background), start timers.

        Raises :class:`BrokerRefused` when the broker refuses this device's credentials,
        authorisation or protocol (an unreachable broker is retried in the background instead)."""
        if self._thread is not None:
            return
        self._open_spool()
        try:
            self._open_endpoints()
        except BaseException:
            self._close_spool()
            raise
        transport = self._transport
        if transport is not None:
            if self.config.announce:
                transport.set_will(self._tree.state(self.id), self._state_bytes("offline"),
                                   qos=_STATE.qos, retain=_STATE.retain)
            transport.add_connect_listener(self._on_connect)
            subscriptions: tuple[tuple[str, Kind, Callable[[Message], None]], ...] = (
                (self._result_topic, Kind.RESULT, self._on_result),
                (self._tree.all_of(Kind.HEARTBEAT), Kind.HEARTBEAT, self._on_heartbeat),
                (self._tree.all_of(Kind.STATE), Kind.STATE, self._on_state),
                (self._pong_topic, Kind.PONG, self._on_pong),
                (self._tree.ping(self.id), Kind.PING, self._on_ping),
            )
            for topic_filter, kind, handler in subscriptions:
                transport.subscribe(topic_filter, handler, qos=DELIVERY[kind].qos)
            if self.config.routes:
                self.bridge = Bridge(self, self.config.routes)
                self.bridge.start()
            try:
                self._try_connect(first=True)
            except BrokerRefused:
                transport.close()
                self._close_endpoints()
                self._close_spool()
                raise
        self._thread = threading.Thread(target=self._run_timers, name=f"{self.id}-edge", daemon=True)
        self._thread.start()
        if self.http_endpoint is not None:
            self.http_endpoint.start()
        if self.config.freeze_startup_heap:
            freeze_startup_objects()  # full collections stop every thread: keep them short

    def _open_endpoints(self) -> None:
        """Start the metrics server and bind the HTTP endpoint the config asks for, before anything
        else starts: a port in use fails :meth:`start` with nothing left running."""
        config = self.config
        if config.metrics_port is not None:
            from edge_agent.metrics import EdgeMetrics

            self.metrics = EdgeMetrics(self).serve(host=config.metrics_host, port=config.metrics_port)
        if config.http_port is not None:
            from edge_agent.http_endpoint import HttpEndpoint

            try:
                self.http_endpoint = HttpEndpoint(self, host=config.http_host, port=config.http_port,
                                                  max_body=config.http_max_body,
                                                  max_pending=config.http_max_pending)
            except OSError:
                self._close_endpoints()
                raise

    def _close_endpoints(self) -> None:
        if self.http_endpoint is not None:
            self.http_endpoint.close()
            self.http_endpoint = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None

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
    def core(self) -> DeviceCore:
        """The device core this agent drives (for inspection; call it only through the agent)."""
        return self._core

    @property
    def registry(self) -> TaskRegistry:
        """The tasks this device can run itself."""
        return self._registry

    @property
    def connected(self) -> bool:
        return self._transport is not None and self._transport.connected

    @property
    def fatal_error(self) -> BrokerRefused | None:
        """Why this agent gave up connecting for good (the broker refused its credentials,
        authorisation or protocol), or None. It keeps running its local tasks meanwhile."""
        return self._fatal_error

    @property
    def connect_problem(self) -> str | None:
        """Why the last attempt to connect failed, while it has not succeeded since (None once
        connected): what to tell a user instead of "no server knows this task"."""
        return self._connect_problem

    def _try_connect(self, *, first: bool = False) -> None:
        assert self._transport is not None
        try:
            self._transport.connect(timeout=self.config.connect_timeout)
        except BrokerRefused as exc:
            if first:
                raise  # start() fails: a setting is wrong, retrying cannot help
            self._fatal_error = exc
            self._next_connect = None
            log.error("node=%s broker refused this device, no more retries: %s", self.id, exc)
            return
        except ConnectError as exc:
            self._connect_problem = str(exc)
            delay = self._connect_backoff()
            self._next_connect = self._mono() + delay
            self.counters["connect_failures"] += 1
            if self.counters["connect_failures"] == 1:
                log.warning("node=%s broker unreachable, running locally and retrying: %s", self.id, exc)
            return
        self._next_connect = None
        self._connect_problem = None

    def stop(self) -> None:
        """Fail what is unfinished (one outcome each), publish a clean death, close, stop threads."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._wake.set()
        if self.http_endpoint is not None:
            self.http_endpoint.close()  # no new requests; waiting ones get their outcome below
        self._feed(self._core.stop, self._mono())
        if self._transport is not None:
            if self._transport.connected and self.config.announce:
                with contextlib.suppress(TransportError):
                    self._transport.publish(self._tree.state(self.id), self._state_bytes("offline"),
                                            qos=_STATE.qos, retain=_STATE.retain)
            self._transport.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5.0)
        self._release_spooled()  # after the timer thread: no drain hands a task over any more
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._process_pool is not None:
            self._process_pool.shutdown(wait=False, cancel_futures=True)
        if self.metrics is not None:
            self.metrics.close()
        self._close_spool()

    def __enter__(self) -> EdgeAgent:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add_record_listener(self, listener: RecordListener) -> None:
        """Call ``listener`` with one :class:`TaskRecord` per finished task (on the finishing thread)."""
        with self._lock:
            self._listeners.append(listener)

    def add_node_listener(self, listener: NodeListener) -> None:
        """Call ``listener`` with every heartbeat and state record this agent hears, of devices and
        servers, and with ``None`` and the reason for one it cannot read (fleet views use this)."""
        with self._lock:
            self._node_listeners.append(listener)

    def _tell_nodes(self, topic: str, record: Heartbeat | NodeState | None, problem: str = "") -> None:
        for listener in list(self._node_listeners):
            try:
                listener(topic, record, problem)
            except Exception:  # a listener's bug must not stop the agent hearing its fleet
                log.exception("node=%s node listener failed", self.id)

    def remove_record_listener(self, listener: RecordListener) -> None:
        """Stop calling ``listener`` (no error if it was not added)."""
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    # ------------------------------------------------------------------------------ submitting
    def submit(self, name: str, payload: Any, *, deadline: float | None = None, stage: int | None = None,
               policy: str | None = None, target: str | None = None, pool: str | None = None,
               origin: str | None = None) -> TaskHandle:
        """Run task ``name`` on ``payload`` here or on a server; the handle holds the result payload.

        ``deadline``: seconds from now. ``stage``: for a pipeline, run stages ``stage..n-1``.
        ``target``: every attempt on that server only; ``pool``: every attempt published to that
        pool's shared inbox (the rules: :mod:`edge_agent.pinning`); not both.
        Raises :class:`UnknownTaskError` when neither this device nor any server knows ``name`` (with
        the ``local`` policy: when this device does not), :class:`~edge_agent.pinning.UnknownServerError`
        / :class:`~edge_agent.pinning.UnknownPoolError` (``LookupError``) for a ``target`` not known or
        not announcing ``name`` / a ``pool`` no live server announces, ``UnknownPolicyError`` for a bad
        policy name, ``ValueError`` for a bad stage, deadline or pin, ``RuntimeError`` after :meth:`stop`.

        With a spool (``spool_path``), a task that cannot run anywhere now waits in it (its handle
        pending) until a server serving it is usable, at most until its deadline or ``spool_ttl``
        (then ``expired``); a name no server has announced is accepted while no server is usable.
        :class:`~edge_agent.spool.SpoolFull` (a ``ValueError``) when it does not fit: nothing is
        kept. ``origin``: the caller's reference, stored with a spooled task (for a later run).
        Pinned tasks (``target``, ``pool``) are never spooled.
        """
        if self._stopping.is_set():
            raise RuntimeError(f"edge agent {self.id} is stopped")
        chosen = check_policy(policy) if policy is not None else self.config.policy
        spec = self._spec(name)
        pinned = target is not None or pool is not None
        if pinned:
            if target is not None and pool is not None:
                raise ValueError("give target or pool, not both")
            validate_node_id(target or pool or "", what="target" if target is not None else "pool name")
            with self._lock:
                self._core.check_pin(name, target=target, pool=pool)
        elif spec is None:
            with self._lock:
                announced = self._core.announced(name)
            if chosen == LOCAL or (not announced and not self._may_spool(name)):
                raise UnknownTaskError(name, self._registry.names())
        if spec is not None:
            spec.check_stage(stage)
        elif stage is not None and stage < 0:
            raise ValueError(f"stage must be >= 0, got {stage}")
        if deadline is not None and not deadline > 0:
            raise ValueError(f"deadline must be a positive number of seconds, got {deadline}")
        task_id = f"{self._id_prefix}-{next(self._task_numbers)}"
        handle = TaskHandle(task_id)
        handle.set_running_or_notify_cancel()
        created = self._clock()
        job = _Job(handle, payload, stage, None if deadline is None else created + deadline, name=name,
                   policy=chosen, created=created)
        job.origin = origin
        with self._lock:
            self._jobs[task_id] = job
            if len(self._timers) > 2 * len(self._jobs) + 1024:
                self._timers.prune(self._core.live)
        self._feed(self._core.submit, task_id, name, payload_size(payload), self._mono(), deadline=deadline,
                   policy=chosen, target=target, pool=pool)
        if job.refused is not None:
            with self._lock:
                self._jobs.pop(task_id, None)
            raise job.refused
        return handle

    def _may_spool(self, name: str) -> bool:
        """A task no server announced may still wait in the spool: while no server is usable (the
        one that serves it may be the one that is down)."""
        if self._spool is None:
            return False
        with self._lock:
            return not self._core.connected or not self._core.table.probe_targets(self._mono())

    def _spec(self, name: str) -> TaskSpec | None:
        return self._registry.get(name) if name in self._registry else None

    # ------------------------------------------------------------------------------ driving the core
    def _feed(self, event: Callable[..., Sequence[Action]], *args: Any, value: Any = _NO_VALUE,
              **kwargs: Any) -> None:
        """Call the core with an event (``now`` among ``args``), then perform its actions. ``value``:
        the result payload this event brings, for a task it completes ``ok``."""
        with self._lock:
            if self._core.connected and not self.connected:
                self._core.link_down(self._mono())
            actions = event(*args, **kwargs)
            rest: list[Action] = []
            for action in actions:
                timer = action if isinstance(action, Timer) else (
                    action.timer if isinstance(action, Send | RunLocal) else None)
                if timer is not None:
                    self._timers.push(timer)
                    if timer.at < self._next_wake:
                        self._wake.set()  # the timer thread sleeps past this one: wake it
                if timer is not action:
                    rest.append(action)
        for action in rest:
            self._perform(action, value)

    def _perform(self, action: Action, value: Any) -> None:
        if isinstance(action, Send):
            self._send(action)
        elif isinstance(action, Complete):
            self._complete(action, value)
        elif isinstance(action, RunLocal):
            self._queue_local(action.task)
        elif isinstance(action, Execute):
            self._execute(action.task)
        elif isinstance(action, Ping):
            self._ping(action)
        elif isinstance(action, Fault):
            self._fault(action)
        elif isinstance(action, Park):
            self._park(action.task)

    def _send(self, action: Send) -> None:
        task, server = action.task, action.server
        job = self._jobs.get(task.task_id)
        if job is None:
            return  # completed meanwhile
        ttl = None if task.deadline is None else min(MAX_TTL, max(0.0, task.deadline - self._mono()))
        try:
            data = self._tasks_out.encode(task_id=task.task_id, name=task.name,
                                          created=max(0.0, self._clock()), attempt=action.attempt,
                                          ttl=ttl,  # relative: immune to an offset between the clocks
                                          payload=job.payload, stage=job.stage)
        except EncodeError as exc:
            self._bad.record("unencodable-payload", str(exc), task_id=task.task_id)
            self._feed(self._core.unsendable, task, self._mono(), f"payload cannot be sent: {exc}")
            return
        job.sent_bytes = len(data)
        if action.resend:
            log.debug("node=%s re-sending task %s attempt %d to %s", self.id, task.task_id, action.attempt,
                      server)
        assert self._transport is not None  # the core offers servers only while connected
        try:
            topic = self._inbox(server) if task.pool is None else self._tree.pool_inbox(task.pool)
            self._transport.publish(topic, data, qos=DELIVERY[Kind.TASK].qos)
        except TransportError as exc:
            self._feed(self._core.publish_failed, task, action.attempt, self._mono(),
                       not_connected=isinstance(exc, NotConnectedError),
                       error=f"cannot publish to {server}: {exc}")

    def _complete(self, action: Complete, value: Any) -> None:
        task = action.task
        with self._lock:
            job = self._jobs.pop(task.task_id, None)
            listeners = list(self._listeners)
        if job is None:
            return
        record = action.record
        handle = job.handle
        handle.record = record
        if task.outcome == "ok":
            handle.set_result(None if value is _NO_VALUE else value)
        else:
            handle.set_exception(TaskFailed(record.outcome, task.error or record.outcome, task.attempts,
                                            task_id=task.task_id, name=task.name))
        if task.error and task.outcome != "ok" and task.targets:
            log.debug("node=%s task=%s id=%s ended %s after %d attempt(s): %s", self.id, task.name,
                      task.task_id, task.outcome, task.attempts, task.error)
        self._tell_records(listeners, record)

    def _tell_records(self, listeners: list[RecordListener], record: TaskRecord) -> None:
        """Give ``record`` to each listener; one that raises is counted and logged, not fatal."""
        for listener in listeners:
            try:
                listener(record)
            except Exception:
                self.counters["listener_errors"] += 1
                log.exception("node=%s record listener failed", self.id)

    def _fault(self, action: Fault) -> None:
        task, exc = action.task, action.error
        held = self._throttle.allow("decision-error", self._mono())
        if held is not None:
            log.error("node=%s cannot decide task %s (%s): %s%s", self.id, task.task_id, task.name,
                      f"{type(exc).__name__}: {exc}"[:500],
                      f" ({held} more since the last report)" if held else "", exc_info=exc)

    def _ping(self, action: Ping) -> None:
        ping = PingMessage(nonce=action.nonce, sender=self.id, reply_to=self._pong_topic, sent=action.sent)
        with contextlib.suppress(TransportError):
            self.publish(self._tree.ping(action.server), self._codec.encode(ping),
                         qos=DELIVERY[Kind.PING].qos)

    def _inbox(self, node: str) -> str:
        topic = self._inboxes.get(node)
        if topic is None:
            topic = self._inboxes[node] = self._tree.task_inbox(node)
        return topic

    # ------------------------------------------------------------------------------ local runs
    def _queue_local(self, task: CoreTask) -> None:
        try:
            self._pool.submit(self._feed_local_start, task)
        except RuntimeError:  # pool shut down by stop()
            self._feed(self._core.local_refused, task, self._mono(), "edge agent stopped")

    def _feed_local_start(self, task: CoreTask) -> None:
        self._feed(self._core.local_start, task, self._mono())

    def _execute(self, task: CoreTask) -> None:
        """Run ``task`` on this (local pool) thread, as the core's :class:`Execute` asked."""
        job = self._jobs.get(task.task_id)
        spec = self._spec(task.name)
        begin = self._mono()
        error: str | None = None
        value: Any = None
        if job is None or spec is None:
            error = "the task is gone"
        else:
            try:
                if spec.executor == "process":
                    value = self._processes().submit(run_spec, spec, job.payload, job.stage).result()
                else:
                    value = run_spec(spec, job.payload, job.stage)
            except Exception as exc:  # noqa: BLE001  # the task's own failure: an error outcome
                error = f"{type(exc).__name__}: {exc}"[:4096]
        now = self._mono()
        self._feed(self._core.local_done, task, now, elapsed=now - begin, error=error, value=value)

    def _processes(self) -> concurrent.futures.ProcessPoolExecutor:
        with self._lock:
            if self._process_pool is None:
                self._process_pool = concurrent.futures.ProcessPoolExecutor(self.config.local_workers)
            return self._process_pool

    # ------------------------------------------------------------------------------ store and forward
    def _open_spool(self) -> None:
        config = self.config
        if config.spool_path is None:
            return
        self._spool = open_spool(config.spool_path, now=self._clock(), log=log,
                                 max_tasks=config.spool_max_tasks, max_bytes=config.spool_max_bytes)
        self._spool_expiry = self._spool.next_expiry()
        waiting = len(self._spool)
        if waiting:
            log.info("node=%s spool %s holds %d task(s) from an earlier run: sent when a server is back",
                     self.id, config.spool_path, waiting)
            self.counters["spool_recovered"] += waiting
            self._drain_due = True

    def _close_spool(self) -> None:
        if self._spool is not None:
            self._spool.close()

    def _park(self, task: CoreTask) -> None:
        """The core parked ``task`` (no option now): keep it in the spool, its handle pending."""
        job = self._jobs.get(task.task_id)
        spool = self._spool
        if job is None:
            return
        if job.spooled:
            job.reparked = True  # taken from the spool, no server after all: it stays there
            return
        if spool is None:  # the core parks only when the agent has a spool
            job.refused = SpoolError("no spool to keep a task that cannot run anywhere now")
            return
        message = Task(id=task.task_id, task=task.name, sender=self.id, reply_to=self._result_topic,
                       created=max(0.0, job.created), attempt=1, ttl=None, payload=job.payload,
                       stage=job.stage)
        try:
            data = self._codec.encode(message)
            spool.put(SpooledTask(task_id=task.task_id, name=task.name, payload=data, created=job.created,
                                  deadline=job.deadline, ttl=self.config.spool_ttl, stage=job.stage,
                                  policy=task.policy, origin=job.origin))
        except (SpoolError, EncodeError) as exc:
            self.counters["spool_refused"] += 1
            job.refused = exc
            return
        job.spooled = True
        self.counters["spooled"] += 1
        with self._lock:  # a server heard between the decision and now found the spool without it
            usable = self._core.can_serve(task.name, self._mono())
        if usable:
            self._poke_spool()
        expiry = min(e for e in (job.deadline, job.created + self.config.spool_ttl) if e is not None)
        with self._expiry_lock:  # not lost to an _expire_spool reading next_expiry() meanwhile
            earlier = self._spool_expiry is None or expiry < self._spool_expiry
            if earlier:
                self._spool_expiry = expiry
        if earlier:
            self._wake.set()

    def _poke_spool(self) -> None:
        """A server may have become usable: let the timer thread hand the spool's tasks to the core."""
        if self._spool is not None and len(self._spool) > 0:
            self._drain_due = True
            self._wake.set()

    def _spool_tick(self, mono: float) -> float | None:
        """Expire and drain the spool (on the timer thread); the monotonic time of its next expiry."""
        assert self._spool is not None
        now = self._clock()
        if self._spool_expiry is not None and now >= self._spool_expiry:
            self._expire_spool(now)
        if self._drain_due:
            self._drain_due = False
            self._drain_spool()
        expiry = self._spool_expiry
        return None if expiry is None else mono + max(0.0, expiry - self._clock())

    def _expire_spool(self, now: float) -> None:
        assert self._spool is not None
        try:
            with self._expiry_lock:
                expired = self._spool.expire(now)
                self._spool_expiry = self._spool.next_expiry()
        except SpoolError as exc:
            with self._expiry_lock:
                self._spool_expiry = now + MAX_WAIT * 20
            log.error("node=%s cannot expire spooled tasks: %s", self.id, exc)
            return
        for entry in expired:
            with self._lock:
                job = self._jobs.pop(entry.task_id, None)
                listeners = list(self._listeners)
            self.counters["spool_expired"] += 1
            why = "deadline" if entry.deadline is not None and entry.deadline <= now else "spool_ttl"
            error = f"waited in the spool until its {why} passed: no server was usable"
            if job is None:  # from an earlier run, never handed over: no caller, no handle
                self.counters["spool_recovered_expired"] += 1
                log.info("node=%s spooled task %s (%s) from an earlier run expired (%s)", self.id,
                         entry.task_id, entry.name, why)
                continue
            record = TaskRecord(task_id=entry.task_id, name=entry.name, device=self.id,
                                policy=entry.policy or self.config.policy, target="none", reason="spooled",
                                outcome="expired", attempts=0, created=entry.created, finished=now,
                                error=error, payload_bytes=len(entry.payload))
            job.handle.record = record
            job.handle.set_exception(TaskFailed("expired", error, 0, task_id=entry.task_id, name=entry.name))
            self._tell_records(listeners, record)

    def _drain_spool(self, batch: int = 64) -> None:
        """Hand the spooled tasks a usable server serves to the core, oldest first; an entry leaves
        the spool once the core took it (sent it, or ran it). Names nobody serves now are skipped."""
        spool = self._spool
        assert spool is not None
        servable: dict[str, bool] = {}
        seen: set[str] = set()
        while not self._stopping.is_set():
            try:
                entries = spool.peek(self._clock(), limit=len(seen) + batch)
            except SpoolError as exc:
                log.error("node=%s cannot read the spool: %s", self.id, exc)
                return
            fresh = [entry for entry in entries if entry.task_id not in seen]
            if not fresh:
                return
            for entry in fresh:
                seen.add(entry.task_id)
                name = entry.name
                usable = servable.get(name)
                if usable is None:
                    with self._lock:
                        usable = servable[name] = self._core.can_serve(name, self._mono())
                if usable and not self._forward(entry):
                    servable[name] = False

    def _forward(self, entry: SpooledTask) -> bool:
        """Submit one spooled task to the core again; False when the core parked it again."""
        assert self._spool is not None
        job = self._jobs.get(entry.task_id)
        if job is None:
            job = self._recovered(entry)
            if job is None:
                return True
        elif not job.spooled:
            return True  # already handed over
        left = None if entry.deadline is None else entry.deadline - self._clock()
        if left is not None and left <= 0:
            return True  # the next expiry answers it
        job.reparked = False
        if self._stopping.is_set():
            return True
        self._feed(self._core.submit, entry.task_id, entry.name, payload_size(job.payload), self._mono(),
                   deadline=left, policy=entry.policy or job.policy or None)
        if job.reparked:
            return False
        if self._stopping.is_set():  # stop() came in between: keep it for the next run, end it here
            self._feed(self._core.stop, self._mono())
            return True
        job.spooled = False
        self.counters["spool_forwarded"] += 1
        try:
            self._spool.remove(entry.task_id)
        except SpoolError as exc:  # it went: a restart may send it again (the server answers from its cache)
            log.error("node=%s cannot remove task %s from the spool: %s", self.id, entry.task_id, exc)
        return True

    def _recovered(self, entry: SpooledTask) -> _Job | None:
        """A job for a task an earlier run spooled: its outcome has no caller here, so it is counted
        and logged (``spool_recovered_<outcome>``)."""
        assert self._spool is not None
        try:
            message = self._codec.decode(entry.payload, Task)
        except (DecodeError, ValueError) as exc:
            self.counters["spool_unreadable"] += 1
            log.error("node=%s spooled task %s cannot be read, dropped: %s", self.id, entry.task_id, exc)
            with contextlib.suppress(SpoolError):
                self._spool.remove(entry.task_id)
            return None
        handle = TaskHandle(entry.task_id)
        handle.set_running_or_notify_cancel()
        job = _Job(handle, message.payload, message.stage, entry.deadline, name=entry.name,
                   policy=entry.policy or "", spooled=True, created=entry.created, recovered=True,
                   origin=entry.origin)
        handle.add_done_callback(functools.partial(self._recovered_done, entry.task_id, entry.name,
                                                   entry.origin))
        with self._lock:
            self._jobs[entry.task_id] = job
        return job

    def _recovered_done(self, task_id: str, name: str, origin: str | None,
                        handle: concurrent.futures.Future[Any]) -> None:
        """The outcome of a task an earlier run spooled: counted and logged; a bridged one is published
        on its route's output topic, as the bridge of that run would have."""
        error = handle.exception()
        status = "ok" if error is None else getattr(error, "status", type(error).__name__)
        self.counters[f"spool_recovered_{status}"] += 1
        log.info("node=%s task %s (%s) spooled by an earlier run ended %s%s", self.id, task_id, name, status,
                 "" if error is None else f": {error}")
        if origin is None or self.bridge is None:
            return
        try:
            reference = json.loads(origin)
        except ValueError:
            return
        if (isinstance(reference, dict) and "bridge" in reference
                and not self.bridge.answer_recovered(name, reference, handle)):
            self.counters["spool_recovered_unrouted"] += 1

    def _release_spooled(self) -> None:
        """At stop: the callers of tasks still in the spool get a ``failed`` outcome here (nobody in this
        process will answer them); the tasks stay in the spool, and the next run sends them."""
        with self._lock:
            waiting = [(task_id, job) for task_id, job in self._jobs.items() if job.spooled]
            for task_id, _ in waiting:
                del self._jobs[task_id]
        for task_id, job in waiting:
            if not job.recovered:
                job.handle.set_exception(TaskFailed(
                    "failed", f"edge agent stopped; the task stays in the spool {self.config.spool_path} "
                    "and the next run sends it", 0, task_id=task_id, name=job.name))

    # ------------------------------------------------------------------------------ handlers
    def _on_result(self, message: Message) -> None:
        now = self._mono()
        result = decode_or_count(self._codec, message, Result, self._bad, kind="result")
        if result is None:
            return
        job = self._jobs.get(result.task_id)
        sent = 0 if job is None else job.sent_bytes
        self._feed(self._core.result, result.task_id, result.server, result.attempt, str(result.status), now,
                   nbytes=sent + len(message.payload), queue_wait=result.queue_wait,
                   service_time=result.service_time, error=result.error, value=result.payload)

    def _on_heartbeat(self, message: Message) -> None:
        heartbeat = decode_or_count(self._codec, message, Heartbeat, self._bad, kind="heartbeat",
                                    on_error=functools.partial(self._unreadable, message, "heartbeat"))
        if heartbeat is None:
            return
        parsed = self._tree.parse(message.topic)
        if parsed is None or parsed.node != heartbeat.node:
            self._bad.record("heartbeat-topic", f"heartbeat of {heartbeat.node} on a foreign topic",
                             topic=message.topic)
            return
        if self._node_listeners:
            self._tell_nodes(message.topic, heartbeat)
        if heartbeat.role == Role.SERVER.value:
            fresh = False
            if self._spool is not None:
                with self._lock:
                    fresh = heartbeat.node not in self._core.table.probe_targets(self._mono())
            self._feed(self._core.heartbeat, ServerReport.of(heartbeat), self._mono())
            if fresh:
                self._poke_spool()  # a server newly usable: parked tasks may go now

    def _on_state(self, message: Message) -> None:
        if not message.payload:
            return  # a cleared retained state
        state = decode_or_count(self._codec, message, NodeState, self._bad, kind="state",
                                on_error=functools.partial(self._unreadable, message, "state"))
        if state is None:
            return
        parsed = self._tree.parse(message.topic)
        if parsed is None or parsed.node != state.node:
            self._bad.record("state-topic", f"state of {state.node} on a foreign topic", topic=message.topic)
            return
        if self._node_listeners:
            self._tell_nodes(message.topic, state)
        if state.role != Role.SERVER.value:
            return
        online = state.status == "online"
        with self._lock:
            was_dead = self._core.table.dead(state.node)
        self._feed(self._core.state, state.node, state.session, online, self._mono(), live=not message.retain,
                   tasks=frozenset(state.tasks), interval=state.interval, pools=frozenset(state.pools))
        if online:
            self._poke_spool()
        if not online and not was_dead and self._core.table.dead(state.node):
            log.info("node=%s server=%s session=%d went offline", self.id, state.node, state.session)

    def _unreadable(self, message: Message, kind: str, error: DecodeError) -> None:
        if self._node_listeners:
            self._tell_nodes(message.topic, None, f"{kind}: {error.reason}")

    def _on_pong(self, message: Message) -> None:
        pong = decode_or_count(self._codec, message, Pong, self._bad, kind="pong")
        if pong is None:
            return
        with self._lock:
            self._core.pong(pong.responder, pong.nonce, pong.sent, self._mono())

    def _on_ping(self, message: Message) -> None:
        ping = decode_or_count(self._codec, message, PingMessage, self._bad, kind="ping")
        if ping is None:
            return
        data = self._codec.encode(Pong(nonce=ping.nonce, responder=self.id, sent=ping.sent))
        try:
            reply_to = self._ping_replies.check(ping)
        except TopicError as exc:
            self._bad.record("ping-reply-to-not-allowed", f"{exc} (reply_to {ping.reply_to[:100]!r})",
                             topic=message.topic)
            return
        try:
            self.publish(reply_to, data, qos=DELIVERY[Kind.PONG].qos)
        except (TransportError, ValueError) as exc:
            self._bad.record("ping-reply", str(exc), topic=message.topic)

    def _on_connect(self) -> None:
        """After every (re)connect, on the dispatch thread, before any message of the new link."""
        self._feed(self._core.link_up, self._mono())
        self._poke_spool()
        if self.config.announce:
            try:
                self.publish(self._tree.state(self.id), self._state_bytes("online"), qos=_STATE.qos,
                             retain=_STATE.retain)
            except TransportError as exc:
                log.warning("node=%s cannot publish birth: %s", self.id, exc)
        self._next_heartbeat = 0.0
        self._wake.set()

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
        with self._lock:
            fired = self._timers.due(mono)
        for timer in fired:
            self._feed(self._core.fire, timer, mono)
        if self._spool is not None:
            spool_due = self._spool_tick(mono)
            if spool_due is not None:
                due.append(spool_due)
        if self.connected and self.config.announce:
            if mono >= self._next_heartbeat:
                self._send_heartbeat()
                self._next_heartbeat = mono + self.config.heartbeat_interval
            due.append(self._next_heartbeat)
        with self._lock:
            following = self._timers.next_time()
        if following is not None:
            due.append(following)
        return (min(due) if due else mono + MAX_WAIT) - mono

    def _send_heartbeat(self) -> None:
        with self._lock:
            self._seq += 1
            queued, running, workers, capacity, service = self._core.local_load()
            seq = self._seq
        load = Load(queue_length=queued, queue_capacity=capacity, in_flight=running, workers=workers,
                    service_time={name: round(value, 6) for name, value in service.items()})
        heartbeat = Heartbeat(node=self.id, role=Role.DEVICE, session=self._session, seq=seq,
                              interval=self.config.heartbeat_interval, time=max(0.0, self._clock()),
                              capabilities=self._registry.capabilities(), load=load)
        try:
            self.publish(self._tree.heartbeat(self.id), self._json.encode(heartbeat),
                         qos=DELIVERY[Kind.HEARTBEAT].qos)
        except TransportError:
            self.counters["heartbeat_failures"] += 1

    def _state_bytes(self, status: str) -> bytes:
        state = NodeState(node=self.id, role=Role.DEVICE, status=status,  # type: ignore[arg-type]
                          session=self._session, time=max(0.0, self._clock()))
        return self._json.encode(state)

    # ------------------------------------------------------------------------------ views
    def servers(self) -> list[ServerView]:
        """Snapshot of the server table (rtt, bandwidth, load, staleness) for fleet views."""
        with self._lock:
            return self._core.views(self._mono())

    def stats(self) -> dict[str, Any]:
        """Counters of this agent and its core, its bad input, its server table and its transport."""
        with self._lock:
            values: dict[str, Any] = self._core.stats(self._mono())
            for name, count in self.counters.items():
                values[name] = values.get(name, 0) + count
        values["bad_input"] = self._bad.snapshot()
        values["connected"] = self.connected
        if self.bridge is not None:
            values["bridge"] = self.bridge.stats()
        values["transport"] = self._transport.stats() if self._transport is not None else {}
        if self._spool is not None:
            values["spool"] = {"tasks": len(self._spool), "bytes": self._spool.bytes_used,
                               "max_tasks": self._spool.max_tasks, "max_bytes": self._spool.max_bytes}
        return values


__all__ = ["EdgeAgent", "NodeListener", "RecordListener", "SpoolFull", "TaskFailed", "TaskHandle",
           "TaskRecord", "attempt_timeout", "payload_size"]
