"""Task registry: tasks are plain functions registered with a decorator in an importable module.

The same module serves the server (remote run) and the device (local run). Only registered names
ever run; no code travels over the network.

    from agent_common.registry import task

    @task("square", executor="thread")
    def square(payload: dict) -> dict: ...

A pipeline is a task made of stages, each taking the previous stage's output; a stage may end the
chain early by returning :class:`Done`. Running from stage ``k`` runs stages ``k..n-1``.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from topics.models import Executor, TaskCapability

ExecutorKind = Literal["thread", "process"]
_TASK_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,128}")  # the TaskName of topics.models
TaskFunction = Callable[[Any], Any]


class RegistryError(LookupError):
    """An unknown task name, a bad registration, or a tasks module that cannot be loaded."""


class UnknownTaskError(RegistryError):
    """A task name nobody registered."""

    def __init__(self, name: str, known: Sequence[str]) -> None:
        super().__init__(f"unknown task {name!r}; registered: {', '.join(sorted(known)) or 'none'}")
        self.name = name


@dataclass(frozen=True, slots=True)
class Done:
    """Returned by a pipeline stage to end the chain for this input with ``value`` as the result."""

    value: Any


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """A registered task: a single function, or a pipeline of stages."""

    name: str
    stages: tuple[TaskFunction, ...]
    executor: ExecutorKind = "thread"
    pipeline: bool = False
    description: str = ""

    @property
    def function(self) -> TaskFunction:
        return self.stages[0]

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(getattr(stage, "__name__", f"stage{i}") for i, stage in enumerate(self.stages))

    def capability(self) -> TaskCapability:
        """How this task is announced in heartbeats."""
        return TaskCapability(executor=Executor(self.executor),
                              stages=len(self.stages) if self.pipeline else None)

    def check_stage(self, start: int | None) -> int:
        """Validate a start stage; plain tasks only accept ``None`` or 0."""
        first = start or 0
        if first < 0 or first >= len(self.stages) or (first and not self.pipeline):
            raise ValueError(f"task {self.name!r} has no stage {first} "
                             f"(stages 0..{len(self.stages) - 1})")
        return first

    def run(self, payload: Any, start: int | None = None, stop: int | None = None) -> Any:
        """Run stages ``start..stop-1`` (all remaining by default); a :class:`Done` ends early."""
        first = self.check_stage(start)
        last = len(self.stages) if stop is None else stop
        if not first <= last <= len(self.stages):
            raise ValueError(f"task {self.name!r}: bad stage range {first}..{last}")
        value = payload
        for stage in self.stages[first:last]:
            value = stage(value)
            if isinstance(value, Done):
                return value
        return value


def run_spec(spec: TaskSpec, payload: Any, start: int | None = None) -> Any:
    """Module-level entry point for process pools (picklable): run ``spec`` and unwrap ``Done``."""
    result = spec.run(payload, start)
    return result.value if isinstance(result, Done) else result


@dataclass
class TaskRegistry:
    """Name -> :class:`TaskSpec`."""

    _tasks: dict[str, TaskSpec] = field(default_factory=dict)

    def add(self, spec: TaskSpec) -> TaskSpec:
        if not isinstance(spec.name, str) or not _TASK_NAME.fullmatch(spec.name):
            raise RegistryError(f"invalid task name {spec.name!r}: use 1-128 letters, digits and _.:- "
                                "(the names a Task message can carry)")
        if spec.executor not in ("thread", "process"):
            raise RegistryError(f"task {spec.name!r}: executor must be 'thread' or 'process'")
        if not spec.stages or not all(callable(s) for s in spec.stages):
            raise RegistryError(f"task {spec.name!r} needs callable stages")
        existing = self._tasks.get(spec.name)
        if existing is not None and existing.stages != spec.stages:
            raise RegistryError(f"task {spec.name!r} is already registered")
        self._tasks[spec.name] = spec
        return spec

    def task(self, name: str | None = None, *, executor: ExecutorKind = "thread"
             ) -> Callable[[TaskFunction], TaskFunction]:
        """Decorator registering a plain function under ``name`` (default: its ``__name__``)."""

        def register(function: TaskFunction) -> TaskFunction:
            self.add(TaskSpec(name or function.__name__, (function,), executor,
                              description=(function.__doc__ or "").strip().split("\n")[0]))
            return function

        return register

    def pipeline(self, name: str, stages: Sequence[TaskFunction], *,
                 executor: ExecutorKind = "thread", description: str = "") -> TaskSpec:
        """Register a pipeline of stages under ``name``."""
        return self.add(TaskSpec(name, tuple(stages), executor, pipeline=True,
                                 description=description))

    def get(self, name: str) -> TaskSpec:
        try:
            return self._tasks[name]
        except KeyError:
            raise UnknownTaskError(name, list(self._tasks)) from None

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __iter__(self) -> Iterator[TaskSpec]:
        return iter(self._tasks.values())

    def __len__(self) -> int:
        return len(self._tasks)

    def names(self) -> list[str]:
        return sorted(self._tasks)

    def capabilities(self) -> dict[str, TaskCapability]:
        return {spec.name: spec.capability() for spec in self._tasks.values()}

    def merge(self, other: TaskRegistry) -> None:
        for spec in other:
            self.add(spec)


default_registry = TaskRegistry()
task = default_registry.task
pipeline = default_registry.pipeline


def load_tasks(*modules: str) -> TaskRegistry:
    """Import task modules and return the tasks they registered.

    A module may keep its own ``registry = TaskRegistry()``; otherwise it uses the decorators of
    this module and its tasks land in :data:`default_registry`.
    """
    combined = TaskRegistry()
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise RegistryError(f"cannot import tasks module {module_name!r}: {exc}") from exc
        except Exception as exc:  # a broken tasks module: name it, with what went wrong
            raise RegistryError(f"tasks module {module_name!r} failed while importing: "
                                f"{type(exc).__name__}: {exc}") from exc
        own = getattr(module, "registry", None)
        combined.merge(own if isinstance(own, TaskRegistry) else default_registry)
    if not combined:
        raise RegistryError(f"no tasks registered by {', '.join(modules)}")
    return combined
