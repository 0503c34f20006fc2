"""Pinned tasks: every attempt of a task on one named server, or published to one pool's shared inbox.

``submit(..., target="srv1")`` takes the choice away from the policy: each attempt goes to ``srv1``
(never run locally, never to another server), with the usual timeouts, deadline and ``max_attempts``.
A retry there is the same task id with ``attempt`` + 1, which the server's duplicate detection
(keyed by sender, id and content) joins to the running copy or answers from its result cache: it
never runs twice. A dead or silent ``srv1`` ends the task at once (there is nowhere else to go).

``submit(..., pool="gpu")`` publishes to ``{prefix}/pool/gpu/task``; the broker hands each message
to one member, and the Result names it. Duplicate detection is per server and the members share
nothing, so a copy that reaches a second member would run a second time. Hence **the pool rule**:
an attempt to a pool is retried (to the pool again) only on an answer that says the task did not
run there, ``rejected-busy`` or ``unknown-task`` (:data:`POOL_RETRIED`). A timeout, ``expired``, a
failed publish or a lost link ends the task with that outcome instead: nobody can tell whether some
member has it, and re-sending could run it twice. A member's death does not end the attempt either
(the device does not know which member took it): its timeout does.

This module holds the checks made at submission (:func:`check_target`, :func:`check_pool`: bad
input fails fast with a :class:`PinError`) and the decisions the core takes for pinned attempts
(:func:`pinned_decision`, :func:`pool_decision`), all pure.
"""

from __future__ import annotations

from collections.abc import Sequence

from edge_agent.policy import Decision, PolicyConfig, ServerInfo, TaskInfo, server_ect
from edge_agent.servers import ServerTable

__all__ = ["POOL_PREFIX", "POOL_RETRIED", "PinError", "UnknownPoolError", "UnknownServerError",
           "check_pool", "check_target", "pinned_decision", "pool_decision", "pool_key"]

POOL_PREFIX = "pool/"
"""How a pool attempt's target reads in the core and in records until a member answers (a node id
cannot contain ``/``, so it never collides with a server)."""
POOL_RETRIED = frozenset({"rejected-busy", "unknown-task"})
"""The answers after which a pool attempt is retried: the member said the task did not run."""


class PinError(LookupError):
    """A pinned submission names something that cannot take the task: raised by ``submit``."""


class UnknownServerError(PinError):
    """``target`` is not a known server, or does not announce the task."""

    def __init__(self, target: str, name: str, reason: str) -> None:
        super().__init__(f"cannot pin task {name!r} to server {target!r}: {reason}")
        self.target, self.name, self.reason = target, name, reason


class UnknownPoolError(PinError):
    """No live server announces ``pool`` (heartbeats' ``pools``), or none of them runs the task."""

    def __init__(self, pool: str, name: str, reason: str) -> None:
        super().__init__(f"cannot send task {name!r} to pool {pool!r}: {reason}")
        self.pool, self.name, self.reason = pool, name, reason


def pool_key(pool: str) -> str:
    """The target of an attempt to ``pool`` (see :data:`POOL_PREFIX`)."""
    return POOL_PREFIX + pool


def check_target(table: ServerTable, target: str, name: str) -> None:
    """Raise :class:`UnknownServerError` unless ``target`` is in ``table`` and announces ``name``."""
    entry = table.entry(target)
    if entry is None:
        raise UnknownServerError(target, name, "no such server has been heard from")
    if not entry.capable(name):
        raise UnknownServerError(target, name, f"it does not announce task {name!r}")


def check_pool(table: ServerTable, pool: str, name: str) -> None:
    """Raise :class:`UnknownPoolError` unless a live server of ``pool`` announces ``name``."""
    members = table.pool_members(pool)
    if not members:
        raise UnknownPoolError(pool, name, "no live server announces this pool")
    if not any(entry is not None and entry.capable(name) for entry in map(table.entry, members)):
        raise UnknownPoolError(pool, name, f"no server of the pool ({', '.join(members)}) announces "
                               f"task {name!r}")


def _usable(server: ServerInfo) -> bool:
    return server.capable and not server.stale


def pinned_decision(policy: str, task: TaskInfo, server: ServerInfo | None, config: PolicyConfig) -> Decision:
    """The attempt goes to ``server`` (``None``: not in the table or not offered, the link is down)
    with its ECT, or nowhere (``target`` None, reason ``pinned-unusable``) if it cannot take it."""
    if server is None or not _usable(server):
        return Decision(policy, None, "pinned-unusable", (), False)
    estimate = server_ect(task, server, config)
    fits = task.time_left is None or estimate <= task.time_left
    return Decision(policy, server.node, "pinned", ((server.node, estimate),), fits, estimate)


def pool_decision(policy: str, task: TaskInfo, pool: str, members: Sequence[ServerInfo],
                  config: PolicyConfig) -> Decision:
    """The attempt goes to ``pool`` (target :func:`pool_key`), expected to take as long as its
    slowest usable member would (the broker picks the member; the attempt is not retried after
    a timeout, so the timeout errs long); nowhere (reason ``pool-unusable``) with no usable member."""
    estimates = sorted(((member.node, server_ect(task, member, config)) for member in members
                        if _usable(member)), key=lambda option: option[1])
    if not estimates:
        return Decision(policy, None, "pool-unusable", (), False)
    slowest = estimates[-1][1]
    fits = task.time_left is None or estimates[0][1] <= task.time_left
    return Decision(policy, pool_key(pool), "pool", tuple(estimates), fits, slowest)
