"""Scenario files for the simulator: a validated TOML description of a fleet and its workload.

A scenario names device groups (count, compute speed, workload, payload, deadline, task), server groups
(count, workers, speed, capabilities, queue size), links (one-way delay, jitter, loss, bandwidth: a
default and per group pair), timed events (server crash or slowdown, link change), the duration, the
seed, the heartbeat interval, the policies to compare and the task cost model. Both simulator modes
read the same :class:`Scenario` and drive the same workload: :func:`iter_arrivals` is a deterministic
function of the scenario seed and the device index, whatever the policy.

Nodes are named ``<group>-<i>``: the group ``cams`` with ``count = 3`` gives ``cams-0`` .. ``cams-2``.

    scenario = load_scenario("sim/scenarios/heterogeneous.toml")
    for arrival in iter_arrivals(scenario, device_index=0): ...
"""

from __future__ import annotations

import math
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edge_agent.policy import POLICIES, PolicyConfig
from edge_agent.tuning import Tuning
from sim.oracle import ORACLE

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = [
    "Arrival", "BurstWorkload", "CrashEvent", "DeviceGroup", "DeviceNode", "FpsWorkload", "LinkEvent",
    "LinkSpec", "Links", "Node", "OfflineEvent", "PairLink", "PoissonWorkload", "Scenario", "ScenarioError",
    "ServerGroup",
    "ServerNode", "SlowdownEvent", "TaskCost", "UniformWorkload", "device_group", "device_rng",
    "generate_arrivals", "group_arrivals", "iter_arrivals", "load_scenario", "parse_scenario",
]

GroupName = Annotated[str, Field(min_length=1, max_length=48, pattern=r"^[A-Za-z0-9_.:@]+$")]
TaskNameField = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")]
Seconds = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0.0, allow_inf_nan=False)]

DEFAULT_MESSAGE_DELAY = 0.001
"""One message's broker and agent handling, one way (s): half an offloaded no-op's round trip through
Mosquitto and both agents on loopback (``python -m bench.offload_trace``: 1.2-1.9 ms on the 2-core
development machine under load), and the gap between emulated and discrete-event medians in ``herding``
(2.0-2.6 ms per task round trip)."""


class ScenarioError(ValueError):
    """A scenario that cannot be used; the message names the file and the offending field."""


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TaskCost(_Model):
    """Cost model of one task name: service time on a speed-1.0 node, its spread, result size."""

    service_time: Positive
    variation: Annotated[float, Field(ge=0.0, le=3.0)] = 0.0
    """Coefficient of variation of the work per task (lognormal); 0 = every task costs the same."""
    result_bytes: Annotated[int, Field(ge=0)] = 200


class PoissonWorkload(_Model):
    kind: Literal["poisson"]
    rate: Positive
    """Mean tasks per second."""


class FpsWorkload(_Model):
    kind: Literal["fps"]
    fps: Positive
    """A camera: one task every ``1/fps`` seconds, with a random phase per device."""


class BurstWorkload(_Model):
    kind: Literal["bursts"]
    burst_size: Annotated[int, Field(ge=1)]
    interval: Positive
    """Seconds between burst starts (exponential when ``poisson_bursts``, else fixed)."""
    spacing: Seconds = 0.0
    """Seconds between tasks inside a burst."""
    poisson_bursts: bool = True


class UniformWorkload(_Model):
    kind: Literal["uniform"]
    min_gap: Seconds
    max_gap: Seconds
    """Gaps between consecutive tasks drawn uniformly in ``[min_gap, max_gap]``."""
    count: Annotated[int, Field(ge=1)] | None = None
    """Stop after this many tasks (else at the scenario duration)."""

    @model_validator(mode="after")
    def _ordered(self) -> UniformWorkload:
        if self.max_gap < self.min_gap or self.max_gap <= 0.0:
            raise ValueError("max_gap must be > 0 and >= min_gap")
        return self


Workload = Annotated[PoissonWorkload | FpsWorkload | BurstWorkload | UniformWorkload,
                     Field(discriminator="kind")]


class DeviceGroup(_Model):
    name: GroupName
    count: Annotated[int, Field(ge=1, le=1_000_000)] = 1
    speed: Positive = 1.0
    """Compute speed factor: a task costs ``service_time * work / speed`` seconds here."""
    workers: Annotated[int, Field(ge=1, le=1024)] = 1
    local_queue_size: Annotated[int, Field(ge=0)] | None = None
    """Local tasks waiting beyond the busy workers; then it offloads. Default: ``tuning.local_queue_size``."""
    task: TaskNameField
    workload: Workload
    payload_bytes: Annotated[int, Field(ge=0)] = 1_000
    payload_bytes_max: Annotated[int, Field(ge=0)] | None = None
    """When set, payload sizes are uniform in ``[payload_bytes, payload_bytes_max]``."""
    deadline: Positive | None = None
    """Relative deadline of each task (s); none by default."""
    capable: bool = True
    """The task is registered on the devices, so they can run it locally."""
    known_servers: Annotated[int, Field(ge=1)] | None = None
    """Each device sees only this many servers (a seeded random subset, its neighbourhood)."""
    start: Seconds = 0.0
    """First task no earlier than this (s)."""
    clock_offset: Annotated[float, Field(ge=-86_400.0, le=86_400.0, allow_inf_nan=False)] = 0.0
    """Seconds the devices' wall clocks are off (emulation; the discrete-event mode has no wall
    clock, and the wire carries relative deadlines, so it changes nothing there, by design)."""

    @model_validator(mode="after")
    def _payload_range(self) -> DeviceGroup:
        if self.payload_bytes_max is not None and self.payload_bytes_max < self.payload_bytes:
            raise ValueError("payload_bytes_max must be >= payload_bytes")
        return self


class ServerGroup(_Model):
    name: GroupName
    count: Annotated[int, Field(ge=1, le=100_000)] = 1
    workers: Annotated[int, Field(ge=1, le=4096)] = 1
    speed: Positive = 1.0
    capabilities: tuple[TaskNameField, ...] | None = None
    """Task names it runs; ``None`` = every task of the cost model."""
    queue_size: Annotated[int, Field(ge=0)] = 64
    """Tasks waiting beyond the busy workers; more are answered ``rejected-busy``."""


class LinkSpec(_Model):
    """One direction of a link (used both ways): delay and jitter (s), loss probability, bytes/s."""

    delay: Seconds = 0.0005
    jitter: Seconds = 0.0
    loss: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    bandwidth: Positive = 12.5e6


class PairLink(LinkSpec):
    """The link between one device group and one server group."""

    devices: GroupName
    servers: GroupName


class Links(_Model):
    default: LinkSpec = LinkSpec()
    pairs: tuple[PairLink, ...] = ()


class CrashEvent(_Model):
    kind: Literal["crash"]
    at: Seconds
    server: str
    """Node id (``edge-0``); its queued and running tasks are lost and time out on the devices."""
    will: bool = True
    """The broker publishes its death message at once (process killed); False = the machine vanished
    and devices only notice after ``stale_after`` missed heartbeats."""


class SlowdownEvent(_Model):
    kind: Literal["slowdown"]
    at: Seconds
    server: str
    factor: Positive
    """Service times are multiplied by this from ``at`` on (1.0 restores the normal speed)."""


class LinkEvent(LinkSpec):
    kind: Literal["link"]
    at: Seconds
    devices: GroupName
    servers: GroupName


class OfflineEvent(_Model):
    kind: Literal["offline"]
    at: Seconds
    devices: GroupName
    duration: Positive
    """The group's devices lose their broker connection from ``at`` for this long: what they
    publish fails, what is published to them is lost (clean sessions), they run what they can
    locally, then reconnect."""


Event = Annotated[CrashEvent | SlowdownEvent | LinkEvent | OfflineEvent, Field(discriminator="kind")]


GroupT = TypeVar("GroupT", "DeviceGroup", "ServerGroup")


@dataclass(frozen=True, slots=True)
class Node(Generic[GroupT]):
    """One node of a group: its index across all groups of its kind (in file order), its node id."""

    index: int
    node: str
    group: GroupT


DeviceNode = Node[DeviceGroup]
ServerNode = Node[ServerGroup]


class Scenario(_Model):
    """A whole fleet experiment."""

    name: str = "scenario"
    description: str = ""
    duration: Positive
    """Seconds during which tasks are created; the run continues until every task has an outcome."""
    seed: int = 1
    heartbeat_interval: Positive = 1.0
    """Seconds between the servers' heartbeats."""
    message_delay: Seconds = DEFAULT_MESSAGE_DELAY
    """Seconds each task, result and pong spends in the broker and the agents' MQTT handling, on top
    of its link (discrete-event mode; emulation pays it for real)."""
    tuning: Tuning = Tuning()
    """The devices' tuning (:class:`edge_agent.tuning.Tuning`, the edge agent's defaults): retries,
    timeouts, staleness, probes, failure half-life, the gains of their estimates, local queue size."""
    policies: tuple[str, ...] = ("local", "random", "min_rtt", "ect")
    policy: dict[str, Any] = Field(default_factory=dict)
    """Overrides of :class:`edge_agent.policy.PolicyConfig` fields (``spread_k``, ``hysteresis``, ...)."""
    tasks: dict[TaskNameField, TaskCost]
    devices: tuple[DeviceGroup, ...] = Field(min_length=1)
    servers: tuple[ServerGroup, ...] = ()
    links: Links = Links()
    events: tuple[Event, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _tuning_at_the_top(cls, data: Any) -> Any:
        """Earlier files set some tuning at the top level (``timeout_min``, ``ping_interval``...): moved
        into ``[tuning]`` under its name there; the same number in both places is refused."""
        if not isinstance(data, dict) or not any(key in data for key in _TOP_LEVEL_TUNING):
            return data
        data = dict(data)
        tuning = dict(data.get("tuning") or {})
        for key, name in _TOP_LEVEL_TUNING.items():
            if key in data:
                if name in tuning:
                    raise _FieldError(key, f"also set as tuning.{name}: keep one")
                tuning[name] = data.pop(key)
        data["tuning"] = tuning
        return data

    @property
    def max_attempts(self) -> int:
        return self.tuning.max_attempts

    @property
    def ping_interval(self) -> float:
        """Seconds between round-trip probes (``tuning.probe_interval``)."""
        return self.tuning.probe_interval

    def device_tuning(self, group: DeviceGroup) -> Tuning:
        """The tuning of the devices of ``group``: the scenario's, with the group's local queue if set."""
        if group.local_queue_size is None or group.local_queue_size == self.tuning.local_queue_size:
            return self.tuning
        return self.tuning.model_copy(update={"local_queue_size": group.local_queue_size})

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
        for index, name in enumerate(self.policies):
            if name == ORACLE:
                raise _FieldError(f"policies[{index}]", f"{ORACLE!r} is not a device policy: offload-sim "
                                  "adds it to every discrete-event comparison by itself")
            if name not in POLICIES:
                raise _FieldError(f"policies[{index}]",
                                  f"unknown policy {name!r}; valid: {', '.join(POLICIES)}")
        try:
            PolicyConfig(**self.policy)
        except (TypeError, ValueError) as exc:
            raise _FieldError("policy", str(exc)) from exc
        _unique("devices", [group.name for group in self.devices])
        _unique("servers", [group.name for group in self.servers])
        for index, device_group in enumerate(self.devices):
            if device_group.task not in self.tasks:
                raise _FieldError(f"devices[{index}].task", f"{device_group.task!r} is not in [tasks]")
        for index, server_group in enumerate(self.servers):
            for name in server_group.capabilities or ():
                if name not in self.tasks:
                    raise _FieldError(f"servers[{index}].capabilities", f"{name!r} is not in [tasks]")
        device_names = {group.name for group in self.devices}
        server_names = {group.name for group in self.servers}
        links: list[tuple[str, PairLink | LinkEvent]] = [
            (f"links.pairs[{i}]", pair) for i, pair in enumerate(self.links.pairs)]
        nodes = {node.node for node in self.server_nodes()}
        for index, event in enumerate(self.events):
            if isinstance(event, LinkEvent):
                links.append((f"events[{index}]", event))
            elif isinstance(event, OfflineEvent):
                if event.devices not in device_names:
                    raise _FieldError(f"events[{index}].devices", f"no device group named {event.devices!r}")
            elif event.server not in nodes:
                raise _FieldError(f"events[{index}].server", f"no server named {event.server!r}")
        for where, link in links:
            if link.devices not in device_names:
                raise _FieldError(f"{where}.devices", f"no device group named {link.devices!r}")
            if link.servers not in server_names:
                raise _FieldError(f"{where}.servers", f"no server group named {link.servers!r}")
        for index, device_group in enumerate(self.devices):
            self._check_reachable(index, device_group)
        return self

    def _check_reachable(self, index: int, group: DeviceGroup) -> None:
        """Refuse a device group whose tasks no option can ever complete (in time, with a deadline)."""
        cost = self.tasks[group.task]
        runners = [server for server in self.servers if self.capable(server, group.task)]
        if not group.capable and not runners:
            raise _FieldError(f"devices[{index}].capable", f"false, and no server group runs "
                              f"{group.task!r}: every task would fail")
        if group.deadline is None or (group.capable and _least_service(cost, group.speed) <= group.deadline):
            return
        floors = {server.name: self._least_remote(group, server, cost) for server in runners}
        if any(floor <= group.deadline for floor in floors.values()):
            return
        fastest = min(floors, key=floors.__getitem__) if floors else None
        remote = (f"the fastest answer from a server takes {floors[fastest] * 1000:.1f} ms (group "
                  f"{fastest!r}: payload and result over the link, its delay both ways less the jitter, "
                  "the service time)") if fastest else "no server group runs it"
        local = ("the devices cannot run it (capable = false)" if not group.capable else
                 f"a local run takes {_least_service(cost, group.speed) * 1000:.1f} ms")
        raise _FieldError(f"devices[{index}].deadline",
                          f"{group.deadline * 1000:g} ms can never be met: {local}, and {remote}")

    def _least_remote(self, group: DeviceGroup, server: ServerGroup, cost: TaskCost) -> float:
        """The least time a task of ``group`` can take on ``server``: the payload there and the result
        back (bandwidth), the one-way delay both ways less its jitter, over the link at the start and
        after every link event of the pair; plus the service time when every task costs the same."""
        specs: list[LinkSpec] = [self.link(group.name, server.name)]
        specs.extend(event for event in self.events if isinstance(event, LinkEvent)
                     and event.devices == group.name and event.servers == server.name)
        trip = min((group.payload_bytes + cost.result_bytes) / spec.bandwidth
                   + 2.0 * max(spec.delay - spec.jitter, 0.0) for spec in specs)
        return trip + _least_service(cost, server.speed)

    def policy_config(self, **overrides: Any) -> PolicyConfig:
        """The scenario's :class:`PolicyConfig`, with ``overrides`` on top."""
        return PolicyConfig(**{**self.policy, **overrides})

    def device_nodes(self) -> list[DeviceNode]:
        """Every device, numbered across groups in file order."""
        nodes: list[DeviceNode] = []
        for group in self.devices:
            nodes.extend(Node(len(nodes), f"{group.name}-{i}", group) for i in range(group.count))
        return nodes

    def server_nodes(self) -> list[ServerNode]:
        """Every server, numbered across groups in file order."""
        nodes: list[ServerNode] = []
        for group in self.servers:
            nodes.extend(Node(len(nodes), f"{group.name}-{i}", group) for i in range(group.count))
        return nodes

    def link(self, devices: str, servers: str) -> LinkSpec:
        """The link between two groups at time 0 (the pair's, else the default)."""
        for pair in self.links.pairs:
            if pair.devices == devices and pair.servers == servers:
                return pair
        return self.links.default

    def capable(self, group: ServerGroup, task: str) -> bool:
        return group.capabilities is None or task in group.capabilities

    def known_servers(self, device: DeviceNode) -> list[int]:
        """Indices of the servers this device sees: all, or its seeded neighbourhood."""
        count = sum(group.count for group in self.servers)
        limit = device.group.known_servers
        if limit is None or limit >= count:
            return list(range(count))
        return sorted(random.Random(f"{self.seed}:known:{device.index}").sample(range(count), limit))


_TOP_LEVEL_TUNING = {"max_attempts": "max_attempts", "stale_after": "stale_after",
                     "ping_interval": "probe_interval", "timeout_factor": "timeout_factor",
                     "timeout_min": "default_timeout"}
"""Tuning keys an older scenario file may have at its top level, and their names in ``[tuning]``."""


class _FieldError(ValueError):
    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where = where
        self.message = message


def _least_service(cost: TaskCost, speed: float) -> float:
    """The least service time of a task on a node of ``speed``: its cost when every task costs the same,
    else 0 (a lognormal work factor has no floor)."""
    return cost.service_time / speed if cost.variation == 0.0 else 0.0


def _unique(where: str, names: list[str]) -> None:
    seen: set[str] = set()
    for index, name in enumerate(names):
        if name in seen:
            raise _FieldError(f"{where}[{index}].name", f"duplicate group name {name!r}")
        seen.add(name)


_TAGGED = {"workload": ("poisson", "fps", "bursts", "uniform"),
           "events": ("crash", "slowdown", "link", "offline")}


def _location(loc: tuple[int | str, ...]) -> str:
    """``('servers', 1, 'workers')`` -> ``servers[1].workers``, without pydantic's union tags."""
    text = ""
    for position, part in enumerate(loc):
        if isinstance(part, int):
            text += f"[{part}]"
            continue
        owner = loc[position - 1] if position else None
        if isinstance(owner, int) and position >= 2:
            owner = loc[position - 2]
        if isinstance(owner, str) and part in _TAGGED.get(owner, ()) and (
                owner == "workload" or isinstance(loc[position - 1], int)):
            continue  # the union tag pydantic inserts; the TOML has no such level
        text += f".{part}" if text else part
    return text or "<scenario>"


def parse_scenario(data: dict[str, Any], source: str = "<scenario>") -> Scenario:
    """Validate a parsed scenario; errors raise :class:`ScenarioError` naming ``source`` and the field."""
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        context = first.get("ctx", {}).get("error")
        if isinstance(context, _FieldError):
            where, message = context.where, context.message
        else:
            where, message = _location(first["loc"]), first["msg"]
            message = message.removeprefix("Value error, ")
        # A bad item also fails its container's length check: count only independent errors.
        others = [error for error in exc.errors(include_url=False)[1:]
                  if tuple(first["loc"][:len(error["loc"])]) != tuple(error["loc"])]
        more = f" (+{len(others)} more)" if others else ""
        raise ScenarioError(f"{source}: {where}: {message}{more}") from exc


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario TOML file."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ScenarioError(f"{path}: no such scenario file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: not valid TOML: {exc}") from exc
    return parse_scenario(data, str(path))


@dataclass(frozen=True, slots=True)
class Arrival:
    """One task a device creates: when, what, how big, its relative deadline and its work factor."""

    time: float
    task: str
    payload_bytes: int
    deadline: float | None
    work: float
    """Multiplier of the task's base service time (1.0 on average), fixed per task for every policy."""


def device_rng(scenario: Scenario, device_index: int) -> random.Random:
    """The workload random stream of one device: a function of the seed and the index only."""
    return random.Random(f"{scenario.seed}:workload:{device_index}")


def device_group(scenario: Scenario, device_index: int) -> DeviceGroup:
    """The group of the device numbered ``device_index`` (see :meth:`Scenario.device_nodes`)."""
    if device_index >= 0:
        for group in scenario.devices:
            if device_index < group.count:
                return group
            device_index -= group.count
    raise IndexError(f"no device with index {device_index} in this scenario")


def iter_arrivals(scenario: Scenario, device_index: int, rng: random.Random | None = None
                  ) -> Iterator[Arrival]:
    """The tasks of device ``device_index`` in time order, up to the scenario duration (lazy).

    Without ``rng`` the stream is :func:`device_rng`, so every mode and policy sees the same tasks.
    """
    return group_arrivals(scenario, device_group(scenario, device_index),
                          rng or device_rng(scenario, device_index))


def group_arrivals(scenario: Scenario, group: DeviceGroup, rng: random.Random) -> Iterator[Arrival]:
    """The arrivals of one device of ``group`` drawn from ``rng``."""
    cost = scenario.tasks[group.task]
    sigma = math.sqrt(math.log1p(cost.variation ** 2)) if cost.variation else 0.0
    mu = -sigma * sigma / 2.0  # mean work factor 1.0
    low, high = group.payload_bytes, group.payload_bytes_max
    end = scenario.duration
    workload = group.workload
    created = 0

    def make(time: float) -> Arrival:
        size = low if high is None else rng.randint(low, high)
        work = math.exp(rng.gauss(mu, sigma)) if sigma else 1.0
        return Arrival(time, group.task, size, group.deadline, work)

    # Dispatch on the tag (mypy narrows on it): isinstance on pydantic models goes through ABCMeta,
    # which costs ~20 us per call, too much for 10,000 devices.
    if workload.kind == "poisson":  # make() inlined: 10,000 devices draw here for every task
        rate, name, deadline = workload.rate, group.task, group.deadline
        gauss, expovariate, exp = rng.gauss, rng.expovariate, math.exp
        time = group.start + expovariate(rate)
        while time < end:
            size = low if high is None else rng.randint(low, high)
            yield Arrival(time, name, size, deadline, exp(gauss(mu, sigma)) if sigma else 1.0)
            time += expovariate(rate)
    elif workload.kind == "fps":
        period = 1.0 / workload.fps
        time = group.start + rng.uniform(0.0, period)
        while time < end:
            yield make(time)
            time += period
    elif workload.kind == "bursts":
        bursts = workload
        start = group.start + (rng.expovariate(1.0 / bursts.interval) if bursts.poisson_bursts
                               else rng.uniform(0.0, bursts.interval))
        while start < end:
            for k in range(bursts.burst_size):
                time = start + k * bursts.spacing
                if time >= end:
                    break
                yield make(time)
            gap = rng.expovariate(1.0 / bursts.interval) if bursts.poisson_bursts else bursts.interval
            start += max(gap, bursts.burst_size * bursts.spacing)
    else:
        uniform = workload
        time = group.start + rng.uniform(uniform.min_gap, uniform.max_gap)
        while time < end and (uniform.count is None or created < uniform.count):
            yield make(time)
            created += 1
            time += rng.uniform(uniform.min_gap, uniform.max_gap)


def generate_arrivals(scenario: Scenario, device_index: int, rng: random.Random | None = None
                      ) -> list[Arrival]:
    """:func:`iter_arrivals` as a list (for emulation drivers and tests)."""
    return list(iter_arrivals(scenario, device_index, rng))
