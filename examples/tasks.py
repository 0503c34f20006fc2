"""The demo tasks, for readers browsing ``examples/``: they live in :mod:`agent_common.demo_tasks`,
which an installed agent can import (the default ``tasks = ["agent_common.demo_tasks"]``).
``--tasks examples.tasks`` still works from the repository root.
"""

from agent_common.demo_tasks import registry

__all__ = ["registry"]
