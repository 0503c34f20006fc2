"""The pure decision policy, one story per test with fixed numbers."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import overload

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.policy import (
    DEFAULT_POLICY_CONFIG,
    LOCAL,
    POLICIES,
    Decision,
    LocalInfo,
    PolicyConfig,
    ServerInfo,
    TaskInfo,
    UnknownPolicyError,
    check_policy,
    decide,
    local_ect,
    server_ect,
)

TASK = TaskInfo("detect", payload_bytes=1_000)
NO_LOCAL = LocalInfo(capable=False)


def run(policy: str, servers: list[ServerInfo], *, local: LocalInfo = NO_LOCAL, task: TaskInfo = TASK,
        seed: int = 0, previous: str | None = None, exclude: frozenset[str] = frozenset(),
        allow_local: bool = True, config: PolicyConfig = DEFAULT_POLICY_CONFIG) -> Decision:
    return decide(policy, task, local, servers, now=100.0, rng=random.Random(seed), previous=previous,
                  exclude=exclude, allow_local=allow_local, config=config)


def test_ect_formula_with_fixed_numbers() -> None:
    # 2 ms rtt, 1 MB at 10 MB/s = 100 ms, 3 queued + 1 running on 2 workers: (4 - 2 + 0.5) * 20 ms / 2,
    # 20 ms service; a recent failure costs nothing by default, 0.5 s with the old penalty.
    server = ServerInfo("a", rtt=0.002, bandwidth=10e6, queue_length=2, in_flight=1, sent_since_report=1,
                        workers=2, service_time=0.020, recent_failures=1.0)
    task = TaskInfo("t", 1_000_000)
    expected = 0.002 + 0.1 + 2.5 * 0.020 / 2 + 0.020
    assert server_ect(task, server) == pytest.approx(expected)
    assert server_ect(task, server, PolicyConfig(failure_penalty=0.5)) == pytest.approx(expected + 0.5)
    # The device's own send backlog delays the payload: 30 ms more.
    assert server_ect(TaskInfo("t", 1_000_000, backlog=0.030), server) == pytest.approx(expected + 0.030)
    # An answer newer than the report measured 8 ms of queue wait, and 2 attempts are unanswered.
    fresh = dataclasses.replace(server, queue_wait=0.008, outstanding=2)
    assert server_ect(task, fresh) == pytest.approx(0.002 + 0.1 + 0.008 + 2 * 0.020 / 2 + 0.020)
    # A busy answer is load: a full queue ahead (64 reported; else busy_tasks per worker), in proportion.
    full = dataclasses.replace(server, busy=1.0, queue_capacity=64)
    assert server_ect(task, full) == pytest.approx(expected + 64 * 0.020 / 2)
    half = dataclasses.replace(server, busy=0.5)
    assert server_ect(task, half) == pytest.approx(expected + 0.5 * 4 * 2 * 0.020 / 2)
    # A timeout is uncertainty: doubt leaves the mean alone.
    assert server_ect(task, dataclasses.replace(server, doubt=0.3)) == pytest.approx(expected)
    # Idle device with one worker: just the service time; one running: half of it more.
    assert local_ect(LocalInfo(capable=True, service_time=0.03)) == pytest.approx(0.03)
    assert local_ect(LocalInfo(capable=True, in_flight=1, service_time=0.03)) == pytest.approx(0.045)


def test_nearest_server_is_the_most_loaded_ect_avoids_it_min_rtt_falls_in() -> None:
    near = ServerInfo("near", rtt=0.001, queue_length=10, in_flight=1, service_time=0.010)
    far = ServerInfo("far", rtt=0.008, queue_length=0, service_time=0.010)
    ect = run("ect", [near, far])
    assert (ect.target, ect.reason) == ("far", "lowest-ect")
    assert [name for name, _ in ect.estimates] == ["far", "near"]
    assert ect.estimate("far") == pytest.approx(0.008 + 1_000 / 12.5e6 + 0.010)
    assert ect.estimate("near") == pytest.approx(0.001 + 1_000 / 12.5e6 + 10.5 * 0.010 + 0.010)
    min_rtt = run("min_rtt", [near, far])
    assert (min_rtt.target, min_rtt.reason) == ("near", "min-rtt")


def test_stale_server_is_skipped_and_all_stale_falls_back_to_local() -> None:
    stale = ServerInfo("fast-but-dead", rtt=0.0005, service_time=0.001, stale=True)
    alive = ServerInfo("alive", rtt=0.004, service_time=0.010)
    for policy in ("ect", "remote", "random", "min_rtt"):
        assert run(policy, [stale, alive]).target == "alive", policy
    local = LocalInfo(capable=True, service_time=0.050)
    fallback = run("remote", [stale], local=local)
    assert (fallback.target, fallback.reason, fallback.feasible) == (None, "stale", True)
    assert run("remote", [], local=local).reason == "no-server"


def test_hysteresis_of_remote_holds_under_jitter_and_yields_to_a_clear_gain() -> None:
    jitter = random.Random(7)
    config = PolicyConfig(spread_k=1)
    b = ServerInfo("b", rtt=0.002, service_time=0.010)
    for _ in range(100):
        a = ServerInfo("a", rtt=0.002 + jitter.uniform(0.0, 0.0004), service_time=0.010)
        decision = run("remote", [a, b], previous="a", config=config)
        assert (decision.target, decision.reason) == ("a", "keep-previous")
    # Without a previous choice the same numbers pick the lower estimate.
    assert run("remote", [ServerInfo("a", rtt=0.0024, service_time=0.010), b], config=config).target == "b"
    # A clear gain (a now has 3 tasks queued: +35 ms) moves the device off its previous server.
    busy_a = ServerInfo("a", rtt=0.002, queue_length=3, service_time=0.010)
    assert (run("remote", [busy_a, b], previous="a", config=config).target) == "b"


def test_deadline_drops_an_option() -> None:
    # Local takes 50 ms, the server 12 ms plus 2 ms of round trip: a 30 ms deadline leaves only the server
    # even though local was the previous choice.
    local = LocalInfo(capable=True, service_time=0.050)
    server = ServerInfo("s", rtt=0.002, service_time=0.012)
    decision = run("ect", [server], local=local, previous=LOCAL, task=TaskInfo("t", 0, time_left=0.030))
    assert (decision.target, decision.reason, decision.feasible) == ("s", "deadline", True)
    assert decision.estimate(LOCAL) == pytest.approx(0.050)
    # Nothing can make it: an option anyway, flagged infeasible.
    a = ServerInfo("a", rtt=0.002, service_time=0.026)
    hopeless = run("ect", [a], local=local, task=TaskInfo("t", 0, time_left=0.001))
    assert (hopeless.reason, hopeless.feasible) == ("deadline", False)


def test_remote_spreads_among_near_equal_servers() -> None:
    a = ServerInfo("a", rtt=0.002, service_time=0.010)      # 12.08 ms
    b = ServerInfo("b", rtt=0.0025, service_time=0.010)     # 12.58 ms: within 15 %
    c = ServerInfo("c", rtt=0.002, service_time=0.030)      # 32 ms: never near-equal
    counts = Counter(run("remote", [a, b, c], seed=seed).target for seed in range(1000))
    assert counts["c"] == 0
    assert 400 <= counts["a"] <= 600 and counts["a"] + counts["b"] == 1000
    assert run("remote", [a, b, c], seed=3).reason == "spread"
    always_min = Counter(run("remote", [a, b, c], seed=seed, config=PolicyConfig(spread_k=1)).target
                         for seed in range(200))
    assert always_min == Counter({"a": 200})


def test_reports_since_heartbeat_and_failures_push_devices_away() -> None:
    # Both servers reported idle, but this device already sent 4 tasks to a since that report.
    a = ServerInfo("a", rtt=0.002, service_time=0.010, sent_since_report=4)
    b = ServerInfo("b", rtt=0.003, service_time=0.010)
    assert run("ect", [a, b]).target == "b"
    # A busy answer (load) and a timeout (doubt) push the device away too, without banning the server.
    busy = ServerInfo("a", rtt=0.001, service_time=0.010, busy=0.5)
    doubtful = ServerInfo("a", rtt=0.001, service_time=0.010, doubt=0.2)
    for failing in (busy, doubtful):
        assert {run("ect", [failing, b], seed=seed).target for seed in range(50)} == {"b"}
        assert run("ect", [failing], seed=1).target == "a"


def test_unmeasured_server_is_tried_but_not_trusted() -> None:
    measured = ServerInfo("old", rtt=0.020, service_time=0.010)
    new = ServerInfo("new", rtt=None, service_time=None)   # default 5 ms rtt, "old"'s 10 ms service
    picks = Counter(run("ect", [measured, new], seed=seed).target for seed in range(400))
    # Explored, as a draw from 15 ms +- 55 ms against old's 30 ms: more than a third of the time.
    assert 0.4 < picks["new"] / 400 < 0.8
    decision = run("ect", [measured, new])
    assert decision.estimate("new") == pytest.approx(0.005 + 1_000 / 12.5e6 + 0.010)
    alone = run("ect", [new])                      # nothing known to compare with: the default
    assert alone.estimate("new") == pytest.approx(0.005 + 1_000 / 12.5e6 + 0.050)
    # ... whose quantile (15 ms + 2 x 55 ms of spread) cannot promise a 100 ms deadline.
    tight = TaskInfo("t", 1_000, time_left=0.100)
    assert {run("ect", [measured, new], task=tight, seed=seed).target for seed in range(50)} == {"old"}


def test_rank_counts_a_jittery_option_by_its_tail() -> None:
    # Same 30 ms mean; "jittery" deviates by 10 ms (its answers), "steady" by 1 ms: ranked on
    # mean + deviation +- the draw, the steady one is chosen mostly, and always without the draw.
    steady = ServerInfo("steady", rtt=0.010, rtt_dev=0.001, service_time=0.020)
    jittery = ServerInfo("jittery", rtt=0.010, error_dev=0.010, service_time=0.020)
    picks = Counter(run("ect", [steady, jittery], seed=seed).target for seed in range(400))
    assert picks["steady"] > 0.7 * 400 and picks["jittery"] > 0   # still drawn now and then
    flat = PolicyConfig(explore=0.0)
    assert {run("ect", [jittery, steady], seed=seed, config=flat).target for seed in range(20)} == {"steady"}
    # Without the tail (tail = 0) and the draw the two tie on the mean: table order decides.
    assert run("ect", [jittery, steady], config=PolicyConfig(explore=0.0, tail=0.0)).target == "jittery"


def test_threshold_rule_of_the_old_proxy() -> None:
    server = ServerInfo("s", rtt=0.002, service_time=0.005)
    slow = LocalInfo(capable=True, service_time=0.040, rate=20.0)
    under = run("threshold", [server], local=slow)
    assert (under.target, under.reason) == (None, "under-threshold")
    over = run("threshold", [server], local=LocalInfo(capable=True, service_time=0.040, rate=30.0))
    assert (over.target, over.reason) == ("s", "over-threshold")
    assert run("threshold", [server], local=NO_LOCAL).reason == "local-incapable"
    assert run("threshold", [server], local=slow, config=PolicyConfig(threshold_rate=10.0)).target == "s"


def test_local_remote_and_random_policies() -> None:
    servers = [ServerInfo(f"s{i}", rtt=0.002 * (i + 1), service_time=0.010) for i in range(4)]
    idle = LocalInfo(capable=True, service_time=0.500)
    assert run("local", servers, local=idle).reason == "always-local"
    assert run("local", servers).target == "s0"   # not registered locally: best server instead
    assert run("remote", servers, local=idle, config=PolicyConfig(spread_k=1)).target == "s0"
    assert run("ect", servers, local=LocalInfo(capable=True, service_time=0.001)).target is None
    picks = Counter(run("random", servers, seed=seed).target for seed in range(800))
    assert set(picks) == {"s0", "s1", "s2", "s3"} and min(picks.values()) >= 140


def test_unknown_policy_name() -> None:
    with pytest.raises(UnknownPolicyError) as info:
        run("fastest", [])
    assert "fastest" in str(info.value) and all(name in str(info.value) for name in POLICIES)
    assert check_policy("ect") == "ect"
    with pytest.raises(UnknownPolicyError):
        check_policy("ECT")


def test_no_option_at_all() -> None:
    servers = [ServerInfo("dead", stale=True), ServerInfo("other", capable=False)]
    for policy in POLICIES:
        decision = run(policy, servers)
        assert (decision.target, decision.reason, decision.feasible) == (None, "no-option", False)
    assert run("ect", [ServerInfo("s")], allow_local=False, exclude=frozenset({"s"})).reason == "no-option"


def test_exclude_moves_a_retry_to_the_next_best_option() -> None:
    servers = [ServerInfo("a", rtt=0.001, service_time=0.010), ServerInfo("b", rtt=0.004, service_time=0.010)]
    local = LocalInfo(capable=True, service_time=0.100)
    assert run("ect", servers, local=local, config=PolicyConfig(spread_k=1)).target == "a"
    retry = run("ect", servers, local=local, exclude=frozenset({"a"}))
    assert retry.target == "b" and "a" not in dict(retry.estimates)
    assert run("ect", servers, local=local, exclude=frozenset({"a", "b"})).target is None
    assert run("remote", servers, local=local, exclude=frozenset({"a", "b"})).reason == "no-server"


def test_bad_inputs_raise_typed_errors() -> None:
    with pytest.raises(ValueError, match="spread_k"):
        PolicyConfig(spread_k=0)
    with pytest.raises(ValueError, match="payload_bytes"):
        TaskInfo("t", -1)


server_rows = st.builds(
    ServerInfo,
    node=st.sampled_from([f"s{i}" for i in range(8)]),
    capable=st.booleans(), stale=st.booleans(),
    rtt=st.none() | st.floats(0.0, 0.5), rtt_dev=st.floats(0.0, 0.1),
    bandwidth=st.none() | st.floats(1e3, 1e9),
    queue_length=st.integers(0, 50), in_flight=st.integers(0, 8), workers=st.integers(0, 8),
    service_time=st.none() | st.floats(0.0, 1.0), sent_since_report=st.integers(0, 10),
    recent_failures=st.floats(0.0, 5.0), queue_capacity=st.integers(0, 64), outstanding=st.integers(0, 5),
    queue_wait=st.none() | st.floats(0.0, 0.5), error_dev=st.floats(0.0, 0.1), busy=st.floats(0.0, 3.0),
    doubt=st.floats(0.0, 2.0), latency=st.none() | st.floats(0.0, 1.0),
)


@settings(max_examples=300, deadline=None)
@given(policy=st.sampled_from(POLICIES), servers=st.lists(server_rows, max_size=8),
       local_capable=st.booleans(), rate=st.floats(0.0, 100.0),
       time_left=st.none() | st.floats(-1.0, 2.0), previous=st.none() | st.sampled_from(["s0", "s3", LOCAL]),
       exclude=st.frozensets(st.sampled_from([f"s{i}" for i in range(8)]), max_size=3),
       allow_local=st.booleans(), seed=st.integers(0, 2**32))
def test_never_picks_unusable_and_is_deterministic(
        policy: str, servers: list[ServerInfo], local_capable: bool, rate: float, time_left: float | None,
        previous: str | None, exclude: frozenset[str], allow_local: bool, seed: int) -> None:
    task = TaskInfo("t", 5_000, time_left=time_left)
    local = LocalInfo(capable=local_capable, queue_length=2, service_time=0.02, rate=rate)

    def once() -> Decision:
        return decide(policy, task, local, servers, now=0.0, rng=random.Random(seed), previous=previous,
                      exclude=exclude, allow_local=allow_local)

    decision = once()
    assert decision == once()
    if decision.target is not None:
        usable = [s for s in servers if s.node == decision.target and s.capable and not s.stale]
        assert usable and decision.target not in exclude
    else:
        assert (allow_local and local_capable) or decision.reason == "no-option"
    if decision.reason != "no-option":
        assert (decision.target or LOCAL, decision.expected) in decision.estimates
    labels = [label for label, _ in decision.estimates]
    values = [value for _, value in decision.estimates]
    assert values == sorted(values)
    assert all(label == LOCAL or label not in exclude for label in labels)


@settings(max_examples=200, deadline=None)
@given(servers=st.lists(server_rows, max_size=8, unique_by=lambda server: server.node),
       payload=st.integers(0, 10_000_000))
def test_decision_estimates_are_server_ect(servers: list[ServerInfo], payload: int) -> None:
    task = TaskInfo("t", payload, backlog=0.003)
    for policy in ("ect", "remote"):  # remote: the inlined loop of the policies that read every row
        decision = decide(policy, task, NO_LOCAL, servers, now=0.0, rng=random.Random(0), allow_local=False,
                          config=PolicyConfig(choices=8))
        estimates = dict(decision.estimates)
        usable = [server for server in servers if server.capable and not server.stale]
        known = [server.service_time for server in usable if server.service_time is not None]
        # ect, which draws them all here (choices=8), assumes the shortest known service for unknown ones.
        prior = min(known) if known and policy == "ect" else None
        for server in usable:
            assert estimates[server.node] == pytest.approx(server_ect(task, server, prior=prior), rel=1e-12)


def test_deadline_is_judged_on_a_high_quantile_not_the_mean() -> None:
    # Local averages 70 ms with a 10 ms mean deviation: its mean meets an 80 ms deadline, its quantile
    # (70 + 2 x 10 = 90 ms) does not; a server at a steady 75 ms does.
    local = LocalInfo(capable=True, service_time=0.070, service_dev=0.010)
    server = ServerInfo("s", rtt=0.005, rtt_dev=0.0, service_time=0.070)
    tight = TaskInfo("t", 0, time_left=0.080)
    for seed in range(50):
        decision = run("ect", [server], local=local, task=tight, seed=seed)
        assert (decision.target, decision.reason) == ("s", "deadline")
        assert decision.quantile == pytest.approx(0.075)
    # Without the deadline the rank counts local's tail (70 + 10 ms, +- 10 ms drawn) against the
    # server's steady 75 ms: local wins about a quarter of the time; on the mean (tail 0) mostly.
    loose = Counter(run("ect", [server], local=local, seed=seed).target for seed in range(400))
    assert 0.1 < loose[None] / 400 < 0.4
    mean_only = PolicyConfig(tail=0.0)
    on_mean = Counter(run("ect", [server], local=local, seed=seed, config=mean_only).target
                      for seed in range(400))
    assert 0.6 < on_mean[None] / 400 < 0.9
    # The mean alone (risk 0) would have kept local.
    assert run("ect", [server], local=local, task=tight, config=PolicyConfig(risk=0.0), seed=1).target is None


def test_a_timeout_never_removes_a_server_for_good() -> None:
    # 5 s of doubt: a server that may not answer. With a fine alternative it is avoided under a 1 s
    # deadline; alone, it is still chosen (flagged infeasible), and as the doubt fades it meets it again.
    good = ServerInfo("b", rtt=0.002, service_time=0.010)
    task = TaskInfo("t", 0, time_left=1.0)
    for doubt, feasible in ((5.0, False), (1.0, False), (0.2, True)):
        doubtful = ServerInfo("a", rtt=0.001, service_time=0.010, doubt=doubt)
        assert run("ect", [doubtful, good], task=task).target == "b"
        alone = run("ect", [doubtful], task=task)
        assert (alone.target, alone.feasible) == ("a", feasible)
        assert run("ect", [doubtful, dataclasses.replace(good, stale=True)], task=task).target == "a"


def test_p2c_picks_by_latency_times_requests_in_flight() -> None:
    assert "p2c" in POLICIES
    # a answers in 10 ms but this device has 3 requests in flight there: 10 x 4 = 40 > 20 x 1.
    a = ServerInfo("a", rtt=0.001, service_time=0.005, latency=0.010, outstanding=3)
    b = ServerInfo("b", rtt=0.001, service_time=0.005, latency=0.020)
    decision = run("p2c", [a, b])
    assert (decision.target, decision.reason) == ("b", "p2c")
    assert run("p2c", [dataclasses.replace(a, outstanding=0), b]).target == "a"
    # Of many servers it draws two; the costliest never wins, the cheapest wins whenever drawn.
    servers = [ServerInfo(f"s{i}", rtt=0.001, service_time=0.005, latency=0.010 * (i + 1)) for i in range(10)]
    picks = Counter(run("p2c", servers, seed=seed).target for seed in range(2000))
    assert picks["s9"] == 0 and picks["s0"] == max(picks.values())
    assert 0.13 < picks["s0"] / 2000 < 0.27                 # drawn in 2 of 10: about 1 in 5
    # No latency measured yet: the ECT stands in for it; no usable server: local.
    assert run("p2c", [ServerInfo("x", rtt=0.001, service_time=0.005)]).target == "x"
    local = LocalInfo(capable=True, service_time=0.010)
    assert run("p2c", [], local=local).reason == "no-server"


def test_devices_reading_the_same_stale_table_spread_their_picks() -> None:
    # 1,000 devices, 100 servers, the same (stale) reports: s0 looks idle, every other one has a task
    # queued. Lowest-ECT-over-all would send all 1,000 to s0; power of two choices sends there only the
    # devices that drew it (about 2 %), the rest spread.
    servers = [ServerInfo(f"s{i}", rtt=0.002, service_time=0.010, workers=2,
                          queue_length=0 if i == 0 else 2) for i in range(100)]
    picks = Counter(decide("ect", TASK, NO_LOCAL, servers, now=0.0, rng=random.Random(device)).target
                    for device in range(1000))
    assert picks["s0"] < 60
    assert max(count for node, count in picks.items() if node != "s0") < 40
    assert len(picks) > 80
    always_min = Counter(run("remote", servers, seed=device, config=PolicyConfig(spread_k=1)).target
                         for device in range(100))
    assert always_min == Counter({"s0": 100})


class _Counting(Sequence[ServerInfo]):
    """A server table that counts the rows read."""

    def __init__(self, rows: Iterable[ServerInfo]) -> None:
        self.rows = list(rows)
        self.reads = 0

    def __len__(self) -> int:
        return len(self.rows)

    @overload
    def __getitem__(self, index: int) -> ServerInfo: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[ServerInfo]: ...

    def __getitem__(self, index: int | slice) -> ServerInfo | Sequence[ServerInfo]:
        self.reads += 1
        return self.rows[index]


def test_an_ect_decision_reads_o_d_rows_not_the_whole_table() -> None:
    table = _Counting(ServerInfo(f"s{i}", rtt=0.002, service_time=0.010) for i in range(10_000))
    for seed in range(20):
        table.reads = 0
        decision = decide("ect", TASK, NO_LOCAL, table, now=0.0, rng=random.Random(seed), previous="s7",
                          previous_at=7, config=PolicyConfig(choices=2))
        assert decision.target is not None and len(decision.estimates) == 3   # s7 and two drawn
        assert table.reads < 10


def test_a_local_run_never_timed_is_not_explored_on_hope() -> None:
    # The device has never run the task: assumed the default 50 ms, and ranked with that much caution,
    # so a known 12 ms server is always preferred (each local try would cost a slow run); a server
    # never measured is still explored (its unknown figures widen its draw instead).
    server = ServerInfo("s", rtt=0.002, service_time=0.010)
    untimed = LocalInfo(capable=True)
    assert {run("ect", [server], local=untimed, seed=seed).target for seed in range(200)} == {"s"}
    slow = ServerInfo("s", rtt=0.002, service_time=0.120)
    assert {run("ect", [slow], local=untimed, seed=seed).target for seed in range(50)} == {None}


def test_ect_finds_the_few_usable_servers_of_a_large_table() -> None:
    # 1,000 rows of which 3 can run the task: rejection draws miss them; a scan then finds them.
    table = [ServerInfo(f"s{i}", rtt=0.002, service_time=0.010, capable=i in (5, 500, 995))
             for i in range(1000)]
    picks = {run("ect", table, seed=seed).target for seed in range(60)}
    assert picks == {"s5", "s500", "s995"}


def test_a_server_left_after_a_bad_period_is_drawn_again_as_its_evidence_ages() -> None:
    # "slowed" answered 75 ms during a bad period; "fast" answers in 17 ms and its evidence is fresh.
    fast = ServerInfo("fast", rtt=0.002, service_time=0.015, evidence_at=100.0)

    def share(measured_at: float, config: PolicyConfig = DEFAULT_POLICY_CONFIG) -> float:
        slowed = ServerInfo("slowed", rtt=0.001, service_time=0.075, evidence_at=measured_at)
        picks = [run("ect", [fast, slowed], seed=seed, config=config).target for seed in range(1000)]
        return picks.count("slowed") / len(picks)

    assert share(100.0) == 0.0                      # just measured: its 75 ms stand
    assert share(99.0) == 0.0                       # a second old (half-life 2 s): not yet worth a try
    assert 0.03 < share(90.0) < 0.2                 # ten seconds without a sample: tried now and then
    assert share(90.0, PolicyConfig(evidence_half_life=0.0)) == 0.0  # evidence that never ages: never

    def floored(floor: float) -> float:
        slowed = ServerInfo("slowed", rtt=0.001, service_time=0.075, evidence_at=90.0, service_floor=floor)
        picks = [run("ect", [fast, slowed], seed=seed).target for seed in range(1000)]
        return picks.count("slowed") / len(picks)

    # What it may have gone back to is what its reports showed when it was well: a server that was
    # never faster than now is not worth a try; one that ran in 8 ms before its bad period is.
    assert floored(0.070) == 0.0
    assert 0.03 < floored(0.008) < 0.2
    # The deadline is judged on the same widened spread: an old figure is a risk, not a promise.
    old = ServerInfo("slowed", rtt=0.001, service_time=0.075, evidence_at=90.0)
    fresh = dataclasses.replace(old, evidence_at=100.0)
    assert run("ect", [old], task=dataclasses.replace(TASK, time_left=0.15)).feasible is False
    assert run("ect", [fresh], task=dataclasses.replace(TASK, time_left=0.15)).feasible is True


def test_evidence_half_life_out_of_range_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="evidence_half_life"):
        PolicyConfig(evidence_half_life=-1.0)
