"""What the edge agent reports about every finished task: one :class:`TaskRecord` per task.

Times are seconds on the agent's clock (``clock``, Unix time by default); a field is ``None`` when
that step never happened (``sent`` for a task run locally, ``started`` for a task run remotely).
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import asdict
from typing import Any, Literal

from agent_common.readonly import record

Outcome = Literal["ok", "error", "expired", "rejected-busy", "unknown-task", "timeout", "failed"]
OUTCOMES: tuple[str, ...] = ("ok", "error", "expired", "rejected-busy", "unknown-task", "timeout", "failed")


class TaskFailed(Exception):
    """The outcome of a task that produced no result: set on the caller's future.

    ``status`` is one of :data:`OUTCOMES` other than ``ok``; ``error`` says what happened;
    ``attempts`` counts the options tried (local runs and servers).
    """

    def __init__(self, status: str, error: str, attempts: int, *, task_id: str = "", name: str = "") -> None:
        where = f" (task {name!r} id {task_id})" if task_id else ""
        super().__init__(f"{status}: {error} after {attempts} attempt(s){where}")
        self.status = status
        self.error = error
        self.attempts = attempts
        self.task_id = task_id
        self.name = name


@record
class TaskRecord:
    """Everything the agent knows about one finished task, for logs, the simulator and tests."""

    task_id: str
    name: str
    device: str
    policy: str
    target: str
    """``"local"`` or the node id of the server of the last attempt."""
    reason: str
    """The reason of the last decision (``lowest-ect``, ``spread``, ``keep-previous``...)."""
    outcome: Outcome
    attempts: int
    created: float
    """When it was submitted."""
    decided: float | None = None
    """When its last attempt was decided, with these estimates:"""
    estimates: tuple[tuple[str, float], ...] = ()
    """``(option, expected completion s)`` of the last decision, best first."""
    sent: float | None = None
    """When it was sent to the server of its last attempt; every option tried, in order:"""
    targets: tuple[str, ...] = ()
    started: float | None = None
    """When its local run started (local runs only)."""
    payload_bytes: int = 0
    finished: float | None = None
    """When it got its outcome."""
    received: float | None = None
    """When the server's answer arrived (remote ok/error results only)."""
    error: str | None = None
    queue_wait: float | None = None
    """Queue wait the server reported (remote ok/error results only)."""
    service_time: float | None = None
    """Service time measured locally or reported by the server."""

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    @property
    def latency(self) -> float | None:
        """Seconds from submission to the outcome reaching the agent."""
        end = self.received if self.received is not None else self.finished
        return None if end is None else end - self.created

    def as_dict(self) -> dict[str, Any]:
        """Plain values (lists for tuples), ready for JSON lines."""
        values = asdict(self)
        values["estimates"] = [list(item) for item in self.estimates]
        values["targets"] = list(self.targets)
        return values


class TaskHandle(concurrent.futures.Future[Any]):
    """What :meth:`EdgeAgent.submit <edge_agent.agent.EdgeAgent.submit>` returns: a future of the result
    payload (or :class:`TaskFailed`) that also carries the task's id and, once done, its record.

    ``record`` is set before the outcome, so a done callback or a caller woken by :meth:`result`
    always finds it.
    """

    def __init__(self, task_id: str) -> None:
        super().__init__()
        self.task_id = task_id
        self.record: TaskRecord | None = None
        """Where it ran, why, the attempts and the times; ``None`` until the task is done."""

    def __repr__(self) -> str:
        return f"<TaskHandle {self.task_id} {self.record.outcome if self.record else 'pending'}>"


__all__ = ["OUTCOMES", "Outcome", "TaskFailed", "TaskHandle", "TaskRecord"]
