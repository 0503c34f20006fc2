"""The simulator's offline events and device clock offsets, in both modes."""

from __future__ import annotations

from collections import Counter

import pytest
from test_emulation import assert_one_outcome_each, small_scenario

from sim.des import run_des
from sim.emulate import run_emulation
from sim.report import TaskRecord
from sim.scenario import Scenario, ScenarioError, parse_scenario
from topics.brokers import MosquittoBroker

AWAY = (0.8, 1.6)
"""The devices are offline from 0.8 s to 1.6 s of the 2.4 s run."""


def offline_scenario(**device: object) -> Scenario:
    """Devices that cannot run the task themselves lose their broker for 0.8 s mid-run."""
    base = small_scenario()
    data = base.model_dump(mode="python", exclude_defaults=False)
    data["duration"] = 2.4
    data["devices"][0].update({"capable": False, "deadline": 2.0, **device})
    data["events"] = [{"kind": "offline", "at": AWAY[0], "devices": "dev", "duration": AWAY[1] - AWAY[0]}]
    return parse_scenario(data, "offline")


def outcomes(records: list[TaskRecord], start: float, end: float) -> Counter[str]:
    return Counter(r.outcome for r in records if start <= r.created < end)


def test_des_devices_offline_run_nothing_remote_and_recover() -> None:
    scenario = offline_scenario()
    result = run_des(scenario, "ect")
    assert_one_outcome_each(result.records, scenario)
    before, away, after = (outcomes(result.records, 0.0, AWAY[0]),
                           outcomes(result.records, AWAY[0] + 0.01, AWAY[1] - 0.01),
                           outcomes(result.records, AWAY[1] + 0.5, scenario.duration))
    assert set(before) == {"ok"} and set(after) == {"ok"}, (before, after)
    assert away and "ok" not in away, away  # no broker, cannot run it here: no way to finish it
    assert result.counters.get("offline_periods") == 1


def test_emulated_devices_offline_run_nothing_remote_and_recover(
        mosquitto_broker: MosquittoBroker) -> None:
    scenario = offline_scenario()
    result = run_emulation(scenario, "ect", broker_url=mosquitto_broker.url)
    assert_one_outcome_each(result.records, scenario)
    away = outcomes(result.records, AWAY[0] + 0.05, AWAY[1] - 0.05)
    after = outcomes(result.records, AWAY[1] + 0.5, scenario.duration)
    assert away and "ok" not in away, away
    assert set(after) == {"ok"}, after
    assert result.counters.get("offline_periods") == 2  # both devices


@pytest.mark.parametrize("offset", [600.0, -600.0])
def test_a_device_clock_ten_minutes_off_offloads_normally_in_both_modes(
        mosquitto_broker: MosquittoBroker, offset: float) -> None:
    scenario = small_scenario(policies=["ect"])
    data = scenario.model_dump(mode="python")
    data["devices"][0].update({"capable": False, "clock_offset": offset})
    skewed = parse_scenario(data, "skewed")
    for result in (run_des(skewed, "ect"), run_emulation(skewed, "ect", broker_url=mosquitto_broker.url)):
        assert_one_outcome_each(result.records, skewed)
        assert {r.outcome for r in result.records} == {"ok"}
        assert all(0.0 <= r.created <= skewed.duration for r in result.records)  # on the run's clock


def test_an_offline_event_names_a_device_group() -> None:
    data = small_scenario().model_dump(mode="python")
    data["events"] = [{"kind": "offline", "at": 1.0, "devices": "nobody", "duration": 1.0}]
    with pytest.raises(ScenarioError, match=r"events\[0\].devices"):
        parse_scenario(data, "bad")
    data["events"] = [{"kind": "offline", "at": 1.0, "devices": "dev", "duration": 0.0}]
    with pytest.raises(ScenarioError, match=r"events\[0\].duration"):
        parse_scenario(data, "bad")
