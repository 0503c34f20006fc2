"""What both agents use: the task registry, the bad-input log, the settings loader, decoding helpers.

Imports nothing of ``edge_agent`` or ``cloud_agent``, so a device loads no server code.
"""

from agent_common.badinput import BadInputLog, RateLimitedLog
from agent_common.decoding import decode_or_count
from agent_common.registry import (
    Done,
    RegistryError,
    TaskRegistry,
    TaskSpec,
    UnknownTaskError,
    load_tasks,
    run_spec,
)
from agent_common.settings import SettingsError, load_settings

__all__ = [
    "BadInputLog",
    "Done",
    "RateLimitedLog",
    "RegistryError",
    "SettingsError",
    "TaskRegistry",
    "TaskSpec",
    "UnknownTaskError",
    "decode_or_count",
    "load_settings",
    "load_tasks",
    "run_spec",
]
