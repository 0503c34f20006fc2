"""Scenario files: validation errors that name the field and the file, and the seeded workload."""

from __future__ import annotations

import copy
import itertools
import statistics
from pathlib import Path
from typing import Any

import pytest

from sim.cli import shipped_scenarios
from sim.scenario import (
    BurstWorkload,
    Scenario,
    ScenarioError,
    device_group,
    generate_arrivals,
    iter_arrivals,
    load_scenario,
    parse_scenario,
)

SCENARIOS = Path(__file__).resolve().parent.parent / "sim" / "scenarios"

BASE: dict[str, Any] = {
    "duration": 10.0,
    "seed": 1,
    "tasks": {"detect": {"service_time": 0.02}},
    "devices": [{"name": "cams", "count": 3, "task": "detect", "workload": {"kind": "poisson", "rate": 5.0}}],
    "servers": [{"name": "edge", "count": 2, "workers": 2}, {"name": "big", "workers": 4}],
}


def scenario_with(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    data.update(changes)
    return data


@pytest.mark.parametrize("path", shipped_scenarios(), ids=lambda path: path.stem)
def test_shipped_scenarios_load(path: Path) -> None:
    scenario = load_scenario(path)
    assert scenario.name == path.stem
    assert scenario.duration <= 30.0, "small enough for the emulation mode on one machine"
    assert sum(group.count for group in scenario.devices) <= 50


def test_the_five_scenarios_of_the_issue_are_shipped() -> None:
    assert {path.stem for path in shipped_scenarios()} >= {
        "old_proxy", "heterogeneous", "near_overloaded", "server_crash", "herding"}
    old = load_scenario(SCENARIOS / "old_proxy.toml")
    assert "threshold" in old.policies and old.policy_config().threshold_rate == 25.0
    arrivals = generate_arrivals(old, 0)
    gaps = [b.time - a.time for a, b in itertools.pairwise(arrivals)]
    assert len(arrivals) == 1000 and min(gaps) >= 0.001 and max(gaps) <= 0.005


def bad(data: dict[str, Any]) -> str:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(data, "fleet.toml")
    message = str(info.value)
    assert message.startswith("fleet.toml: ")
    return message


def test_errors_name_the_field_and_the_file() -> None:
    servers = copy.deepcopy(BASE["servers"])
    servers[1]["workers"] = 0
    assert "servers[1].workers: " in bad(scenario_with(servers=servers))
    assert "greater than or equal to 1" in bad(scenario_with(servers=servers))

    devices = copy.deepcopy(BASE["devices"])
    devices[0]["workload"] = {"kind": "poisson", "rate": -1}
    assert "devices[0].workload.rate: " in bad(scenario_with(devices=devices))
    devices[0]["workload"] = {"kind": "sometimes"}
    assert "devices[0].workload" in bad(scenario_with(devices=devices))
    devices[0]["workload"] = {"kind": "uniform", "min_gap": 0.005, "max_gap": 0.001}
    assert "devices[0].workload: max_gap must be > 0 and >= min_gap" in bad(scenario_with(devices=devices))
    devices[0] = {**BASE["devices"][0], "task": "segment"}
    assert "devices[0].task: 'segment' is not in [tasks]" in bad(scenario_with(devices=devices))

    assert "policies[1]: unknown policy 'fastest'" in bad(scenario_with(policies=["ect", "fastest"]))
    assert "policies[0]: 'oracle' is not a device policy" in bad(scenario_with(policies=["oracle"]))
    assert "policy: PolicyConfig.spread_k" in bad(scenario_with(policy={"spread_k": 0}))
    assert "policy: " in bad(scenario_with(policy={"spread": 2}))
    assert "events[0].server: no server named 'edge-7'" in bad(
        scenario_with(events=[{"kind": "crash", "at": 1.0, "server": "edge-7"}]))
    assert "links.pairs[0].servers: no server group named 'cloud'" in bad(
        scenario_with(links={"pairs": [{"devices": "cams", "servers": "cloud", "delay": 0.01}]}))
    assert "events[0].devices: no device group" in bad(
        scenario_with(events=[{"kind": "link", "at": 1.0, "devices": "phones", "servers": "edge"}]))
    assert "colour: Extra inputs are not permitted" in bad(scenario_with(colour="blue"))
    assert "duration: " in bad(scenario_with(duration=0))
    assert "servers[1].name: duplicate group name 'edge'" in bad(
        scenario_with(servers=[{"name": "edge"}, {"name": "edge"}]))


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="no such scenario file"):
        load_scenario(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("duration = [1,\n")
    with pytest.raises(ScenarioError, match=r"broken\.toml: not valid TOML"):
        load_scenario(broken)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('duration = 5\n[tasks.t]\nservice_time = 0.01\n[[devices]]\nname = "d"\ntask = "t"\n'
                     'workload = { kind = "fps", fps = 0 }\n')
    with pytest.raises(ScenarioError, match=r"wrong\.toml: devices\[0\]\.workload\.fps: "):
        load_scenario(wrong)


def test_nodes_and_neighbourhoods() -> None:
    devices = [{**BASE["devices"][0], "count": 4, "known_servers": 2}]
    scenario = parse_scenario(scenario_with(devices=devices))
    assert [node.node for node in scenario.device_nodes()] == ["cams-0", "cams-1", "cams-2", "cams-3"]
    assert [node.node for node in scenario.server_nodes()] == ["edge-0", "edge-1", "big-0"]
    known = [scenario.known_servers(node) for node in scenario.device_nodes()]
    assert all(len(indices) == 2 and len(set(indices)) == 2 for indices in known)
    assert known == [scenario.known_servers(node) for node in scenario.device_nodes()]
    everyone = parse_scenario(BASE)
    assert everyone.known_servers(everyone.device_nodes()[0]) == [0, 1, 2]


def test_workload_is_a_function_of_seed_and_device() -> None:
    scenario = parse_scenario(BASE)
    first = generate_arrivals(scenario, 0)
    assert first == generate_arrivals(scenario, 0)
    assert first != generate_arrivals(scenario, 1)
    assert first != generate_arrivals(parse_scenario(scenario_with(seed=2)), 0)
    assert [a.time for a in first] == sorted(a.time for a in first)
    assert all(0.0 < a.time < scenario.duration and a.task == "detect" for a in first)
    # Poisson at 5/s over 10 s on 3 devices: about 150 tasks.
    total = sum(len(generate_arrivals(scenario, i)) for i in range(3))
    assert 100 <= total <= 200
    with pytest.raises(IndexError):
        device_group(scenario, 3)


def test_workload_kinds() -> None:
    cost = {"detect": {"service_time": 0.02, "variation": 0.5}}
    fps = parse_scenario(scenario_with(tasks=cost, devices=[{
        "name": "cam", "task": "detect", "payload_bytes": 100, "payload_bytes_max": 200, "deadline": 0.5,
        "workload": {"kind": "fps", "fps": 20}}]))
    frames = generate_arrivals(fps, 0)
    assert len(frames) in (199, 200)
    assert all(abs((b.time - a.time) - 0.05) < 1e-9 for a, b in itertools.pairwise(frames))
    assert all(100 <= a.payload_bytes <= 200 and a.deadline == 0.5 for a in frames)
    works = [a.work for a in frames]
    assert 0.8 < statistics.mean(works) < 1.2 and statistics.pstdev(works) > 0.2

    bursts = parse_scenario(scenario_with(devices=[{
        "name": "b", "task": "detect", "start": 1.0,
        "workload": {"kind": "bursts", "burst_size": 5, "interval": 2.0, "spacing": 0.01,
                     "poisson_bursts": False}}]))
    assert isinstance(bursts.devices[0].workload, BurstWorkload)
    times = [a.time for a in iter_arrivals(bursts, 0)]
    assert times[0] >= 1.0 and len(times) % 5 == 0 and 15 <= len(times) <= 25
    assert times[1] - times[0] == pytest.approx(0.01)


def test_scenario_is_frozen() -> None:
    scenario = parse_scenario(BASE)
    with pytest.raises(Exception, match="frozen"):
        scenario.duration = 5.0
    assert isinstance(scenario, Scenario)


def _set(path: str, value: Any) -> dict[str, Any]:
    """BASE with one field changed, the field given as in the error messages (``servers[1].workers``)."""
    data = copy.deepcopy(BASE)
    *parents, last = path.replace("]", "").replace("[", ".").split(".")
    node: Any = data
    for part in parents:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    node[int(last) if last.isdigit() else last] = value
    return data


@pytest.mark.parametrize(("field", "value"), [
    ("devices[0].workload.rate", 0), ("devices[0].workload.rate", -2.5),
    ("devices[0].count", 0), ("devices[0].workers", 0), ("devices[0].speed", 0), ("devices[0].speed", -1),
    ("devices[0].deadline", 0), ("devices[0].payload_bytes", -1), ("devices[0].local_queue_size", -1),
    ("servers[0].workers", 0), ("servers[1].speed", 0), ("servers[1].speed", -0.5),
    ("servers[0].count", 0), ("servers[0].queue_size", -1),
    ("links.default.delay", -0.001), ("links.default.jitter", -0.001), ("links.default.bandwidth", 0),
    ("links.default.bandwidth", -1e6), ("links.default.loss", 1.5),
    ("tasks.detect.service_time", 0), ("tasks.detect.result_bytes", -1),
    ("heartbeat_interval", 0), ("duration", -1), ("tuning.max_attempts", 0),
    ("devices[0].speed", float("nan")), ("links.default.delay", float("inf")),
])
def test_impossible_values_are_refused_with_the_field(field: str, value: Any) -> None:
    assert f"fleet.toml: {field}: " in bad(_set(field, value))


@pytest.mark.parametrize(("kind", "field"), [
    ({"kind": "fps", "fps": 0}, "fps"), ({"kind": "bursts", "burst_size": 0, "interval": 1.0}, "burst_size"),
    ({"kind": "bursts", "burst_size": 3, "interval": -1.0}, "interval"),
    ({"kind": "bursts", "burst_size": 3, "interval": 1.0, "spacing": -0.1}, "spacing"),
])
def test_impossible_workloads_are_refused(kind: dict[str, Any], field: str) -> None:
    assert f"devices[0].workload.{field}: " in bad(_set("devices[0].workload", kind))


@pytest.mark.parametrize(("event", "field"), [
    ({"kind": "slowdown", "at": 1.0, "server": "edge-0", "factor": 0}, "factor"),
    ({"kind": "crash", "at": -1.0, "server": "edge-0"}, "at"),
    ({"kind": "offline", "at": 1.0, "devices": "cams", "duration": 0}, "duration"),
    ({"kind": "link", "at": 1.0, "devices": "cams", "servers": "edge", "bandwidth": 0}, "bandwidth"),
    ({"kind": "link", "at": 1.0, "devices": "cams", "servers": "edge", "delay": -1}, "delay"),
])
def test_impossible_events_are_refused(event: dict[str, Any], field: str) -> None:
    assert f"events[0].{field}: " in bad(scenario_with(events=[event]))


def remote_only(deadline: float, **link: Any) -> dict[str, Any]:
    """Devices that cannot run their task, 100 kB payloads and 1 kB results on a 1 MB/s, 10 ms link:
    an answer takes at least 0.101 s + 0.02 s + 20 ms of service (no variation) = 141 ms."""
    return scenario_with(
        tasks={"detect": {"service_time": 0.02, "result_bytes": 1_000}},
        devices=[{**BASE["devices"][0], "capable": False, "payload_bytes": 100_000, "deadline": deadline}],
        links={"default": {"delay": 0.01, "bandwidth": 1e6, **link}})


def test_a_deadline_below_every_round_trip_is_refused() -> None:
    message = bad(remote_only(0.14))
    assert "devices[0].deadline: 140 ms can never be met: the devices cannot run it (capable = false), " \
        "and the fastest answer" in message
    assert "the fastest answer from a server takes 141.0 ms (group 'edge': " in message
    assert parse_scenario(remote_only(0.142)).devices[0].deadline == 0.142
    # Jitter can shorten the one-way delay down to zero: only the transfers and the service are sure.
    assert parse_scenario(remote_only(0.125, jitter=0.01))
    assert "can never be met" in bad(remote_only(0.12, jitter=0.01))
    # With variation the service time has no floor: only the link counts.
    varied = remote_only(0.125)
    varied["tasks"]["detect"]["variation"] = 0.5
    assert parse_scenario(varied)


def test_a_deadline_is_judged_against_every_option() -> None:
    # One server group near enough is enough: the far one is a choice the policy should avoid.
    near = remote_only(0.05)
    near["links"]["pairs"] = [{"devices": "cams", "servers": "big", "delay": 0.001, "bandwidth": 1e8}]
    assert parse_scenario(near)
    # ... unless that group does not run the task.
    near["servers"][1]["capabilities"] = ["other"]
    near["tasks"]["other"] = {"service_time": 0.01}
    assert "devices[0].deadline: 50 ms can never be met" in bad(near)
    # A link event that makes the link fast later makes the deadline reachable from then on.
    later = remote_only(0.05) | {"events": [
        {"kind": "link", "at": 2.0, "devices": "cams", "servers": "edge", "delay": 0.001, "bandwidth": 1e8}]}
    assert parse_scenario(later)
    # Devices that run the task themselves can meet it locally, unless every run takes longer.
    local = remote_only(0.05)
    local["devices"][0]["capable"] = True
    assert parse_scenario(local)
    local["devices"][0]["speed"] = 0.2
    assert "a local run takes 100.0 ms" in bad(local)


def test_a_task_nobody_can_run_is_refused() -> None:
    alone = scenario_with(devices=[{**BASE["devices"][0], "capable": False}],
                          servers=[{"name": "edge", "capabilities": ["other"]}],
                          tasks={"detect": {"service_time": 0.02}, "other": {"service_time": 0.01}})
    assert "devices[0].capable: false, and no server group runs 'detect'" in bad(alone)
    assert "devices[0].capable: " in bad(alone | {"servers": []})


def test_message_delay_is_seconds_from_zero_up() -> None:
    assert "message_delay: Input should be greater than or equal to 0" in bad(
        scenario_with(message_delay=-0.001))
    assert parse_scenario(scenario_with(message_delay=0.0), "fleet.toml").message_delay == 0.0
