"""The pure decision policy, one story per test with fixed numbers."""

from __future__ import annotations

import random
from collections import Counter

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
    # 20 ms service, one recent failure at 0.5 s.
    server = ServerInfo("a", rtt=0.002, bandwidth=10e6, queue_length=2, in_flight=1, sent_since_report=1,
                        workers=2, service_time=0.020, recent_failures=1.0)
    expected = 0.002 + 0.1 + 2.5 * 0.020 / 2 + 0.020 + 0.5
    assert server_ect(TaskInfo("t", 1_000_000), server) == pytest.approx(expected)
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


def test_hysteresis_holds_under_jitter_and_yields_to_a_clear_gain() -> None:
    jitter = random.Random(7)
    config = PolicyConfig(spread_k=1)
    b = ServerInfo("b", rtt=0.002, service_time=0.010)
    for _ in range(100):
        a = ServerInfo("a", rtt=0.002 + jitter.uniform(0.0, 0.0004), service_time=0.010)
        decision = run("ect", [a, b], previous="a", config=config)
        assert (decision.target, decision.reason) == ("a", "keep-previous")
    # Without a previous choice the same numbers pick the lower estimate.
    assert run("ect", [ServerInfo("a", rtt=0.0024, service_time=0.010), b], config=config).target == "b"
    # A clear gain (a now has 3 tasks queued: +35 ms) moves the device off its previous server.
    busy_a = ServerInfo("a", rtt=0.002, queue_length=3, service_time=0.010)
    assert (run("ect", [busy_a, b], previous="a", config=config).target) == "b"
    # Hysteresis toward local works the same way, labelled LOCAL.
    local = LocalInfo(capable=True, service_time=0.0125)
    kept = run("ect", [b], local=local, previous=LOCAL, config=config)
    assert (kept.target, kept.reason) == (None, "keep-previous")


def test_deadline_drops_an_option() -> None:
    # Local takes 50 ms, the server 12 ms plus 2 ms of round trip: a 30 ms deadline leaves only the server
    # even though local was the previous choice and hysteresis would otherwise keep it.
    local = LocalInfo(capable=True, service_time=0.050)
    server = ServerInfo("s", rtt=0.002, service_time=0.012)
    decision = run("ect", [server], local=local, previous=LOCAL, task=TaskInfo("t", 0, time_left=0.030),
                   config=PolicyConfig(hysteresis=5.0))
    assert (decision.target, decision.reason, decision.feasible) == ("s", "deadline", True)
    assert decision.estimate(LOCAL) == pytest.approx(0.050)
    # Near-equal servers are only spread over when both can meet the deadline.
    a = ServerInfo("a", rtt=0.002, service_time=0.026)
    b = ServerInfo("b", rtt=0.002, service_time=0.030)
    tight = TaskInfo("t", 0, time_left=0.030)
    assert {run("ect", [a, b], task=tight, seed=seed).target for seed in range(50)} == {"a"}
    assert {run("ect", [a, b], seed=seed).target for seed in range(50)} == {"a", "b"}
    # Nothing can make it: the best option anyway, flagged infeasible.
    hopeless = run("ect", [a, b], local=local, task=TaskInfo("t", 0, time_left=0.001))
    assert (hopeless.target, hopeless.reason, hopeless.feasible) == ("a", "deadline", False)


def test_spreading_among_near_equal_servers() -> None:
    a = ServerInfo("a", rtt=0.002, service_time=0.010)      # 12.08 ms
    b = ServerInfo("b", rtt=0.0025, service_time=0.010)     # 12.58 ms: within 15 %
    c = ServerInfo("c", rtt=0.002, service_time=0.030)      # 32 ms: never near-equal
    counts = Counter(run("ect", [a, b, c], seed=seed).target for seed in range(1000))
    assert counts["c"] == 0
    assert 400 <= counts["a"] <= 600 and counts["a"] + counts["b"] == 1000
    assert run("ect", [a, b, c], seed=3).reason == "spread"
    always_min = Counter(run("ect", [a, b, c], seed=seed, config=PolicyConfig(spread_k=1)).target
                         for seed in range(200))
    assert always_min == Counter({"a": 200})
    wider = Counter(run("ect", [a, b, c], seed=seed, config=PolicyConfig(spread_k=3, near_equal=2.0)).target
                    for seed in range(900))
    assert min(wider.values()) >= 200 and set(wider) == {"a", "b", "c"}


def test_reports_since_heartbeat_and_failures_push_devices_away() -> None:
    # Both servers reported idle, but this device already sent 4 tasks to a since that report.
    a = ServerInfo("a", rtt=0.002, service_time=0.010, sent_since_report=4)
    b = ServerInfo("b", rtt=0.003, service_time=0.010)
    assert run("ect", [a, b]).target == "b"
    failing = ServerInfo("a", rtt=0.001, service_time=0.010, recent_failures=0.5)
    assert run("ect", [failing, b]).target == "b"


def test_unmeasured_server_gets_tried() -> None:
    measured = ServerInfo("old", rtt=0.020, service_time=0.010)
    new = ServerInfo("new", rtt=None, service_time=None)   # default 5 ms rtt and 10 ms service
    decision = run("ect", [measured, new])
    assert decision.target == "new"
    assert decision.estimate("new") == pytest.approx(0.005 + 1_000 / 12.5e6 + 0.010)


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
    recent_failures=st.floats(0.0, 5.0),
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
    task = TaskInfo("t", payload)
    decision = decide("ect", task, NO_LOCAL, servers, now=0.0, rng=random.Random(0), allow_local=False)
    estimates = dict(decision.estimates)
    for server in servers:
        if server.capable and not server.stale:
            assert estimates[server.node] == pytest.approx(server_ect(task, server), rel=1e-12)
