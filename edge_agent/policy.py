"""The offloading decision, as a pure function.

:func:`decide` maps (task, local state, server table, now, rng) to a :class:`Decision`: run locally
or send to one server, with the reason and the estimates behind it. It does no I/O, reads no clock and
draws randomness only from the ``rng`` it is given, so the edge agent and the simulator run the very
same code and a seeded run is reproducible.

Expected completion time (ECT) of an option, in seconds, and its spread::

    server: rtt + backlog + payload_bytes / bandwidth + queue_wait + busy_wait + service_time
    local:                                             queue_wait + service_time

    queue_wait = the wait an answer newer than the report measured, plus this device's unanswered
                 attempts there x service / workers                             if there is one
               = 0                                                    if ahead < workers
               = (ahead - workers + in_flight_residual) * service / workers   otherwise
    ahead      = queue_length + in_flight (+ sent_since_report for a server)
    busy_wait  = busy * (queue_capacity or busy_tasks * workers) * service / workers
    spread     = rtt_dev + error_dev   (a server's; a local run's: the service time's mean deviation)
                 + the default of a server's unknown round trip or service time
                 + (1 - 0.5 ** (age / evidence_half_life)) x (service - service_floor)
    age        = now - evidence_at: how long its report has repeated an unchanged service time (it ran
                 nothing) with no answer to this device since; 0 while anything measures it
    service_floor = the lowest service time its reports have shown: what it may have gone back to
                 (unknown: the aged part is queue_wait + busy_wait + service)
    caution    = doubt (none while the server's loss is above the ``hedge`` budget: the core then
                 hedges its attempts, so a lost one costs the hedge's time, not a timeout); for a
                 local run never timed, the default service time
    service    = the server's; if unknown, ``ect`` assumes the shortest known among the servers it drew
                 for this decision (the default if none is known), with the default's spread

``in_flight_residual`` (default 0.5) is the part of a running task still to do when a new one
arrives: the head of the line is on average half done. A server's ``queue_length`` comes from its last
heartbeat, which may be old: ``sent_since_report`` adds what this device sent it since; an answer newer
than the report replaces the report's queue by the wait it measured. ``backlog`` is the device's own
send queue. ``busy`` (decayed ``rejected-busy``/``expired`` answers) is load: the queue was full;
``doubt`` (decayed seconds waited for timed-out attempts, plus how late the oldest unanswered one is)
is uncertainty: it is caution, not part of the mean. Neither bans a server: both fade with time and
halve on each answer.

``ect`` ranks an option by ``ECT + caution + tail x deviation + u x spread`` (``deviation``: the
measured part of the spread, without the defaults of unknowns, so a jittery option ranks by its tail
and an unknown one still gets tried; ``u`` uniform in [-1, 1), drawn per option and decision: what the
option may take, as Thompson sampling draws it) and counts it as meeting a
deadline only when ``ECT + risk x (spread + caution)`` does (a high quantile, not the mean). It
considers ``choices`` servers drawn at random from the table (plus the one chosen last time, and the
local option): power of d choices, so devices reading the same stale report do not all pick the same
server, and a decision costs O(d), not O(servers). When none of them meets the deadline it draws
again, up to ``rounds`` times.

Policies (:data:`POLICIES`): ``local``, ``remote`` (best server by ECT), ``random`` (uniform over
usable servers), ``min_rtt`` (lowest round trip, blind to load), ``threshold`` (the old proxy's rule:
offload to the best server once the local arrival rate exceeds ``threshold_rate``), ``p2c`` (power of
two choices on latency x requests in flight: Finagle's and linkerd's peak-EWMA balancer) and ``ect``
(default: see above).

Stale, incapable and excluded servers are never chosen by any policy.
"""

from __future__ import annotations

import operator
import random
from collections.abc import Sequence
from dataclasses import dataclass

from agent_common.readonly import record

__all__ = [
    "DEFAULT_POLICY", "DEFAULT_POLICY_CONFIG", "LOCAL", "POLICIES", "Decision", "LocalInfo", "PolicyConfig",
    "ServerInfo", "TaskInfo", "UnknownPolicyError", "check_policy", "decide", "local_ect", "server_ect",
]

LOCAL = "local"
"""Label of the local option in :attr:`Decision.estimates` and in ``previous``."""

POLICIES: tuple[str, ...] = ("local", "remote", "random", "min_rtt", "threshold", "p2c", "ect")
DEFAULT_POLICY = "ect"


class UnknownPolicyError(ValueError):
    """A policy name that is not one of :data:`POLICIES`."""

    def __init__(self, name: str) -> None:
        super().__init__(f"unknown policy {name!r}; valid policies: {', '.join(POLICIES)}")
        self.name = name


def check_policy(name: str) -> str:
    """Return ``name`` if it is a known policy, else raise :class:`UnknownPolicyError`."""
    if name not in POLICIES:
        raise UnknownPolicyError(name)
    return name


@record
class TaskInfo:
    """What the policy knows about the task being decided."""

    name: str
    payload_bytes: int
    time_left: float | None = None
    """Seconds until the task's deadline; ``None`` means no deadline."""
    backlog: float = 0.0
    """Seconds until the device's own uplink has sent what is queued on it (its payload waits that long)."""

    def __post_init__(self) -> None:
        if self.payload_bytes < 0:
            raise ValueError(f"TaskInfo.payload_bytes must be >= 0, got {self.payload_bytes}")
        if not self.backlog >= 0.0:
            raise ValueError(f"TaskInfo.backlog must be >= 0, got {self.backlog}")


@record
class LocalInfo:
    """The device's own state for this task name."""

    capable: bool
    """The task is registered on this device."""
    queue_length: int = 0
    in_flight: int = 0
    workers: int = 1
    service_time: float | None = None
    """EWMA local service time for this task name (s); ``None`` = never run here."""
    rate: float = 0.0
    """Local task arrivals per second over the recent window (``threshold`` policy)."""
    service_dev: float = 0.0
    """Mean deviation of the local service time (s)."""


@record
class ServerInfo:
    """One row of the device's server table, as seen for this task name."""

    node: str
    capable: bool = True
    """The server announced this task name."""
    stale: bool = False
    """Missed heartbeats or a death message: never chosen."""
    rtt: float | None = None
    """EWMA round trip over MQTT (s); ``None`` = not measured yet (``default_rtt`` is assumed)."""
    rtt_dev: float = 0.0
    bandwidth: float | None = None
    """Bytes/s device -> server; ``None`` = unknown (``default_bandwidth``)."""
    queue_length: int = 0
    in_flight: int = 0
    workers: int = 1
    service_time: float | None = None
    """Reported EWMA service time for this task name (s); ``None`` = ``default_service_time``."""
    sent_since_report: int = 0
    """Tasks this device sent it since the heartbeat these numbers come from (best: those still
    unanswered, since answered ones have left its queue)."""
    recent_failures: float = 0.0
    """Decayed count of recent failures (timeout, busy, death)."""
    queue_capacity: int = 0
    """Queued tasks the server takes at most (0 = not reported)."""
    outstanding: int = 0
    """This device's attempts to it not answered yet."""
    queue_wait: float | None = None
    """The queue wait (s) this device's answers from it measured, when newer than its report."""
    error_dev: float = 0.0
    """Mean absolute error (s) of this device's predictions for it, from its answers."""
    busy: float = 0.0
    """Decayed count of busy answers (``rejected-busy``, ``expired``): load."""
    doubt: float = 0.0
    """Decayed seconds this device waited for attempts to it that timed out: uncertainty."""
    latency: float | None = None
    """Peak-EWMA wall time (s) of its answers to this device (``p2c``)."""
    evidence_at: float | None = None
    """When its service time was last measured (the caller's clock), once its report repeats an unchanged
    one (it ran nothing since): when that figure came, or this device's last answer from it if newer.
    ``None``: current (its last report changed it, or no report says); ``ect`` does not age it."""
    service_floor: float | None = None
    """The lowest service time its reports have shown for the task (s): what it does when well."""
    loss: float = 0.0
    """The share of this device's attempts to it left unanswered, as estimated (EWMA)."""


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """Tuning of the policies. The defaults suit a LAN with millisecond round trips."""

    default_rtt: float = 0.005
    """Round trip assumed for a server never measured: small, so new servers get tried."""
    default_bandwidth: float = 12.5e6
    """Bytes/s assumed when unknown (100 Mbit/s)."""
    default_service_time: float = 0.050
    """Service time assumed for a task never timed on that node (s); ``ect`` counts it as caution too."""
    spread_k: int = 2
    """Spread over at most this many near-equal best options (1 = always the minimum)."""
    near_equal: float = 0.15
    """Options within this relative margin of the best count as near-equal."""
    near_equal_abs: float = 0.0005
    """... or within this many seconds of it (so tiny estimates are not split by noise)."""
    hysteresis: float = 0.2
    """Keep ``previous`` unless the best option is better by more than this relative margin."""
    failure_penalty: float = 0.0
    """Seconds added to a server's estimate per recent failure (0: failures act through ``busy`` and
    ``doubt`` instead)."""
    threshold_rate: float = 25.0
    """``threshold`` policy: offload once the local rate (tasks/s) exceeds this."""
    in_flight_residual: float = 0.5
    """Fraction of a running task assumed still to do (see the module docstring)."""
    rtt_dev_weight: float = 0.0
    """Add this many ``rtt_dev`` to a server's round trip (risk aversion; 0 = mean only)."""
    choices: int = 2
    """``ect``: servers drawn at random per decision (besides the previous choice and the local option)."""
    rounds: int = 3
    """``ect``: draws of ``choices`` servers at most, while none drawn meets the deadline."""
    risk: float = 2.0
    """``ect``: an option meets a deadline when ``ECT + risk x (spread + caution)`` does."""
    explore: float = 1.0
    """``ect``: the rank's draw is uniform over ``ECT +- explore x spread`` (0: rank on the mean)."""
    tail: float = 1.0
    """``ect``: the rank adds this many measured deviations (``rtt_dev + error_dev`` of a server, the
    service time's of a local run; not the default spread of unknowns): the goal is a low p95."""
    busy_tasks: int = 4
    """Queued tasks per worker a busy answer stands for when the server reports no queue capacity."""
    evidence_half_life: float = 1.0
    """``ect``: seconds for a server's service-time estimate to lose half its weight while nothing
    measures it (``ServerInfo.evidence_at``): the spread grows by ``(1 - 0.5 ** (age /
    evidence_half_life)) x (service - service_floor)``, so a server left after a bad period is drawn
    again now and then and its answer says whether it recovered (0: evidence never ages)."""
    hedge: float = 0.01
    """``ect``, in the device core: when the chosen server's measured loss (the share of attempts it left
    unanswered, :meth:`~edge_agent.servers.ServerTable.loss`) is above this budget, the attempt is also
    sent to the best other server the decision drew that can meet the deadline; the first final answer
    gives the task its outcome (0: never hedge)."""
    hedge_delay: float = 0.0
    """Seconds after the attempt that its hedge goes out, if no answer came by then (0: at once)."""
    loss_cost: float = 0.0
    """Seconds a lost attempt costs: ``ect``'s caution adds ``loss x loss_cost`` for a server whose
    losses are not hedged (the core sets it to its attempt timeout's floor when no hedge is left)."""
    hedge_share: float = 1.0
    """At most this many hedges per task, on average (1: no cap). Each task submitted adds
    ``hedge_share`` to a bucket of at most :data:`~edge_agent.core.HEDGE_BURST` hedges, each hedge takes
    one. While it holds less than one, attempts are decided as with ``hedge = 0`` (a lossy server's
    doubt counts as caution: a lost attempt would cost its timeout) and not hedged (counted
    ``hedge_over_budget`` when the chosen server is lossy all the same)."""

    def __post_init__(self) -> None:
        checks = (
            ("default_rtt", self.default_rtt >= 0.0), ("default_bandwidth", self.default_bandwidth > 0.0),
            ("default_service_time", self.default_service_time >= 0.0), ("spread_k", self.spread_k >= 1),
            ("near_equal", self.near_equal >= 0.0), ("near_equal_abs", self.near_equal_abs >= 0.0),
            ("hysteresis", self.hysteresis >= 0.0), ("failure_penalty", self.failure_penalty >= 0.0),
            ("threshold_rate", self.threshold_rate >= 0.0),
            ("in_flight_residual", 0.0 <= self.in_flight_residual <= 1.0),
            ("rtt_dev_weight", self.rtt_dev_weight >= 0.0), ("choices", self.choices >= 1),
            ("rounds", self.rounds >= 1), ("risk", self.risk >= 0.0), ("explore", self.explore >= 0.0),
            ("tail", self.tail >= 0.0),
            ("busy_tasks", self.busy_tasks >= 0), ("evidence_half_life", self.evidence_half_life >= 0.0),
            ("hedge", 0.0 <= self.hedge <= 1.0), ("hedge_delay", self.hedge_delay >= 0.0),
            ("hedge_share", 0.0 <= self.hedge_share <= 1.0), ("loss_cost", self.loss_cost >= 0.0),
        )
        for name, ok in checks:
            if not ok:
                raise ValueError(f"PolicyConfig.{name}: out of range ({getattr(self, name)!r})")


DEFAULT_POLICY_CONFIG = PolicyConfig()


@record
class Decision:
    """The outcome of :func:`decide`, kept for logs, traces and tests."""

    policy: str
    target: str | None
    """``None`` = run locally; otherwise the server node id."""
    reason: str
    """Short stable phrase: ``lowest-ect``; ``keep-previous`` (hysteresis); ``spread`` (random among
    near-equal best options); ``deadline`` (the deadline removed options, or none can meet it);
    ``always-local``; ``local-incapable``; ``no-server`` / ``stale`` (no usable server, run locally);
    ``random``; ``min-rtt``; ``p2c``; ``under-threshold`` / ``over-threshold``; ``no-option``."""
    estimates: tuple[tuple[str, float], ...] = ()
    """``(LOCAL or node id, expected completion s)`` for every option considered, best first."""
    feasible: bool = True
    """False when no option could meet the deadline, or none could run the task at all."""
    expected: float | None = None
    """The expected completion time (s) of the chosen option (``None`` with no option)."""
    quantile: float | None = None
    """``ect``: the high quantile of the chosen option's completion time (what the deadline was judged
    on; attempt timeouts derive from it). ``None``: use ``expected``."""

    @property
    def local(self) -> bool:
        return self.target is None

    def estimate(self, option: str) -> float | None:
        """The ECT computed for ``option`` (``LOCAL`` or a node id), if it was considered."""
        for name, value in self.estimates:
            if name == option:
                return value
        return None


def _queue_wait(ahead: int, workers: int, service: float, residual: float) -> float:
    workers = workers if workers > 0 else 1
    if ahead < workers:
        return 0.0
    return (ahead - workers + residual) * service / workers


def _server_estimate(task: TaskInfo, server: ServerInfo, config: PolicyConfig,
                     prior: float | None = None, now: float | None = None) -> tuple[float, float, float]:
    """(ECT, spread, caution) of ``task`` on ``server`` (see the module docstring). ``prior``: the
    service time assumed when the server's is unknown (else ``default_service_time``); ``now``: the
    caller's clock, to age the evidence (``None``: no ageing)."""
    spread = server.rtt_dev + server.error_dev
    caution = server.doubt
    if config.hedge and server.loss > config.hedge:
        caution = 0.0  # the core hedges its attempts: a lost one costs the hedge's time, not a timeout
    elif config.loss_cost:
        caution += server.loss * config.loss_cost  # an unhedged lost attempt costs its timeout
    rtt = server.rtt
    if rtt is None:
        rtt = config.default_rtt
        spread += rtt
    if config.rtt_dev_weight:
        rtt += config.rtt_dev_weight * server.rtt_dev
    service = server.service_time
    if service is None:
        service = config.default_service_time if prior is None else prior
        spread += config.default_service_time
    workers = server.workers if server.workers > 0 else 1
    bandwidth = server.bandwidth or config.default_bandwidth
    estimate = rtt + task.backlog + task.payload_bytes / bandwidth + service
    if server.queue_wait is not None:
        estimate += server.queue_wait + server.outstanding * service / workers
    else:
        ahead = server.queue_length + server.in_flight + server.sent_since_report
        if ahead >= workers:
            estimate += (ahead - workers + config.in_flight_residual) * service / workers
    if server.busy:
        capacity = server.queue_capacity or config.busy_tasks * workers
        estimate += server.busy * capacity * service / workers
    if server.recent_failures and config.failure_penalty:
        estimate += server.recent_failures * config.failure_penalty
    measured_at = server.evidence_at
    if now is not None and measured_at is not None and now > measured_at and config.evidence_half_life:
        # Aged evidence: the service time may have gone back to what the server does when well (its
        # floor; unknown: anywhere down to 0, queue included) since anything measured it.
        floor = server.service_floor
        aged = estimate - rtt - task.backlog - task.payload_bytes / bandwidth if floor is None else (
            service - floor if service > floor else 0.0)
        spread += (1.0 - 0.5 ** ((now - measured_at) / config.evidence_half_life)) * aged
    return estimate, spread, caution


def _local_estimate(local: LocalInfo, config: PolicyConfig) -> tuple[float, float, float]:
    """(ECT, spread, caution) of running the task on this device."""
    service, caution = local.service_time, 0.0
    if service is None:  # never run here: pessimistic (a device is often slow; a run costs its CPU)
        service = caution = config.default_service_time
    return (_queue_wait(local.queue_length + local.in_flight, local.workers, service,
                        config.in_flight_residual) + service, local.service_dev, caution)


def server_ect(task: TaskInfo, server: ServerInfo, config: PolicyConfig = DEFAULT_POLICY_CONFIG, *,
               prior: float | None = None) -> float:
    """Expected completion time (s) of ``task`` sent to ``server`` (see the module docstring); ``prior``:
    the service time assumed if the server's is unknown (default: ``config.default_service_time``)."""
    return _server_estimate(task, server, config, prior)[0]


def local_ect(local: LocalInfo, config: PolicyConfig = DEFAULT_POLICY_CONFIG) -> float:
    """Expected completion time (s) of running the task on this device."""
    return _local_estimate(local, config)[0]


_sort_key = operator.itemgetter(1)
"""Sort options by their ECT (C-level key: this runs on every decision)."""


def _usable(server: ServerInfo, exclude: frozenset[str]) -> bool:
    return server.capable and not server.stale and not (exclude and server.node in exclude)


def _options(task: TaskInfo, local: LocalInfo, servers: Sequence[ServerInfo], exclude: frozenset[str],
             allow_local: bool, config: PolicyConfig) -> tuple[list[tuple[str, float]], float | None]:
    """Every usable option with its ECT (unsorted): usable servers first, local last if allowed."""
    # _server_estimate's ECT inlined: the policies that read every row run this loop on every decision.
    options: list[tuple[str, float]] = []
    append = options.append
    payload, backlog = task.payload_bytes, task.backlog
    default_rtt, default_bandwidth = config.default_rtt, config.default_bandwidth
    default_service, residual = config.default_service_time, config.in_flight_residual
    penalty, dev_weight, busy_tasks = config.failure_penalty, config.rtt_dev_weight, config.busy_tasks
    for server in servers:
        if server.stale or not server.capable or (exclude and server.node in exclude):
            continue
        rtt = server.rtt
        if rtt is None:
            rtt = default_rtt
        if dev_weight:
            rtt += dev_weight * server.rtt_dev
        service = server.service_time
        if service is None:
            service = default_service
        workers = server.workers if server.workers > 0 else 1
        estimate = rtt + backlog + payload / (server.bandwidth or default_bandwidth) + service
        if server.queue_wait is not None:
            estimate += server.queue_wait + server.outstanding * service / workers
        else:
            ahead = server.queue_length + server.in_flight + server.sent_since_report
            if ahead >= workers:
                estimate += (ahead - workers + residual) * service / workers
        if server.busy:
            estimate += server.busy * (server.queue_capacity or busy_tasks * workers) * service / workers
        if server.recent_failures and penalty:
            estimate += server.recent_failures * penalty
        append((server.node, estimate))
    local_estimate = local_ect(local, config) if (allow_local and local.capable) else None
    return options, local_estimate


def _draw(servers: Sequence[ServerInfo], count: int, rng: random.Random, exclude: frozenset[str],
          taken: set[int]) -> list[int]:
    """Up to ``count`` indices of usable servers not in ``taken`` (added to it), drawn uniformly: by
    rejection (O(count) draws) in a large table, by a shuffle of the usable ones in a small one or when
    rejection finds too few."""
    size = len(servers)
    if size <= 4 * count:
        return _draw_scan(servers, count, rng, exclude, taken)
    picked: list[int] = []
    for _ in range(8 * count):
        if len(picked) == count:
            return picked
        i = int(rng.random() * size)
        if i not in taken:
            taken.add(i)
            if _usable(servers[i], exclude):
                picked.append(i)
    if len(picked) < count:  # mostly unusable rows: the rest at random from a scan (the rare O(servers) case)
        return picked + _draw_scan(servers, count - len(picked), rng, exclude, taken)
    return picked


def _draw_scan(servers: Sequence[ServerInfo], count: int, rng: random.Random, exclude: frozenset[str],
               taken: set[int]) -> list[int]:
    pool = [i for i in range(len(servers)) if i not in taken and _usable(servers[i], exclude)]
    if len(pool) <= count:
        taken.update(pool)
        return pool
    picked: list[int] = []
    for _ in range(count):  # a partial Fisher-Yates shuffle
        j = int(rng.random() * len(pool))
        picked.append(pool[j])
        pool[j] = pool[-1]
        pool.pop()
    taken.update(picked)
    return picked


def _ect(task: TaskInfo, local: LocalInfo, servers: Sequence[ServerInfo], *, rng: random.Random, now: float,
         previous: str | None, previous_at: int | None, exclude: frozenset[str], allow_local: bool,
         config: PolicyConfig) -> Decision:
    """The ``ect`` rule (see the module docstring)."""
    time_left = task.time_left
    risk = config.risk
    # (label, rank, quantile, ECT); rank = ECT + caution + u x spread, u uniform in [-1, 1) per option and
    # decision: a draw from what the option may take (Thompson sampling); doubt counts in full.
    options: list[tuple[str, float, float, float]] = []
    random_ = rng.random

    explore = config.explore

    tail = config.tail

    def add(label: str, mean: float, spread: float, caution: float, measured: float) -> None:
        options.append((label, mean + caution + tail * measured + (2.0 * random_() - 1.0) * explore * spread,
                        mean + risk * (spread + caution), mean))

    if allow_local and local.capable:
        estimate = _local_estimate(local, config)
        add(LOCAL, *estimate, estimate[1])
    taken: set[int] = set()
    # An unknown service time is assumed as short as the shortest known among the servers drawn (with the
    # default's spread): a new server gets tried beside known ones, and its first answer says the truth.
    prior: float | None = None
    rows: list[ServerInfo] = []
    if previous is not None and previous != LOCAL:
        at = previous_at
        if at is None or not 0 <= at < len(servers) or servers[at].node != previous:
            at = next((i for i, server in enumerate(servers) if server.node == previous), None) \
                if len(servers) <= 4 * config.choices else None
        if at is not None:
            taken.add(at)
            if _usable(servers[at], exclude):
                rows.append(servers[at])
    for _ in range(config.rounds):
        rows.extend(servers[i] for i in _draw(servers, config.choices, rng, exclude, taken))
        for row in rows:
            if row.service_time is not None and (prior is None or row.service_time < prior):
                prior = row.service_time
        for row in rows:
            add(row.node, *_server_estimate(task, row, config, prior, now), row.rtt_dev + row.error_dev)
        rows.clear()
        if time_left is None or any(option[2] <= time_left for option in options):
            break
        if len(taken) >= len(servers):
            break
    if not options:
        return Decision("ect", None, "no-option", (), False)
    estimates = tuple(sorted(((option[0], option[3]) for option in options), key=_sort_key))
    options.sort(key=_sort_key)
    feasible = options if time_left is None else [option for option in options if option[2] <= time_left]
    if feasible:
        chosen = feasible[0]
        reason = "lowest-ect" if len(feasible) == len(options) else "deadline"
    else:
        chosen, reason = options[0], "deadline"
    label = chosen[0]
    return Decision("ect", None if label == LOCAL else label, reason, estimates, bool(feasible), chosen[3],
                    chosen[2])


def _p2c(task: TaskInfo, servers: Sequence[ServerInfo], *, rng: random.Random, exclude: frozenset[str],
         config: PolicyConfig) -> tuple[str, float, tuple[tuple[str, float], ...]] | None:
    """Power of two choices on latency x (requests in flight + 1): (node, its ECT, the two estimates)."""
    best: tuple[float, str, float] | None = None
    estimates = []
    for i in _draw(servers, 2, rng, exclude, set()):
        server = servers[i]
        mean = _server_estimate(task, server, config)[0]
        latency = mean if server.latency is None else server.latency
        cost = latency * (server.outstanding + 1)
        estimates.append((server.node, mean))
        if best is None or cost < best[0]:
            best = (cost, server.node, mean)
    if best is None:
        return None
    return best[1], best[2], tuple(sorted(estimates, key=_sort_key))


def _pick(policy: str, options: list[tuple[str, float]], time_left: float | None, *, rng: random.Random,
          previous: str | None, spread: bool, config: PolicyConfig
          ) -> tuple[tuple[str, float], str, tuple[tuple[str, float], ...], bool]:
    """Lowest-ECT choice among ``options`` (non-empty): deadline filter, hysteresis, then spreading.

    Returns ((option label, its ECT), reason, estimates best first, feasible).
    """
    options.sort(key=_sort_key)
    estimates = tuple(options)
    best_overall = options[0]
    candidates = options
    if time_left is not None and options[-1][1] > time_left:  # sorted: the worst fits, so all do
        if best_overall[1] > time_left:
            return best_overall, "deadline", estimates, False
        candidates = [option for option in options if option[1] <= time_left]
    best = candidates[0]
    reason = "lowest-ect" if len(candidates) == len(options) else "deadline"
    if previous is not None and previous != best[0]:
        for option in candidates:
            if option[0] == previous:
                if option[1] <= best[1] * (1.0 + config.hysteresis):
                    return option, "keep-previous", estimates, True
                break
    if spread and config.spread_k > 1 and len(candidates) > 1:
        limit = max(best[1] * (1.0 + config.near_equal), best[1] + config.near_equal_abs)
        near = 1
        top = min(config.spread_k, len(candidates))
        while near < top and candidates[near][1] <= limit:
            near += 1
        if near > 1:
            if previous is not None:
                for option in candidates[:near]:
                    if option[0] == previous:
                        return option, "keep-previous", estimates, True
            return candidates[int(rng.random() * near)], "spread", estimates, True
    return best, reason, estimates, True


def _labelled(options: list[tuple[str, float]], local_estimate: float | None) -> list[tuple[str, float]]:
    """``options`` plus the local one; only ever called on a list built for this decision."""
    if local_estimate is not None:
        options.append((LOCAL, local_estimate))
    return options


def _decision(policy: str, chosen: tuple[str, float], reason: str, estimates: tuple[tuple[str, float], ...],
              feasible: bool) -> Decision:
    label, expected = chosen
    return Decision(policy, None if label == LOCAL else label, reason, estimates, feasible, expected)


def _fits(estimate: float, time_left: float | None) -> bool:
    return time_left is None or estimate <= time_left


def decide(policy: str, task: TaskInfo, local: LocalInfo, servers: Sequence[ServerInfo], *,
           now: float, rng: random.Random, previous: str | None = None,
           exclude: frozenset[str] = frozenset(), allow_local: bool = True,
           config: PolicyConfig = DEFAULT_POLICY_CONFIG, previous_at: int | None = None) -> Decision:
    """Decide where ``task`` runs under ``policy``.

    ``previous`` is the option chosen last time for this task name (a node id, or :data:`LOCAL`),
    ``previous_at`` where it is in ``servers`` if the caller knows (``ect`` then finds it in O(1));
    ``exclude`` are servers already tried for this task; ``allow_local=False`` removes the local option.
    ``now`` is the caller's clock, the same one as ``ServerInfo.evidence_at`` (``ect`` ages evidence by it:
    policies stay pure, time arrives as an argument). Raises :class:`UnknownPolicyError` for a name not
    in :data:`POLICIES`.
    """
    if policy not in POLICIES:
        raise UnknownPolicyError(policy)
    time_left = task.time_left
    if policy == "local" and allow_local and local.capable:
        estimate = local_ect(local, config)
        return Decision(policy, None, "always-local", ((LOCAL, estimate),), _fits(estimate, time_left),
                        estimate)
    if policy == "ect":
        return _ect(task, local, servers, rng=rng, now=now, previous=previous, previous_at=previous_at,
                    exclude=exclude, allow_local=allow_local, config=config)
    if policy == "p2c":
        picked = _p2c(task, servers, rng=rng, exclude=exclude, config=config)
        if picked is not None:
            node, mean, estimates = picked
            return Decision(policy, node, "p2c", estimates, _fits(mean, time_left), mean)
        if allow_local and local.capable:
            estimate = local_ect(local, config)
            stale = any(server.stale and server.capable for server in servers)
            return Decision(policy, None, "stale" if stale else "no-server", ((LOCAL, estimate),),
                            _fits(estimate, time_left), estimate)
        return Decision(policy, None, "no-option", (), False)

    options, local_estimate = _options(task, local, servers, exclude, allow_local, config)

    if not options and local_estimate is None:
        return Decision(policy, None, "no-option", (), False)

    if policy == "local":  # the local option is unavailable here: the best server instead
        chosen, _, estimates, feasible = _pick(policy, options, time_left, rng=rng, previous=previous,
                                               spread=False, config=config)
        return _decision(policy, chosen, "local-incapable", estimates, feasible)

    if not options:
        # Every offloading policy falls back to local when no server is usable.
        assert local_estimate is not None
        stale = any(server.stale and server.capable for server in servers)
        return Decision(policy, None, "stale" if stale else "no-server", ((LOCAL, local_estimate),),
                        _fits(local_estimate, time_left), local_estimate)

    if policy == "remote":
        chosen, reason, estimates, feasible = _pick(policy, options, time_left, rng=rng, previous=previous,
                                                    spread=True, config=config)
        return _decision(policy, chosen, reason, estimates, feasible)

    if policy == "threshold":
        if local_estimate is not None and local.rate <= config.threshold_rate:
            return Decision(policy, None, "under-threshold",
                            tuple(sorted(_labelled(options, local_estimate), key=_sort_key)),
                            _fits(local_estimate, time_left), local_estimate)
        chosen, _, estimates, _ = _pick(policy, options, None, rng=rng, previous=None, spread=False,
                                        config=config)
        reason = "over-threshold" if local_estimate is not None else "local-incapable"
        return _decision(policy, chosen, reason, estimates, _fits(chosen[1], time_left))

    estimates = tuple(sorted(options, key=_sort_key))
    if policy == "random":
        chosen = options[int(rng.random() * len(options))]
    else:
        # min_rtt: the lowest round trip among usable servers, blind to load; table order on ties.
        # ``options`` holds the usable servers in table order, so walk both in step.
        best_rtt = float("inf")
        chosen = options[0]
        position = 0
        for server in servers:
            if position == len(options):
                break
            if server.node != options[position][0] or server.stale or not server.capable:
                continue
            rtt = config.default_rtt if server.rtt is None else server.rtt
            if rtt < best_rtt:
                best_rtt, chosen = rtt, options[position]
            position += 1
    reason = "random" if policy == "random" else "min-rtt"
    return Decision(policy, chosen[0], reason, estimates, _fits(chosen[1], time_left), chosen[1])
