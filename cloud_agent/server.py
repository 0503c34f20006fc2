"""The cloud agent: runs offloaded tasks, reports its load honestly, survives bad input.

One :class:`CloudAgent` per server node, on any :class:`~topics.transport.Transport`. It holds no
global state and installs no signal handlers, so many can live in one process (the simulator).

It composes, and starts and stops, one of each:

* :class:`~cloud_agent.liveness.Liveness`: birth and death (retained state, Will), heartbeats, pongs;
* :class:`~cloud_agent.admission.Admission`: the task inbox (topic and reply checks, duplicates by the
  :class:`~cloud_agent.cache.ResultCache`, room in the queue) and the answers it gives at once;
* :class:`~cloud_agent.jobs.JobBoard`: the queue, jobs in progress, cache and counters, one lock;
* :class:`~cloud_agent.workers.Workers`: the worker loop, process pool, watchdog, each job's answer;
* :class:`~cloud_agent.replies.Replies`: results and dead letters out, bad input counted.

Threads, all named after the node id: the transport's dispatch thread (decodes, admits or rejects
tasks, answers pings at once), ``<id>-worker-<n>`` (``workers`` daemon threads that run tasks; process
tasks are handed to a process pool from there), ``<id>-watchdog`` (answers ``expired`` at a running or
queued task's deadline) and ``<id>-heartbeat``.

Worker threads are daemon threads on purpose: a handler that hangs forever must not keep the process
alive after a clean shutdown (``ThreadPoolExecutor`` threads would be joined at exit).
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent_common.badinput import BadInputLog, RateLimitedLog
from agent_common.heap import freeze_startup_objects
from agent_common.registry import TaskRegistry, TaskSpec, load_tasks
from agent_common.settings import load_settings
from cloud_agent.admission import Admission
from cloud_agent.cache import ResultCache, content_digest
from cloud_agent.clock_offsets import CLOCK_OFFSET_LIMIT, ClockOffsetWatch
from cloud_agent.config import ENV_PREFIX, CloudConfig
from cloud_agent.http_adapter import HttpForwarder
from cloud_agent.jobs import JobBoard
from cloud_agent.liveness import Liveness
from cloud_agent.node import ServerNode
from cloud_agent.replies import DEAD_LETTER_PAYLOAD, BadInput, Replies, ReplyRules
from cloud_agent.workers import EWMA_ALPHA, Workers
from topics.models import Load, Status
from topics.names import DELIVERY, Kind, TopicTree
from topics.transport import Message, Transport

if TYPE_CHECKING:
    from agent_common.metrics import MetricsServer

log = logging.getLogger(__name__)

_ResultCache = ResultCache
"""The name the cache had when it lived here (tests import it)."""


class CloudAgent:
    """A server node: admits tasks into a bounded queue, runs them, answers, reports its load."""

    def __init__(self, config: CloudConfig, transport: Transport, registry: TaskRegistry, *,
                 clock: Callable[[], float] = time.time, rng: random.Random | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.node_id = config.id
        self._transport = transport
        tree = TopicTree(config.prefix)
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
        cache = ResultCache(config.result_cache_size, config.result_cache_ttl, config.result_cache_bytes)
        self._node = node = ServerNode(config=config, transport=transport, tree=tree, registry=self._registry,
                                       board=JobBoard(config, cache), stopping=threading.Event(),
                                       clock=clock, monotonic=monotonic)
        self._replies = Replies(node, bad_input=self.bad_input, unsent=self._unsent)
        self._workers = Workers(node, self._replies, failures=self._failures, overload=self._overload)
        self._admission = Admission(node, self._workers, self._replies, overload=self._overload)
        self.clock_offsets: ClockOffsetWatch = self._admission.clock_offsets
        self._liveness = Liveness(node, self._replies, flush=self._flush_logs,
                                  rng=rng or random.Random(f"{config.id}-{os.getpid()}"))
        self._threads: list[threading.Thread] = []
        self._started = False
        self.metrics: MetricsServer | None = None
        """The Prometheus metrics server while started, when the config has ``metrics_port``."""

    # ------------------------------------------------------------------ lifecycle

    @property
    def session(self) -> int:
        """Session number of the current start (ms timestamp), shared by birth, heartbeats and Will."""
        return self._liveness.session

    @property
    def registry(self) -> TaskRegistry:
        return self._registry

    @property
    def draining(self) -> bool:
        """True from the start of :meth:`stop`: new tasks get rejected-busy."""
        return self._node.board.draining

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
        port = self.config.metrics_port
        if port is not None:  # first: a port in use fails with nothing running
            from cloud_agent.metrics import CloudMetrics

            self.metrics = CloudMetrics(self).serve(host=self.config.metrics_host, port=port)
        self._started = True
        self._node.stopping.clear()
        self._node.board.draining = False
        self._liveness.begin()
        for index in range(self.config.workers):
            self._spawn(self._workers.work_loop, f"{self.node_id}-worker-{index}")
        self._spawn(self._workers.watchdog_loop, f"{self.node_id}-watchdog")
        tree = self._node.tree
        try:
            self._transport.subscribe(tree.task_inbox(self.node_id), self._admission.on_task,
                                      qos=DELIVERY[Kind.TASK].qos)
            self._transport.subscribe(tree.ping(self.node_id), self._liveness.on_ping,
                                      qos=DELIVERY[Kind.PING].qos)
            for pool in self.config.pools:
                self._transport.subscribe(tree.pool_subscription(pool), self._admission.on_task,
                                          qos=DELIVERY[Kind.TASK].qos)
            self._transport.connect()
        except BaseException:
            self._shutdown_threads()
            self._close_metrics()
            self._started = False
            raise
        if self.config.pools:
            log.info("%s serves pools %s via $share subscriptions: these need Mosquitto (3.1.1 or 5), "
                     "EMQX or HiveMQ; amqtt accepts $share but never delivers it",
                     self.node_id, ", ".join(self.config.pools))
        self._spawn(self._liveness.heartbeat_loop, f"{self.node_id}-heartbeat")
        if self.config.freeze_startup_heap:
            freeze_startup_objects()  # full collections stop every thread: keep them short
        log.info("%s online: session %d, %d workers, queue %d, tasks %s", self.node_id, self.session,
                 self.config.workers, self.config.queue_size, ", ".join(self._registry.names()))

    def stop(self, grace: float | None = None) -> None:
        """Drain (new tasks get rejected-busy), wait up to ``grace`` for queued and running tasks,
        answer the rest rejected-busy, publish offline and close the transport."""
        node = self._node
        if not self._started or node.stopping.is_set():
            return
        grace = self.config.grace_period if grace is None else grace
        end = node.monotonic() + grace
        waiting = node.board.drain()
        log.info("%s stopping: %d queued or running, grace %.1fs", self.node_id, waiting, grace)
        leftovers = node.board.wait_idle(end, node.monotonic)
        for job in leftovers:
            self._workers.answer(job, Status.REJECTED_BUSY, error="server shut down before the task finished")
        node.stopping.set()
        self._shutdown_threads()
        self._liveness.publish_offline()
        self._transport.close()
        self._workers.close()
        self._close_metrics()
        self._started = False
        log.info("%s offline (%d tasks answered late or not run)", self.node_id, len(leftovers))

    def _close_metrics(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _shutdown_threads(self) -> None:
        self._node.stopping.set()
        self._workers.wake()
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
        return self._liveness.load()

    def stats(self) -> dict[str, Any]:
        """Counters (every key is listed in docs/cloud-agent.md): received, completed by status,
        bad input by reason, results not sent by reason, duplicates, pings..."""
        counters, queued, running, cached = self._node.board.snapshot()
        completed = {key.removeprefix("completed:"): value for key, value in counters.items()
                     if key.startswith("completed:")}
        plain = {key: value for key, value in counters.items() if ":" not in key}
        return {**plain, "completed": completed, "bad_input": self.bad_input.snapshot(),
                "unsent": self._unsent.snapshot(), "task_errors": self._failures.snapshot(),
                "queue_length": queued, "in_flight": running, "cached_results": cached,
                "transport": self._transport.stats()}

    def _flush_logs(self) -> None:
        """Log what the rate-limited logs held back and is due (after every heartbeat)."""
        for summary in (self.bad_input, self._unsent, self._failures, self._overload):
            summary.flush()

    # ------------------------------------------------------------------ input

    def handle(self, message: Message) -> None:
        """Route one received message by topic (what the subscriptions do; useful for bridges)."""
        parsed = self._node.tree.parse(message.topic)
        if parsed is not None and parsed.kind is Kind.PING:
            self._liveness.on_ping(message)
        else:
            self._admission.on_task(message)


__all__ = ["CLOCK_OFFSET_LIMIT", "DEAD_LETTER_PAYLOAD", "EWMA_ALPHA", "BadInput", "ClockOffsetWatch",
           "CloudAgent", "CloudConfig", "ReplyRules", "content_digest"]
