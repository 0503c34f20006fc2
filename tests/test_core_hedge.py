"""Hedged attempts in the device core alone: a lossy server's attempt also goes to a second server."""

from __future__ import annotations

import random

import pytest
from test_core import Rig, report

from edge_agent.config import PolicySettings
from edge_agent.core import HEDGE_BURST, DeviceCore, Send
from edge_agent.policy import LocalInfo, PolicyConfig, ServerInfo, TaskInfo, decide
from edge_agent.tuning import Tuning


def hedging(*, hedge: float = 0.01, hedge_delay: float = 0.0, seed: int = 1, max_attempts: int = 3,
            hedge_share: float = 1.0, slow: float = 0.03) -> Rig:
    """A device without local runs beside a fast server and a slow one (``slow`` s), clean so far."""
    config = PolicyConfig(default_service_time=0.01, hedge=hedge, hedge_delay=hedge_delay,
                          hedge_share=hedge_share)
    core = DeviceCore("dev", local_tasks=set(), tuning=Tuning(default_timeout=0.1, max_attempts=max_attempts),
                      rng=random.Random(seed), policy_config=config)
    rig = Rig(core)
    rig.take(core.link_up(0.0))
    for server in (report("fast", service=0.002), report("slow", service=slow)):
        rig.take(core.heartbeat(server, 0.0))
    return rig


def lose_one(rig: Rig, task_id: str = "lost") -> None:
    """A task whose attempt to ``fast`` is never answered: it times out, ``slow`` answers the retry."""
    rig.take(rig.core.submit(task_id, "job", 0, rig.now))
    assert rig.sends[-1].server == "fast"
    rig.advance(rig.now + 0.15)
    retry = rig.sends[-1]
    assert (retry.server, retry.attempt) == ("slow", 2)
    rig.take(rig.core.result(task_id, "slow", 2, "ok", rig.now, service_time=0.03))


def sends_of(rig: Rig, task_id: str) -> list[Send]:
    return [send for send in rig.sends if send.task.task_id == task_id]


def in_flight(rig: Rig) -> dict[str, int]:
    return {view.node: view.in_flight for view in rig.core.views(rig.now)}


def test_without_loss_nothing_is_hedged() -> None:
    rig = hedging()
    for i in range(20):
        rig.take(rig.core.submit(f"t{i}", "job", 0, rig.now))
        send = rig.sends[-1]
        rig.now += 0.01
        rig.take(rig.core.result(f"t{i}", send.server, send.attempt, "ok", rig.now, service_time=0.002))
    assert len(rig.sends) == 20 and rig.core.counters["hedges"] == 0
    assert rig.core.table.loss("fast", rig.now) == 0.0 and len(rig.completions) == 20


def test_an_attempt_to_a_lossy_server_is_hedged_and_the_first_answer_is_the_one_outcome() -> None:
    rig = hedging()
    lose_one(rig)
    assert rig.core.table.loss("fast", rig.now) == pytest.approx(0.1, rel=0.01)
    rig.take(rig.core.submit("t", "job", 0, rig.now))
    first, hedge = sends_of(rig, "t")
    assert (first.server, first.attempt, hedge.server, hedge.attempt) == ("fast", 1, "slow", 2)
    assert rig.core.counters["hedges"] == 1 and in_flight(rig) == {"fast": 1, "slow": 1}  # both are load
    rig.now += 0.005
    rig.take(rig.core.result("t", "fast", 1, "ok", rig.now, service_time=0.002))
    record = rig.records["t"]
    assert (record.outcome, record.target, record.attempts) == ("ok", "fast", 2)
    assert in_flight(rig) == {"fast": 0, "slow": 0}
    rig.now += 0.03
    rig.take(rig.core.result("t", "slow", 2, "ok", rig.now, queue_wait=0.004, service_time=0.03))
    assert rig.completions.count("t") == 1  # the loser is counted, never a second outcome
    counters = rig.core.counters
    assert (counters["hedge_side_won"], counters["hedge_late_answers"], counters["late_results"]) == (1, 1, 1)
    slow = rig.core.table.snapshot("job", rig.now)[rig.core.table.index_of("slow")]  # type: ignore[index]
    assert slow.queue_wait is not None and slow.queue_wait > 0.0  # the loser's answer taught it (was 0)
    assert slow.sent_since_report == 0
    assert rig.core.table.loss("fast", rig.now) < 0.1  # its answer was a sample 0
    rig.advance(rig.now + 1.0)  # the dead timers change nothing
    assert rig.completions.count("t") == 1


def hedge_wins(rig: Rig) -> None:
    """After a loss, task ``t`` goes to both servers and the hedge (``slow``) answers first."""
    lose_one(rig)
    rig.take(rig.core.submit("t", "job", 0, rig.now))
    rig.now += 0.03
    rig.take(rig.core.result("t", "slow", 2, "ok", rig.now, service_time=0.03))


def test_the_hedge_may_win_and_the_lossy_answer_then_only_counts() -> None:
    rig = hedging()
    hedge_wins(rig)
    assert (rig.records["t"].outcome, rig.records["t"].target) == ("ok", "slow")
    rig.now += 0.01
    rig.take(rig.core.result("t", "fast", 1, "ok", rig.now, service_time=0.002))
    assert rig.completions.count("t") == 1 and rig.core.counters["hedge_late_answers"] == 1


def test_a_hedged_attempt_left_unanswered_is_a_loss_sample_without_doubt() -> None:
    rig = hedging()
    hedge_wins(rig)
    before = rig.core.table.loss("fast", rig.now)
    rig.advance(rig.now + 0.5)  # past the lossy attempt's timeout, and it never answered
    rig.take(rig.core.submit("u", "job", 0, rig.now))
    assert rig.core.counters["hedge_unanswered"] == 1
    assert rig.core.table.loss("fast", rig.now) > before
    assert rig.core.counters["timeouts"] == 1  # only the first task's: the hedged one waited on nothing


def test_a_late_answer_takes_its_loss_sample_back() -> None:
    rig = hedging()
    lose_one(rig)
    assert rig.core.table.loss("fast", rig.now) == pytest.approx(0.1, rel=0.01)
    rig.take(rig.core.result("lost", "fast", 1, "ok", rig.now))  # it was slow, not lost
    assert rig.core.table.loss("fast", rig.now) == 0.0
    assert rig.completions.count("lost") == 1 and rig.core.counters["late_results"] == 1


def test_the_loss_estimate_fades_on_answers_and_the_hedges_stop() -> None:
    rig = hedging()
    lose_one(rig)
    for i in range(40):  # answers from the lossy server, each a sample 0
        rig.take(rig.core.submit(f"t{i}", "job", 0, rig.now))
        rig.now += 0.005
        rig.take(rig.core.result(f"t{i}", "fast", 1, "ok", rig.now, service_time=0.002))
    assert rig.core.table.loss("fast", rig.now) <= 0.01 and rig.core.counters["hedges"] > 0
    hedges = rig.core.counters["hedges"]
    rig.take(rig.core.submit("clean", "job", 0, rig.now))
    assert [send.server for send in sends_of(rig, "clean")] == ["fast"]
    assert rig.core.counters["hedges"] == hedges


def test_the_loss_halves_with_time_too() -> None:
    rig = hedging()
    lose_one(rig)
    loss = rig.core.table.loss("fast", rig.now)
    assert rig.core.table.loss("fast", rig.now + 10.0) == pytest.approx(loss / 2)


def test_a_zero_budget_never_hedges() -> None:
    rig = hedging(hedge=0.0)
    lose_one(rig)
    rig.take(rig.core.submit("t", "job", 0, rig.now))
    assert len(sends_of(rig, "t")) == 1 and rig.core.counters["hedges"] == 0


def hedge_run(share: float, tasks: int = 20) -> Rig:
    """``tasks`` tasks after a loss on ``fast``, each answered by ``fast``: the loss stays above the
    budget throughout (0.1 x 0.9 ** 20 > 0.01), so each one's attempt is one to hedge."""
    rig = hedging(hedge_share=share, slow=0.5)  # slow enough that fast wins even with its doubt counted
    lose_one(rig)
    for i in range(tasks):
        rig.take(rig.core.submit(f"t{i}", "job", 0, rig.now))
        assert sends_of(rig, f"t{i}")[0].server == "fast"
        rig.now += 0.005
        rig.take(rig.core.result(f"t{i}", "fast", 1, "ok", rig.now, service_time=0.002))
        assert rig.records[f"t{i}"].outcome == "ok"
    assert rig.core.table.loss("fast", rig.now) > 0.01
    return rig


def test_hedges_uncapped_by_default() -> None:
    counters = hedge_run(1.0).core.counters
    assert (counters["hedges"], counters["hedge_over_budget"]) == (20, 0)


def test_a_hedge_share_caps_the_hedges_to_a_burst_plus_that_share_per_task() -> None:
    rig = hedge_run(0.25)
    counters = rig.core.counters
    # The bucket starts full (HEDGE_BURST = 10), each task adds 0.25 and each hedge takes 1: tasks 1-13
    # are hedged, 14-16 find less than one left, 17 is, 18-20 are not.
    assert (HEDGE_BURST, counters["hedges"], counters["hedge_over_budget"]) == (10.0, 14, 6)
    assert len(rig.sends) == 2 + 20 + 14  # lose_one's two attempts, one per task, the hedges
    assert all(rig.completions.count(f"t{i}") == 1 for i in range(20))


def test_a_zero_share_allows_only_the_burst() -> None:
    counters = hedge_run(0.0).core.counters
    assert (counters["hedges"], counters["hedge_over_budget"]) == (10, 10)


def test_an_unhedged_loss_is_priced_by_loss_cost() -> None:
    """What a decision goes by when no hedge is left: a lossy server's loss costs ``loss x loss_cost``
    (the core sets the attempt timeout's floor), so the clean server wins where the lossy one did."""
    lossy = ServerInfo("fast", rtt=0.002, service_time=0.002, loss=0.3)
    clean = ServerInfo("slow", rtt=0.002, service_time=0.03)
    task, local = TaskInfo("job", 0), LocalInfo(capable=False)

    def chosen(config: PolicyConfig) -> str | None:
        return decide("ect", task, local, [lossy, clean], now=0.0, rng=random.Random(1), config=config).target

    assert chosen(PolicyConfig(hedge=0.0)) == "fast"
    assert chosen(PolicyConfig(hedge=0.0, loss_cost=0.2)) == "slow"
    assert chosen(PolicyConfig(loss_cost=0.2)) == "fast"  # its losses are hedged: no cost


def test_a_hedge_share_outside_0_1_is_refused_with_its_name() -> None:
    with pytest.raises(ValueError, match="hedge_share"):
        PolicyConfig(hedge_share=1.5)
    with pytest.raises(ValueError, match="hedge_share"):
        PolicySettings(hedge_share=-0.1)
    with pytest.raises(ValueError, match="loss_cost"):
        PolicyConfig(loss_cost=-1.0)


def test_a_delayed_hedge_goes_out_only_while_the_attempt_is_unanswered() -> None:
    rig = hedging(hedge_delay=0.01)
    lose_one(rig)
    rig.take(rig.core.submit("quick", "job", 0, rig.now))
    rig.now += 0.005
    rig.take(rig.core.result("quick", "fast", 1, "ok", rig.now, service_time=0.002))
    rig.advance(rig.now + 0.05)
    assert len(sends_of(rig, "quick")) == 1
    rig.take(rig.core.submit("t", "job", 0, rig.now))
    start = rig.now
    rig.advance(start + 0.011)
    hedge = sends_of(rig, "t")[-1]
    assert (hedge.server, hedge.attempt) == ("slow", 2) and rig.core.counters["hedges"] == 1
    rig.take(rig.core.result("t", "slow", 2, "ok", rig.now + 0.03, service_time=0.03))
    assert rig.completions.count("t") == 1


def test_a_dead_hedge_server_leaves_the_first_attempt_to_answer() -> None:
    rig = hedging()
    lose_one(rig)
    rig.take(rig.core.submit("t", "job", 0, rig.now))
    rig.take(rig.core.state("slow", 1, False, rig.now, live=True))  # the hedge's server dies
    rig.now += 0.005
    rig.take(rig.core.result("t", "fast", 1, "ok", rig.now, service_time=0.002))
    assert rig.records["t"].outcome == "ok" and rig.completions.count("t") == 1


def last_attempt_refused() -> Rig:
    """Two attempts at most: task ``t`` goes to ``fast`` and its hedge, the last attempt, to ``slow``,
    which answers busy; the attempt to ``fast`` is still in flight."""
    rig = hedging(max_attempts=2)
    lose_one(rig)
    rig.take(rig.core.submit("t", "job", 0, rig.now))
    assert [(send.server, send.attempt) for send in sends_of(rig, "t")] == [("fast", 1), ("slow", 2)]
    rig.now += 0.002
    rig.take(rig.core.result("t", "slow", 2, "rejected-busy", rig.now))
    assert "t" not in rig.records and rig.core.counters["hedge_waited_for_side"] == 1
    return rig


def test_with_no_attempt_left_a_failed_hedge_waits_for_the_first_attempt() -> None:
    rig = last_attempt_refused()
    rig.now += 0.005
    rig.take(rig.core.result("t", "fast", 1, "ok", rig.now, service_time=0.002))
    assert (rig.records["t"].outcome, rig.records["t"].target) == ("ok", "fast")
    rig.advance(rig.now + 1.0)
    assert rig.completions.count("t") == 1 and len(sends_of(rig, "t")) == 2


def test_the_first_attempt_waited_for_times_out_like_any_other() -> None:
    rig = last_attempt_refused()
    timeouts = rig.core.counters["timeouts"]
    rig.advance(rig.now + 1.0)  # fast never answers
    record = rig.records["t"]
    assert record.outcome == "timeout" and rig.completions.count("t") == 1
    assert rig.core.counters["timeouts"] == timeouts + 1 and in_flight(rig) == {"fast": 0, "slow": 0}
    rig.take(rig.core.result("t", "fast", 1, "ok", rig.now))  # it was slow, not lost: only counted
    assert rig.completions.count("t") == 1


def test_the_first_attempt_waited_for_on_a_server_that_dies_ends_the_task_at_once() -> None:
    rig = last_attempt_refused()
    rig.take(rig.core.state("fast", 1, False, rig.now, live=True))
    record = rig.records["t"]
    assert (record.outcome, record.error) == ("failed", "server fast went offline")
    assert rig.completions.count("t") == 1
