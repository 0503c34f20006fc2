"""The package layers: a device loads no server code and no numpy; the simulator uses public names."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _loaded_after(module: str) -> set[str]:
    """Top-level packages in ``sys.modules`` after importing ``module`` in a fresh interpreter."""
    code = f"import json, sys; import {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True, timeout=60).stdout
    return {name.split(".")[0] for name in json.loads(out)}


@pytest.mark.parametrize("module", ["edge_agent", "edge_agent.cli"])
def test_device_loads_no_server_code_and_no_numpy(module: str) -> None:
    loaded = _loaded_after(module)
    assert "cloud_agent" not in loaded
    assert "numpy" not in loaded


def test_server_loads_no_device_code() -> None:
    assert "edge_agent" not in _loaded_after("cloud_agent")


def test_agent_common_loads_neither_agent() -> None:
    loaded = _loaded_after("agent_common")
    assert not loaded & {"edge_agent", "cloud_agent"}


def _private_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] not in ("edge_agent", "cloud_agent"):
                continue
            found += [f"{path.name}:{node.lineno} {node.module}.{alias.name}" for alias in node.names
                      if alias.name.startswith("_") or any(p.startswith("_") and p != "__init__"
                                                           for p in node.module.split("."))]
    return found


def test_sim_imports_no_private_agent_names() -> None:
    found = [hit for path in sorted((ROOT / "sim").glob("*.py")) for hit in _private_imports(path)]
    assert found == []


def test_edge_agent_imports_cloud_agent_only_lazily() -> None:
    """Only one function body may import cloud_agent: the CLI's ``build_peer`` (``--serve`` runs a server
    beside the device); anywhere else in edge_agent, at module level or in a function, fails."""
    allowed = {("cli.py", "build_peer")}
    offenders = []
    for path in sorted((ROOT / "edge_agent").glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        scopes: list[tuple[ast.AST, str]] = [(node, "") for node in tree.body]
        while scopes:
            node, function = scopes.pop()
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                function = node.name
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                         else [alias.name for alias in node.names])
                offenders += [f"{path.name}:{node.lineno} in {function or 'module'}" for name in names
                              if name.split(".")[0] == "cloud_agent" and (path.name, function) not in allowed]
            scopes.extend((child, function) for child in ast.iter_child_nodes(node))
    assert offenders == []


def test_embedded_broker_without_the_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from topics.brokers import BrokerError, EmbeddedBroker

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "amqtt" else real(name, *args))
    with pytest.raises(BrokerError, match=r"pip install 'mqtt-offload\[broker\]'"):
        EmbeddedBroker(port=0).start()
