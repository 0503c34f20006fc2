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

import contextlib
import dataclasses
import heapq
import logging
import multiprocessing
import random
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from functools import partial
from multiprocessing.connection import Connection
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

__all__ = ["EmulationError", "device_process", "run_emulation"]


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


ScenarioEvent = CrashEvent | SlowdownEvent | LinkEvent | OfflineEvent


@dataclass
class _RunSettings:
    """What defines one run, the same in the caller's process and in every device process."""

    scenario: Scenario
    policy: str
    policy_config: PolicyConfig
    broker_url: str
    protocol: str
    run_id: str


@dataclass
class _Run(_RunSettings):
    """What both sides of one run share: its settings, its topics, links and counters."""

    fleet: _Fleet = field(init=False)
    tree: TopicTree = field(init=False)
    scheduler: DelayScheduler = field(init=False)
    group_of: dict[str, str] = field(init=False)
    emulators: dict[str, LinkEmulator] = field(default_factory=dict)
    counters: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.fleet = _Fleet(self.scenario)
        self.tree = TopicTree(f"offload-sim/{self.run_id}")
        self.scheduler = DelayScheduler(f"links-{self.run_id}")
        self.group_of = {node.node: node.group.name for node in self.scenario.server_nodes()}
        self.group_of.update({node.node: node.group.name for node in self.scenario.device_nodes()})

    @classmethod
    def of(cls, settings: _RunSettings) -> _Run:
        return cls(**{f.name: getattr(settings, f.name) for f in fields(_RunSettings)})

    def settings(self) -> _RunSettings:
        """These settings alone (without the topics, links and counters built from them)."""
        return _RunSettings(**{f.name: getattr(self, f.name) for f in fields(_RunSettings)})

    def transport_config(self, client: str) -> TransportConfig:
        config = TransportConfig.from_url(self.broker_url, protocol=self.protocol, keepalive=5)
        return config.model_copy(update={"client_id": f"sim-{self.run_id}-{client}"})

    def transport(self, node: str, own_group: str, *, server: bool) -> LinkEmulator:
        """``node``'s MQTT connection behind its links (towards a peer: the pair of the two groups)."""
        scenario, fleet, group_of = self.scenario, self.fleet, self.group_of

        def link_to(peer: str | None) -> LinkParams:
            if peer is None or peer not in group_of:
                return _params(scenario.links.default)
            if server:
                return fleet.link(group_of[peer], own_group)
            return fleet.link(own_group, group_of[peer])

        emulator = LinkEmulator(MqttTransport(self.transport_config(node)), node_id=node,
                                tree=self.tree, link_to=link_to, scheduler=self.scheduler,
                                rng=random.Random(f"{scenario.seed}:link:{node}"))
        self.emulators[node] = emulator
        return emulator

    def apply_events_until(self, events: list[ScenarioEvent], due: float, start: float) -> None:
        """Apply (and take off ``events``) every event due by run time ``due``."""
        while events and events[0].at <= due:
            _apply_event(events.pop(0), self.fleet, self.emulators, self.counters, start,
                         self.group_of, self.scheduler)

    def link_counters(self) -> None:
        for emulator in self.emulators.values():
            for name, value in emulator.counters.items():
                self.counters[f"link_{name}"] += value


class _Servers:
    """The scenario's servers (one :class:`CloudAgent` each) and a monitor of their heartbeats."""

    def __init__(self, run: _Run) -> None:
        self._run = run
        self.agents: dict[str, CloudAgent] = {}
        self.queue_series: list[tuple[float, str, int, int]] = []
        self.origin = time.time()  # reset when the workload starts; set-up heartbeats come out negative
        self._lock = threading.Lock()
        self._codec = Codec()
        self._monitor = MqttTransport(run.transport_config("monitor"))

    def start(self) -> None:
        run, scenario = self._run, self._run.scenario
        self._monitor.connect(timeout=10.0)
        self._monitor.subscribe(run.tree.all_of(Kind.HEARTBEAT), self._on_heartbeat, qos=0)
        for server in scenario.server_nodes():
            capabilities = [t for t in scenario.tasks if scenario.capable(server.group, t)]
            agent = CloudAgent(
                CloudConfig(id=server.node, broker=run.broker_url, prefix=run.tree.prefix, tasks=[],
                            workers=server.group.workers, queue_size=server.group.queue_size,
                            heartbeat_interval=scenario.heartbeat_interval, grace_period=0.0),
                run.transport(server.node, server.group.name, server=True),
                _registry(scenario, capabilities, server.node, server.group.speed, run.fleet))
            agent.start()
            self.agents[server.node] = agent

    def _on_heartbeat(self, message: Message) -> None:
        try:
            beat = self._codec.decode(message.payload, Heartbeat, topic=message.topic)
        except DecodeError:
            self._run.counters["monitor_bad_heartbeats"] += 1
            return
        if beat.role == "server":
            with self._lock:
                self.queue_series.append((time.time() - self.origin, beat.node,
                                          beat.load.queue_length, beat.load.in_flight))

    def series(self) -> list[tuple[float, str, int, int]]:
        with self._lock:
            return list(self.queue_series)

    def stop(self) -> None:
        for agent in self.agents.values():
            _quietly(partial(agent.stop, grace=0.0))
        _quietly(self._monitor.close)


_DEVICE_STATS = ("late_results", "unknown_results", "retries", "timeouts", "local_full",
                 "publish_failures", "server_deaths_in_flight")


class _Devices:
    """Some of the scenario's devices (one :class:`EdgeAgent` each): they submit their own workload,
    wait for its outcomes and keep the records."""

    def __init__(self, run: _Run, nodes: list[DeviceNode]) -> None:
        self._run, self._nodes = run, nodes
        self.agents: dict[str, EdgeAgent] = {}
        self.records: list[TaskRecord] = []
        self.origin = time.time()
        self._lock = threading.Lock()

    def start(self) -> None:
        run, scenario = self._run, self._run.scenario
        config = run.policy_config
        settings = PolicySettings(**{name: getattr(config, name) for name in PolicySettings.model_fields})
        for device in self._nodes:
            names = [device.group.task] if device.group.capable else []
            edge = EdgeAgent(
                EdgeConfig(id=device.node, broker=run.broker_url, prefix=run.tree.prefix, tasks=[],
                           policy=run.policy, policy_config=settings, announce=False,
                           local_workers=device.group.workers,
                           heartbeat_interval=scenario.heartbeat_interval,
                           **scenario.device_tuning(device.group).settings()),
                run.transport(device.node, device.group.name, server=False),
                _registry(scenario, names, device.node, device.group.speed, run.fleet),
                rng=random.Random(f"{scenario.seed}:decide:{device.index}"),
                clock=_skewed_clock(device.group.clock_offset))
            edge.add_record_listener(partial(self._on_record, device))
            edge.start()
            self.agents[device.node] = edge

    def _on_record(self, device: DeviceNode, record: AgentRecord) -> None:
        # its times are on its device's clock; self.origin is read when the record comes
        trace = _to_trace(record, self.origin + device.group.clock_offset, device.group.deadline)
        with self._lock:
            self.records.append(trace)

    def wait_for_discovery(self, timeout: float, stop: threading.Event) -> None:
        _wait_for_discovery(self.agents, len(self._run.scenario.server_nodes()), timeout, stop)

    def drive(self, start: float, origin: float, stop: threading.Event,
              progress: Callable[[float], None] | None = None) -> None:
        """Submit the workload from monotonic time ``start`` (wall time ``origin``), apply the
        scenario's events on the way, then wait (bounded) for the outcomes."""
        run, scenario = self._run, self._run.scenario
        self.origin = origin
        arrivals: list[tuple[float, int, str, Any]] = []
        for device in self._nodes:
            for order, arrival in enumerate(iter_arrivals(scenario, device.index)):
                arrivals.append((arrival.time, device.index * 10_000_000 + order, device.node, arrival))
        heapq.heapify(arrivals)
        events = sorted(scenario.events, key=lambda event: event.at)
        futures = []
        last_progress = 0.0
        while arrivals and not stop.is_set():
            due, _, node, arrival = heapq.heappop(arrivals)
            run.apply_events_until(events, due, start)
            delay = start + due - time.monotonic()
            if delay > 0 and stop.wait(delay):
                heapq.heappush(arrivals, (due, 0, node, arrival))
                break
            if progress is not None and due - last_progress >= 0.5:
                progress(due)
                last_progress = due
            payload = {"work": arrival.work, "data": bytes(arrival.payload_bytes)}
            try:
                future = self.agents[node].submit(arrival.task, payload, deadline=arrival.deadline)
            except Exception as exc:  # noqa: BLE001 - count it; one bad submission must not end the run
                run.counters[f"submit_failed:{type(exc).__name__}"] += 1
                continue
            futures.append(future)
        _apply_remaining(run, events, start, stop)
        run.counters["not_submitted"] += len(arrivals)
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
            run.counters[UNFINISHED] += unfinished

    def stop(self) -> None:
        for edge in self.agents.values():
            _quietly(edge.stop)
        for edge in self.agents.values():
            stats = edge.stats()
            for name in _DEVICE_STATS:
                self._run.counters[f"device_{name}"] += stats.get(name, 0)

    def taken_records(self) -> list[TaskRecord]:
        with self._lock:
            return list(self.records)


def _apply_remaining(run: _Run, events: list[ScenarioEvent], start: float, stop: threading.Event) -> None:
    """Apply the events still to come, each at its time (after the last arrival, or with no devices)."""
    while events and not stop.is_set():
        if stop.wait(max(0.0, start + events[0].at - time.monotonic())):
            break
        run.apply_events_until(events, events[0].at, start)


class _WakeupProbe:
    """How late this process's timers fire: a thread sleeps ``period`` again and again and keeps how
    much later than asked it woke. On a busy machine every hop of every message pays that lateness,
    so it says how much of an emulated latency is the machine, not the fleet."""

    def __init__(self, period: float = 0.002) -> None:
        self._period = period
        self._late: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wakeup-probe", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            asked = time.monotonic()
            time.sleep(self._period)
            self._late.append(time.monotonic() - asked - self._period)

    def stop(self, counters: Counter[str]) -> None:
        """Stop, and count the lateness's p50, p95 and maximum in microseconds."""
        self._stop.set()
        self._thread.join(1.0)
        late = sorted(self._late)
        if late:
            for name, value in (("p50", late[len(late) // 2]), ("p95", late[int(0.95 * (len(late) - 1))]),
                                ("max", late[-1])):
                counters[f"wakeup_late_{name}_us"] = round(1e6 * value)


def run_emulation(scenario: Scenario, policy: str, *, broker_url: str, protocol: str = "3.1.1",
                  config: PolicyConfig | None = None, seed: int | None = None, label: str = "",
                  progress: Callable[[float], None] | None = None,
                  stop: threading.Event | None = None, settle_timeout: float = 10.0,
                  device_processes: int = 0) -> RunResult:
    """Run ``scenario`` under ``policy`` with real agents on the broker at ``broker_url``.

    Returns when every created task has its outcome (or, after ``stop`` is set, with the rest
    marked ``unfinished``). ``progress`` is called with seconds of workload elapsed.
    ``device_processes``: 0 runs every agent in this process; ``n`` spreads the devices over ``n``
    child processes (each with its own interpreter, connections and link timers) and keeps the
    servers here, so that a large fleet is not bound to one interpreter lock.
    """
    if device_processes < 0:
        raise ValueError(f"device_processes must be >= 0, got {device_processes}")
    if seed is not None and seed != scenario.seed:
        scenario = scenario.model_copy(update={"seed": seed})
    run = _Run(scenario, policy, config or scenario.policy_config(), broker_url, protocol,
               uuid.uuid4().hex[:8])
    stop = stop or threading.Event()
    servers = _Servers(run)
    devices = scenario.device_nodes()
    records: list[TaskRecord] = []
    probe = _WakeupProbe()
    try:
        probe.start()
        servers.start()
        if device_processes:
            records = _drive_in_children(run, servers, devices, device_processes, settle_timeout,
                                         stop, progress)
        else:
            local = _Devices(run, devices)
            try:
                local.start()
                local.wait_for_discovery(settle_timeout, stop)
                start, servers.origin = time.monotonic(), time.time()
                local.drive(start, servers.origin, stop, progress)
            finally:
                local.stop()
            records = local.taken_records()
    finally:
        servers.stop()
        run.scheduler.stop()
        probe.stop(run.counters)
    run.link_counters()
    return RunResult(policy, records, scenario.duration, servers.series(), dict(run.counters),
                     label=label)


@dataclass(frozen=True)
class _ChildSpec:
    """What a device process needs to build its part of the fleet (sent once, over its pipe)."""

    run: _RunSettings
    devices: list[int]
    """Indices into ``scenario.device_nodes()``."""
    settle_timeout: float


def _drive_in_children(run: _Run, servers: _Servers, devices: list[DeviceNode], processes: int,
                       settle_timeout: float, stop: threading.Event,
                       progress: Callable[[float], None] | None) -> list[TaskRecord]:
    """Spread ``devices`` over ``processes`` children, start them together, apply the server-side
    events here, and gather their records (plain tuples) and counters."""
    shares = [list(range(len(devices)))[i::processes] for i in range(processes)]
    children: list[tuple[subprocess.Popen[bytes], Connection]] = []
    try:
        for share in (s for s in shares if s):
            ours, theirs = multiprocessing.Pipe()
            spec = _ChildSpec(run.settings(), share, settle_timeout)
            # A fresh interpreter (not a fork of this threaded one, and not a re-run of the
            # caller's main module as multiprocessing's spawn would do), its pipe end by number.
            process = subprocess.Popen([sys.executable, "-m", "sim.device_process", str(theirs.fileno())],
                                       pass_fds=[theirs.fileno()])
            theirs.close()
            children.append((process, ours))
            ours.send(spec)
        bound = settle_timeout + 30.0  # the children's start-up (imports) and discovery
        for _, conn in children:
            reply = _receive(conn, bound, "ready")
            if reply[0] != "ready":
                raise EmulationError(str(reply[1]))
        start = time.monotonic() + 0.2
        servers.origin = time.time() + 0.2
        for _, conn in children:
            conn.send(("go", start, servers.origin))
        forward = threading.Thread(target=_forward_stop, args=(stop, children), daemon=True)
        forward.start()
        events = sorted(run.scenario.events, key=lambda event: event.at)
        _apply_remaining(run, events, start, stop)
        end = start + run.scenario.duration
        while progress is not None and not stop.is_set() and time.monotonic() < end:
            progress(time.monotonic() - start)
            stop.wait(min(0.5, max(0.0, end - time.monotonic())))
        if progress is not None:
            progress(run.scenario.duration)
        records: list[TaskRecord] = []
        bound = max(0.0, end - time.monotonic()) + _drain_budget(run.scenario) + 30.0
        for _, conn in children:
            kind, rows, counters = _receive(conn, bound, "done")
            if kind != "done":
                raise EmulationError(str(rows))
            records.extend(TaskRecord(*row) for row in rows)
            run.counters.update(counters)
        return records
    finally:
        for child, conn in children:
            conn.close()
            try:
                child.wait(10.0)
            except subprocess.TimeoutExpired:
                child.terminate()
                child.wait(2.0)


def _receive(conn: Connection, timeout: float, what: str) -> Any:
    if not conn.poll(timeout):
        raise EmulationError(f"a device process sent no {what!r} within {timeout:.0f} s")
    try:
        return conn.recv()
    except EOFError:
        raise EmulationError(f"a device process ended before {what!r} (see its output)") from None


def _forward_stop(stop: threading.Event,
                  children: list[tuple[subprocess.Popen[bytes], Connection]]) -> None:
    """When the caller stops the run, tell every child (they then drain no longer)."""
    while not stop.wait(0.5):
        if all(child.poll() is not None for child, _ in children):
            return
    for _, conn in children:
        with contextlib.suppress(OSError, ValueError):
            conn.send(("stop",))


def device_process(conn: Connection) -> None:
    """A device process's whole life (:mod:`sim.device_process`): read its spec from ``conn``,
    build its devices, say ready, drive on "go", send the records back."""
    spec: _ChildSpec = conn.recv()
    stop = threading.Event()
    run = _Run.of(spec.run)
    nodes = run.scenario.device_nodes()
    devices = _Devices(run, [nodes[i] for i in spec.devices])
    try:
        try:
            devices.start()
            devices.wait_for_discovery(spec.settle_timeout, stop)
        except Exception as exc:  # noqa: BLE001 - the parent reports it
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
            return
        conn.send(("ready",))
        message = conn.recv()
        if message[0] != "go":
            return
        threading.Thread(target=_watch_stop, args=(conn, stop), daemon=True).start()
        devices.drive(message[1], message[2], stop)
    finally:
        devices.stop()
        run.scheduler.stop()
    run.link_counters()
    rows = [dataclasses.astuple(record) for record in devices.taken_records()]
    conn.send(("done", rows, dict(run.counters)))


def _watch_stop(conn: Connection, stop: threading.Event) -> None:
    """Stop when the parent says so, or when it is gone (its end of the pipe closed)."""
    with contextlib.suppress(EOFError, OSError):
        conn.recv()  # the only message after "go" is "stop"
    stop.set()


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


def _apply_event(event: ScenarioEvent, fleet: _Fleet,
                 emulators: dict[str, LinkEmulator], counters: Counter[str], start: float,
                 group_of: dict[str, str], scheduler: DelayScheduler) -> None:
    delay = start + event.at - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    if isinstance(event, OfflineEvent):
        away = [emulators[node] for node, group in group_of.items()
                if group == event.devices and node in emulators]  # others: in another process
        for emulator in away:
            emulator.go_offline()
            scheduler.call_at(start + event.at + event.duration, emulator.come_back)
        if away:
            counters["offline_periods"] += len(away)
        log.info("event: devices %s offline for %.1f s", event.devices, event.duration)
    elif isinstance(event, CrashEvent):
        if event.server not in emulators:  # the servers are in another process
            return
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
