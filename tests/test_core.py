"""The device core alone: feed it events with an explicit ``now``, read the actions it returns.

No broker, no thread, no clock: each test is a script of events. :class:`Rig` keeps the core's timers
in a heap and fires them as the script moves time on, as a driver would.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.core import (
    Action,
    Complete,
    CoreTask,
    DeviceCore,
    Execute,
    Fault,
    Park,
    Ping,
    RunLocal,
    Send,
    Timer,
)
from edge_agent.policy import PolicyConfig
from edge_agent.records import TaskRecord
from edge_agent.servers import ServerReport
from edge_agent.tuning import Tuning


def report(node: str, seq: int = 1, *, session: int = 1, queue: int = 0, service: float = 0.01,
           tasks: frozenset[str] = frozenset({"job"}), interval: float = 1.0) -> ServerReport:
    return ServerReport(node, session, seq, interval, tasks, queue_length=queue, workers=1,
                        service_time={name: service for name in tasks})


class Rig:
    """A driver made of lists: what the core asked for, and its timers, fired in time order."""

    def __init__(self, core: DeviceCore) -> None:
        self.core = core
        self.now = 0.0
        self.timers: list[tuple[float, int, Timer]] = []
        self.order = itertools.count()
        self.sends: list[Send] = []
        self.pings: list[Ping] = []
        self.local: list[CoreTask] = []
        self.executing: list[CoreTask] = []
        self.records: dict[str, TaskRecord] = {}
        self.completions: list[str] = []
        self.faults: list[Fault] = []
        self.parked: list[CoreTask] = []

    def arm(self, timer: Timer | None) -> None:
        if timer is not None:
            assert timer.at >= self.now - 1e-12, "a timer in the past"
            heapq.heappush(self.timers, (timer.at, next(self.order), timer))

    def take(self, actions: Sequence[Action]) -> list[Action]:
        for action in actions:
            if isinstance(action, Timer):
                self.arm(action)
            elif isinstance(action, Send):
                self.arm(action.timer)
                self.sends.append(action)
            elif isinstance(action, Ping):
                self.pings.append(action)
            elif isinstance(action, RunLocal):
                self.arm(action.timer)
                self.local.append(action.task)
            elif isinstance(action, Execute):
                self.executing.append(action.task)
            elif isinstance(action, Complete):
                self.completions.append(action.task.task_id)
                self.records[action.task.task_id] = action.record
            elif isinstance(action, Park):
                self.parked.append(action.task)
            else:
                self.faults.append(action)
        return list(actions)

    def advance(self, to: float) -> None:
        """Fire every timer due up to ``to``, in order, then stand at ``to``."""
        while self.timers and self.timers[0][0] <= to:
            at, _, timer = heapq.heappop(self.timers)
            self.now = max(self.now, at)
            self.take(self.core.fire(timer, self.now))
        self.now = max(self.now, to)

    def start_local(self) -> CoreTask | None:
        """A worker takes the first queued local task; returns it if the core says run it."""
        task = self.local.pop(0)
        before = len(self.executing)
        self.take(self.core.local_start(task, self.now))
        return task if len(self.executing) > before else None

    def finish_local(self, task: CoreTask, elapsed: float, error: str | None = None) -> None:
        self.executing.remove(task)
        self.take(self.core.local_done(task, self.now, elapsed=elapsed, error=error))


def make(*, local: bool = True, servers: Sequence[ServerReport] = (), workers: int = 1,
         policy: str = "ect", seed: int = 1, **tuning: object) -> Rig:
    core = DeviceCore("dev", local_tasks={"job"} if local else set(), local_workers=workers,
                      tuning=Tuning.model_validate(tuning), policy=policy, rng=random.Random(seed),
                      policy_config=PolicyConfig(default_service_time=0.01))
    rig = Rig(core)
    rig.take(core.link_up(0.0))
    for server in servers:
        rig.take(core.heartbeat(server, 0.0))
    return rig


# ------------------------------------------------------------------------------ decisions and runs


def test_a_local_run_from_submission_to_its_record() -> None:
    rig = make()
    rig.take(rig.core.submit("t1", "job", 100, 0.0))
    assert [task.task_id for task in rig.local] == ["t1"] and not rig.sends
    rig.now = 0.5
    task = rig.start_local()
    assert task is not None
    rig.now = 0.7
    rig.finish_local(task, 0.2)
    record = rig.records["t1"]
    assert (record.outcome, record.target, record.attempts, record.reason) == ("ok", "local", 1, "lowest-ect")
    assert (record.started, record.finished, record.service_time) == (0.5, 0.7, 0.2)
    assert rig.core.local_load()[4] == {"job": 0.2}


def test_an_offloaded_task_is_sent_with_a_timer_and_ends_with_the_result() -> None:
    rig = make(local=False, servers=[report("s")])
    actions = rig.take(rig.core.submit("t1", "job", 100, 0.0, deadline=1.0))
    send = next(a for a in actions if isinstance(a, Send))
    assert (send.server, send.attempt, send.resend) == ("s", 1, False)
    assert send.timer.at <= 1.0  # the attempt's timeout, within the deadline
    assert rig.core.views(0.0)[0].in_flight == 1 and rig.core.views(0.0)[0].sent_since_report == 1
    rig.now = 0.05
    rig.take(rig.core.result("t1", "s", 1, "ok", 0.05, queue_wait=0.01, service_time=0.02))
    record = rig.records["t1"]
    assert (record.outcome, record.target, record.received, record.queue_wait) == ("ok", "s", 0.05, 0.01)
    assert rig.core.views(0.05)[0].sent_since_report == 0  # answered: no longer waiting there
    rig.advance(5.0)  # the attempt timer comes due after the outcome: nothing happens
    assert rig.completions == ["t1"] and rig.core.counters["timeouts"] == 0


def test_a_timeout_counts_a_failure_and_falls_back_to_local() -> None:
    rig = make(servers=[report("s", service=0.001)], policy="remote", default_timeout=0.2)
    rig.take(rig.core.submit("t1", "job", 100, 0.0))
    assert rig.sends[0].server == "s"
    rig.advance(0.3)
    assert [task.task_id for task in rig.local] == ["t1"]
    assert rig.core.counters["timeouts"] == 1 and rig.core.table.recent_failures("s", 0.2) == 1.0
    task = rig.start_local()
    assert task is not None
    rig.finish_local(task, 0.01)
    assert rig.records["t1"].targets == ("s", "local") and rig.records["t1"].attempts == 2


def test_busy_answers_move_on_to_servers_not_tried_and_attempts_are_bounded() -> None:
    rig = make(local=False, servers=[report(f"s{i}") for i in range(4)], max_attempts=3)
    rig.take(rig.core.submit("t1", "job", 0, 0.0))
    for attempt in (1, 2, 3):
        send = rig.sends[-1]
        assert send.attempt == attempt
        rig.take(rig.core.result("t1", send.server, attempt, "rejected-busy", rig.now))
    assert len({send.server for send in rig.sends}) == 3
    record = rig.records["t1"]
    assert (record.outcome, record.attempts) == ("rejected-busy", 3)


def test_a_full_local_queue_decides_again_without_it_or_answers_busy() -> None:
    rig = make(workers=1, local_queue_size=1)
    for task_id in ("a", "b", "c"):
        rig.take(rig.core.submit(task_id, "job", 0, 0.0))
    assert [t.task_id for t in rig.local] == ["a", "b"]
    assert rig.records["c"].outcome == "rejected-busy" and rig.core.counters["local_full"] == 1
    rig.take(rig.core.heartbeat(report("s"), 0.0))
    rig.take(rig.core.submit("d", "job", 0, 0.0))
    assert rig.sends[-1].task.task_id == "d"  # the second decision, without the full local option


def test_the_deadline_gives_queued_and_running_local_tasks_their_outcome() -> None:
    rig = make(workers=1)
    rig.take(rig.core.submit("run", "job", 0, 0.0, deadline=0.3))
    rig.take(rig.core.submit("wait", "job", 0, 0.0, deadline=0.4))
    running = rig.start_local()
    assert running is not None
    rig.advance(1.0)
    assert rig.records["run"].error == "deadline passed while running locally"
    assert rig.records["wait"].error == "deadline passed while queued locally"
    assert {r.outcome for r in rig.records.values()} == {"expired"}
    assert rig.core.counters["deadline_outcomes"] == 2
    rig.finish_local(running, 1.0)  # the late run ends: it adds nothing, but its time is learnt
    assert rig.start_local() is None  # the queued one never runs
    assert rig.completions == ["run", "wait"] and rig.core.local_load()[:2] == (0, 0)


def test_an_offloaded_attempt_times_out_at_the_deadline_at_the_latest() -> None:
    rig = make(local=False, servers=[report("s")], default_timeout=30.0)
    rig.take(rig.core.submit("t1", "job", 0, 0.0, deadline=0.2))
    rig.advance(0.2)
    assert rig.records["t1"].outcome == "timeout" and rig.records["t1"].finished == pytest.approx(0.2)


def test_late_duplicate_foreign_and_earlier_attempt_results() -> None:
    rig = make(local=False, servers=[report("a"), report("b", service=0.02)], default_timeout=0.1)
    rig.take(rig.core.submit("t1", "job", 0, 0.0))
    first = rig.sends[-1].server
    rig.advance(0.15)  # timed out: attempt 2 goes to the other server
    second = rig.sends[-1]
    assert second.attempt == 2 and second.server != first
    rig.take(rig.core.result("t1", first, 1, "rejected-busy", rig.now))  # stale and not final: late
    assert rig.core.counters["late_results"] == 1 and not rig.completions
    rig.take(rig.core.result("t1", first, 1, "ok", rig.now))  # the work of attempt 1 is done: used
    assert rig.records["t1"].outcome == "ok" and rig.core.counters["late_results_used"] == 1
    rig.take(rig.core.result("t1", second.server, 2, "ok", rig.now))  # the duplicate
    rig.take(rig.core.result("never", "a", 1, "ok", rig.now))
    assert rig.core.counters["late_results"] == 2 and rig.core.counters["unknown_results"] == 1
    assert rig.completions == ["t1"]


def test_a_death_retries_elsewhere_or_waits_for_the_server_to_come_back() -> None:
    rig = make(servers=[report("s")], policy="remote", default_timeout=30.0)
    rig.take(rig.core.submit("t1", "job", 0, 0.0))
    rig.take(rig.core.state("s", 1, False, 0.1, live=True))
    assert [t.task_id for t in rig.local] == ["t1"] and rig.core.counters["server_deaths_in_flight"] == 1
    alone = make(local=False, servers=[report("s")], default_timeout=30.0)
    alone.take(alone.core.submit("t2", "job", 0, 0.0))
    alone.take(alone.core.state("s", 1, False, 0.1, live=True))
    assert alone.core.counters["waiting_for_server"] == 1 and not alone.completions
    alone.take(alone.core.heartbeat(report("s", seq=2), 0.2))  # the same session is back
    resent = alone.sends[-1]
    assert (resent.attempt, resent.resend) == (1, True) and alone.core.counters["resends"] == 1
    alone.take(alone.core.result("t2", "s", 1, "ok", 0.3))
    assert alone.records["t2"].outcome == "ok"


def test_a_silent_server_is_given_up_at_its_stale_time_not_the_timeout() -> None:
    rig = make(servers=[report("s")], policy="remote", default_timeout=30.0, stale_after=3)
    rig.take(rig.core.submit("t1", "job", 0, 0.0))
    rig.advance(2.9)
    assert not rig.local
    rig.advance(3.1)  # three heartbeats of 1 s missed, long before the 30 s timeout
    assert [t.task_id for t in rig.local] == ["t1"] and rig.core.counters["timeouts"] == 0


def test_a_reconnect_resends_what_was_sent_over_the_old_link() -> None:
    rig = make(local=False, servers=[report("s")], default_timeout=30.0)
    rig.take(rig.core.submit("t1", "job", 0, 0.0))
    rig.take(rig.core.link_down(0.1))
    rig.take(rig.core.link_up(0.2))
    assert rig.core.counters["link_lost_attempts"] == 1 and rig.core.counters["reconnects"] == 1
    assert rig.core.table.stale("s", 0.2)  # not offered until heard over the new link
    rig.take(rig.core.heartbeat(report("s", seq=2), 0.3))
    assert rig.sends[-1].resend and rig.sends[-1].attempt == 1


def test_a_publish_refused_by_a_dropped_link_runs_locally_or_waits() -> None:
    rig = make(servers=[report("s")], policy="remote")
    rig.take(rig.core.submit("t1", "job", 0, 0.0))
    rig.take(rig.core.link_down(0.0))
    rig.take(rig.core.publish_failed(rig.sends[-1].task, 1, 0.0, not_connected=True, error="down"))
    assert [t.task_id for t in rig.local] == ["t1"]
    assert rig.core.table.recent_failures("s", 0.0) == 0.0  # not the server's fault


def test_a_broken_decision_ends_the_task_failed_with_a_fault(monkeypatch: pytest.MonkeyPatch) -> None:
    rig = make(servers=[report("s")])

    def broken(*args: object, **kwargs: object) -> list[object]:
        raise OverflowError("absurd")

    monkeypatch.setattr(type(rig.core.table), "snapshot", broken)
    rig.take(rig.core.submit("t1", "job", 0, 0.0))
    assert rig.records["t1"].outcome == "failed" and "OverflowError" in (rig.records["t1"].error or "")
    assert isinstance(rig.faults[0].error, OverflowError) and rig.core.counters["decision_errors"] == 1


def test_probes_start_with_a_new_server_and_pongs_give_the_round_trip() -> None:
    rig = make(servers=[report("s")], probe_interval=2.0)
    rig.advance(0.0)
    assert [ping.server for ping in rig.pings] == ["s"]
    ping = rig.pings[0]
    assert rig.core.pong("s", ping.nonce, ping.sent, 0.004) == pytest.approx(0.004)
    assert rig.core.views(0.004)[0].rtt == pytest.approx(0.004)
    rig.advance(2.9)
    assert len(rig.pings) == 2  # every 2 s +-25%
    rig.advance(10.0)
    assert len(rig.pings) == 2  # not heard from for 3 s: stale, no longer probed
    rig.take(rig.core.heartbeat(report("s", seq=2), 10.0))
    rig.advance(10.0)
    assert len(rig.pings) == 3  # heard again: probed at once


def test_records_carry_the_drivers_clock() -> None:
    core = DeviceCore("dev", local_tasks={"job"}, epoch=1_000.0)
    actions = core.submit("t1", "job", 0, 5.0)
    task = next(a for a in actions if isinstance(a, RunLocal)).task
    core.local_start(task, 6.0)
    done = next(a for a in core.local_done(task, 7.0, elapsed=1.0) if isinstance(a, Complete))
    assert (done.record.created, done.record.started, done.record.finished) == (1_005.0, 1_006.0, 1_007.0)


# ------------------------------------------------------------------------------ one outcome, always

EVENTS = st.lists(st.tuples(st.sampled_from(["submit", "beat", "death", "result", "busy", "local", "time",
                                             "down", "up"]),
                            st.integers(0, 2), st.floats(0.0, 0.5)), max_size=40)


@settings(max_examples=150, deadline=None)
@given(events=EVENTS, local=st.booleans(), seed=st.integers(0, 3))
def test_every_task_gets_exactly_one_outcome_by_its_deadline(
        events: list[tuple[str, int, float]], local: bool, seed: int) -> None:
    rig = make(local=local, servers=[report("s0"), report("s1")], seed=seed, default_timeout=0.3,
               local_queue_size=2)
    seqs = {"s0": 1, "s1": 1}
    deadlines: dict[str, float] = {}
    for number, (kind, which, step) in enumerate(events):
        rig.advance(rig.now + step)
        node = f"s{which % 2}"
        core = rig.core
        if kind == "submit":
            task_id = f"t{number}"
            deadlines[task_id] = rig.now + 1.0
            rig.take(core.submit(task_id, "job", 10, rig.now, deadline=1.0))
        elif kind == "beat":
            seqs[node] += 1
            rig.take(core.heartbeat(report(node, seqs[node]), rig.now))
        elif kind == "death":
            rig.take(core.state(node, 1, False, rig.now, live=True))
        elif kind in ("result", "busy") and rig.sends:
            send = rig.sends[which % len(rig.sends)]
            rig.take(core.result(send.task.task_id, send.server, send.attempt,
                                 "ok" if kind == "result" else "rejected-busy", rig.now))
        elif kind == "local":
            if rig.executing:
                rig.finish_local(rig.executing[0], 0.01)
            elif rig.local:
                rig.start_local()
        elif kind == "down":
            rig.take(core.link_down(rig.now))
        elif kind == "up":
            rig.take(core.link_up(rig.now))
    rig.advance(rig.now + 2.0)
    assert sorted(rig.completions) == sorted(deadlines)  # each one exactly once
    for task_id, record in rig.records.items():
        assert record.finished is not None and record.finished <= deadlines[task_id] + 1e-9
        assert record.outcome == "ok" or record.error
    assert not rig.core.tasks


# ------------------------------------------------------------------------------ parking (store and forward)


def test_with_parking_a_task_without_any_option_is_parked_not_failed() -> None:
    rig = make(local=False)
    rig.core.parking = True
    rig.take(rig.core.submit("t1", "job", 100, 0.0, deadline=5.0))
    assert [task.task_id for task in rig.parked] == ["t1"] and not rig.completions
    assert rig.core.task("t1") is None and rig.core.counters["parked"] == 1
    assert not rig.core.can_serve("job", 0.0)
    rig.advance(10.0)  # its deadline timer is dead: the driver answers it from its spool
    assert not rig.completions
    rig.take(rig.core.heartbeat(report("s"), 10.0))
    assert rig.core.can_serve("job", 10.0)
    rig.take(rig.core.submit("t1", "job", 100, 10.0, deadline=5.0))  # the driver hands it back
    assert [send.server for send in rig.sends] == ["s"]
    rig.take(rig.core.result("t1", "s", 1, "ok", 10.1))
    assert rig.records["t1"].outcome == "ok"


def test_parking_covers_a_link_down_but_not_a_task_already_tried() -> None:
    rig = make(local=False, servers=[report("s")])
    rig.core.parking = True
    rig.take(rig.core.link_down(0.0))
    rig.take(rig.core.submit("t1", "job", 100, 0.0, deadline=5.0))
    assert [task.task_id for task in rig.parked] == ["t1"]
    assert not rig.core.can_serve("job", 0.0)
    rig.take(rig.core.link_up(0.1))
    rig.take(rig.core.heartbeat(report("s", 2), 0.1))
    rig.take(rig.core.submit("t2", "job", 100, 0.1, deadline=5.0, policy="ect"))
    rig.take(rig.core.result("t2", "s", 1, "unknown-task", 0.2))  # tried, nowhere else: it fails
    assert rig.records["t2"].outcome == "failed" and len(rig.parked) == 1  # as without parking


def test_without_parking_the_same_task_fails_as_before() -> None:
    rig = make(local=False)
    rig.take(rig.core.submit("t1", "job", 100, 0.0))
    assert rig.records["t1"].outcome == "failed" and not rig.parked
    assert make().core.can_serve("job", 0.0)  # runs here


def test_a_pinned_task_is_never_parked() -> None:
    rig = make(local=False, servers=[report("s")])
    rig.core.parking = True
    rig.take(rig.core.link_down(0.0))
    rig.take(rig.core.submit("t1", "job", 100, 0.0, deadline=5.0, target="s"))
    rig.take(rig.core.submit("t2", "job", 100, 0.0, deadline=5.0, pool="p"))
    rig.advance(6.0)
    assert not rig.parked and set(rig.completions) == {"t1", "t2"}  # the pinning rules answer them
