"""The start-up heap freeze: once per process, and only when the agent's config asks for it."""

from __future__ import annotations

import gc
import uuid
from collections.abc import Callable

import pytest

import agent_common.heap as heap
import cloud_agent.server
import edge_agent.agent
from agent_common.registry import TaskRegistry
from cloud_agent.config import CloudConfig
from cloud_agent.server import CloudAgent
from edge_agent.agent import EdgeAgent
from edge_agent.config import EdgeConfig
from topics.memory import MemoryBroker, MemoryTransport


def test_freezes_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    frozen: list[int] = []
    monkeypatch.setattr(heap, "_frozen", False)
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append(1))
    assert heap.freeze_startup_objects() is True
    assert heap.freeze_startup_objects() is False
    assert frozen == [1]


@pytest.mark.parametrize("freeze", [True, False])
def test_agents_freeze_only_when_configured(freeze: bool, monkeypatch: pytest.MonkeyPatch,
                                            memory_broker: MemoryBroker) -> None:
    calls: list[str] = []

    def recorder(side: str) -> Callable[[], bool]:
        def freeze() -> bool:
            calls.append(side)
            return True
        return freeze

    monkeypatch.setattr(edge_agent.agent, "freeze_startup_objects", recorder("edge"))
    monkeypatch.setattr(cloud_agent.server, "freeze_startup_objects", recorder("cloud"))
    prefix = f"test/heap/{uuid.uuid4().hex[:6]}"
    server_config = CloudConfig(id="srv", prefix=prefix, freeze_startup_heap=freeze)
    server = CloudAgent(server_config, MemoryTransport(memory_broker, "srv"), TaskRegistry())
    device_config = EdgeConfig(id="dev", prefix=prefix, freeze_startup_heap=freeze)
    device = EdgeAgent(device_config, MemoryTransport(memory_broker, "dev"), TaskRegistry())
    server.start()
    device.start()
    try:
        assert calls == (["cloud", "edge"] if freeze else [])
    finally:
        device.stop()
        server.stop(grace=0.0)
