"""Server side: runs offloaded tasks, reports its load, survives bad input."""

from agent_common.registry import Done, TaskRegistry, TaskSpec, load_tasks, pipeline, task
from cloud_agent.config import CloudConfig
from cloud_agent.http_adapter import HttpAdapterError, HttpForwarder
from cloud_agent.server import BadInput, CloudAgent

__all__ = [
    "BadInput",
    "CloudAgent",
    "CloudConfig",
    "Done",
    "HttpAdapterError",
    "HttpForwarder",
    "TaskRegistry",
    "TaskSpec",
    "load_tasks",
    "pipeline",
    "task",
]
