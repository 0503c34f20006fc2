"""The shared settings loader: unknown names refused with the closest one, every problem named,
secrets never from flags, the password from a file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from agent_common.settings import SettingsError, load_settings
from cloud_agent.config import CloudConfig
from edge_agent.cli import main as edge_main
from edge_agent.config import PolicySettings, load_edge_config
from edge_agent.policy import PolicyConfig


def test_misspelt_environment_variable_is_refused_with_the_closest_name() -> None:
    with pytest.raises(SettingsError, match="CLOUD_AGENT_WORKRS names no setting "
                       r"\(did you mean CLOUD_AGENT_WORKERS\?\)"):
        load_settings(CloudConfig, env_prefix="CLOUD_AGENT_",
                      environ={"CLOUD_AGENT_ID": "srv1", "CLOUD_AGENT_WORKRS": "8"})


def test_unknown_toml_key_is_refused_with_the_closest_name(tmp_path: Path) -> None:
    path = tmp_path / "device.toml"
    path.write_text('id = "cam1"\npolcy = "ect"\n[policy_config]\nspred_k = 3\n')
    with pytest.raises(SettingsError) as caught:
        load_edge_config(path, environ={})
    message = str(caught.value)
    assert "setting polcy: unknown setting (did you mean policy?)" in message
    assert "setting policy_config.spred_k: unknown setting (did you mean spread_k?)" in message


def test_every_problem_is_named() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(CloudConfig, overrides={"id": "srv1", "workers": 0, "queue_size": -1})
    message = str(caught.value)
    assert "setting workers" in message and "setting queue_size" in message and "more)" not in message


def test_password_is_refused_as_a_flag_and_read_from_a_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="set CLOUD_AGENT_PASSWORD or password_file"):
        load_settings(CloudConfig, env_prefix="CLOUD_AGENT_", environ={},
                      overrides={"id": "srv1", "password": "hunter2"})
    secret = tmp_path / "secret"
    secret.write_text("hunter2\n")
    config = load_settings(CloudConfig, env_prefix="CLOUD_AGENT_", environ={},
                           overrides={"id": "srv1", "password_file": str(secret)})
    assert config.password is not None and config.password.get_secret_value() == "hunter2"


def test_edge_agent_password_flag_points_to_the_environment(capsys: pytest.CaptureFixture[str]) -> None:
    assert edge_main(["submit", "--id", "cam1", "--password", "x", "square", "{}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "EDGE_AGENT_PASSWORD" in err


def test_the_policy_settings_are_the_policy_config_fields_with_its_defaults() -> None:
    defaults = {field.name: field.default for field in dataclasses.fields(PolicyConfig)}
    assert PolicySettings().model_dump() == defaults
    assert PolicySettings().to_policy_config() == PolicyConfig()
