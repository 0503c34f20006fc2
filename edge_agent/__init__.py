"""Device side: per-message offloading decisions, execution with fallback, topic bridge."""

from edge_agent.agent import EdgeAgent, payload_size
from edge_agent.bridge import Bridge
from edge_agent.config import BridgeRoute, EdgeConfig, PolicySettings, load_edge_config
from edge_agent.pinning import PinError, UnknownPoolError, UnknownServerError
from edge_agent.policy import (
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
)
from edge_agent.records import TaskFailed, TaskRecord
from edge_agent.servers import ServerTable, ServerView

__all__ = [
    "LOCAL",
    "POLICIES",
    "Bridge",
    "BridgeRoute",
    "Decision",
    "EdgeAgent",
    "EdgeConfig",
    "LocalInfo",
    "PinError",
    "PolicyConfig",
    "PolicySettings",
    "ServerInfo",
    "ServerTable",
    "ServerView",
    "TaskFailed",
    "TaskInfo",
    "TaskRecord",
    "UnknownPolicyError",
    "UnknownPoolError",
    "UnknownServerError",
    "check_policy",
    "decide",
    "load_edge_config",
    "payload_size",
]
