"""A fleet view: every node heard on the fleet's topics, with its liveness, load and round trip.

:class:`FleetBoard` is sans-I/O: fed the heartbeats, node states and dead letters a device hears (and
the messages it could not read), with the time each arrived, it gives one :class:`NodeRow` per node.
:class:`FleetWatch` feeds a board from a running :class:`~edge_agent.agent.EdgeAgent`, adding the
agent's round trips and what it sent each server and lost there. :func:`render_table` prints rows
as plain text; ``edge-agent servers`` uses all three (``--watch`` refreshes it with rich).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from agent_common.badinput import BadInputLog
from edge_agent.records import TaskRecord
from topics.codec import Codec
from topics.errors import DecodeError
from topics.models import DeadLetter, Heartbeat, NodeState
from topics.names import Kind, TopicTree
from topics.transport import Message

if TYPE_CHECKING:
    from edge_agent.agent import EdgeAgent
    from edge_agent.servers import ServerView

log = logging.getLogger(__name__)

__all__ = ["FleetBoard", "FleetWatch", "NodeRow", "Status", "render_table"]

Status = Literal["online", "stale", "offline", "unreadable", "unknown"]


@dataclass(frozen=True)
class NodeRow:
    """One node as a fleet view shows it."""

    node: str
    role: str
    status: Status
    session: int | None = None
    seq: int | None = None
    """Sequence number of its last heartbeat."""
    heartbeat_age: float | None = None
    """Seconds since its last heartbeat (None: none heard)."""
    rtt: float | None = None
    """This device's round-trip estimate to it (servers only)."""
    queue_length: int | None = None
    queue_capacity: int | None = None
    in_flight: int | None = None
    workers: int | None = None
    service_time: Mapping[str, float] = field(default_factory=dict)
    sent: int = 0
    """Tasks this device sent it."""
    failed: int = 0
    """Of those, how many did not come back as a result from it."""
    dead_letters: Mapping[str, int] = field(default_factory=dict)
    """Input it rejected, by reason (from its dead-letter topic)."""
    problem: str = ""
    """Why its last message could not be read (status ``unreadable``)."""


@dataclass
class _Node:
    role: str = "?"
    session: int | None = None
    heartbeat: Heartbeat | None = None
    heard_at: float | None = None
    offline_session: int | None = None
    """The session of the last death heard, if no later session has been heard since."""
    online_state: bool = False
    state_at: float | None = None
    """When its last birth was heard."""
    problem: str = ""
    dead_letters: Counter[str] = field(default_factory=Counter)


class FleetBoard:
    """Every node heard on heartbeat, state and dead-letter topics; liveness judged as devices do.

    A node is ``offline`` after a death for its current session, ``stale`` once ``stale_after``
    heartbeat intervals pass without one, ``unreadable`` while its last message could not be read,
    ``unknown`` when only its dead letters were heard, ``online`` otherwise. A node heard only by
    its birth (no heartbeat yet) is judged against ``default_interval``.
    """

    def __init__(self, *, stale_after: int = 3, default_interval: float = 1.0) -> None:
        if stale_after < 1:
            raise ValueError(f"stale_after must be >= 1, got {stale_after}")
        if not default_interval > 0:
            raise ValueError(f"default_interval must be positive, got {default_interval}")
        self.stale_after = stale_after
        self.default_interval = default_interval
        self._nodes: dict[str, _Node] = {}

    def _node(self, node: str) -> _Node:
        entry = self._nodes.get(node)
        if entry is None:
            entry = self._nodes[node] = _Node()
        return entry

    def heartbeat(self, heartbeat: Heartbeat, now: float) -> None:
        entry = self._node(heartbeat.node)
        if entry.session is not None and heartbeat.session < entry.session:
            return  # a late heartbeat of an old session
        if entry.offline_session is not None and heartbeat.session <= entry.offline_session:
            return  # in flight when it died
        entry.role, entry.session, entry.heartbeat, entry.heard_at = (
            str(heartbeat.role), heartbeat.session, heartbeat, now)
        entry.offline_session, entry.problem = None, ""

    def state(self, state: NodeState, now: float) -> None:
        entry = self._node(state.node)
        entry.role = str(state.role)
        entry.problem = ""
        if entry.session is not None and state.session < entry.session:
            return  # the death or birth of an earlier session
        entry.session = state.session
        if state.status == "offline":
            entry.offline_session, entry.online_state = state.session, False
        else:
            entry.offline_session, entry.online_state, entry.state_at = None, True, now

    def dead_letter(self, letter: DeadLetter) -> None:
        self._node(letter.node).dead_letters[letter.reason] += 1

    def unreadable(self, node: str, problem: str) -> None:
        """The last message on one of ``node``'s topics could not be read (``problem`` says why)."""
        self._node(node).problem = problem

    def nodes(self) -> list[str]:
        return sorted(self._nodes)

    def status(self, node: str, now: float) -> Status:
        entry = self._nodes.get(node)
        if entry is None:
            return "unknown"
        if entry.problem:
            return "unreadable"
        if entry.offline_session is not None:
            return "offline"
        if entry.heartbeat is not None and entry.heard_at is not None:
            silent = now - entry.heard_at
            return "stale" if silent > self.stale_after * entry.heartbeat.interval else "online"
        if entry.online_state and entry.state_at is not None:
            silent = now - entry.state_at
            return "stale" if silent > self.stale_after * self.default_interval else "online"
        return "unknown"

    def rows(self, now: float, *, servers: Iterable[ServerView] = (),
             sent: Mapping[str, tuple[int, int]] | None = None) -> list[NodeRow]:
        """One row per node, by node id; ``servers`` and ``sent`` (node -> (sent, failed)) are what a
        device knows of them."""
        views = {view.node: view for view in servers}
        counts = sent or {}
        rows = []
        for node in self.nodes():
            entry = self._nodes[node]
            load = entry.heartbeat.load if entry.heartbeat is not None else None
            view = views.get(node)
            mine = counts.get(node, (0, 0))
            rows.append(NodeRow(
                node=node, role=entry.role, status=self.status(node, now), session=entry.session,
                seq=entry.heartbeat.seq if entry.heartbeat is not None else None,
                heartbeat_age=None if entry.heard_at is None else now - entry.heard_at,
                rtt=view.rtt if view is not None else None,
                queue_length=load.queue_length if load else None,
                queue_capacity=load.queue_capacity if load else None,
                in_flight=load.in_flight if load else None, workers=load.workers if load else None,
                service_time=dict(load.service_time) if load else {}, sent=mine[0], failed=mine[1],
                dead_letters=dict(entry.dead_letters), problem=entry.problem))
        return rows


class FleetWatch:
    """A :class:`FleetBoard` fed by a running edge agent: every node its broker connection hears.

    Attach before ``agent.start()`` (the dead-letter subscription rides on the agent's transport).
    Thread-safe: the agent's threads feed it, any thread reads :meth:`rows`.
    """

    def __init__(self, agent: EdgeAgent, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._agent = agent
        self._clock = clock
        self._lock = threading.Lock()
        self._tree = TopicTree(agent.config.prefix)
        self._codec = Codec(agent.config.format, max_payload=agent.config.max_payload)
        self._bad = BadInputLog(log)
        self.board = FleetBoard(stale_after=agent.config.stale_after)
        self._sent: Counter[str] = Counter()
        self._failed: Counter[str] = Counter()
        agent.add_node_listener(self._on_node)
        agent.add_record_listener(self._on_record)
        agent.subscribe(self._tree.all_of(Kind.DEAD_LETTER), self._on_dead_letter, qos=0)

    def _node_of(self, topic: str) -> str | None:
        parsed = self._tree.parse(topic)
        return None if parsed is None else parsed.node

    def _on_node(self, topic: str, record: Heartbeat | NodeState | None, problem: str) -> None:
        now = self._clock()
        with self._lock:
            if record is None:
                node = self._node_of(topic)
                if node is not None:
                    self.board.unreadable(node, problem)
            elif isinstance(record, Heartbeat):
                self.board.heartbeat(record, now)
            else:
                self.board.state(record, now)

    def _on_dead_letter(self, message: Message) -> None:
        try:
            letter = self._codec.decode(message.payload, DeadLetter, topic=message.topic)
        except DecodeError as exc:
            self._bad.record(f"dead-letter-{exc.reason}", exc.detail, topic=message.topic)
            node = self._node_of(message.topic)
            if node is not None:
                with self._lock:
                    self.board.unreadable(node, f"dead letter: {exc.reason}")
            return
        with self._lock:
            self.board.dead_letter(letter)

    def _on_record(self, record: TaskRecord) -> None:
        for server in record.targets:
            if server == "local":
                continue
            with self._lock:
                self._sent[server] += 1
                if not (record.ok and record.target == server):
                    self._failed[server] += 1

    def rows(self) -> list[NodeRow]:
        servers = self._agent.servers()
        with self._lock:
            sent = {node: (count, self._failed[node]) for node, count in self._sent.items()}
            return self.board.rows(self._clock(), servers=servers, sent=sent)


_COLUMNS = ("node", "role", "status", "session", "heartbeat", "rtt ms", "queue", "in flight",
            "workers", "service ms", "sent", "failed", "dead letters")


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None or not math.isfinite(seconds) else f"{seconds * 1000:.1f}"


def row_cells(row: NodeRow) -> tuple[str, ...]:
    """The cells of one row, in the order of the table's columns."""
    queue = "-" if row.queue_length is None else f"{row.queue_length}/{row.queue_capacity}"
    service = " ".join(f"{name}={seconds * 1000:.1f}" for name, seconds in sorted(row.service_time.items()))
    letters = " ".join(f"{reason}={count}" for reason, count in sorted(row.dead_letters.items()))
    status = f"{row.status} ({row.problem})" if row.problem else row.status
    age = "-" if row.heartbeat_age is None else f"{row.heartbeat_age:.1f}s ago"
    return (row.node, row.role, status, "-" if row.session is None else str(row.session), age,
            _ms(row.rtt), queue, "-" if row.in_flight is None else str(row.in_flight),
            "-" if row.workers is None else str(row.workers), service or "-", str(row.sent),
            str(row.failed), letters or "-")


def columns() -> tuple[str, ...]:
    return _COLUMNS


def render_table(rows: Sequence[NodeRow]) -> str:
    """The rows as an aligned plain-text table (one header line, one line per node)."""
    cells = [_COLUMNS, *(row_cells(row) for row in rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(_COLUMNS))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
                     for line in cells)
