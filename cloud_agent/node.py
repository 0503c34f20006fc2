"""What every part of one server node shares: its settings, connection, topics, tasks, job board,
stop signal and clocks (one of each per :class:`~cloud_agent.server.CloudAgent`)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from agent_common.registry import TaskRegistry
from cloud_agent.config import CloudConfig
from cloud_agent.jobs import JobBoard
from topics.names import TopicTree
from topics.transport import Transport


@dataclass(frozen=True, slots=True)
class ServerNode:
    """The shared parts of one server node; the parts themselves are not frozen."""

    config: CloudConfig
    transport: Transport
    tree: TopicTree
    registry: TaskRegistry
    """What this node runs (the configured tasks, and ``http`` with a forwarder)."""
    board: JobBoard
    stopping: threading.Event
    """Set when the node stops: every loop of its threads ends."""
    clock: Callable[[], float]
    """Wall clock: what the wire carries (times, legacy deadlines)."""
    monotonic: Callable[[], float]
    """What deadlines, waits and service times are measured on."""

    @property
    def id(self) -> str:
        return self.config.id


__all__ = ["ServerNode"]
