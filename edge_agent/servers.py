"""The device's view of the servers: a table fed by heartbeats, node state and round-trip probes.

* **Liveness.** A server is stale after ``stale_after`` missed heartbeats (each heartbeat carries its
  own ``interval``), or at once on a death message for its *current* session; a late Will naming an
  older session is ignored, and a higher session number replaces the old state. A birth, or a
  heartbeat newer than any seen before the death, of the same session revives it: the server
  reconnected (Mosquitto fires Wills when it restarts).
* **Round trip.** Pings carry the device's monotonic clock, echoed back in the pong: no clock sync.
  The estimate is an EWMA with a mean deviation, as TCP does (gains 1/8 and 1/4).
* **Bandwidth.** Estimated from offloaded tasks whose payload is large enough for transfer time to
  dominate noise (>= :data:`MIN_BANDWIDTH_BYTES`): bytes moved / (result round trip - probe round trip
  - the server's reported queue wait and service time). Smaller tasks leave it unknown and the
  policy uses its default. It is a rough, honest figure, not a link measurement.
* **Failures.** Timeouts, busy rejections and deaths add 1 to a count that halves every
  ``half_life`` seconds; the policy adds a penalty per unit.
* **The device's own link.** While it was down nothing could be heard: :meth:`ServerTable.link_restored`
  restarts every server's silence count at the reconnect, and a server is offered to the policy again
  only once heard from over the new link (a heartbeat, or a birth that is not a retained copy), which
  proves it is connected and subscribed, so a task sent to it is not lost.
* **Untrusted numbers.** Heartbeats come from anyone allowed on the topic: counts are clamped to
  :data:`MAX_REPORTED` before the policy does arithmetic with them.

All methods are thread-safe; times are the caller's monotonic clock.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

from edge_agent.policy import ServerInfo
from topics.models import Heartbeat, Load, NodeState, Role

RTT_GAIN = 0.125
RTT_DEV_GAIN = 0.25
BANDWIDTH_GAIN = 0.25
MIN_BANDWIDTH_BYTES = 16 * 1024
MAX_OUTSTANDING_PINGS = 4
MAX_REPORTED = 1_000_000_000
"""Queue lengths and counts a heartbeat may report are clamped to this: far beyond any real
server, and small enough that the policy's float arithmetic never overflows."""


def _clamped(heartbeat: Heartbeat) -> Heartbeat:
    """``heartbeat`` with its load counts clamped to :data:`MAX_REPORTED` (the same object if none
    exceeds it: the usual case costs three comparisons)."""
    load = heartbeat.load
    if max(load.queue_length, load.queue_capacity, load.in_flight) <= MAX_REPORTED:
        return heartbeat
    bounded = load.model_copy(update={name: min(getattr(load, name), MAX_REPORTED)
                                      for name in ("queue_length", "queue_capacity", "in_flight")})
    return heartbeat.model_copy(update={"load": bounded})


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


@dataclass
class _Server:
    node: str
    session: int = -1
    interval: float = 1.0
    last_heartbeat: float | None = None
    seq: int = -1
    dead: bool = False
    heartbeat: Heartbeat | None = None
    rtt: float | None = None
    rtt_dev: float = 0.0
    bandwidth: float | None = None
    sent_since_report: int = 0
    failures: float = 0.0
    failures_at: float = 0.0
    in_flight: int = 0
    pings: dict[int, float] = field(default_factory=dict)
    awaiting: bool = False
    """Not heard from since the device's own link came back: not offered to the policy."""


class ServerTable:
    """Servers known from heartbeats and node state, with probes, failures and per-device counts."""

    def __init__(self, *, stale_after: int = 3, half_life: float = 10.0, ignore: frozenset[str] = frozenset()
                 ) -> None:
        self._stale_after = stale_after
        self._half_life = half_life
        self._ignore = ignore
        self._servers: dict[str, _Server] = {}
        self._restored_at = -math.inf
        self._lock = threading.Lock()
        self.counters: dict[str, int] = {"late_heartbeats": 0, "old_session_deaths": 0, "unknown_pongs": 0,
                                         "sessions_replaced": 0, "revived": 0}

    # --- feeding ----------------------------------------------------------------------------

    def on_heartbeat(self, heartbeat: Heartbeat, now: float) -> bool:
        """Take a server heartbeat in; False if ignored (a device, an old session, a dead session)."""
        if heartbeat.role != Role.SERVER.value or heartbeat.node in self._ignore:
            return False
        with self._lock:
            server = self._servers.setdefault(heartbeat.node, _Server(heartbeat.node))
            if heartbeat.session < server.session or (
                    heartbeat.session == server.session and heartbeat.seq <= server.seq):
                self.counters["late_heartbeats"] += 1
                return False
            if heartbeat.session == server.session and server.dead:
                # A newer heartbeat of the session its Will killed: the server reconnected (a broker
                # restart fires Wills too). Anything sent before the death arrived before the Will.
                server.dead = False
                self.counters["revived"] += 1
            if heartbeat.session > server.session:
                if server.session >= 0:
                    self.counters["sessions_replaced"] += 1
                server.session = heartbeat.session
                server.dead = False
                server.pings.clear()
            server.seq = heartbeat.seq
            server.interval = heartbeat.interval
            server.last_heartbeat = now
            server.heartbeat = _clamped(heartbeat)
            server.sent_since_report = 0
            server.awaiting = False
            return True

    def on_state(self, state: NodeState, now: float, *, live: bool = False) -> bool:
        """Take a birth/death record in; True when it killed the server's current session.

        ``live``: the record was published now, not a retained copy: a birth then proves the server
        is connected (it publishes its birth after subscribing)."""
        if state.role != Role.SERVER.value or state.node in self._ignore:
            return False
        with self._lock:
            server = self._servers.setdefault(state.node, _Server(state.node))
            if state.session < server.session:
                if state.status == "offline":
                    self.counters["old_session_deaths"] += 1
                return False
            if state.status == "online":
                if state.session > server.session:
                    server.session = state.session
                    server.heartbeat = None
                    server.last_heartbeat = None
                    server.seq = -1
                elif server.dead:
                    self.counters["revived"] += 1  # the same session reconnected
                server.dead = False
                if live:
                    server.awaiting = False
                return False
            # offline for the current (or a newer) session
            was_alive = not server.dead
            server.session = state.session
            server.dead = True
            server.pings.clear()
            return was_alive

    def stale(self, node: str, now: float) -> bool:
        """Not to be offered to the policy: dead, silent, or not heard since the link came back."""
        with self._lock:
            server = self._servers.get(node)
            return server is None or self._is_stale(server, now)

    def silent(self, node: str, now: float) -> bool:
        """Dead or silent too long: tasks in flight to it are given up. Time the device's own link
        was down does not count (nothing could be heard)."""
        with self._lock:
            server = self._servers.get(node)
            return server is None or self._is_silent(server, now)

    def awaiting(self, node: str) -> bool:
        """Not heard from since the device's own link came back."""
        with self._lock:
            server = self._servers.get(node)
            return server is not None and server.awaiting

    def link_restored(self, now: float) -> None:
        """The device reconnected: silence counts from ``now``, and every server must be heard
        from again before it is offered to the policy."""
        with self._lock:
            self._restored_at = now
            for server in self._servers.values():
                server.awaiting = True

    def _is_stale(self, server: _Server, now: float) -> bool:
        return server.awaiting or self._is_silent(server, now)

    def _is_silent(self, server: _Server, now: float) -> bool:
        if server.dead or server.last_heartbeat is None:
            return True
        return now - max(server.last_heartbeat, self._restored_at) > server.interval * self._stale_after

    # --- probes -----------------------------------------------------------------------------

    def probe_targets(self, now: float) -> list[str]:
        """Servers worth probing now: alive, heard from recently."""
        with self._lock:
            return [s.node for s in self._servers.values() if not self._is_stale(s, now)]

    def ping_sent(self, node: str, nonce: int, sent: float) -> None:
        with self._lock:
            server = self._servers.get(node)
            if server is None:
                return
            server.pings[nonce] = sent
            while len(server.pings) > MAX_OUTSTANDING_PINGS:  # lost pings: forget the oldest
                del server.pings[next(iter(server.pings))]

    def on_pong(self, node: str, nonce: int, sent: float, now: float) -> float | None:
        """Update the round trip from a pong; returns the sample, or None for an unknown nonce."""
        with self._lock:
            server = self._servers.get(node)
            if server is None or server.pings.pop(nonce, None) != sent or now < sent:
                self.counters["unknown_pongs"] += 1
                return None
            sample = now - sent
            if server.rtt is None:
                server.rtt, server.rtt_dev = sample, sample / 2
            else:
                server.rtt_dev += RTT_DEV_GAIN * (abs(sample - server.rtt) - server.rtt_dev)
                server.rtt += RTT_GAIN * (sample - server.rtt)
            return sample

    # --- per-task bookkeeping ---------------------------------------------------------------

    def task_sent(self, node: str) -> None:
        with self._lock:
            server = self._servers.get(node)
            if server is not None:
                server.sent_since_report += 1
                server.in_flight += 1

    def task_done(self, node: str, *, answered: bool = False) -> None:
        """An attempt sent to ``node`` ended; ``answered``: the server itself answered it, so it no
        longer waits there and stops counting among the tasks sent since the last report."""
        with self._lock:
            server = self._servers.get(node)
            if server is not None:
                if server.in_flight > 0:
                    server.in_flight -= 1
                if answered and server.sent_since_report > 0:
                    server.sent_since_report -= 1

    def recent_failures(self, node: str, now: float) -> float:
        """The decayed failure count of ``node`` (0 for an unknown node)."""
        with self._lock:
            server = self._servers.get(node)
            return 0.0 if server is None else self._decayed(server, now)

    def failure(self, node: str, now: float) -> None:
        with self._lock:
            server = self._servers.get(node)
            if server is not None:
                server.failures = self._decayed(server, now) + 1.0
                server.failures_at = now

    def transfer_observed(self, node: str, nbytes: int, round_trip: float, server_time: float) -> None:
        """Fold one offloaded task's timing into the bandwidth estimate (see the module docstring)."""
        if nbytes < MIN_BANDWIDTH_BYTES:
            return
        with self._lock:
            server = self._servers.get(node)
            if server is None:
                return
            transfer = round_trip - (server.rtt or 0.0) - server_time
            if transfer <= 0.0:
                return
            sample = nbytes / transfer
            server.bandwidth = sample if server.bandwidth is None else (
                server.bandwidth + BANDWIDTH_GAIN * (sample - server.bandwidth))

    def _decayed(self, server: _Server, now: float) -> float:
        if server.failures <= 0.0:
            return 0.0
        return server.failures * math.pow(0.5, max(0.0, now - server.failures_at) / self._half_life)

    # --- reading ----------------------------------------------------------------------------

    def snapshot(self, task: str, now: float) -> list[ServerInfo]:
        """One :class:`ServerInfo` per known server, as the policy sees it for ``task``."""
        with self._lock:
            rows = []
            for server in self._servers.values():
                heartbeat = server.heartbeat
                load = heartbeat.load if heartbeat is not None else Load()
                rows.append(ServerInfo(
                    node=server.node,
                    capable=heartbeat is not None and task in heartbeat.capabilities,
                    stale=self._is_stale(server, now),
                    rtt=server.rtt, rtt_dev=server.rtt_dev, bandwidth=server.bandwidth,
                    queue_length=load.queue_length, in_flight=load.in_flight, workers=load.workers,
                    service_time=load.service_time.get(task),
                    sent_since_report=server.sent_since_report,
                    recent_failures=self._decayed(server, now),
                ))
            return rows

    def announces(self, task: str) -> bool:
        """True when some server (alive or not) announced ``task`` in a heartbeat."""
        with self._lock:
            return any(s.heartbeat is not None and task in s.heartbeat.capabilities
                       for s in self._servers.values())

    def views(self, now: float) -> list[ServerView]:
        with self._lock:
            return [ServerView(
                node=s.node, session=s.session, stale=self._is_stale(s, now), dead=s.dead, rtt=s.rtt,
                rtt_dev=s.rtt_dev, bandwidth=s.bandwidth,
                tasks=tuple(sorted(s.heartbeat.capabilities)) if s.heartbeat else (),
                load=s.heartbeat.load if s.heartbeat else Load(),
                heartbeat_age=None if s.last_heartbeat is None else now - s.last_heartbeat,
                sent_since_report=s.sent_since_report, recent_failures=self._decayed(s, now),
                in_flight=s.in_flight) for s in self._servers.values()]

    def next_stale_time(self) -> float | None:
        """The earliest monotonic time a live server turns stale if no heartbeat comes."""
        with self._lock:
            times = [max(s.last_heartbeat, self._restored_at) + s.interval * self._stale_after
                     for s in self._servers.values() if s.last_heartbeat is not None and not s.dead]
            return min(times) if times else None


__all__ = ["MAX_REPORTED", "MIN_BANDWIDTH_BYTES", "ServerTable", "ServerView"]
