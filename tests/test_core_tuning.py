"""One set of tuning numbers: the agent's config, scenario files, the simulator and emulation read it."""

from __future__ import annotations

from typing import Any

import pytest

from agent_common.registry import TaskRegistry
from edge_agent.agent import EdgeAgent
from edge_agent.config import EdgeConfig
from edge_agent.tuning import DEFAULT_TUNING, Estimators, Tuning
from sim.scenario import ScenarioError, parse_scenario
from topics.memory import MemoryBroker, MemoryTransport

BASE: dict[str, Any] = {
    "duration": 1.0, "tasks": {"t": {"service_time": 0.01}},
    "devices": [{"name": "d", "task": "t", "workload": {"kind": "poisson", "rate": 1.0}}],
}


def test_the_agents_config_has_the_same_defaults_and_names() -> None:
    config = EdgeConfig(id="dev")
    assert Tuning.of(config) == DEFAULT_TUNING
    assert set(Tuning.model_fields) <= set(EdgeConfig.model_fields)


def test_an_agent_runs_its_core_with_its_configs_tuning(memory_broker: MemoryBroker) -> None:
    config = EdgeConfig(id="dev", failure_half_life=2.5, max_attempts=5,
                        estimators=Estimators(local_service_gain=0.5))
    agent = EdgeAgent(config, MemoryTransport(memory_broker, "dev"), TaskRegistry())
    assert agent.core.tuning == Tuning.of(config) and agent.core.tuning.max_attempts == 5
    assert agent.core.table.half_life == 2.5


def test_a_scenario_sets_the_tuning_in_its_table_and_groups_their_local_queue() -> None:
    scenario = parse_scenario({**BASE, "tuning": {"failure_half_life": 5.0, "estimators": {"rtt_gain": 0.5}},
                               "devices": [{**BASE["devices"][0], "local_queue_size": 4}]})
    assert scenario.tuning.failure_half_life == 5.0 and scenario.tuning.estimators.rtt_gain == 0.5
    device_tuning = scenario.device_tuning(scenario.devices[0])
    assert device_tuning.local_queue_size == 4 and device_tuning.failure_half_life == 5.0
    # What emulation hands each device agent is that tuning, field for field.
    assert Tuning.of(EdgeConfig(id="d-0", **device_tuning.settings())) == device_tuning
    assert parse_scenario(BASE).device_tuning(parse_scenario(BASE).devices[0]) == DEFAULT_TUNING


def test_older_top_level_keys_are_read_into_the_tuning_and_never_twice() -> None:
    scenario = parse_scenario({**BASE, "timeout_min": 0.2, "ping_interval": 0.5, "max_attempts": 4})
    assert (scenario.tuning.default_timeout, scenario.tuning.probe_interval) == (0.2, 0.5)
    assert scenario.max_attempts == 4 and scenario.ping_interval == 0.5
    with pytest.raises(ScenarioError, match=r"timeout_min: also set as tuning.default_timeout"):
        parse_scenario({**BASE, "timeout_min": 0.2, "tuning": {"default_timeout": 0.3}})
    with pytest.raises(ScenarioError, match=r"tuning.failure_half_life"):
        parse_scenario({**BASE, "tuning": {"failure_half_life": -1.0}})
