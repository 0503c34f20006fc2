"""What a device learns of its servers from answers, busy replies and timeouts (pure: no I/O, no clock)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent_common.smoothing import aged_gain
from edge_agent.core import DeviceCore, Send
from edge_agent.policy import ServerInfo, TaskInfo, server_ect
from edge_agent.servers import BIRTH_INTERVAL, ServerReport, ServerTable
from edge_agent.tuning import Tuning

TASK = TaskInfo("detect", 0)


def table_with(node: str = "s", *, at: float = 0.0, queue_length: int = 0, service: float = 0.010,
               half_life: float = 10.0) -> ServerTable:
    table = ServerTable(half_life=half_life)
    beat(table, node, 1, at, queue_length=queue_length, service=service)
    return table


def beat(table: ServerTable, node: str, seq: int, at: float, *, queue_length: int = 0,
         service: float = 0.010) -> None:
    assert table.on_heartbeat(ServerReport(node, 1, seq, 100.0, frozenset({"detect"}),
                                           queue_length=queue_length, workers=2,
                                           service_time={"detect": service}), at)


def row(table: ServerTable, now: float, node: str = "s") -> ServerInfo:
    return next(info for info in table.snapshot("detect", now) if info.node == node)


def pong(table: ServerTable, nonce: int, sent: float, rtt: float) -> None:
    table.ping_sent("s", nonce, sent)
    assert table.on_pong("s", nonce, sent, sent + rtt) == pytest.approx(rtt)


def test_a_busy_answer_raises_the_estimate_then_fades() -> None:
    table = table_with()
    before = server_ect(TASK, row(table, 1.0))
    table.busy("s", 1.0)
    busy = row(table, 1.0)
    assert busy.busy == pytest.approx(1.0) and server_ect(TASK, busy) > before + 0.015  # a full queue ahead
    # It fades with time (half-life 10 s)...
    assert row(table, 11.0).busy == pytest.approx(0.5)
    assert server_ect(TASK, row(table, 11.0)) < server_ect(TASK, busy)
    # ... and on evidence: each answer halves it.
    table.answered("s", 11.0, wall=0.012, queue_wait=0.0, service_time=0.010)
    assert row(table, 11.0).busy == pytest.approx(0.25)
    assert row(table, 200.0).busy == 0.0 and not row(table, 200.0).stale


def test_a_timeout_is_doubt_that_fades_and_never_removes_the_server() -> None:
    table = table_with()
    for at in (1.0, 1.2, 1.4):
        table.timed_out("s", at, 0.2)
    doubtful = row(table, 1.4)
    assert doubtful.doubt == pytest.approx(0.6, rel=0.05)
    assert doubtful.capable and not doubtful.stale          # still offered to the policy
    assert server_ect(TASK, doubtful) == pytest.approx(server_ect(TASK, row(table_with(), 1.4)))  # mean
    assert row(table, 21.4).doubt == pytest.approx(doubtful.doubt / 4, rel=0.01)
    table.answered("s", 21.4, wall=0.012, queue_wait=0.0, service_time=0.010)
    assert row(table, 21.4).doubt == pytest.approx(doubtful.doubt / 8, rel=0.01)


def test_a_recovered_links_round_trip_comes_back_within_a_few_answers() -> None:
    table = table_with()
    pong(table, 1, 0.0, 0.050)                       # pings saw a bad link: 50 ms round trips
    assert row(table, 0.1).rtt == pytest.approx(0.050)
    # The link recovers (5 ms; the server takes 10 ms): the first answer says so at once.
    table.answered("s", 0.2, wall=0.015, queue_wait=0.0, service_time=0.010)
    assert row(table, 0.2).rtt == pytest.approx(0.005)
    now = 0.2

    def answers_until(wall: float, done: float, above: bool) -> int:
        nonlocal now
        count = 0
        while (row(table, now).rtt > done) if above else (row(table, now).rtt < done):  # type: ignore[operator]
            now += 0.02
            table.answered("s", now, wall=wall, queue_wait=0.0, service_time=0.010)
            count += 1
        return count

    # Degrading to 50 ms and recovering to 5 ms take as many answers, and few.
    worse = answers_until(0.060, 0.045, above=False)
    better = answers_until(0.015, 0.010, above=True)
    assert worse <= 8 and better <= 8 and abs(worse - better) <= 1


def test_answers_measure_the_round_trip_without_server_time_or_transfer() -> None:
    table = table_with(queue_length=10, service=0.010)
    table.answered("s", 1.0, wall=0.045, queue_wait=0.020, service_time=0.012, transfer=0.008,
                   predicted=0.035)
    info = row(table, 1.0)
    assert info.rtt == pytest.approx(0.005)           # 45 - 20 - 12 - 8 ms
    assert info.service_time == pytest.approx(0.012)  # newer than the report
    assert info.queue_wait == pytest.approx(0.020)    # replaces the report's 10 queued
    assert info.error_dev == pytest.approx(0.3 * 0.010)
    assert info.latency == pytest.approx(0.045)
    # A newer report takes the queue and service time back; a newer pong the round trip (pings fill
    # the gaps when no work flows).
    beat(table, "s", 2, 2.0, queue_length=0, service=0.011)
    pong(table, 1, 2.5, 0.003)
    info = row(table, 3.0)
    assert (info.queue_wait, info.service_time, info.queue_length) == (None, 0.011, 0)
    assert info.rtt == pytest.approx(0.003)


def test_the_core_teaches_its_table_from_each_answer() -> None:
    core = DeviceCore("dev", local_tasks=set(), tuning=Tuning(default_timeout=1.0), probes=False,
                      watchdog=False)
    core.link_up(0.0)
    core.heartbeat(ServerReport("s", 1, 1, 100.0, frozenset({"detect"}), workers=2,
                                service_time={"detect": 0.010}), 0.0)
    sends = [a for a in core.submit("t1", "detect", 125_000, 0.0) if isinstance(a, Send)]
    second = [a for a in core.submit("t2", "detect", 125_000, 0.0) if isinstance(a, Send)]
    assert sends and second
    # 125 kB at the default 12.5 MB/s: 10 ms on the uplink; the second waits behind the first.
    assert second[0].task.decision is not None
    assert sends[0].task.transfer == pytest.approx(0.010) and second[0].task.transfer == pytest.approx(0.020)
    assert row(core.table, 0.0).outstanding == 2
    core.result("t1", "s", 1, "ok", 0.040, queue_wait=0.005, service_time=0.012)
    info = row(core.table, 0.040)
    assert info.rtt == pytest.approx(0.040 - 0.005 - 0.012 - 0.010) and info.outstanding == 1
    core.result("t2", "s", 1, "rejected-busy", 0.050)
    assert row(core.table, 0.050).busy == pytest.approx(1.0)


def test_an_unanswered_attempt_past_its_expected_time_is_doubt_before_any_timeout() -> None:
    table = table_with()
    table.sending("s", 1.0)
    table.expect("s", 1.030)                          # expected back within 30 ms
    assert row(table, 1.020).doubt == 0.0
    assert row(table, 1.080).doubt == pytest.approx(0.050)
    assert not row(table, 1.080).stale
    table.settled("s")                                # answered (or given up): the evidence is gone
    assert row(table, 1.080).doubt == 0.0 and row(table, 1.080).outstanding == 0


def test_a_snapshot_builds_the_rows_it_is_asked_for() -> None:
    table = ServerTable()
    for index in range(50):
        beat(table, f"s{index}", 1, 0.0)
    table.answered("s7", 0.5, wall=0.015, queue_wait=0.0, service_time=0.010)
    rows = table.snapshot("detect", 1.0)
    assert len(rows) == 50 and rows[7].node == "s7" and rows[-1].node == "s49"
    assert rows[7].rtt == pytest.approx(0.005) and rows[8].rtt is None
    assert [info.node for info in rows] == [f"s{index}" for index in range(50)]
    assert list(rows[7:9]) == [rows[7], rows[8]]
    assert table.index_of("s7") == 7 and table.index_of("nobody") is None


def test_a_birth_naming_its_tasks_lets_a_device_offload_before_the_first_heartbeat() -> None:
    core = DeviceCore("dev", local_tasks=set(), tuning=Tuning(default_timeout=1.0), probes=False,
                      watchdog=False)
    core.link_up(0.0)
    core.state("s", 7, True, 0.0, tasks=frozenset({"detect"}))  # the retained birth
    assert core.table.announces("detect") and not core.table.stale("s", 0.5)
    sends = [a for a in core.submit("t1", "detect", 100, 0.5) if isinstance(a, Send)]
    assert [send.server for send in sends] == ["s"]
    # Silent since: stale after stale_after birth intervals, as after any heartbeat.
    assert core.table.stale("s", 3.0 * BIRTH_INTERVAL + 0.1)
    # The first real heartbeat replaces it (its sequence 0 is newer than the birth's).
    assert core.table.on_heartbeat(ServerReport("s", 7, 0, 5.0, frozenset({"detect", "blur"})), 4.0)
    assert core.table.announces("blur") and not core.table.stale("s", 14.0)


def test_a_birth_without_tasks_or_a_death_announces_nothing() -> None:
    table = ServerTable()
    table.on_state_of("old", 1, True, now=0.0)  # an older server: no tasks in its birth
    table.on_state_of("gone", 2, False, tasks=frozenset({"detect"}), now=0.0)
    assert not table.announces("detect")


def test_a_birth_stands_for_a_heartbeat_as_long_as_its_own_interval_says() -> None:
    table = ServerTable(stale_after=3)
    table.on_state_of("s", 1, True, tasks=frozenset({"detect"}), now=0.0, interval=5.0)
    assert not table.stale("s", 14.9)  # a server beating every 5 s is not stale after 3 s
    assert table.stale("s", 15.1)



def test_a_birth_names_the_pools_a_server_reads() -> None:
    table = ServerTable()
    table.on_state_of("s", 1, True, tasks=frozenset({"detect"}), now=0.0, interval=1.0,
                      pools=frozenset({"gpu"}))
    (view,) = table.views(0.5)
    assert view.pools == ("gpu",)


@settings(max_examples=60, deadline=None)
@given(reads=st.lists(st.integers(-12, 11), min_size=1, max_size=30), answered=st.sets(st.integers(0, 11)),
       sent=st.sets(st.integers(0, 11)))
def test_a_snapshot_read_twice_gives_what_a_fresh_read_gives(reads: list[int], answered: set[int],
                                                              sent: set[int]) -> None:
    """A snapshot builds each row once and keeps it: whatever order a policy reads its rows in (again,
    by negative index, by slice, by iterating), each is what a fresh snapshot's row says."""
    table = ServerTable()
    for index in range(12):
        beat(table, f"s{index}", 1, 0.0, queue_length=index)
    for index in sorted(answered):
        table.answered(f"s{index}", 0.4, wall=0.015 + index / 1000, queue_wait=0.001, service_time=0.010)
    for index in sorted(sent):
        table.sending(f"s{index}", 0.5)
        table.expect(f"s{index}", 0.6)
    rows = table.snapshot("detect", 1.0)
    for index in reads:
        assert rows[index] == table.snapshot("detect", 1.0)[index]
    assert list(rows) == list(table.snapshot("detect", 1.0)) == list(rows[0:12])


def test_a_heartbeat_repeating_an_old_service_time_is_no_new_evidence() -> None:
    table = table_with(service=0.075)                  # the server's figure from a slow period, at 0 s
    assert row(table, 5.0).evidence_at is None         # the newest report: as current as reports get
    beat(table, "s", 2, 1.0, service=0.075)            # the same figure again: it ran nothing since
    assert row(table, 5.0).evidence_at == 0.0          # so the evidence is as old as before
    table.answered("s", 6.0, wall=0.010, queue_wait=0.0, service_time=0.008)  # a try: fast again
    beat(table, "s", 3, 7.0, service=0.075)            # still the old figure
    info = row(table, 7.5)
    assert info.evidence_at == 6.0 and info.service_time == pytest.approx(0.008)  # the answer stands
    beat(table, "s", 4, 8.0, service=0.009)            # it ran the task since: its figure is newer
    info = row(table, 8.5)
    assert info.evidence_at is None and info.service_time == pytest.approx(0.009)
    beat(table, "s", 5, 9.0, service=0.030)
    assert row(table, 9.5).service_floor == pytest.approx(0.009)  # the best its reports have shown


def test_after_a_pause_one_answer_moves_the_estimate_most_of_the_way() -> None:
    def after(pause: float) -> float:
        table = table_with()
        for step in range(20):                         # a slow period: 75 ms, answers flowing
            table.answered("s", 0.1 * step, wall=0.080, queue_wait=0.0, service_time=0.075)
        table.answered("s", 1.9 + pause, wall=0.012, queue_wait=0.0, service_time=0.008)
        service = row(table, 1.9 + pause).service_time
        assert service is not None
        return service

    assert after(0.1) > 0.05                           # while answers flow: the plain gain (0.3)
    assert after(10.0) < 0.010                         # ten seconds after the last one: nearly all of it


def test_aged_gain_is_the_plain_gain_while_samples_flow_and_nears_one_after_a_pause() -> None:
    assert aged_gain(0.3, 0.0, 2.0) == 0.3
    assert aged_gain(0.3, 2.0, 2.0) == pytest.approx(1.0 - 0.7 / 2)
    assert aged_gain(0.3, 20.0, 2.0) > 0.999


def test_pongs_seconds_apart_weigh_the_old_round_trip_less() -> None:
    table = table_with()
    pong(table, 1, 0.0, 0.080)                         # a slow link
    pong(table, 2, 0.1, 0.080)
    pong(table, 3, 2.1, 0.001)                         # recovered; the next pong two seconds later
    rtt = row(table, 2.2).rtt
    assert rtt is not None and rtt < 0.080 - 0.5 * 0.079  # more than the plain gain (0.5) moved it
