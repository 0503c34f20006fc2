"""The discrete-event simulator and the shared report: reproducible, lossless, and policies that rank
the way the issue expects on small scenarios."""

from __future__ import annotations

import copy
import csv
import heapq
import math
import random
from collections import Counter
from dataclasses import astuple
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.core import DeviceCore, Send
from edge_agent.servers import ServerEntry, ServerReport, ServerTable
from edge_agent.tuning import Tuning
from sim.cli import main
from sim.des import _Calendar, _Simulation, run_des
from sim.report import (
    OK,
    OUTCOMES,
    UNFINISHED,
    TaskRecord,
    format_table,
    summarize,
    write_plots,
    write_trace_csv,
)
from sim.scenario import Scenario, generate_arrivals, load_scenario, parse_scenario

SCENARIOS = Path(__file__).resolve().parent.parent / "sim" / "scenarios"

SMALL: dict[str, Any] = {
    "name": "small", "duration": 6.0, "seed": 9, "heartbeat_interval": 0.5,
    "tasks": {"detect": {"service_time": 0.02, "variation": 0.3}},
    "devices": [{"name": "cam", "count": 4, "speed": 0.25, "task": "detect", "payload_bytes": 5_000,
                 "deadline": 2.0, "workload": {"kind": "poisson", "rate": 8.0}}],
    "servers": [{"name": "edge", "count": 3, "workers": 2, "queue_size": 16}],
    "links": {"default": {"delay": 0.002, "jitter": 0.0005}},
}


def small(**changes: Any) -> Scenario:
    data = copy.deepcopy(SMALL)
    data.update(changes)
    return parse_scenario(data, "<test>")


def trace(records: list[TaskRecord]) -> list[tuple[object, ...]]:
    return [astuple(record) for record in records]


def assert_one_outcome_each(scenario: Scenario, records: list[TaskRecord]) -> None:
    """Every task the workload created is in the records once, with one final outcome."""
    created = sum(len(generate_arrivals(scenario, node.index)) for node in scenario.device_nodes())
    assert len(records) == created
    assert len({record.task_id for record in records}) == created
    assert all(record.outcome in OUTCOMES and record.outcome != UNFINISHED for record in records)
    assert all(1 <= record.attempts <= scenario.max_attempts for record in records
               if record.outcome not in ("no-option",))
    for record in records:
        if record.outcome == OK:
            assert record.received is not None and record.finished is not None
            assert record.created <= record.decided <= record.received  # type: ignore[operator]
            assert record.finished <= record.received


def test_same_seed_same_trace_other_seed_other_trace() -> None:
    scenario = small()
    first = run_des(scenario, "ect")
    again = run_des(scenario, "ect")
    assert trace(first.records) == trace(again.records)
    assert first.queue_series == again.queue_series and first.counters == again.counters
    other = run_des(scenario, "ect", seed=10)
    assert trace(other.records) != trace(first.records)
    # Every policy sees the same tasks: same ids and creation times.
    random_run = run_des(scenario, "random")
    assert [(r.task_id, r.created) for r in random_run.records] == [(r.task_id, r.created)
                                                                    for r in first.records]


def test_crash_scenario_loses_no_task() -> None:
    scenario = load_scenario(SCENARIOS / "server_crash.toml")
    for policy in ("ect", "min_rtt", "random"):
        result = run_des(scenario, policy)
        assert_one_outcome_each(scenario, result.records)
        assert result.counters["crashed_servers"] == 1
        # The crashed server took work down with it, the devices noticed by timing out, and retried.
        assert result.counters.get("sent_to_dead_server", 0) + result.counters.get("lost_in_crash", 0) > 0
        assert result.counters["timeouts"] > 0 and result.counters["retries"] > 0
        retried = [r for r in result.records if r.attempts > 1]
        assert retried and all(r.target != "near-0" for r in retried if r.outcome == OK)
        last_heartbeat = max(t for t, server, _, _ in result.queue_series if server == "near-0")
        assert 4.5 <= last_heartbeat < 5.0
        assert sum(r.outcome == OK for r in result.records) >= 0.95 * len(result.records)


def test_lossy_links_and_a_slowdown_still_give_one_outcome_each() -> None:
    scenario = small(links={"default": {"delay": 0.002, "jitter": 0.001, "loss": 0.15}},
                     events=[{"kind": "slowdown", "at": 2.0, "server": "edge-1", "factor": 20.0},
                             {"kind": "link", "at": 3.0, "devices": "cam", "servers": "edge",
                              "delay": 0.02, "loss": 0.3}],
                     max_attempts=4)
    result = run_des(scenario, "ect")
    assert_one_outcome_each(scenario, result.records)
    assert result.counters["lost_task_messages"] > 0 and result.counters["lost_result_messages"] > 0
    assert Counter(r.outcome for r in result.records)[OK] > 0.6 * len(result.records)


def test_ect_beats_local_and_random_on_p95() -> None:
    scenario = load_scenario(SCENARIOS / "near_overloaded.toml")
    p95 = {policy: summarize(run_des(scenario, policy).records).p95
           for policy in ("local", "random", "min_rtt", "ect")}
    assert p95["ect"] is not None
    assert p95["ect"] * 2 < p95["local"]  # type: ignore[operator]
    assert p95["ect"] * 2 < p95["random"]  # type: ignore[operator]
    assert p95["ect"] * 10 < p95["min_rtt"]  # type: ignore[operator]  # the near server is a trap


def test_herding_power_of_choices_beats_always_the_minimum() -> None:
    scenario = load_scenario(SCENARIOS / "herding.toml")
    always_min = run_des(scenario, "remote", config=scenario.policy_config(spread_k=1), label="min")
    ect = run_des(scenario, "ect")
    herd, spread_summary = summarize(always_min.records), summarize(ect.records)
    assert max(spread_summary.share_by_server.values()) < 0.4
    assert herd.p95 is not None and spread_summary.p95 is not None
    assert herd.p95 > 1.05 * spread_summary.p95
    # Queues seen at heartbeats: ect's tries of servers its evidence says little about may find one task
    # waiting (seed 1: once in 15 heartbeats), never a herd's pile.
    assert max(q for _, _, q, _ in always_min.queue_series) + 1 >= max(q for _, _, q, _ in ect.queue_series)


def test_threshold_policy_of_the_old_proxy() -> None:
    scenario = load_scenario(SCENARIOS / "old_proxy.toml")
    threshold = summarize(run_des(scenario, "threshold").records)
    local_run = run_des(scenario, "local")
    local = summarize(local_run.records)
    # ~330 requests/s on a device that serves 125/s: its bounded local queue overflows to the servers,
    # as the edge agent does, and nothing is lost.
    assert local_run.counters["local_full"] > 0 and 0.2 < local.share_local < 0.8
    assert_one_outcome_each(scenario, local_run.records)
    # The first ~25 requests of the window run locally, then the rule offloads the rest.
    assert 0.0 < threshold.share_local < 0.1
    assert threshold.p95 * 10 < local.p95  # type: ignore[operator]


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown policy 'fast'"):
        run_des(small(), "fast")


def test_summary_numbers_on_hand_made_records() -> None:
    def record(i: int, device: str, target: str | None, latency: float | None, outcome: str = OK,
               attempts: int = 1) -> TaskRecord:
        return TaskRecord(f"t{i}", device, "detect", float(i), "ect", deadline=float(i) + 0.5,
                          decided=float(i), received=None if latency is None else i + latency,
                          finished=None if latency is None else i + latency, target=target,
                          outcome=outcome, attempts=attempts)

    records = [record(0, "a", None, 0.1), record(1, "a", "s1", 0.2), record(2, "a", "s1", 0.3),
               record(3, "b", "s2", 0.9), record(4, "b", None, None, "timeout", attempts=3)]
    summary = summarize(records, duration=10.0)
    assert (summary.tasks, summary.completed, summary.failed) == (5, 4, {"timeout": 1})
    assert summary.deadline_misses == 2          # 0.9 s late, and the timeout
    assert summary.p50 == pytest.approx(0.2) and summary.p99 == pytest.approx(0.9)
    assert summary.throughput == pytest.approx(0.4)
    assert summary.share_local == pytest.approx(0.25)
    assert summary.share_by_server == {"s1": 0.5, "s2": 0.25}
    assert summary.switch_rate == pytest.approx(2 / 3)   # a: local->s1, s1->s1; b: s2->local
    assert summary.retries == 2
    table = format_table([summary])
    assert "ect" in table and "timeout 1" in table and "200.0" in table


def test_trace_csv_and_plots(tmp_path: Path) -> None:
    scenario = small(duration=3.0)
    results = [run_des(scenario, "ect"), run_des(scenario, "local")]
    rows = write_trace_csv([r for result in results for r in result.records], tmp_path / "trace.csv")
    with (tmp_path / "trace.csv").open() as handle:
        parsed = list(csv.DictReader(handle))
    assert rows == len(parsed) == sum(len(result.records) for result in results)
    assert {"created", "decided", "sent", "started", "finished", "received", "target", "policy", "reason",
            "outcome", "attempts"} <= set(parsed[0])
    assert {row["target"] for row in parsed if row["policy"] == "local"} == {"local"}
    paths = write_plots(results, tmp_path / "plots")
    assert sorted(path.name for path in paths) == [
        "latency_cdf.png", "local_throughput.png", "server_queues.png", "tasks_per_target.png"]
    assert all(path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for path in paths)


def test_cli_entry(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["run", str(SCENARIOS / "old_proxy.toml"), "--mode", "des", "--policies",
                   "threshold,ect", "--out", str(tmp_path / "run"), "--quiet"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "threshold" in captured.out and "ect" in captured.out and "p95 ms" in captured.out
    assert {path.name for path in (tmp_path / "run").iterdir()} >= {
        "trace.csv", "summary.txt", "server_queues.csv", "latency_cdf.png"}

    assert main(["run", str(SCENARIOS / "old_proxy.toml"), "--mode", "des", "--policies", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown policy 'nope'" in err
    bad = tmp_path / "bad.toml"
    bad.write_text("duration = -1\n")
    assert main(["run", str(bad), "--mode", "des"]) == 2
    err = capsys.readouterr().err
    assert "bad.toml: " in err and err.count("\n") == 1


# --- the simulator's fast paths give what the shared code gives ---------------------------------------

FLEETS = st.fixed_dictionaries({
    "loss": st.sampled_from([0.0, 0.05, 0.3]),
    "jitter": st.sampled_from([0.0, 0.002]),
    "workers": st.integers(1, 3),
    "queue_size": st.integers(0, 4),
    "deadline": st.sampled_from([None, 0.05, 0.4]),
    "capable": st.booleans(),
    "crash": st.sampled_from([None, True, False]),
    "policy": st.sampled_from(["ect", "random", "local", "oracle"]),
    "seed": st.integers(1, 50),
})


@settings(max_examples=25, deadline=None)
@given(fleet=FLEETS)
def test_held_timers_change_nothing(fleet: dict[str, Any]) -> None:
    """Holding an attempt's timer until the simulation cannot promise an answer before it gives the
    very trace of queueing every timer at once."""
    devices: dict[str, Any] = {"name": "cam", "count": 3, "speed": 0.5, "task": "detect",
                               "payload_bytes": 20_000, "capable": fleet["capable"],
                               "local_queue_size": 2, "workload": {"kind": "poisson", "rate": 15.0}}
    if fleet["deadline"] is not None:
        devices["deadline"] = fleet["deadline"]
    events = [] if fleet["crash"] is None else [
        {"kind": "crash", "at": 0.8, "server": "edge-0", "will": fleet["crash"]}]
    scenario = small(duration=2.0, seed=fleet["seed"], devices=[devices], events=events,
                     servers=[{"name": "edge", "count": 2, "workers": fleet["workers"],
                               "queue_size": fleet["queue_size"]}],
                     links={"default": {"delay": 0.003, "jitter": fleet["jitter"], "loss": fleet["loss"],
                                        "bandwidth": 2e6}})
    held = run_des(scenario, fleet["policy"])
    try:
        _Simulation.hold_timers = False
        queued = run_des(scenario, fleet["policy"])
    finally:
        _Simulation.hold_timers = True
    assert trace(held.records) == trace(queued.records)
    assert held.events <= queued.events


def _offload_script(draw: st.DrawFn) -> list[tuple[str, int, float]]:
    return draw(st.lists(st.tuples(st.sampled_from(["beat", "pong", "submit", "answer", "time"]),
                                   st.integers(0, 2), st.floats(0.0, 1.5)), max_size=40))


@settings(max_examples=60, deadline=None)
@given(script=st.composite(_offload_script)(), seed=st.integers(0, 5))
def test_devices_sharing_one_heartbeat_view_decide_as_with_their_own(
        script: list[tuple[str, int, float]], seed: int) -> None:
    """The simulator feeds each server's heartbeats and pongs once into an entry that the devices of a
    group share; a device with a table of its own, fed the same messages at the same times, takes
    the same decisions and arms the same timers (and a second device on the entries changes nothing)."""
    nodes = ("s0", "s1", "s2")

    def core(table: ServerTable | None) -> DeviceCore:
        made = DeviceCore("dev", local_tasks={"detect"}, rng=random.Random(seed), table=table, probes=False,
                          watchdog=False, tuning=Tuning(default_timeout=0.3))
        made.link_up(0.0)
        return made

    own = core(None)
    entries = {node: ServerEntry(node) for node in nodes}
    shared_tables = []
    for _ in range(2):
        table = ServerTable()
        for node in nodes:
            table.adopt(entries[node])
        shared_tables.append(table)
    shared, neighbour = core(shared_tables[0]), core(shared_tables[1])
    seqs = dict.fromkeys(nodes, 0)
    sent: list[tuple[str, str, int]] = []
    now = 0.0
    script = [("beat", index, 0.0) for index in range(len(nodes))] + script  # in the entries' order

    def shape(actions: list[Any]) -> list[tuple[Any, ...]]:
        return [(type(a).__name__, getattr(a, "server", None), getattr(a, "attempt", None),
                 getattr(a, "at", None), getattr(getattr(a, "timer", None), "at", None)) for a in actions]

    for number, (kind, which, value) in enumerate(script):
        node = nodes[which]
        if kind == "time":
            now += value
        elif kind == "beat":
            seqs[node] += 1
            report = ServerReport(node, 1, seqs[node], 1.0, frozenset({"detect"}),
                                  queue_length=int(value * 4), workers=2,
                                  service_time={"detect": 0.005 + value / 100})
            assert shape(own.heartbeat(report, now)) == []
            entries[node].on_report(report, now)
        elif kind == "pong":
            for table in (own.table, shared_tables[0]):
                table.ping_sent(node, number, now)
            sample = now + value / 100
            assert own.pong(node, number, now, sample) == entries[node].on_pong(number, now, sample)
        elif kind == "submit":
            mine = own.submit(f"t{number}", "detect", 5_000, now, deadline=1.0)
            theirs = shared.submit(f"t{number}", "detect", 5_000, now, deadline=1.0)
            neighbour.submit(f"t{number}", "detect", 5_000, now, deadline=1.0)
            assert shape(mine) == shape(theirs)
            sent += [(f"t{number}", a.server, a.attempt) for a in mine if isinstance(a, Send)]
        elif kind == "answer" and sent:
            task_id, server, attempt = sent[which % len(sent)]
            status = "ok" if value < 1.0 else "rejected-busy"
            assert shape(own.result(task_id, server, attempt, status, now)) == shape(
                shared.result(task_id, server, attempt, status, now))
    assert own.views(now) == shared.views(now)


@settings(max_examples=200, deadline=None)
@given(script=st.lists(st.one_of(st.sampled_from([0.0, 0.25, 0.5, 1.0, 1.75, 3.0]), st.floats(0.0, 4.0),
                                 st.none()), max_size=60),
       width=st.sampled_from([0.001, 0.3, 1.0, 10.0, math.inf]))
def test_the_arrivals_calendar_pops_in_the_order_of_one_heap(script: list[float | None],
                                                             width: float) -> None:
    """The arrivals' queue keeps only its earliest slice as a heap; pushed and popped in any order
    (``None``: a pop), it gives every entry when one heap would, ties broken by the sequence."""
    calendar = _Calendar(width)
    heap: list[tuple[float, int, int, Any, Any]] = []
    taken: list[tuple[float, int, int, Any, Any]] = []
    expected: list[tuple[float, int, int, Any, Any]] = []
    for sequence, step in enumerate(script):
        if step is not None:
            entry = (step, sequence, 0, None, 0)
            calendar.push(entry)
            heapq.heappush(heap, entry)
        elif heap:
            expected.append(heapq.heappop(heap))
            if not calendar.heap:
                calendar.advance()
            taken.append(heapq.heappop(calendar.heap))
    while heap:
        expected.append(heapq.heappop(heap))
        if not calendar.heap:
            calendar.advance()
        taken.append(heapq.heappop(calendar.heap))
    assert taken == expected and not calendar.slices


@settings(max_examples=15, deadline=None)
@given(workload=st.sampled_from([{"kind": "poisson", "rate": 20.0}, {"kind": "fps", "fps": 16.0},
                                 {"kind": "bursts", "burst_size": 4, "interval": 0.3, "spacing": 0.0},
                                 {"kind": "uniform", "min_gap": 0.0, "max_gap": 0.1}]),
       width=st.sampled_from([0.0005, 0.05, math.inf]), policy=st.sampled_from(["ect", "random", "oracle"]),
       seed=st.integers(1, 50))
def test_the_arrivals_slice_width_changes_nothing(workload: dict[str, Any], width: float, policy: str,
                                                  seed: int) -> None:
    """Arrivals in a queue of their own, sliced at any width, give the trace of the default slices."""
    devices = [{"name": "cam", "count": 5, "speed": 0.5, "task": "detect", "payload_bytes": 5_000,
                "deadline": 0.3, "workload": workload}]
    scenario = small(duration=1.5, seed=seed, devices=devices)
    default = run_des(scenario, policy)
    try:
        _Simulation.slice_width = width
        sliced = run_des(scenario, policy)
    finally:
        _Simulation.slice_width = None
    assert trace(default.records) == trace(sliced.records) and default.events == sliced.events


def test_message_delay_is_paid_by_each_task_and_result() -> None:
    """Each offloaded attempt's task and result message take ``message_delay`` on top of the link."""
    def round_trips(message_delay: float) -> list[float]:
        records = run_des(small(message_delay=message_delay), "remote").records
        return [r.received - r.sent for r in records  # type: ignore[operator]
                if r.outcome == OK and r.target is not None and r.attempts == 1]

    quick, slow = round_trips(0.0), round_trips(0.05)
    assert quick and slow
    assert min(slow) >= 2 * 0.05 > max(quick)


def test_work_comes_back_to_a_server_that_recovered_from_a_slowdown() -> None:
    # The fast server is 10x slower from 5 s to 12 s: devices leave it, and once it is fast again its
    # aged evidence gets it tried, its report follows the first new run, and the work comes back.
    scenario = load_scenario(SCENARIOS / "adversarial" / "server_slowdown.toml")
    records = run_des(scenario, "ect", seed=1).records

    def share(start: float, end: float) -> float:
        window = [record for record in records if start <= record.created < end]
        return sum(record.target == "fast-0" for record in window) / len(window)

    assert share(1.0, 5.0) > 0.9 and share(6.0, 12.0) < 0.1
    assert share(15.0, 20.0) > 0.5
