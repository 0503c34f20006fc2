"""The shipped systemd unit: valid, in the right sections, hardened (systemd-analyze, offline)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from brokers_support import require

UNIT = Path(__file__).resolve().parent.parent / "examples" / "edge-agent.service"
INSTALLED = "/opt/offload/venv/bin/edge-agent"  # where docs/raspberry-pi.md installs it


@pytest.fixture
def analyze() -> str:
    path = shutil.which("systemd-analyze")
    require(path is not None, "systemd-analyze missing (apt-get install -y systemd)")
    assert path is not None
    return path


def sections(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    current = ""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            found[current] = []
        elif line and not line.startswith("#"):
            found[current].append(line.split("=", 1)[0])
    return found


def test_each_setting_is_in_the_section_systemd_reads_it_from() -> None:
    keys = sections(UNIT.read_text())
    assert {"StartLimitIntervalSec", "StartLimitBurst"} <= set(keys["Unit"])
    assert not {"StartLimitIntervalSec", "StartLimitBurst"} & set(keys["Service"])
    assert f"ExecStart={INSTALLED} " in UNIT.read_text()
    assert INSTALLED in (UNIT.parent.parent / "docs" / "raspberry-pi.md").read_text()


def test_systemd_accepts_the_unit_and_rates_it_at_most_3(analyze: str, tmp_path: Path) -> None:
    # verify needs the program to exist: the same unit with ExecStart pointing at a real one
    unit = tmp_path / "edge-agent.service"
    unit.write_text(UNIT.read_text().replace(INSTALLED, shutil.which("true") or "/bin/true"))
    verified = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                              timeout=60)
    problems = [line for line in (verified.stdout + verified.stderr).splitlines()
                if "edge-agent.service" in line]
    assert verified.returncode == 0 and not problems, problems
    rated = subprocess.run([analyze, "security", "--offline=yes", str(unit)], capture_output=True,
                           text=True, timeout=60)
    match = re.search(r"Overall exposure level for edge-agent\.service: ([0-9.]+)", rated.stdout)
    assert match is not None, rated.stdout[-500:] + rated.stderr[-500:]
    assert float(match.group(1)) <= 3.0, rated.stdout
