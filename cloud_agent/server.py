"""The cloud agent: runs offloaded tasks, reports its load honestly, survives bad input.

One :class:`CloudAgent` per server node, on any :class:`~topics.transport.Transport`. It holds no
global state and installs no signal handlers, so many can live in one process (the simulator).

Threads, all named after the node id: the transport's dispatch thread (decodes, admits or rejects
tasks, answers pings at once), ``<id>-worker-<n>`` (``workers`` daemon threads that run tasks; process
tasks are handed to a process pool from there), ``<id>-watchdog`` (answers ``expired`` at a running or
queued task's deadline) and ``<id>-heartbeat``.

Worker threads are daemon threads on purpose: a handler that hangs forever must not keep the process
alive after a clean shutdown (``ThreadPoolExecutor`` threads would be joined at exit).
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import logging
import multiprocessing
import os
import random
import sys
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import TypeAdapter, ValidationError

from agent_common.badinput import BadInputLog, RateLimitedLog
from agent_common.decoding import decode_or_count
from agent_common.registry import TaskRegistry, TaskSpec, load_tasks, run_spec
from agent_common.settings import load_settings
from cloud_agent.config import ENV_PREFIX, CloudConfig
from cloud_agent.http_adapter import HttpForwarder
from topics.codec import Codec, EncodeError, Format, sniff_format
from topics.errors import DecodeError, TopicError
from topics.models import (
    CONTENT_CBOR,
    CONTENT_JSON,
    DeadLetter,
    Heartbeat,
    Load,
    NodeState,
    Ping,
    Pong,
    Result,
    Role,
    Status,
    Task,
    TaskName,
)
from topics.names import (
    DELIVERY,
    Kind,
    TopicTree,
    topic_matches,
    validate_node_id,
    validate_publish_topic,
)
from topics.transport import Message, NotConnectedError, Transport, TransportError

log = logging.getLogger(__name__)

DEAD_LETTER_PAYLOAD = 4096
EWMA_ALPHA = 0.2
_NOT_REPLY_KINDS = frozenset({Kind.TASK, Kind.PING, Kind.STATE, Kind.HEARTBEAT, Kind.DEAD_LETTER})
_STATE = DELIVERY[Kind.STATE]
_ANSWERABLE = frozenset({"schema", "version"})  # decode failures whose mapping may name id and reply_to
_TASK_NAME: TypeAdapter[str] = TypeAdapter(TaskName)
_DIGEST_CODEC = Codec("cbor", max_payload=1 << 40)
CLOCK_OFFSET_LIMIT = 1.0
"""Seconds of disagreement between a sender's clock and ours beyond which we warn (once per sender).

Deadlines sent as ``ttl`` absorb any offset; what cannot is every absolute time: a legacy
``deadline`` is shifted by the whole offset (the tasks offloaded here have deadlines of 0.1 s to a
few seconds), and heartbeat and state times read by operators are wrong by as much. The measure,
``Task.created`` minus our clock at receipt, also contains the one-way transit (milliseconds, well
under a second even over a congested uplink), so below one second it cannot tell skew from delay.
"""
_OFFSET_SENDERS = 4096  # senders remembered as already warned about (bounded memory)


class ClockOffsetWatch:
    """Measures each sender's clock offset from ``Task.created`` and warns once when it is too large."""

    def __init__(self, limit: float = CLOCK_OFFSET_LIMIT) -> None:
        self.limit = limit
        self.offsets: OrderedDict[str, float] = OrderedDict()
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    def observe(self, sender: str, created: float, received: float) -> float:
        """Record ``created - received`` for ``sender``; log a warning the first time it exceeds the
        limit. Returns the offset (positive: the sender's clock is ahead of ours)."""
        offset = created - received
        with self._lock:
            self.offsets[sender] = offset
            self.offsets.move_to_end(sender)
            while len(self.offsets) > _OFFSET_SENDERS:
                self.offsets.popitem(last=False)
            first = abs(offset) > self.limit and sender not in self._warned
            if first and len(self._warned) < _OFFSET_SENDERS:
                self._warned.add(sender)
        if first:
            log.warning("clock of %s is %+.3f s off ours (beyond %.1f s): its ttl deadlines are fine, "
                        "but an absolute deadline or time from it is off by as much; fix its NTP",
                        sender, offset, self.limit)
        return offset



class BadInput(ValueError):
    """Input the agent refuses: ``reason`` is a short word for counting."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class ReplyRules:
    """Where this server may publish a reply (a Result or a Pong) for a given sender.

    Only to the sender's own topics, ``{prefix}/node/{sender}/...``, or to a topic matching one of
    ``allowlist`` (MQTT filters; ``{sender}`` stands for the sender's node id). Never to a topic with
    wildcards or a leading ``$``, nor to any task, ping, state, heartbeat or dead-letter topic of
    the fleet, whatever the allowlist says.
    """

    def __init__(self, tree: TopicTree, allowlist: list[str]) -> None:
        self._tree = tree
        self._allowlist = tuple(allowlist)

    def check(self, topic: str, sender: str) -> str:
        """Return ``topic``, or raise :class:`BadInput` (``bad-reply-to``, ``reply-to-not-allowed``)."""
        try:
            validate_publish_topic(topic)
        except TopicError as exc:
            raise BadInput("bad-reply-to", str(exc)) from None
        parsed = self._tree.parse(topic)
        if parsed is not None and parsed.kind in _NOT_REPLY_KINDS:
            raise BadInput("bad-reply-to", f"reply_to {topic[:200]!r} is a {parsed.kind.value} topic")
        if topic.startswith(f"{self._tree.prefix}/node/{sender}/"):
            return topic
        if any(topic_matches(pattern.replace("{sender}", sender), topic) for pattern in self._allowlist):
            return topic
        raise BadInput("reply-to-not-allowed",
                       f"reply_to {topic[:200]!r} is not one of {sender!r}'s own topics "
                       f"({self._tree.prefix}/node/{sender}/...) nor in reply_allowlist")


def content_digest(task: Task) -> bytes:
    """What makes a retry the same task: name, payload, stage and reply_to (not attempt or times)."""
    fields = [task.task, task.reply_to, task.stage, task.payload]
    try:
        data = _DIGEST_CODEC.encode_value(fields, "cbor")
    except EncodeError:
        data = repr(fields).encode("utf-8", "backslashreplace")
    return hashlib.blake2b(data, digest_size=16).digest()


@dataclass(eq=False)
class _Job:
    """One admitted task from admission to its (single) answer."""

    task: Task
    spec: TaskSpec
    codec: Codec
    key: tuple[str, str]
    digest: bytes
    accepted: float
    deadline: float | None  # monotonic
    state: str = "queued"  # queued -> running -> finished; queued -> dropped (answered in the queue)
    answered: bool = False
    started: float = 0.0
    waiters: list[tuple[str, Codec, int]] = field(default_factory=list)


class _ResultCache:
    """Finished results by (sender, task id) with the content digest of the task they answer:
    bounded LRU (count and encoded bytes) with a TTL."""

    def __init__(self, capacity: int, ttl: float, max_bytes: int) -> None:
        self._capacity = capacity
        self._ttl = ttl
        self._max_bytes = max_bytes
        self._bytes = 0
        self._items: OrderedDict[tuple[str, str], tuple[float, Result, int, bytes]] = OrderedDict()

    def entry(self, key: tuple[str, str], now: float) -> tuple[Result, bytes] | None:
        """The cached result of ``key`` and the digest of the task it answered, or None."""
        item = self._items.get(key)
        if item is None:
            return None
        if now - item[0] > self._ttl:
            self._pop(key)
            return None
        self._items.move_to_end(key)
        return item[1], item[3]

    def get(self, key: tuple[str, str], now: float) -> Result | None:
        found = self.entry(key, now)
        return None if found is None else found[0]

    def _pop(self, key: tuple[str, str]) -> None:
        _, _, size, _ = self._items.pop(key)
        self._bytes -= size

    def put(self, key: tuple[str, str], result: Result, now: float, size: int = 0,
            digest: bytes = b"") -> None:
        if self._capacity <= 0:
            return
        if size > self._max_bytes:  # too large to keep: keep the answer without its payload
            result = result.model_copy(update={"status": Status.ERROR.value, "payload": None,
                                               "error": "result already sent; too large to resend"})
            size = 0
        if key in self._items:
            self._pop(key)
        self._items[key] = (now, result, size, digest)
        self._bytes += size
        while len(self._items) > self._capacity or self._bytes > self._max_bytes:
            self._pop(next(iter(self._items)))

    def __len__(self) -> int:
        return len(self._items)


class CloudAgent:
    """A server node: admits tasks into a bounded queue, runs them, answers, reports its load."""

    def __init__(self, config: CloudConfig, transport: Transport, registry: TaskRegistry, *,
                 clock: Callable[[], float] = time.time, rng: random.Random | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.node_id = config.id
        self._transport = transport
        self._clock = clock
        self._monotonic = monotonic
        self._rng = rng or random.Random(f"{config.id}-{os.getpid()}")
        self._tree = TopicTree(config.prefix)
        self._codecs: dict[Format, Codec] = {
            "cbor": Codec("cbor", max_payload=config.max_payload),
            "json": Codec("json", max_payload=config.max_payload),
        }
        self._codec = self._codecs[config.format]
        self._registry = TaskRegistry()
        self._registry.merge(registry)
        if config.http_base_url:
            forwarder = HttpForwarder(config.http_base_url, timeout=config.http_timeout,
                                      max_response=config.http_max_response)
            self._registry.add(TaskSpec("http", (forwarder,), "thread",
                                        description="forward to the local HTTP service"))
        interval = config.bad_input_log_interval
        self.bad_input = BadInputLog(log, interval=interval)
        self._unsent = RateLimitedLog(log, label="result not sent", interval=interval)
        self._failures = RateLimitedLog(log, label="task raised", interval=interval, level=logging.ERROR)
        self._overload = RateLimitedLog(log, label="load", interval=interval, level=logging.INFO)
        self._replies = ReplyRules(self._tree, config.reply_allowlist)
        self.clock_offsets = ClockOffsetWatch()
        self._lock = threading.Lock()
        self._work_ready = threading.Condition(self._lock)
        self._idle = threading.Condition(self._lock)
        self._queue: deque[_Job] = deque()
        self._in_progress: dict[tuple[str, str], _Job] = {}
        self._running = 0
        self._cache = _ResultCache(config.result_cache_size, config.result_cache_ttl,
                                   config.result_cache_bytes)
        self._ewma: dict[str, float] = {}
        self._counters: Counter[str] = Counter()
        self._deadlines: list[tuple[float, int, _Job]] = []
        self._deadline_seq = itertools.count()
        self._watch = threading.Condition(threading.Lock())
        self._threads: list[threading.Thread] = []
        self._process_pool: ProcessPoolExecutor | None = None
        self._stopping = threading.Event()
        self._draining = False
        self._started = False
        self._session = 0
        self._seq = 0
        self._cpu_share = 0.0
        self._cpu_mark = (time.process_time(), monotonic())

    # ------------------------------------------------------------------ lifecycle

    @property
    def session(self) -> int:
        """Session number of the current start (ms timestamp), shared by birth, heartbeats and Will."""
        return self._session

    @property
    def registry(self) -> TaskRegistry:
        return self._registry

    @classmethod
    def from_config(cls, config: CloudConfig | str | Path, *,
                    registry: TaskRegistry | None = None) -> CloudAgent:
        """An agent on an MQTT transport to ``config.broker``: ``config`` is a :class:`CloudConfig`
        or a TOML file (read with the ``CLOUD_AGENT_*`` environment over it); ``registry``
        defaults to the config's ``tasks`` modules. Not started; ``with`` starts and stops it.

        Raises :class:`agent_common.settings.SettingsError` for a bad file,
        :class:`agent_common.registry.RegistryError` for bad task modules and ``ValueError``
        without a broker URL (the embedded broker is the CLI's business).
        """
        from topics.mqtt import MqttTransport

        if not isinstance(config, CloudConfig):
            config = load_settings(CloudConfig, config_file=config, env_prefix=ENV_PREFIX)
        tasks = registry if registry is not None else load_tasks(*config.tasks)
        return cls(config, MqttTransport(config.transport_config(), name=config.id), tasks)

    def __enter__(self) -> CloudAgent:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def start(self) -> None:
        """Set the Will, connect, subscribe, publish the birth and start the worker threads."""
        if self._started:
            raise RuntimeError(f"cloud agent {self.node_id} already started")
        self._started = True
        self._stopping.clear()
        self._draining = False
        self._session = int(self._clock() * 1000)
        self._transport.set_will(self._tree.state(self.node_id), self._state_payload("offline"),
                                 qos=_STATE.qos, retain=_STATE.retain)
        self._transport.add_connect_listener(self._on_connect)
        for index in range(self.config.workers):
            self._spawn(self._work_loop, f"{self.node_id}-worker-{index}")
        self._spawn(self._watchdog_loop, f"{self.node_id}-watchdog")
        try:
            self._transport.subscribe(self._tree.task_inbox(self.node_id), self._on_task,
                                      qos=DELIVERY[Kind.TASK].qos)
            self._transport.subscribe(self._tree.ping(self.node_id), self._on_ping,
                                      qos=DELIVERY[Kind.PING].qos)
            for pool in self.config.pools:
                self._transport.subscribe(self._tree.pool_subscription(pool), self._on_task,
                                          qos=DELIVERY[Kind.TASK].qos)
            self._transport.connect()
        except BaseException:
            self._shutdown_threads()
            self._started = False
            raise
        if self.config.pools:
            log.info("%s serves pools %s via $share subscriptions: these need Mosquitto (3.1.1 or 5), "
                     "EMQX or HiveMQ; amqtt accepts $share but never delivers it",
                     self.node_id, ", ".join(self.config.pools))
        self._spawn(self._heartbeat_loop, f"{self.node_id}-heartbeat")
        log.info("%s online: session %d, %d workers, queue %d, tasks %s", self.node_id, self._session,
                 self.config.workers, self.config.queue_size, ", ".join(self._registry.names()))

    def stop(self, grace: float | None = None) -> None:
        """Drain (new tasks get rejected-busy), wait up to ``grace`` for queued and running tasks,
        answer the rest rejected-busy, publish offline and close the transport."""
        if not self._started or self._stopping.is_set():
            return
        grace = self.config.grace_period if grace is None else grace
        end = self._monotonic() + grace
        with self._lock:
            self._draining = True
            waiting = len(self._queue) + self._running
        log.info("%s stopping: %d queued or running, grace %.1fs", self.node_id, waiting, grace)
        with self._lock:
            while self._queue or self._running:
                left = end - self._monotonic()
                if left <= 0:
                    break
                self._idle.wait(min(left, 0.5))
            leftovers = [job for job in self._queue if not job.answered]
            leftovers += [job for job in self._in_progress.values()
                          if job.state == "running" and not job.answered]
        for job in leftovers:
            self._answer(job, Status.REJECTED_BUSY, error="server shut down before the task finished")
        self._stopping.set()
        self._shutdown_threads()
        try:
            self._transport.publish(self._tree.state(self.node_id), self._state_payload("offline"),
                                    qos=_STATE.qos, retain=_STATE.retain)
        except TransportError as exc:
            log.warning("%s could not publish its offline state: %s", self.node_id, exc)
        self._transport.close()
        if self._process_pool is not None:
            self._process_pool.shutdown(wait=False, cancel_futures=True)
            self._process_pool = None
        self._started = False
        log.info("%s offline (%d tasks answered late or not run)", self.node_id, len(leftovers))

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _shutdown_threads(self) -> None:
        self._stopping.set()
        with self._lock:
            self._work_ready.notify_all()
        with self._watch:
            self._watch.notify_all()
        current = threading.current_thread()
        for thread in self._threads:
            if thread is not current and not thread.name.startswith(f"{self.node_id}-worker-"):
                thread.join(2.0)
        for thread in self._threads:  # workers: a hung handler must not block shutdown
            if thread is not current and thread.name.startswith(f"{self.node_id}-worker-"):
                thread.join(0.05)
        self._threads = [t for t in self._threads if t.is_alive()]

    # ------------------------------------------------------------------ status

    def load(self) -> Load:
        """What the next heartbeat will report."""
        with self._lock:
            return Load(queue_length=len(self._queue), queue_capacity=self.config.queue_size,
                        in_flight=self._running, workers=self.config.workers,
                        service_time=dict(self._ewma), cpu=self._cpu_share)

    def stats(self) -> dict[str, Any]:
        """Counters (every key is listed in docs/cloud-agent.md): received, completed by status,
        bad input by reason, results not sent by reason, duplicates, pings..."""
        with self._lock:
            counters = dict(self._counters)
            queued, running, cached = len(self._queue), self._running, len(self._cache)
        completed = {key.removeprefix("completed:"): value for key, value in counters.items()
                     if key.startswith("completed:")}
        plain = {key: value for key, value in counters.items() if ":" not in key}
        return {**plain, "completed": completed, "bad_input": self.bad_input.snapshot(),
                "unsent": self._unsent.snapshot(), "task_errors": self._failures.snapshot(),
                "queue_length": queued, "in_flight": running, "cached_results": cached,
                "transport": self._transport.stats()}

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counters[key] += n

    # ------------------------------------------------------------------ liveness

    def _state_payload(self, status: Literal["online", "offline"]) -> bytes:
        return self._codec.encode(NodeState(node=self.node_id, role=Role.SERVER, status=status,
                                            session=self._session, time=max(0.0, self._clock())))

    def _on_connect(self) -> None:
        try:
            self._transport.publish(self._tree.state(self.node_id), self._state_payload("online"),
                                    qos=_STATE.qos, retain=_STATE.retain)
            self._count("births")
        except TransportError as exc:
            log.warning("%s could not publish its birth: %s", self.node_id, exc)

    def _heartbeat_loop(self) -> None:
        interval = self.config.heartbeat_interval
        while not self._stopping.is_set():
            self._publish_heartbeat()
            for summary in (self.bad_input, self._unsent, self._failures, self._overload):
                summary.flush()
            if self._stopping.wait(interval * self._rng.uniform(0.9, 1.1)):
                return

    def _publish_heartbeat(self) -> None:
        cpu_now, wall_now = time.process_time(), self._monotonic()
        cpu_then, wall_then = self._cpu_mark
        if wall_now > wall_then:
            share = (cpu_now - cpu_then) / ((wall_now - wall_then) * (os.cpu_count() or 1))
            self._cpu_share = min(1.0, max(0.0, share))
        self._cpu_mark = (cpu_now, wall_now)
        heartbeat = Heartbeat(node=self.node_id, role=Role.SERVER, session=self._session,
                              seq=self._seq, interval=self.config.heartbeat_interval,
                              time=max(0.0, self._clock()), capabilities=self._registry.capabilities(),
                              pools=tuple(self.config.pools), load=self.load())
        self._seq += 1
        try:
            self._transport.publish(self._tree.heartbeat(self.node_id), self._codec.encode(heartbeat),
                                    qos=DELIVERY[Kind.HEARTBEAT].qos)
            self._count("heartbeats")
        except TransportError as exc:
            self._count("heartbeats_failed")
            log.debug("%s heartbeat not sent: %s", self.node_id, exc)

    # ------------------------------------------------------------------ input

    def _reject(self, message: Message, error: BadInput, task_id: str = "") -> None:
        """Count, log (rate-limited) and dead-letter one piece of bad input."""
        self.bad_input.record(error.reason, error.detail, topic=message.topic, task_id=task_id)
        self._dead_letter(message, error)

    def _dead_letter(self, message: Message, error: BadInput | DecodeError) -> None:
        """Publish a copy of rejected input, with its reason, on this node's dead-letter topic."""
        reason, detail = error.reason, error.detail
        letter = DeadLetter(node=self.node_id, topic=message.topic[:1024] or "?", reason=reason[:64],
                            detail=detail[:4096], payload=message.payload[:DEAD_LETTER_PAYLOAD],
                            size=len(message.payload), time=max(0.0, self._clock()))
        try:
            self._transport.publish(self._tree.dead_letter(self.node_id), self._codec.encode(letter),
                                    qos=DELIVERY[Kind.DEAD_LETTER].qos)
        except (TransportError, EncodeError) as exc:
            log.debug("%s dead letter not sent: %s", self.node_id, exc)

    def _codec_for(self, message: Message) -> Codec:
        """The codec of the format ``message`` is in (the configured one when it cannot tell)."""
        return self._codecs[sniff_format(message.payload) or self.config.format]

    def _on_ping(self, message: Message) -> None:
        """Answer a ping at once, on the dispatch thread, ahead of any queued work."""
        codec = self._codec_for(message)
        ping = decode_or_count(codec, message, Ping, self.bad_input, kind=None,
                               on_error=lambda exc: self._dead_letter(message, exc))
        if ping is None:
            return
        try:
            self._replies.check(ping.reply_to, ping.sender)
        except BadInput as exc:
            self._reject(message, exc)
            return
        pong = Pong(nonce=ping.nonce, responder=self.node_id, sent=ping.sent)
        try:
            self._transport.publish(ping.reply_to, codec.encode(pong), qos=DELIVERY[Kind.PONG].qos)
            self._count("pings")
        except TransportError as exc:
            log.debug("%s pong not sent: %s", self.node_id, exc)

    def handle(self, message: Message) -> None:
        """Route one received message by topic (what the subscriptions do; useful for bridges)."""
        parsed = self._tree.parse(message.topic)
        if parsed is not None and parsed.kind is Kind.PING:
            self._on_ping(message)
        else:
            self._on_task(message)

    def _on_task(self, message: Message) -> None:
        """Decode and admit a task, or answer it at once (busy, duplicate, unknown, bad)."""
        self._count("received")
        parsed = self._tree.parse(message.topic)
        try:
            if parsed is None or parsed.kind is not Kind.TASK:
                raise BadInput("wrong-topic", f"not a task topic under {self._tree.prefix}")
            if parsed.pool is None and parsed.node != self.node_id:
                raise BadInput("wrong-node", f"task addressed to node {parsed.node!r}, this is "
                               f"{self.node_id!r}")
            if parsed.pool is not None and parsed.pool not in self.config.pools:
                raise BadInput("wrong-pool", f"task for pool {parsed.pool!r}, this node serves "
                               f"{list(self.config.pools)}")
        except BadInput as exc:
            self._reject(message, exc)
            return
        codec = self._codec_for(message)
        task = decode_or_count(codec, message, Task, self.bad_input, kind=None,
                               on_error=lambda exc: self._refuse_invalid(message, exc))
        if task is None:
            return
        try:
            self._replies.check(task.reply_to, task.sender)
        except BadInput as exc:
            self._reject(message, exc, task_id=task.id)
            return
        self.clock_offsets.observe(task.sender, task.created, self._clock())
        self._admit(task, codec)

    def _refuse_invalid(self, message: Message, error: DecodeError) -> None:
        """Dead-letter a task that cannot be decoded; answer it when it failed only validation."""
        self._dead_letter(message, error)
        if error.reason in _ANSWERABLE:
            self._answer_invalid(message, error)

    def _answer_invalid(self, message: Message, error: DecodeError) -> None:
        """An ``error`` Result for a task that failed validation, when its mapping names a usable
        ``id``, ``sender`` and ``reply_to`` (the reply rules apply): the client need not time out."""
        codec = self._codec_for(message)
        try:
            fields = codec.decode_mapping(message.payload, topic=message.topic)
        except DecodeError:
            return
        task_id, sender, reply_to = fields.get("id"), fields.get("sender"), fields.get("reply_to")
        if not (isinstance(task_id, str) and 0 < len(task_id) <= 128 and isinstance(sender, str)
                and isinstance(reply_to, str)):
            return
        try:
            self._replies.check(reply_to, validate_node_id(sender))
        except (BadInput, TopicError):
            return
        name = fields.get("task")
        try:
            name = _TASK_NAME.validate_python(name)
        except ValidationError:
            name = None
        attempt = fields.get("attempt")
        result = Result(task_id=task_id, status=Status.ERROR, server=self.node_id, task=name,
                        error=f"invalid task ({error.reason}): {error.detail}"[:4096],
                        attempt=attempt if type(attempt) is int and 1 <= attempt <= 100 else 1,
                        content_type=_content_type(codec))
        self._count("invalid_answered")
        self._publish_result(result, reply_to, codec)

    def _admit(self, task: Task, codec: Codec) -> None:
        key = (task.sender, task.id)
        digest = content_digest(task)
        now = self._monotonic()
        spec: TaskSpec | None = None
        cached: Result | None = None
        reused = False
        with self._lock:
            entry = self._cache.entry(key, now)
            running = self._in_progress.get(key) if entry is None else None
            if entry is not None:
                cached, reused = entry[0], entry[1] != digest
            elif running is not None:  # a retry while the first is queued or running
                reused = running.digest != digest
                if not reused:
                    running.waiters.append((task.reply_to, codec, task.attempt))
                    self._counters["duplicates"] += 1
                    return
            else:
                spec = self._registry.get(task.task) if task.task in self._registry else None
                if spec is not None and not self._draining and self._has_room():
                    job = self._new_job(task, spec, codec, key, digest, now)
                    self._queue.append(job)
                    self._in_progress[key] = job
                    self._work_ready.notify()
                    return
            if reused:
                self._counters["id_reused"] += 1
            elif cached is not None:
                self._counters["duplicates"] += 1
        if reused:
            self._reply_now(task, codec, Status.ERROR,
                            f"task id {task.id!r} was already used by {task.sender!r} for a different "
                            "task (name, payload, stage or reply_to differ): send new work under a "
                            "new id", cache=False)
            return
        if cached is not None:
            self._publish_result(cached.model_copy(update={"attempt": task.attempt}),
                                 task.reply_to, codec)
            return
        if spec is None:
            self._reply_now(task, codec, Status.UNKNOWN_TASK,
                            f"unknown task {task.task!r}; this server runs "
                            f"{', '.join(self._registry.names())}", digest=digest)
        else:
            reason = "server is shutting down" if self._draining else (
                f"queue full ({self.config.queue_size} waiting, {self.config.workers} running)")
            self._overload.record("rejected-busy", f"tasks answered rejected-busy: {reason}")
            self._reply_now(task, codec, Status.REJECTED_BUSY, reason)

    def _has_room(self) -> bool:
        """Room for one more task: ``queue_size`` waiting beyond the workers (caller holds the lock)."""
        return len(self._queue) + self._running < self.config.queue_size + self.config.workers

    def _new_job(self, task: Task, spec: TaskSpec, codec: Codec, key: tuple[str, str], digest: bytes,
                 now: float) -> _Job:
        deadline = None
        if task.ttl is not None:  # relative: counted on our clock from receipt, whatever the sender's
            deadline = now + task.ttl
        elif task.deadline is not None:  # legacy absolute time: right only if both clocks agree
            deadline = now + (task.deadline - self._clock())
        job = _Job(task=task, spec=spec, codec=codec, key=key, digest=digest, accepted=now,
                   deadline=deadline)
        if deadline is not None:
            with self._watch:
                heapq.heappush(self._deadlines, (deadline, next(self._deadline_seq), job))
                if self._deadlines[0][2] is job:  # else the watchdog wakes earlier anyway
                    self._watch.notify()
        return job

    def _reply_now(self, task: Task, codec: Codec, status: Status, error: str, *,
                   cache: bool = True, digest: bytes = b"") -> None:
        """Answer at once; cached (under ``digest``) unless rejected-busy or ``cache`` is False."""
        result = Result(task_id=task.id, status=status, server=self.node_id, task=task.task,
                        error=error, attempt=task.attempt, content_type=_content_type(codec))
        self._count(f"completed:{Status(status).value}")
        if cache and status is not Status.REJECTED_BUSY:
            with self._lock:
                self._cache.put((task.sender, task.id), result, self._monotonic(), digest=digest)
        self._publish_result(result, task.reply_to, codec)

    # ------------------------------------------------------------------ execution

    def _take(self) -> _Job | None:
        with self._lock:
            while True:
                if self._stopping.is_set():
                    return None
                while self._queue:
                    job = self._queue.popleft()
                    if job.answered:  # expired while queued: already answered and uncounted
                        self._idle.notify_all()
                        continue
                    job.state = "running"
                    job.started = self._monotonic()
                    self._running += 1
                    return job
                self._idle.notify_all()
                self._work_ready.wait()

    def _work_loop(self) -> None:
        while True:
            job = self._take()
            if job is None:
                return
            try:
                self._run(job)
            finally:
                with self._lock:
                    self._running -= 1
                    job.state = "finished"
                    if self._in_progress.get(job.key) is job:
                        del self._in_progress[job.key]
                    self._idle.notify_all()

    def _run(self, job: _Job) -> None:
        task = job.task
        if job.answered:
            return
        if job.deadline is not None and self._monotonic() >= job.deadline:
            self._answer(job, Status.EXPIRED, error="deadline passed before the task started")
            return
        try:
            start = job.spec.check_stage(task.stage)
        except ValueError as exc:
            self._answer(job, Status.ERROR, error=f"bad stage: {exc}")
            return
        began = self._monotonic()
        try:
            if job.spec.executor == "process":
                value = self._run_in_process(job.spec, task.payload, start)
            else:
                value = run_spec(job.spec, task.payload, start)
        except Exception as exc:  # noqa: BLE001 - the handler's failure is the device's answer
            service = self._monotonic() - began
            self._failures.record(task.task, f"task {task.id[:128]!r}: {type(exc).__name__}: "
                                  f"{str(exc)[:300]}", exc_info=True)
            self._answer(job, Status.ERROR, error=f"{type(exc).__name__}: {exc}"[:4096],
                         service_time=service)
            return
        service = self._monotonic() - began
        with self._lock:
            previous = self._ewma.get(task.task)
            self._ewma[task.task] = service if previous is None else (
                previous + EWMA_ALPHA * (service - previous))
        if job.answered:
            self._count("late_results")
            self._overload.record("late-result", f"task {task.id[:128]!r} returned {service:.3f}s "
                                  "after it was answered expired")
            return
        self._answer(job, Status.OK, payload=value, service_time=service)

    def _run_in_process(self, spec: TaskSpec, payload: Any, start: int) -> Any:
        with self._lock:
            if self._process_pool is None:
                method = "forkserver" if sys.platform.startswith("linux") else "spawn"
                self._process_pool = ProcessPoolExecutor(
                    max_workers=self.config.process_workers,
                    mp_context=multiprocessing.get_context(method))
            pool = self._process_pool
        future: Future[Any] = pool.submit(run_spec, spec, payload, start)
        return future.result()

    def _answer(self, job: _Job, status: Status, *, payload: Any = None, error: str | None = None,
                service_time: float = 0.0) -> None:
        """Publish the one answer of a job (and to every duplicate waiting on it); later calls no-op."""
        now = self._monotonic()
        with self._lock:
            if job.answered:
                return
            job.answered = True
            if job.state == "queued":
                if job in self._queue:
                    self._queue.remove(job)
                job.state = "dropped"
                self._idle.notify_all()
            if job.state == "dropped" and self._in_progress.get(job.key) is job:
                del self._in_progress[job.key]
            waiters = list(job.waiters)
        task = job.task
        queue_wait = (job.started or now) - job.accepted
        result = Result(task_id=task.id, status=status, server=self.node_id, task=task.task,
                        payload=payload, error=error, queue_wait=max(0.0, queue_wait),
                        service_time=max(0.0, service_time), attempt=task.attempt,
                        content_type=_content_type(job.codec))
        try:
            data = job.codec.encode(result)
        except EncodeError as exc:
            result = result.model_copy(update={"status": Status.ERROR.value, "payload": None,
                                               "error": f"result cannot be sent: {exc}"[:4096]})
            data = job.codec.encode(result)
        with self._lock:
            self._counters[f"completed:{Status(result.status).value}"] += 1
            if result.status != Status.REJECTED_BUSY.value:
                self._cache.put(job.key, result, now, len(data), job.digest)
        self._publish_result(result, task.reply_to, job.codec, data)
        for reply_to, codec, attempt in waiters:
            self._publish_result(result.model_copy(update={"attempt": attempt}), reply_to, codec)

    def _publish_result(self, result: Result, reply_to: str, codec: Codec,
                        data: bytes | None = None) -> None:
        """Publish one answer (QoS 1); waits for room (``publish_wait``) when the outgoing queue is
        full; a result that still cannot go is counted by reason and logged once per interval."""
        try:
            if data is None:
                data = codec.encode(result.model_copy(update={"content_type": _content_type(codec)}))
            self._transport.publish(reply_to, data, qos=DELIVERY[Kind.RESULT].qos)
            return
        except NotConnectedError as exc:
            kind, detail = "not-connected", str(exc)
        except TransportError as exc:
            kind, detail = "transport", str(exc)
        except EncodeError as exc:
            kind, detail = "unencodable", str(exc)
        except TopicError as exc:
            kind, detail = "bad-topic", str(exc)
        self._count("results_not_sent")
        self._unsent.record(kind, f"result of task {result.task_id[:128]!r} to {reply_to[:200]!r}: "
                            f"{detail[:300]}")

    def _watchdog_loop(self) -> None:
        """Answer ``expired`` at each task's deadline unless it was answered already."""
        while not self._stopping.is_set():
            with self._watch:
                if not self._deadlines:
                    self._watch.wait(1.0)
                    continue
                deadline, _, job = self._deadlines[0]
                left = deadline - self._monotonic()
                if left > 0:
                    self._watch.wait(min(left, 1.0))
                    continue
                heapq.heappop(self._deadlines)
            if job.answered:
                continue
            where = "while running (the worker stays busy until it returns)" if (
                job.state == "running") else "while queued"
            self._answer(job, Status.EXPIRED, error=f"deadline passed {where}")


def _content_type(codec: Codec) -> str:
    return CONTENT_JSON if codec.format == "json" else CONTENT_CBOR


__all__ = ["BadInput", "CloudAgent", "CloudConfig"]
