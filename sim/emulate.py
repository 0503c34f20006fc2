"""Emulation mode: the real agents over a real broker, with emulated links and compute speed.

Every server of the scenario is a :class:`~cloud_agent.server.CloudAgent` and every device an
:class:`~edge_agent.agent.EdgeAgent`, all in this process, each on its own MQTT connection wrapped
in a :class:`~sim.linkemu.LinkEmulator`. Compute speed is emulated by the task itself: the scenario's
``work`` task sleeps ``service_time x work / speed`` (x a slowdown factor after a slowdown event), so
a worker is really occupied and queues really build up, without burning the machine's two cores.
The workload is :func:`sim.scenario.iter_arrivals`, the same one the discrete-event mode drives.

Approximations, stated: links are applied at the sender (the node is in the topic of tasks, results,
pings and pongs); heartbeats and state use the server's default link; ``known_servers`` is not
emulated (every device sees every server); a crash with ``will = false`` is a clean disconnect, so
the broker drops the Will and devices notice only by missed heartbeats.
"""

from __future__ import annotations

import heapq
import logging
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from agent_common.registry import TaskRegistry
from cloud_agent.config import CloudConfig
from cloud_agent.server import CloudAgent
from edge_agent.agent import EdgeAgent
from edge_agent.config import EdgeConfig, PolicySettings
from edge_agent.policy import PolicyConfig
from edge_agent.records import TaskRecord as AgentRecord
from sim.linkemu import DelayScheduler, LinkEmulator, LinkParams
from sim.report import UNFINISHED, RunResult, TaskRecord
from sim.scenario import (
    CrashEvent,
    DeviceNode,
    LinkEvent,
    LinkSpec,
    OfflineEvent,
    Scenario,
    ServerNode,
    SlowdownEvent,
    iter_arrivals,
)
from topics.codec import Codec
from topics.errors import DecodeError
from topics.models import Heartbeat
from topics.mqtt import MqttTransport
from topics.names import Kind, TopicTree
from topics.transport import Message, TransportConfig

log = logging.getLogger(__name__)

__all__ = ["EmulationError", "run_emulation"]


class EmulationError(RuntimeError):
    """The fleet could not be brought up (broker unreachable, agents not seeing each other)."""


def _params(spec: LinkSpec) -> LinkParams:
    return LinkParams(delay=spec.delay, jitter=spec.jitter, loss=spec.loss, bandwidth=spec.bandwidth)


@dataclass
class _Fleet:
    """The mutable state of one run that events change: speeds and links."""

    scenario: Scenario
    slowdown: dict[str, float] = field(default_factory=dict)
    links: dict[tuple[str, str], LinkParams] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def link(self, device_group: str, server_group: str) -> LinkParams:
        with self.lock:
            found = self.links.get((device_group, server_group))
        return found or _params(self.scenario.link(device_group, server_group))


def _work_task(name: str, base: float, result_bytes: int, node: str, speed: float,
               fleet: _Fleet) -> Callable[[Any], Any]:
    """The scenario's task as a function: sleep for its emulated cost, answer ``result_bytes``."""

    def work(payload: Any) -> Any:
        if not isinstance(payload, dict) or not isinstance(payload.get("work"), int | float):
            raise ValueError(f"task {name!r} needs a payload {{'work': number, 'data': bytes}}")
        factor = fleet.slowdown.get(node, 1.0)
        time.sleep(max(0.0, base * float(payload["work"]) * factor / speed))
        return {"ok": True, "data": bytes(result_bytes)}

    work.__name__ = f"work_{name.replace('.', '_').replace(':', '_').replace('-', '_')}"
    return work


def _registry(scenario: Scenario, names: list[str], node: str, speed: float,
              fleet: _Fleet) -> TaskRegistry:
    registry = TaskRegistry()
    for name in names:
        cost = scenario.tasks[name]
        registry.task(name)(_work_task(name, cost.service_time, cost.result_bytes, node, speed, fleet))
    return registry


def _relative(value: float | None, origin: float) -> float | None:
    return None if value is None else value - origin


def _to_trace(record: AgentRecord, origin: float, deadline: float | None) -> TaskRecord:
    """The agent's record as a trace row: times relative to the run, local results received
    when they finished (no network between the worker and the caller)."""
    target = None if record.target == "local" else record.target
    received = record.received
    if received is None and target is None and record.outcome == "ok":
        received = record.finished
    estimate = dict(record.estimates).get(record.target)
    return TaskRecord(
        task_id=record.task_id, device=record.device, task=record.name,
        created=record.created - origin, policy=record.policy,
        deadline=None if deadline is None else record.created - origin + deadline,
        decided=_relative(record.decided, origin), sent=_relative(record.sent, origin),
        started=_relative(record.started, origin), finished=_relative(record.finished, origin),
        received=_relative(received, origin), target=target, reason=record.reason,
        outcome=record.outcome, attempts=record.attempts, estimate=estimate)


def run_emulation(scenario: Scenario, policy: str, *, broker_url: str, protocol: str = "3.1.1",
                  config: PolicyConfig | None = None, seed: int | None = None, label: str = "",
                  progress: Callable[[float], None] | None = None,
                  stop: threading.Event | None = None, settle_timeout: float = 10.0) -> RunResult:
    """Run ``scenario`` under ``policy`` with real agents on the broker at ``broker_url``.

    Returns when every created task has its outcome (or, after ``stop`` is set, with the rest
    marked ``unfinished``). ``progress`` is called with seconds of workload elapsed.
    """
    if seed is not None and seed != scenario.seed:
        scenario = scenario.model_copy(update={"seed": seed})
    policy_config = config or scenario.policy_config()
    run_id = uuid.uuid4().hex[:8]
    tree = TopicTree(f"offload-sim/{run_id}")
    fleet = _Fleet(scenario)
    scheduler = DelayScheduler(f"links-{run_id}")
    servers = scenario.server_nodes()
    devices = scenario.device_nodes()
    group_of: dict[str, str] = {node.node: node.group.name for node in servers}
    group_of.update({node.node: node.group.name for node in devices})
    server_agents: dict[str, CloudAgent] = {}
    device_agents: dict[str, EdgeAgent] = {}
    emulators: dict[str, LinkEmulator] = {}
    records: list[TaskRecord] = []
    queue_series: list[tuple[float, str, int, int]] = []
    counters: Counter[str] = Counter()
    records_lock = threading.Lock()
    stop = stop or threading.Event()
    base_config = TransportConfig.from_url(broker_url, protocol=protocol, keepalive=5)
    origin = time.time()  # reset when the workload starts; heartbeats during set-up come out negative

    def transport(node: str, link_to: Callable[[str | None], LinkParams]) -> LinkEmulator:
        inner = MqttTransport(base_config.model_copy(update={"client_id": f"sim-{run_id}-{node}"}))
        emulator = LinkEmulator(inner, node_id=node, tree=tree, link_to=link_to,
                                scheduler=scheduler, rng=random.Random(f"{scenario.seed}:link:{node}"))
        emulators[node] = emulator
        return emulator

    def server_link(server: ServerNode) -> Callable[[str | None], LinkParams]:
        def link_to(peer: str | None) -> LinkParams:
            if peer is None or peer not in group_of:
                return _params(scenario.links.default)
            return fleet.link(group_of[peer], server.group.name)
        return link_to

    def device_link(device: DeviceNode) -> Callable[[str | None], LinkParams]:
        def link_to(peer: str | None) -> LinkParams:
            if peer is None or peer not in group_of:
                return _params(scenario.links.default)
            return fleet.link(device.group.name, group_of[peer])
        return link_to

    monitor = MqttTransport(base_config.model_copy(update={"client_id": f"sim-{run_id}-monitor"}))
    codec = Codec()

    def on_heartbeat(message: Message) -> None:
        try:
            beat = codec.decode(message.payload, Heartbeat, topic=message.topic)
        except DecodeError:
            counters["monitor_bad_heartbeats"] += 1
            return
        if beat.role == "server":
            with records_lock:
                queue_series.append((time.time() - origin, beat.node, beat.load.queue_length,
                                     beat.load.in_flight))

    all_tasks = list(scenario.tasks)
    try:
        monitor.connect(timeout=10.0)
        monitor.subscribe(tree.all_of(Kind.HEARTBEAT), on_heartbeat, qos=0)
        for server in servers:
            capabilities = [t for t in all_tasks if scenario.capable(server.group, t)]
            agent = CloudAgent(
                CloudConfig(id=server.node, broker=broker_url, prefix=tree.prefix, tasks=[],
                            workers=server.group.workers, queue_size=server.group.queue_size,
                            heartbeat_interval=scenario.heartbeat_interval, grace_period=0.0),
                transport(server.node, server_link(server)),
                _registry(scenario, capabilities, server.node, server.group.speed, fleet))
            agent.start()
            server_agents[server.node] = agent
        settings = PolicySettings(**{name: getattr(policy_config, name)
                                     for name in PolicySettings.model_fields})
        deadline_of = {device.node: device.group.deadline for device in devices}
        offset_of = {device.node: device.group.clock_offset for device in devices}

        def on_record(record: AgentRecord) -> None:  # its times are on its device's clock
            with records_lock:
                records.append(_to_trace(record, origin + offset_of.get(record.device, 0.0),
                                         deadline_of.get(record.device)))

        for device in devices:
            names = [device.group.task] if device.group.capable else []
            agent_rng = random.Random(f"{scenario.seed}:decide:{device.index}")
            edge = EdgeAgent(
                EdgeConfig(id=device.node, broker=broker_url, prefix=tree.prefix, tasks=[],
                           policy=policy, policy_config=settings, local_workers=device.group.workers,
                           heartbeat_interval=scenario.heartbeat_interval,
                           **scenario.device_tuning(device.group).settings()),
                transport(device.node, device_link(device)),
                _registry(scenario, names, device.node, device.group.speed, fleet), rng=agent_rng,
                clock=_skewed_clock(device.group.clock_offset))
            edge.add_record_listener(on_record)
            edge.start()
            device_agents[device.node] = edge
        _wait_for_discovery(device_agents, len(servers), settle_timeout, stop)

        arrivals: list[tuple[float, int, str, Any]] = []
        for device in devices:
            for order, arrival in enumerate(iter_arrivals(scenario, device.index)):
                arrivals.append((arrival.time, device.index * 10_000_000 + order, device.node, arrival))
        heapq.heapify(arrivals)
        events = sorted(scenario.events, key=lambda event: event.at)
        futures = []
        start = time.monotonic()
        origin = time.time()  # the run's time 0: the closures above read it when they are called
        last_progress = 0.0
        while arrivals and not stop.is_set():
            due, _, node, arrival = heapq.heappop(arrivals)
            while events and events[0].at <= due:
                _apply_event(events.pop(0), fleet, emulators, counters, start, group_of, scheduler)
            delay = start + due - time.monotonic()
            if delay > 0 and stop.wait(delay):
                heapq.heappush(arrivals, (due, 0, node, arrival))
                break
            if progress is not None and due - last_progress >= 0.5:
                progress(due)
                last_progress = due
            payload = {"work": arrival.work, "data": bytes(arrival.payload_bytes)}
            try:
                future = device_agents[node].submit(arrival.task, payload, deadline=arrival.deadline)
            except Exception as exc:  # noqa: BLE001 - count it; one bad submission must not end the run
                counters[f"submit_failed:{type(exc).__name__}"] += 1
                continue
            futures.append(future)
        while events and not stop.is_set():
            event = events.pop(0)
            if stop.wait(max(0.0, start + event.at - time.monotonic())):
                break
            _apply_event(event, fleet, emulators, counters, start, group_of, scheduler)
        counters["not_submitted"] += len(arrivals)
        if progress is not None:
            progress(scenario.duration)
        drain_limit = time.monotonic() + _drain_budget(scenario)
        for future in futures:
            remaining = drain_limit - time.monotonic()
            if stop.is_set() or remaining <= 0:
                break
            try:
                future.exception(timeout=remaining)
            except TimeoutError:
                break
        unfinished = sum(1 for future in futures if not future.done())
        if unfinished:
            counters[UNFINISHED] += unfinished
    finally:
        for edge in device_agents.values():
            _quietly(edge.stop)
        for agent in server_agents.values():
            _quietly(partial(agent.stop, grace=0.0))
        _quietly(monitor.close)
        scheduler.stop()
    for emulator in emulators.values():
        for name, value in emulator.counters.items():
            counters[f"link_{name}"] += value
    for edge in device_agents.values():
        stats = edge.stats()
        for name in ("late_results", "unknown_results", "retries", "timeouts", "local_full",
                     "publish_failures", "server_deaths_in_flight"):
            counters[f"device_{name}"] += stats.get(name, 0)
    with records_lock:
        done = list(records)
        series = list(queue_series)
    return RunResult(policy, done, scenario.duration, series, dict(counters), label=label)


def _quietly(action: Callable[[], object]) -> None:
    try:
        action()
    except Exception:  # shutting down: report it and go on stopping the rest
        log.exception("while stopping the emulated fleet")


def _drain_budget(scenario: Scenario) -> float:
    """How long to wait after the last arrival for the outcomes still in flight."""
    longest = max(cost.service_time for cost in scenario.tasks.values())
    deadline = max((group.deadline or 0.0) for group in scenario.devices)
    tuning = scenario.tuning
    return 10.0 + tuning.max_attempts * max(tuning.default_timeout, deadline,
                                            tuning.timeout_factor * longest * 4)


def _wait_for_discovery(devices: dict[str, EdgeAgent], servers: int, timeout: float,
                        stop: threading.Event) -> None:
    """Wait until every device has heard every server's heartbeat (or fail after ``timeout``)."""
    if not servers:
        return
    end = time.monotonic() + timeout
    while time.monotonic() < end and not stop.is_set():
        missing = [node for node, edge in devices.items()
                   if sum(1 for view in edge.servers() if not view.stale) < servers]
        if not missing:
            return
        time.sleep(0.05)
    if not stop.is_set():
        raise EmulationError(f"devices did not hear all {servers} servers within {timeout:.0f} s "
                             f"(e.g. {missing[0]}): is the broker delivering?")


def _skewed_clock(offset: float) -> Callable[[], float]:
    """A wall clock ``offset`` seconds off (the device's clock in a clock-offset scenario)."""
    if not offset:
        return time.time
    return lambda: time.time() + offset


def _apply_event(event: CrashEvent | SlowdownEvent | LinkEvent | OfflineEvent, fleet: _Fleet,
                 emulators: dict[str, LinkEmulator], counters: Counter[str], start: float,
                 group_of: dict[str, str], scheduler: DelayScheduler) -> None:
    delay = start + event.at - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    if isinstance(event, OfflineEvent):
        away = [emulators[node] for node, group in group_of.items() if group == event.devices]
        for emulator in away:
            emulator.go_offline()
            scheduler.call_at(start + event.at + event.duration, emulator.come_back)
        counters["offline_periods"] += len(away)
        log.info("event: devices %s offline for %.1f s", event.devices, event.duration)
    elif isinstance(event, CrashEvent):
        emulator = emulators[event.server]
        counters["crashes"] += 1
        if event.will:
            emulator.abort()
        else:
            emulator.inner.close(timeout=1.0)
        log.info("event: server %s crashed (will=%s)", event.server, event.will)
    elif isinstance(event, SlowdownEvent):
        fleet.slowdown[event.server] = event.factor
        log.info("event: server %s slowed down x%.2f", event.server, event.factor)
    else:
        with fleet.lock:
            fleet.links[(event.devices, event.servers)] = _params(event)
        log.info("event: link %s-%s changed", event.devices, event.servers)
