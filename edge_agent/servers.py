"""The device's view of the servers: a table fed by heartbeats, node state, round-trip probes and results.

* **Liveness.** A server is stale after ``stale_after`` missed heartbeats (each heartbeat carries its
  own ``interval``), or at once on a death message for its *current* session; a late Will naming an
  older session is ignored, and a higher session number replaces the old state. A birth, or a
  heartbeat newer than any seen before the death, of the same session revives it: the server
  reconnected (Mosquitto fires Wills when it restarts).
* **Round trip.** Pings carry the device's monotonic clock, echoed back in the pong: no clock sync.
  The estimate is an EWMA with a mean deviation, as TCP does (gains from :class:`Estimators`).
* **Bandwidth.** Estimated from offloaded tasks whose payload is large enough for transfer time to
  dominate noise (``min_bandwidth_bytes``): bytes moved / (result round trip - probe round trip - the
  server's reported queue wait and service time). Smaller tasks leave it unknown and the policy uses
  its default. It is a rough, honest figure, not a link measurement.
* **Failures.** Timeouts, busy rejections and deaths add 1 to a count that halves every
  ``half_life`` seconds (for views, and the policy's optional penalty). Below :data:`FORGET_BELOW` it
  is zero. What a failure says goes further: a busy answer (``rejected-busy``, ``expired``) adds 1 to
  ``busy`` (load: the policy counts a full queue ahead), a timeout adds the seconds waited to
  ``doubt`` (uncertainty: the policy's caution), and so does, until it is answered, how late the
  earliest unanswered attempt is past the time it was expected (:meth:`ServerTable.expect`). Both halve
  every ``half_life`` seconds and on each answer from the server: they fade on evidence and never ban
  a server.
* **Loss.** The share of attempts a server left unanswered (:meth:`ServerTable.loss`): an EWMA (gain
  ``loss_gain``) of 1 per attempt given up without an answer (a timeout, or a hedged attempt the
  other answer made unneeded, once its timeout passed) and 0 per answer; a late answer to an attempt
  counted as lost takes that sample back (:meth:`ServerTable.late_answer`): it was slow, not lost. It
  also halves every ``half_life`` seconds. It bans nothing: the device core hedges attempts to a
  server whose loss is above the policy's budget.
* **Answers.** Every answer to one of this device's attempts teaches it about that server
  (:meth:`ServerTable.answered`): the round trip (the measured wall time minus the queue wait and
  service time the server reports and the expected transfer), the service time, the queue wait, the
  error of the prediction and the answer's wall time (peak EWMA, for ``p2c``), each an EWMA with the
  gain ``answer_gain`` (the same up as down); the prediction error also halves every ``half_life``
  seconds without an answer. The answers' round trip is used while it is at least as recent as the
  last pong, the pings' otherwise; their service time and queue wait replace the report's while they
  are newer than it (the service time also while the report merely repeats a figure older than the
  answer). Pings fill the gaps when no work flows.
* **Evidence ages.** After a pause the previous estimate weighs less against the next sample
  (:func:`~agent_common.smoothing.aged_gain` with ``evidence_half_life``: round trip, service time and
  queue wait of answers, and the pongs' round trip), so one answer after a bad period moves it most of
  the way. A report that repeats a task's service time unchanged says the server ran none since: the
  row's ``evidence_at`` is then when that figure came (or this device's last answer, if newer), and
  ``ect`` widens the spread of an estimate nothing refreshes, so the server gets tried again.
* **Tasks sent since the report.** Each send is counted against the report it was decided on; a newer
  report includes it, so the count starts again; an answer takes it out of the count it was in.
* **The device's own link.** While it was down nothing could be heard: :meth:`ServerTable.link_restored`
  restarts every server's silence count at the reconnect, and a server is offered to the policy again
  only once heard from over the new link (a heartbeat, or a birth that is not a retained copy), which
  proves it is connected and subscribed, so a task sent to it is not lost.
* **Untrusted numbers.** Heartbeats come from anyone allowed on the topic: counts are clamped to
  :data:`MAX_REPORTED` before the policy does arithmetic with them.

What one device hears of one server is a :class:`ServerEntry`; what is the device's own (its sends
and the failures it saw) stays in the :class:`ServerTable`. The discrete-event simulator shares one
entry among the devices of a group, which hear the same heartbeats at the same times.

Nothing here reads a clock, locks or does I/O: times are the caller's monotonic ``now``, and the
caller serialises access (the device core is driven by one thread at a time).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import overload

from agent_common.smoothing import aged_gain
from edge_agent.policy import ServerInfo
from edge_agent.tuning import Estimators
from topics.models import Heartbeat, Load, NodeState, Role

MAX_OUTSTANDING_PINGS = 4
MAX_REPORTED = 1_000_000_000
"""Queue lengths and counts a heartbeat may report are clamped to this: far beyond any real
server, and small enough that the policy's float arithmetic never overflows."""
FORGET_BELOW = 0.01
"""A decayed failure count below this counts as none (and is forgotten)."""
STALE_MARGIN = 0.001
"""Seconds after a server's stale time at which a check finds it stale (staleness is strict)."""
MIN_BANDWIDTH_BYTES = Estimators().min_bandwidth_bytes
BIRTH_INTERVAL = 1.0
"""Heartbeat interval assumed for a server known only from a birth that does not give its own."""
_INF = math.inf


@dataclass(frozen=True, slots=True)
class ServerReport:
    """What one server heartbeat says, in plain values (the simulator builds these without a model)."""

    node: str
    session: int
    seq: int
    interval: float
    capabilities: frozenset[str]
    queue_length: int = 0
    queue_capacity: int = 0
    in_flight: int = 0
    workers: int = 1
    service_time: Mapping[str, float] = field(default_factory=dict)
    load: Load | None = None
    """The heartbeat's own load record, for fleet views (``None``: built from the numbers)."""
    pools: frozenset[str] = frozenset()
    """The pools whose shared inbox the server reads (``Heartbeat.pools``)."""

    @classmethod
    def of(cls, heartbeat: Heartbeat) -> ServerReport:
        """The report of a decoded heartbeat, its counts clamped to :data:`MAX_REPORTED`."""
        load = heartbeat.load
        return cls(heartbeat.node, heartbeat.session, heartbeat.seq, heartbeat.interval,
                   frozenset(heartbeat.capabilities), min(load.queue_length, MAX_REPORTED),
                   min(load.queue_capacity, MAX_REPORTED), min(load.in_flight, MAX_REPORTED), load.workers,
                   load.service_time, load, frozenset(heartbeat.pools))


@dataclass(frozen=True, slots=True)
class ServerView:
    """A read-only snapshot of one server, for fleet views and the vision split controller."""

    node: str
    session: int
    stale: bool
    dead: bool
    rtt: float | None
    rtt_dev: float
    bandwidth: float | None
    tasks: tuple[str, ...]
    load: Load
    heartbeat_age: float | None
    sent_since_report: int
    recent_failures: float
    in_flight: int
    pools: tuple[str, ...] = ()


class ServerEntry:
    """What a device has heard of one server: session, liveness, last report, round trip, bandwidth.

    :meth:`info` keeps the :class:`ServerInfo` it last built for a task name until something changes
    or the server turns stale, so a decision over unchanged servers allocates nothing.
    """

    __slots__ = ("_info", "_task", "_until", "awaiting", "bandwidth", "counters", "dead", "estimators",
                 "figured", "floor", "generation", "interval", "last_heartbeat", "node", "pings", "repeated",
                 "report", "restored_at", "rtt", "rtt_at", "rtt_dev", "seq", "session", "stale_after")

    def __init__(self, node: str, *, stale_after: int = 3, estimators: Estimators | None = None,
                 counters: dict[str, int] | None = None) -> None:
        self.node = node
        self.stale_after = stale_after
        self.estimators = estimators or Estimators()
        self.counters = counters if counters is not None else _new_counters()
        self.session = -1
        self.interval = 1.0
        self.last_heartbeat: float | None = None
        self.seq = -1
        self.dead = False
        self.report: ServerReport | None = None
        self.figured: dict[str, float] = {}
        """Task name -> when a report's service time for it last changed (the server ran it since)."""
        self.floor: dict[str, float] = {}
        """Task name -> the lowest service time its reports have shown (what it can do when well)."""
        self.repeated: frozenset[str] = frozenset()
        """Tasks whose service time the last report repeated unchanged: the server ran none since."""
        self.generation = 0
        """+1 per accepted report: what sends since the report are counted against."""
        self.rtt: float | None = None
        self.rtt_dev = 0.0
        self.rtt_at = -_INF
        """When the last pong came."""
        self.bandwidth: float | None = None
        self.pings: dict[int, float] = {}
        self.awaiting = False
        """Not heard from since the device's own link came back: not offered to the policy."""
        self.restored_at = -_INF
        self._task: str | None = None
        self._info: ServerInfo | None = None
        self._until = -_INF

    # --- feeding ----------------------------------------------------------------------------

    def on_report(self, report: ServerReport, now: float) -> bool:
        """Take a heartbeat in; False if ignored (an old session, a duplicate or older sequence)."""
        if report.session < self.session or (report.session == self.session and report.seq <= self.seq):
            self.counters["late_heartbeats"] += 1
            return False
        if report.session == self.session and self.dead:
            # A newer heartbeat of the session its Will killed: the server reconnected (a broker
            # restart fires Wills too). Anything sent before the death arrived before the Will.
            self.dead = False
            self.counters["revived"] += 1
        if report.session > self.session:
            if self.session >= 0:
                self.counters["sessions_replaced"] += 1
            self.session = report.session
            self.dead = False
            self.pings.clear()
        self.seq = report.seq
        self.interval = report.interval
        self.last_heartbeat = now
        before = self.report.service_time if self.report is not None else {}
        if report.service_time != before:
            figured, floor = self.figured, self.floor
            for task, value in report.service_time.items():
                if before.get(task) != value:
                    figured[task] = now
                    if value < floor.get(task, _INF):
                        floor[task] = value
        self.repeated = frozenset(task for task, value in report.service_time.items()
                                  if before.get(task) == value)
        self.report = report
        self.generation += 1
        self.awaiting = False
        self._task = None
        return True

    def on_state(self, session: int, online: bool, *, live: bool = False, tasks: frozenset[str] = frozenset(),
                 now: float | None = None, interval: float | None = None,
                 pools: frozenset[str] = frozenset()) -> bool:
        """Take a birth (``online``) or death in; True when it killed the current session.

        ``live``: published now, not a retained copy: a birth then proves the server is connected
        (it publishes its birth after subscribing). A birth naming its ``tasks`` (at ``now``) stands
        for a first heartbeat with an empty queue until the real one comes, judged stale after the
        same silence as one (its heartbeat ``interval``, :data:`BIRTH_INTERVAL` when it does not
        say): a device can offload at once."""
        self._task = None
        if session < self.session:
            if not online:
                self.counters["old_session_deaths"] += 1
            return False
        if online:
            if session > self.session:
                self.session = session
                self.report = None
                self.last_heartbeat = None
                self.seq = -1
            elif self.dead:
                self.counters["revived"] += 1  # the same session reconnected
            self.dead = False
            if live:
                self.awaiting = False
            if tasks and self.report is None and now is not None:
                beat = interval or BIRTH_INTERVAL
                self.report = ServerReport(self.node, session, -1, beat, tasks, pools=pools)
                self.interval = beat
                self.last_heartbeat = now
                self.generation += 1
            return False
        was_alive = not self.dead
        self.session = session
        self.dead = True
        self.pings.clear()
        return was_alive

    def link_restored(self, now: float) -> None:
        """The device reconnected: silence counts from ``now``; heard from again before it is offered."""
        self.restored_at = now
        self.awaiting = True
        self._task = None

    def ping_sent(self, nonce: int, sent: float) -> None:
        pings = self.pings
        pings[nonce] = sent
        while len(pings) > MAX_OUTSTANDING_PINGS:  # lost pings: forget the oldest
            del pings[next(iter(pings))]

    def on_pong(self, nonce: int, sent: float, now: float) -> float | None:
        """Update the round trip from a pong; returns the sample, or None for an unknown nonce."""
        if self.pings.pop(nonce, None) != sent or now < sent:
            self.counters["unknown_pongs"] += 1
            return None
        sample = now - sent
        if self.rtt is None:
            self.rtt, self.rtt_dev = sample, sample / 2
        else:
            gains = self.estimators
            self.rtt_dev += gains.rtt_dev_gain * (abs(sample - self.rtt) - self.rtt_dev)
            # The pings' previous estimate ages as answers' do (pings are seconds apart).
            gain = aged_gain(gains.rtt_gain, now - self.rtt_at, gains.evidence_half_life)
            self.rtt += gain * (sample - self.rtt)
        self.rtt_at = now
        self._task = None
        return sample

    def transfer_observed(self, nbytes: int, round_trip: float, server_time: float) -> None:
        """Fold one offloaded task's timing into the bandwidth estimate (see the module docstring)."""
        gains = self.estimators
        if nbytes < gains.min_bandwidth_bytes:
            return
        transfer = round_trip - (self.rtt or 0.0) - server_time
        if transfer <= 0.0:
            return
        sample = nbytes / transfer
        self.bandwidth = sample if self.bandwidth is None else (
            self.bandwidth + gains.bandwidth_gain * (sample - self.bandwidth))
        self._task = None

    # --- reading ----------------------------------------------------------------------------

    def stale_at(self) -> float:
        """When it turns stale if nothing more is heard (infinity: never heard, or dead)."""
        if self.dead or self.last_heartbeat is None:
            return _INF
        heard = self.last_heartbeat if self.last_heartbeat > self.restored_at else self.restored_at
        return heard + self.interval * self.stale_after

    def silent(self, now: float) -> bool:
        """Dead or silent too long; time the device's own link was down does not count."""
        if self.dead or self.last_heartbeat is None:
            return True
        return now > self.stale_at()

    def stale(self, now: float) -> bool:
        """Not to be offered to the policy: dead, silent, or not heard since the link came back."""
        return self.awaiting or self.silent(now)

    def info(self, task: str, now: float) -> ServerInfo:
        """This server as the policy sees it for ``task`` (nothing sent since, no failures)."""
        if self._task == task and now <= self._until:
            return self._info  # type: ignore[return-value]  # set together with _task
        report = self.report
        stale = self.stale(now)
        if report is None:
            info = ServerInfo(self.node, False, stale, self.rtt, self.rtt_dev, self.bandwidth, 0, 0, 1, None)
        else:
            info = ServerInfo(self.node, task in report.capabilities, stale, self.rtt, self.rtt_dev,
                              self.bandwidth, report.queue_length, report.in_flight, report.workers,
                              report.service_time.get(task), queue_capacity=report.queue_capacity,
                              evidence_at=self.figured.get(task) if task in self.repeated else None,
                              service_floor=self.floor.get(task))
        self._task, self._info = task, info
        self._until = _INF if stale else self.stale_at()
        return info

    def capable(self, task: str) -> bool:
        return self.report is not None and task in self.report.capabilities

    def view(self, now: float, *, sent_since_report: int, recent_failures: float, in_flight: int
             ) -> ServerView:
        report = self.report
        tasks: tuple[str, ...] = ()
        pools: tuple[str, ...] = ()
        if report is None:
            load = Load()
        else:
            tasks = tuple(sorted(report.capabilities))
            pools = tuple(sorted(report.pools))
            load = report.load or Load(queue_length=report.queue_length, queue_capacity=report.queue_capacity,
                                       in_flight=report.in_flight, workers=report.workers,
                                       service_time=dict(report.service_time))
        return ServerView(
            node=self.node, session=self.session, stale=self.stale(now), dead=self.dead, rtt=self.rtt,
            rtt_dev=self.rtt_dev, bandwidth=self.bandwidth, tasks=tasks, load=load,
            heartbeat_age=None if self.last_heartbeat is None else now - self.last_heartbeat,
            sent_since_report=sent_since_report, recent_failures=recent_failures, in_flight=in_flight,
            pools=pools)


class _Rows(Sequence[ServerInfo]):
    """:meth:`ServerTable.snapshot`: the table's rows, each built when first read (in table order) and
    kept for the snapshot's life: a decision reads a drawn row several times (usable? its node? its
    estimate?) and builds it once. A snapshot is the table at one instant: take a new one after the
    table changed."""

    __slots__ = ("_built", "_now", "_table", "_task")

    def __init__(self, table: ServerTable, task: str, now: float) -> None:
        self._table, self._task, self._now = table, task, now
        self._built: dict[int, ServerInfo] = {}

    def __len__(self) -> int:
        return len(self._table._list)

    @overload
    def __getitem__(self, index: int) -> ServerInfo: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[ServerInfo]: ...

    def __getitem__(self, index: int | slice) -> ServerInfo | Sequence[ServerInfo]:
        if isinstance(index, slice):
            return [self._row(i) for i in range(*index.indices(len(self)))]
        row = self._built.get(index)
        if row is None:
            row = self._row(index)
        return row

    def _row(self, index: int) -> ServerInfo:
        if index < 0:
            index += len(self._table._list)
        row = self._built.get(index)
        if row is None:
            row = self._built[index] = self._table.row(index, self._task, self._now)
        return row

    def __iter__(self) -> Iterator[ServerInfo]:
        for index in range(len(self._table._list)):
            yield self._row(index)

    def __repr__(self) -> str:
        return f"snapshot({list(self)!r})"


def _new_counters() -> dict[str, int]:
    return {"late_heartbeats": 0, "old_session_deaths": 0, "unknown_pongs": 0, "sessions_replaced": 0,
            "revived": 0}


class _Learned:
    """What one device learned of one server from its own attempts there (see the module docstring)."""

    __slots__ = ("at", "busy", "doubt", "due", "error_dev", "latency", "loss", "outstanding", "rtt",
                 "rtt_dev", "service", "trouble_at", "wait")

    def __init__(self) -> None:
        self.at = -_INF
        """When the last answer came (-inf: none yet)."""
        self.rtt: float | None = None
        self.rtt_dev = 0.0
        self.service: float | None = None
        self.wait = 0.0
        self.error_dev = 0.0
        self.latency: float | None = None
        self.outstanding = 0
        self.due: list[float] = []
        """When the unanswered attempts were expected to be answered (a heap; the earliest first)."""
        self.busy = 0.0
        self.doubt = 0.0
        self.loss = 0.0
        """EWMA share of attempts left unanswered (see :meth:`ServerTable.loss`)."""
        self.trouble_at = 0.0
        """The time ``busy`` and ``doubt`` were last decayed to."""

    def decay(self, now: float, half_life: float) -> None:
        elapsed = now - self.trouble_at
        if elapsed > 0.0:
            if self.busy or self.doubt or self.loss:
                factor = 0.5 ** (elapsed / half_life)
                self.busy = self.busy * factor if self.busy * factor >= FORGET_BELOW else 0.0
                self.doubt = self.doubt * factor if self.doubt * factor >= FORGET_BELOW * 0.01 else 0.0
                self.loss = self.loss * factor if self.loss * factor >= FORGET_BELOW * 0.1 else 0.0
            self.trouble_at = now


class ServerTable:
    """The servers one device knows, with what it sent each since its last report, its failures and what
    its answers taught it."""

    __slots__ = ("_entries", "_estimators", "_failures", "_half_life", "_ignore", "_index", "_learned",
                 "_list", "_sent", "_stale_after", "counters")

    def __init__(self, *, stale_after: int = 3, half_life: float = 10.0, ignore: frozenset[str] = frozenset(),
                 estimators: Estimators | None = None, lookup: dict[str, ServerEntry] | None = None) -> None:
        """``lookup``: the node -> entry mapping to find this table's entries in, shared by tables over
        shared entries (the simulator's devices of a group); it may hold entries this table does not know."""
        self._stale_after = stale_after
        self._half_life = half_life
        self._ignore = ignore
        self._estimators = estimators or Estimators()
        self._entries: dict[str, ServerEntry] = {} if lookup is None else lookup
        self._list: list[ServerEntry] = []
        self._sent: dict[str, list[int]] = {}
        """Node -> [generation of the report the sends are counted against, how many]."""
        self._failures: dict[str, list[float]] = {}
        """Node -> [decayed failure count, time of that value]."""
        self._learned: dict[str, _Learned] = {}
        self._index: dict[str, int] = {}
        """Node -> its place in :meth:`snapshot`."""
        self.counters: dict[str, int] = _new_counters()

    @property
    def half_life(self) -> float:
        return self._half_life

    # --- feeding ----------------------------------------------------------------------------

    def entry(self, node: str) -> ServerEntry | None:
        found = self._entries.get(node)
        return found if found is not None and found in self._list else None

    def adopt(self, entry: ServerEntry) -> None:
        """Use ``entry`` (fed by someone else: the simulator's group view) for its server."""
        old = self._entries.get(entry.node)
        if old is not None and old in self._list:
            self._list.remove(old)
            self._index = {known.node: i for i, known in enumerate(self._list)}
        self._entries[entry.node] = entry
        self._index[entry.node] = len(self._list)
        self._list.append(entry)

    def index_of(self, node: str) -> int | None:
        """Where ``node`` is in :meth:`snapshot` (``None``: not known)."""
        return self._index.get(node)

    def _entry(self, node: str) -> ServerEntry:
        entry = self._entries.get(node)
        if entry is None:
            entry = ServerEntry(node, stale_after=self._stale_after, estimators=self._estimators,
                                counters=self.counters)
            self.adopt(entry)
        return entry

    def on_heartbeat(self, heartbeat: ServerReport | Heartbeat, now: float) -> bool:
        """Take a server heartbeat in; False if ignored (a device, an old session, a dead session)."""
        if isinstance(heartbeat, Heartbeat):
            if heartbeat.role != Role.SERVER.value:
                return False
            heartbeat = ServerReport.of(heartbeat)
        if heartbeat.node in self._ignore:
            return False
        return self._entry(heartbeat.node).on_report(heartbeat, now)

    def on_state(self, state: NodeState, now: float, *, live: bool = False) -> bool:
        """Take a birth/death record in; True when it killed the server's current session."""
        if state.role != Role.SERVER.value:
            return False
        return self.on_state_of(state.node, state.session, state.status == "online", live=live,
                                tasks=frozenset(state.tasks), now=now, interval=state.interval,
                                pools=frozenset(state.pools))

    def on_state_of(self, node: str, session: int, online: bool, *, live: bool = False,
                    tasks: frozenset[str] = frozenset(), now: float | None = None,
                    interval: float | None = None, pools: frozenset[str] = frozenset()) -> bool:
        """:meth:`on_state` in plain values."""
        if node in self._ignore:
            return False
        return self._entry(node).on_state(session, online, live=live, tasks=tasks, now=now, interval=interval,
                                          pools=pools)

    def link_restored(self, now: float) -> None:
        """The device reconnected: silence counts from ``now``, and every server must be heard
        from again before it is offered to the policy."""
        for entry in self._list:
            entry.link_restored(now)

    def ping_sent(self, node: str, nonce: int, sent: float) -> None:
        entry = self._entries.get(node)
        if entry is not None:
            entry.ping_sent(nonce, sent)

    def on_pong(self, node: str, nonce: int, sent: float, now: float) -> float | None:
        """Update the round trip from a pong; returns the sample, or None for an unknown nonce."""
        entry = self._entries.get(node)
        if entry is None:
            self.counters["unknown_pongs"] += 1
            return None
        return entry.on_pong(nonce, sent, now)

    def bandwidth(self, node: str) -> float | None:
        """The bandwidth estimate (bytes/s) towards ``node``, if any."""
        entry = self._entries.get(node)
        return None if entry is None else entry.bandwidth

    def transfer_observed(self, node: str, nbytes: int, round_trip: float, server_time: float) -> None:
        entry = self._entries.get(node)
        if entry is not None:
            entry.transfer_observed(nbytes, round_trip, server_time)

    # --- this device's own bookkeeping ------------------------------------------------------

    def sending(self, node: str, now: float) -> tuple[int, float, float]:
        """Count a task sent to ``node`` (:meth:`task_sent`); also returns its stale time and its recent
        failures (what the attempt's timer needs), in one look-up."""
        entry = self._entries.get(node)
        if entry is None:
            return -1, _INF, 0.0
        generation = entry.generation
        mine = self._sent.get(node)
        if mine is None or mine[0] != generation:
            self._sent[node] = [generation, 1]
        else:
            mine[1] += 1
        learned = self._learn(node)
        learned.outstanding += 1
        failures = self.recent_failures(node, now) if self._failures else 0.0
        heard = entry.last_heartbeat
        if entry.dead or heard is None:
            return generation, _INF, failures
        if heard < entry.restored_at:
            heard = entry.restored_at
        return generation, heard + entry.interval * entry.stale_after, failures

    def task_sent(self, node: str) -> int:
        """Count a task sent to ``node``; returns the report generation it is counted against."""
        return self.sending(node, 0.0)[0]

    def task_done(self, node: str, *, answered: bool = False, generation: int | None = None) -> None:
        """An attempt sent to ``node`` ended. ``answered``: the server itself answered it, so it no
        longer waits there and leaves the count it was in (``generation``, from :meth:`task_sent`;
        default the current one). An unanswered one may still wait there: it stays counted."""
        if not answered:
            return
        mine = self._sent.get(node)
        if mine is None:
            return
        if generation is None:
            entry = self._entries.get(node)
            generation = -1 if entry is None else entry.generation
        if mine[0] == generation and mine[1] > 0:
            mine[1] -= 1
            if not mine[1]:
                del self._sent[node]

    def _learn(self, node: str) -> _Learned:
        learned = self._learned.get(node)
        if learned is None:
            learned = self._learned[node] = _Learned()
        return learned

    def settled(self, node: str) -> None:
        """An attempt this device sent ``node`` ended (answered, given up or moved elsewhere)."""
        learned = self._learned.get(node)
        if learned is not None and learned.outstanding > 0:
            learned.outstanding -= 1
            if learned.due:
                heapq.heappop(learned.due)

    def expect(self, node: str, by: float) -> None:
        """The attempt just sent to ``node`` (:meth:`sending`) should be answered by ``by``: past it, how
        late the earliest unanswered attempt is counts as doubt (evidence before any timeout fires)."""
        learned = self._learned.get(node)
        if learned is not None and len(learned.due) < learned.outstanding:
            heapq.heappush(learned.due, by)

    def answered(self, node: str, now: float, *, wall: float, queue_wait: float, service_time: float,
                 transfer: float = 0.0, predicted: float | None = None) -> None:
        """An answer (``ok`` or ``error``) to an attempt sent ``wall`` seconds ago came from ``node``: learn
        from it (see the module docstring). ``transfer``: the seconds the device expected the payload to
        take on its uplink, backlog included; ``predicted``: the completion time the decision expected."""
        if node not in self._entries:
            return
        learned = self._learn(node)
        learned.decay(now, self._half_life)
        estimators = self._estimators
        gain = base = estimators.answer_gain
        if learned.at > -_INF:  # an old estimate is weaker evidence than a new sample
            gain = aged_gain(base, now - learned.at, estimators.evidence_half_life)
        queue_wait = queue_wait if queue_wait > 0.0 else 0.0
        service_time = service_time if service_time > 0.0 else 0.0
        sample = wall - queue_wait - service_time - transfer
        if sample < 0.0:
            sample = 0.0
        if learned.rtt is None:
            learned.rtt, learned.rtt_dev = sample, sample / 2
        else:
            learned.rtt_dev += gain * (abs(sample - learned.rtt) - learned.rtt_dev)
            learned.rtt += gain * (sample - learned.rtt)
        learned.service = service_time if learned.service is None else (
            learned.service + gain * (service_time - learned.service))
        first = learned.at == -_INF
        learned.wait = queue_wait if first else learned.wait + gain * (queue_wait - learned.wait)
        if predicted is not None:
            if learned.error_dev and now > learned.at > -_INF:  # an old error counts less
                learned.error_dev *= 0.5 ** ((now - learned.at) / self._half_life)
            learned.error_dev += base * (abs(wall - predicted) - learned.error_dev)
        latency = learned.latency
        learned.latency = wall if latency is None or wall > latency else latency + base * (wall - latency)
        learned.at = now
        learned.busy *= 0.5
        learned.doubt *= 0.5
        if learned.loss:
            learned.loss *= 1.0 - estimators.loss_gain

    def busy(self, node: str, now: float) -> None:
        """``node`` answered busy (``rejected-busy`` or ``expired``): load (see the module docstring)."""
        if node not in self._entries:
            return
        learned = self._learn(node)
        learned.decay(now, self._half_life)
        learned.busy += 1.0
        if learned.loss:
            learned.loss *= 1.0 - self._estimators.loss_gain  # an answer: the link works

    def timed_out(self, node: str, now: float, waited: float) -> None:
        """An attempt to ``node`` got no answer in ``waited`` seconds: uncertainty (module docstring)."""
        if node not in self._entries:
            return
        learned = self._learn(node)
        learned.decay(now, self._half_life)
        learned.doubt += waited if waited > 0.0 else 0.0
        learned.loss += self._estimators.loss_gain * (1.0 - learned.loss)

    def unanswered(self, node: str, now: float) -> None:
        """An attempt to ``node`` that no longer mattered (its task ended by another answer) got no
        answer by its timeout: a loss sample, but no doubt (nobody waited for it)."""
        if node not in self._entries:
            return
        learned = self._learn(node)
        learned.decay(now, self._half_life)
        learned.loss += self._estimators.loss_gain * (1.0 - learned.loss)

    def late_answer(self, node: str) -> None:
        """An attempt to ``node`` counted as lost was answered after all: take its loss sample back."""
        learned = self._learned.get(node)
        if learned is not None and learned.loss:
            gain = self._estimators.loss_gain
            loss = (learned.loss - gain) / (1.0 - gain) if gain < 1.0 else 0.0
            learned.loss = loss if loss > 0.0 else 0.0

    def loss(self, node: str, now: float) -> float:
        """The share of this device's attempts to ``node`` left unanswered, as estimated (0: none seen)."""
        learned = self._learned.get(node)
        if learned is None or not learned.loss:
            return 0.0
        learned.decay(now, self._half_life)
        return learned.loss

    def failure(self, node: str, now: float) -> None:
        if node not in self._entries:
            return
        record = self._failures.get(node)
        if record is None:
            self._failures[node] = [1.0, now]
        else:
            record[0] = self._decay(record, now) + 1.0
            record[1] = now

    def recent_failures(self, node: str, now: float) -> float:
        """The decayed failure count of ``node`` (0 for an unknown node)."""
        record = self._failures.get(node)
        if record is None:
            return 0.0
        value = self._decay(record, now)
        return value if value >= FORGET_BELOW else 0.0

    def _decay(self, record: list[float], now: float) -> float:
        elapsed = now - record[1]
        return record[0] * 0.5 ** (elapsed / self._half_life) if elapsed > 0.0 else record[0]

    def sent_since_report(self, node: str) -> int:
        mine = self._sent.get(node)
        entry = self._entries.get(node)
        return 0 if mine is None or entry is None or mine[0] != entry.generation else mine[1]

    # --- reading ----------------------------------------------------------------------------

    def stale(self, node: str, now: float) -> bool:
        """Not to be offered to the policy: dead, silent, or not heard since the link came back."""
        entry = self._entries.get(node)
        return entry is None or entry.stale(now)

    def silent(self, node: str, now: float) -> bool:
        """Dead or silent too long: tasks in flight to it are given up."""
        entry = self._entries.get(node)
        return entry is None or entry.silent(now)

    def dead(self, node: str) -> bool:
        entry = self._entries.get(node)
        return entry is not None and entry.dead

    def awaiting(self, node: str) -> bool:
        """Not heard from since the device's own link came back."""
        entry = self._entries.get(node)
        return entry is not None and entry.awaiting

    def stale_at(self, node: str) -> float:
        entry = self._entries.get(node)
        return _INF if entry is None else entry.stale_at()

    def probe_targets(self, now: float) -> list[str]:
        """Servers worth probing now: alive, heard from recently."""
        return [entry.node for entry in self._list if not entry.stale(now)]

    def snapshot(self, task: str, now: float) -> Sequence[ServerInfo]:
        """One :class:`ServerInfo` per known server, as the policy sees it for ``task`` at ``now``, built
        when read: a policy that draws a few rows (``ect``, ``p2c``) costs O(rows read), not O(servers)."""
        return _Rows(self, task, now)

    def row(self, index: int, task: str, now: float) -> ServerInfo:
        """Row ``index`` of :meth:`snapshot`."""
        entry = self._list[index]
        info = entry._info if entry._task == task and now <= entry._until else entry.info(task, now)
        if not self._sent and not self._failures and not self._learned:
            return info  # type: ignore[return-value]  # nothing of this device's own to add
        return self._mine(info, now, entry)  # type: ignore[arg-type]

    def _mine(self, row: ServerInfo, now: float, entry: ServerEntry | None = None) -> ServerInfo:
        node = row.node
        since = 0
        mine = self._sent.get(node)
        if mine is not None:
            if mine[0] == self._entries[node].generation:
                since = mine[1]
            else:
                del self._sent[node]  # counted against an older report, which the new one includes
        failed = 0.0
        record = self._failures.get(node)
        if record is not None:
            failed = self._decay(record, now)
            if failed < FORGET_BELOW:
                del self._failures[node]
                failed = 0.0
        learned = self._learned.get(node)
        if learned is None:
            if not since and not failed:
                return row
            return ServerInfo(node, row.capable, row.stale, row.rtt, row.rtt_dev, row.bandwidth,
                              row.queue_length, row.in_flight, row.workers, row.service_time, since, failed,
                              row.queue_capacity, evidence_at=row.evidence_at,
                              service_floor=row.service_floor)
        if learned.busy or learned.doubt or learned.loss:
            learned.decay(now, self._half_life)
        if entry is None:
            entry = self._entries[node]
        rtt, rtt_dev = row.rtt, row.rtt_dev
        if learned.rtt is not None and (rtt is None or learned.at >= entry.rtt_at):
            rtt, rtt_dev = learned.rtt, learned.rtt_dev
        service, wait, measured_at = row.service_time, None, row.evidence_at
        heard = entry.last_heartbeat
        if learned.at > -_INF:
            if heard is None or learned.at > heard:
                service, wait = learned.service, learned.wait
            elif measured_at is not None and learned.at > measured_at:
                # A heartbeat repeating a service time the server measured before this answer is no
                # newer evidence of it: the answer's stands (the queue is the report's).
                service = learned.service
            if measured_at is not None and learned.at > measured_at:
                measured_at = learned.at
        error_dev = learned.error_dev
        if error_dev and now > learned.at:  # the error fades while no answer says otherwise
            error_dev *= 0.5 ** ((now - learned.at) / self._half_life)
        doubt = learned.doubt
        if learned.due and now > learned.due[0]:
            doubt += now - learned.due[0]
        return ServerInfo(node, row.capable, row.stale, rtt, rtt_dev, row.bandwidth, row.queue_length,
                          row.in_flight, row.workers, service, since, failed, row.queue_capacity,
                          learned.outstanding, wait, error_dev, learned.busy, doubt, learned.latency,
                          measured_at, row.service_floor, learned.loss)

    def announces(self, task: str) -> bool:
        """True when some server (alive or not) announced ``task`` in a heartbeat."""
        return any(entry.capable(task) for entry in self._list)

    def pool_members(self, pool: str) -> list[str]:
        """The servers not known dead whose last heartbeat said they serve ``pool``, in table order."""
        return [entry.node for entry in self._list
                if not entry.dead and entry.report is not None and pool in entry.report.pools]

    def views(self, now: float, in_flight: Mapping[str, int] | None = None) -> list[ServerView]:
        """Every known server as a :class:`ServerView`; ``in_flight``: this device's attempts per node."""
        counts = in_flight or {}
        return [entry.view(now, sent_since_report=self.sent_since_report(entry.node),
                           recent_failures=self.recent_failures(entry.node, now),
                           in_flight=counts.get(entry.node, 0)) for entry in self._list]

    def next_stale_time(self) -> float | None:
        """The earliest monotonic time a live server turns stale if no heartbeat comes."""
        times = [entry.stale_at() for entry in self._list]
        finite = [value for value in times if value < _INF]
        return min(finite) if finite else None


__all__ = ["FORGET_BELOW", "MAX_REPORTED", "MIN_BANDWIDTH_BYTES", "ServerEntry", "ServerReport",
           "ServerTable", "ServerView"]
