"""Read-only records that are cheap to build: :func:`record`.

A ``@dataclass(frozen=True)`` sets each field in ``__init__`` through ``object.__setattr__``, seven to
eight times slower than a plain slotted field. The records the device core builds for every task (the
policy's server rows, 22 fields and about three per decision; the task, the local state, the decision,
the finished record) spent a seventh of the core's time per task on that. :func:`record` makes a plain
slotted dataclass, hashed by its fields as a frozen one is, and tells the type checker it is frozen
(PEP 681's ``frozen_default``): assigning a field is a mypy error (strict mypy covers the whole
repository, tests included), but not checked at run time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar, dataclass_transform

_Record = TypeVar("_Record")


@dataclass_transform(frozen_default=True)
def record(cls: type[_Record]) -> type[_Record]:
    """``@dataclass(slots=True, unsafe_hash=True)``, frozen for the type checker (module docstring)."""
    return dataclass(slots=True, unsafe_hash=True)(cls)
