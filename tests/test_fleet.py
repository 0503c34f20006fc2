"""The fleet board: liveness, sessions, dead letters and unreadable nodes, without a broker."""

from __future__ import annotations

import pytest

from edge_agent.fleet import FleetBoard, NodeRow, render_table
from topics.models import DeadLetter, Heartbeat, Load, NodeState, Role


def heartbeat(node: str, session: int = 1, *, interval: float = 1.0, queue: int = 0,
              role: Role = Role.SERVER) -> Heartbeat:
    return Heartbeat(node=node, role=role, session=session, seq=1, interval=interval, time=1.0,
                     load=Load(queue_length=queue, queue_capacity=8, workers=2,
                               service_time={"square": 0.004}))


def state(node: str, status: str, session: int = 1) -> NodeState:
    return NodeState.model_validate({"node": node, "role": "server", "status": status,
                                     "session": session, "time": 1.0})


def test_a_node_is_online_until_it_misses_its_heartbeats() -> None:
    board = FleetBoard(stale_after=3)
    board.heartbeat(heartbeat("srv1", interval=1.0, queue=5), now=10.0)
    (row,) = board.rows(12.9)
    assert row.status == "online" and row.role == "server" and row.session == 1
    assert row.queue_length == 5 and row.queue_capacity == 8 and row.workers == 2
    assert row.service_time == {"square": 0.004} and row.heartbeat_age == pytest.approx(2.9)
    assert board.status("srv1", 13.1) == "stale"
    board.heartbeat(heartbeat("srv1"), now=13.2)
    assert board.status("srv1", 13.3) == "online"


def test_a_death_marks_its_session_offline_and_a_new_session_revives_it() -> None:
    board = FleetBoard()
    board.heartbeat(heartbeat("srv1", session=4), now=1.0)
    board.state(state("srv1", "offline", session=3), 1.2)  # an earlier session's death: ignored
    assert board.status("srv1", 1.5) == "online"
    board.state(state("srv1", "offline", session=4), 1.4)
    assert board.status("srv1", 1.5) == "offline"
    board.heartbeat(heartbeat("srv1", session=4), now=1.6)  # in flight when it died
    assert board.status("srv1", 1.7) == "offline"
    board.heartbeat(heartbeat("srv1", session=5), now=2.0)
    assert board.status("srv1", 2.1) == "online" and board.rows(2.1)[0].session == 5


def test_a_retained_birth_alone_shows_online_and_dead_letters_alone_unknown() -> None:
    board = FleetBoard()
    board.state(state("srv2", "online"), 4.0)
    board.dead_letter(DeadLetter(node="srv3", topic="x/y", reason="task-malformed", time=1.0))
    board.dead_letter(DeadLetter(node="srv3", topic="x/y", reason="task-malformed", time=1.0))
    rows = {row.node: row for row in board.rows(5.0)}
    assert rows["srv2"].status == "online" and rows["srv2"].heartbeat_age is None
    assert rows["srv3"].status == "unknown" and rows["srv3"].dead_letters == {"task-malformed": 2}
    # A birth and never a heartbeat: stale after stale_after default intervals.
    assert board.status("srv2", 4.0 + 3 * board.default_interval + 0.01) == "stale"


def test_an_unreadable_node_is_shown_as_such_until_it_is_readable_again() -> None:
    board = FleetBoard()
    board.heartbeat(heartbeat("srv1"), now=1.0)
    board.unreadable("srv1", "heartbeat: malformed")
    (row,) = board.rows(1.5)
    assert row.status == "unreadable" and row.problem == "heartbeat: malformed"
    board.heartbeat(heartbeat("srv1"), now=1.6)
    assert board.status("srv1", 1.7) == "online"


def test_devices_appear_with_their_role() -> None:
    board = FleetBoard()
    board.heartbeat(heartbeat("cam1", role=Role.DEVICE), now=0.0)
    assert board.rows(0.1)[0].role == "device"


def test_the_table_has_a_header_and_one_aligned_line_per_node() -> None:
    rows = [NodeRow(node="srv1", role="server", status="online", session=3, heartbeat_age=0.4,
                    rtt=0.0012, queue_length=1, queue_capacity=8, in_flight=2, workers=2,
                    service_time={"square": 0.004}, sent=10, failed=1,
                    dead_letters={"task-malformed": 2}),
            NodeRow(node="srv-long-name", role="server", status="unreadable", problem="malformed")]
    lines = render_table(rows).splitlines()
    assert len(lines) == 3 and lines[0].startswith("node")
    assert lines[1].split() == ["srv1", "server", "online", "3", "0.4s", "ago", "1.2", "1/8", "2",
                                "2", "square=4.0", "10", "1", "task-malformed=2"]
    assert "unreadable (malformed)" in lines[2]
    assert lines[0].index("role") == lines[1].index("server") == lines[2].index("server")


def test_stale_after_and_the_default_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="stale_after"):
        FleetBoard(stale_after=0)
    with pytest.raises(ValueError, match="default_interval"):
        FleetBoard(default_interval=0.0)
