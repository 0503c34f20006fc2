"""Pinned tasks in the device core alone: ``submit(target=...)`` and ``submit(pool=...)``."""

from __future__ import annotations

from dataclasses import replace

import pytest
from test_core import make, report

from edge_agent.pinning import POOL_RETRIED, PinError, UnknownPoolError, UnknownServerError
from edge_agent.servers import ServerReport


def pooled(node: str, *pools: str, tasks: frozenset[str] = frozenset({"job"})) -> ServerReport:
    return replace(report(node, tasks=tasks), pools=frozenset(pools))


# ------------------------------------------------------------------------------ checks at submission


def test_a_pin_to_an_unknown_server_or_one_not_announcing_the_task_is_refused_by_name() -> None:
    rig = make(servers=[report("s1"), report("s2", tasks=frozenset({"other"}))])
    with pytest.raises(UnknownServerError, match=r"'nope'.*no such server") as unknown:
        rig.core.check_pin("job", target="nope")
    assert isinstance(unknown.value, LookupError) and unknown.value.target == "nope"
    with pytest.raises(UnknownServerError, match=r"'s2'.*does not announce task 'job'"):
        rig.core.check_pin("job", target="s2")
    with pytest.raises(UnknownServerError, match="'dev'"):
        rig.core.check_pin("job", target="dev")  # the device itself is no server
    rig.core.check_pin("job", target="s1")
    with pytest.raises(ValueError, match="not both"):
        rig.core.check_pin("job", target="s1", pool="gpu")


def test_a_pool_no_live_server_announces_is_refused_by_name() -> None:
    rig = make(servers=[report("plain"), pooled("g1", "gpu", tasks=frozenset({"other"}))])
    with pytest.raises(UnknownPoolError, match=r"pool 'cpu'.*no live server announces") as unknown:
        rig.core.check_pin("job", pool="cpu")
    assert isinstance(unknown.value, PinError) and unknown.value.pool == "cpu"
    with pytest.raises(UnknownPoolError, match=r"no server of the pool \(g1\) announces task 'job'"):
        rig.core.check_pin("job", pool="gpu")
    rig.take(rig.core.heartbeat(pooled("g2", "gpu"), 0.0))
    rig.core.check_pin("job", pool="gpu")
    rig.take(rig.core.state("g2", 1, False, 0.1, live=True))  # its death: the pool has no live member
    with pytest.raises(UnknownPoolError, match="no server of the pool"):
        rig.core.check_pin("job", pool="gpu")


# ------------------------------------------------------------------------------ pinned to a server


def test_every_attempt_of_a_pinned_task_goes_to_its_server_never_local() -> None:
    rig = make(servers=[report("fast", service=0.001), report("slow", service=0.05)], default_timeout=0.2,
               max_attempts=3)
    rig.take(rig.core.submit("t1", "job", 0, 0.0, target="slow"))
    assert [send.server for send in rig.sends] == ["slow"] and not rig.local
    rig.advance(2.0)  # each timeout: the same server again, as the next attempt, until none is left
    assert [(send.server, send.attempt) for send in rig.sends] == [("slow", 1), ("slow", 2), ("slow", 3)]
    record = rig.records["t1"]
    assert (record.outcome, record.attempts, record.targets) == ("timeout", 3, ("slow",) * 3)
    assert not rig.local and record.reason == "pinned"


def test_a_pinned_task_ends_with_its_servers_result_and_the_usual_checks() -> None:
    rig = make(servers=[report("a"), report("b")])
    rig.take(rig.core.submit("t1", "job", 0, 0.0, target="b", deadline=1.0))
    send = rig.sends[-1]
    assert send.server == "b" and send.timer.at <= 1.0
    rig.take(rig.core.result("t1", "a", 1, "ok", 0.01))  # another server: not this task's answer
    assert "t1" not in rig.records and rig.core.counters["unknown_results"] == 1
    rig.take(rig.core.result("t1", "b", 1, "ok", 0.02))
    assert (rig.records["t1"].outcome, rig.records["t1"].target) == ("ok", "b")


def test_a_pinned_task_whose_server_dies_ends_at_once() -> None:
    rig = make(servers=[report("a"), report("b")])
    rig.take(rig.core.submit("t1", "job", 0, 0.0, target="b"))
    rig.take(rig.core.state("b", 1, False, 0.1, live=True))
    record = rig.records["t1"]
    assert (record.outcome, record.attempts, record.finished) == ("failed", 1, 0.1)
    assert record.error is not None and "server b" in record.error and "offline" in record.error
    assert [send.server for send in rig.sends] == ["b"] and not rig.local
    rig.take(rig.core.submit("t2", "job", 0, 0.2, target="b"))  # pinned to a dead server: at once
    assert rig.records["t2"].outcome == "failed" and rig.records["t2"].attempts == 0


def test_busy_answers_of_a_pinned_server_are_retried_there_up_to_max_attempts() -> None:
    rig = make(servers=[report("a"), report("b")], max_attempts=2)
    rig.take(rig.core.submit("t1", "job", 0, 0.0, target="a"))
    rig.take(rig.core.result("t1", "a", 1, "rejected-busy", 0.01))
    rig.take(rig.core.result("t1", "a", 2, "rejected-busy", 0.02))
    assert [(send.server, send.attempt) for send in rig.sends] == [("a", 1), ("a", 2)]
    assert (rig.records["t1"].outcome, rig.records["t1"].attempts) == ("rejected-busy", 2)


def test_a_pinned_task_follows_the_deadline() -> None:
    rig = make(servers=[report("b", service=0.001)], default_timeout=5.0)
    rig.take(rig.core.submit("t1", "job", 0, 0.0, target="b", deadline=0.5))
    assert rig.sends[-1].timer.at <= 0.5
    rig.advance(1.0)
    assert rig.records["t1"].outcome == "timeout" and rig.records["t1"].finished == 0.5


# ------------------------------------------------------------------------------ pinned to a pool


def test_a_pool_attempt_is_published_to_the_pool_and_any_member_may_answer() -> None:
    rig = make(servers=[pooled("g1", "gpu"), pooled("g2", "gpu"), report("other")])
    rig.take(rig.core.submit("t1", "job", 0, 0.0, pool="gpu"))
    send = rig.sends[-1]
    assert (send.server, send.attempt, send.task.pool) == ("pool/gpu", 1, "gpu") and not rig.local
    rig.take(rig.core.result("t1", "other", 1, "ok", 0.01))  # not a member of the pool
    assert "t1" not in rig.records and rig.core.counters["unknown_results"] == 1
    rig.take(rig.core.result("t1", "g2", 1, "ok", 0.02))
    record = rig.records["t1"]
    assert (record.outcome, record.target, record.targets, record.reason) == ("ok", "g2", ("g2",), "pool")


def test_a_pool_attempt_is_retried_only_when_a_member_says_it_did_not_run() -> None:
    assert frozenset({"rejected-busy", "unknown-task"}) == POOL_RETRIED
    rig = make(servers=[pooled("g1", "gpu"), pooled("g2", "gpu")], max_attempts=3)
    rig.take(rig.core.submit("t1", "job", 0, 0.0, pool="gpu"))
    rig.take(rig.core.result("t1", "g1", 1, "rejected-busy", 0.01))
    rig.take(rig.core.result("t1", "g1", 2, "unknown-task", 0.02))
    assert [(send.server, send.attempt) for send in rig.sends] == [("pool/gpu", 1), ("pool/gpu", 2),
                                                                  ("pool/gpu", 3)]
    rig.take(rig.core.result("t1", "g2", 3, "ok", 0.03))
    assert rig.records["t1"].targets == ("g1", "g1", "g2") and rig.records["t1"].outcome == "ok"


@pytest.mark.parametrize("how", ["timeout", "expired", "death", "link", "publish"])
def test_a_pool_attempt_that_may_have_run_is_never_sent_again(how: str) -> None:
    rig = make(servers=[pooled("g1", "gpu"), pooled("g2", "gpu")], default_timeout=0.5, max_attempts=3)
    rig.take(rig.core.submit("t1", "job", 0, 0.0, pool="gpu"))
    send = rig.sends[-1]
    if how == "expired":
        rig.take(rig.core.result("t1", "g1", 1, "expired", 0.1))
    elif how == "death":  # nobody knows which member took it: its timeout decides
        rig.take(rig.core.state("g1", 1, False, 0.1, live=True))
        rig.take(rig.core.state("g2", 1, False, 0.1, live=True))
        assert "t1" not in rig.records
    elif how == "link":  # our link dropped: the message may or may not have reached a member
        rig.take(rig.core.link_down(0.1))
        rig.take(rig.core.link_up(0.2))
        for node in ("g1", "g2"):
            rig.take(rig.core.heartbeat(pooled(node, "gpu"), 0.3))
    elif how == "publish":
        rig.take(rig.core.publish_failed(send.task, 1, 0.0, not_connected=True, error="offline"))
    rig.advance(10.0)
    record = rig.records["t1"]
    assert len(rig.sends) == 1 and record.attempts == 1 and not rig.local
    expected = {"timeout": "timeout", "expired": "expired", "death": "timeout", "link": "timeout",
                "publish": "failed"}[how]
    assert record.outcome == expected
    if how in ("timeout", "death", "link"):
        assert record.finished == pytest.approx(0.5)  # its one timeout


def test_a_late_result_of_a_timed_out_pool_attempt_is_counted_not_used() -> None:
    rig = make(servers=[pooled("g1", "gpu")], default_timeout=0.5)
    rig.take(rig.core.submit("t1", "job", 0, 0.0, pool="gpu"))
    rig.advance(1.0)
    rig.take(rig.core.result("t1", "g1", 1, "ok", 1.0))
    assert rig.records["t1"].outcome == "timeout" and rig.core.counters["late_results"] == 1


def test_a_pool_with_no_usable_member_fails_the_task_and_views_ignore_the_pool() -> None:
    rig = make(servers=[pooled("g1", "gpu")])
    rig.take(rig.core.submit("t1", "job", 0, 0.0, pool="gpu"))
    assert [view.in_flight for view in rig.core.views(0.0)] == [0]  # the pool is no server row
    assert rig.core.views(0.0)[0].pools == ("gpu",)
    rig.take(rig.core.link_down(0.1))
    rig.take(rig.core.submit("t2", "job", 0, 0.1, pool="gpu"))
    assert rig.records["t2"].outcome == "failed"
    assert rig.records["t2"].error is not None and "not connected" in rig.records["t2"].error
