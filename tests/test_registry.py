"""The task registry: decorator, pipelines with Done, stage ranges, unknown tasks, load_tasks."""

from __future__ import annotations

import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent_common.registry import (
    Done,
    RegistryError,
    TaskRegistry,
    TaskSpec,
    UnknownTaskError,
    default_registry,
    load_tasks,
    run_spec,
)
from topics.models import Executor, Heartbeat, Role, TaskCapability


def double(value: int) -> int:
    return value * 2


def add_one(value: int) -> int:
    return value + 1


def stop_if_negative(value: int) -> int | Done:
    return Done(f"negative: {value}") if value < 0 else value


@pytest.fixture
def registry() -> TaskRegistry:
    return TaskRegistry()


def test_decorator_registers_a_plain_function_and_returns_it(registry: TaskRegistry) -> None:
    @registry.task("square")
    def square(payload: dict[str, int]) -> dict[str, int]:
        """Square x.

        Longer description that is not the summary."""
        return {"y": payload["x"] ** 2}

    assert square({"x": 3}) == {"y": 9}  # still a plain function
    spec = registry.get("square")
    assert spec.function is square and spec.executor == "thread" and not spec.pipeline
    assert spec.description == "Square x."
    assert spec.run({"x": 4}) == {"y": 16}
    assert "square" in registry and len(registry) == 1 and registry.names() == ["square"]
    assert [s.name for s in registry] == ["square"]


def test_decorator_defaults_to_the_function_name_and_takes_the_executor(registry: TaskRegistry) -> None:
    registry.task(executor="process")(double)
    spec = registry.get("double")
    assert spec.executor == "process"
    assert spec.capability() == TaskCapability(executor=Executor.PROCESS, stages=None)


def test_pipeline_runs_every_stage_in_order(registry: TaskRegistry) -> None:
    spec = registry.pipeline("chain", [double, add_one, double], description="2(2x+1)")
    assert spec.pipeline and spec.stage_names == ("double", "add_one", "double")
    assert spec.run(5) == 22
    assert run_spec(spec, 5) == 22
    assert spec.capability() == TaskCapability(executor=Executor.THREAD, stages=3)


def test_pipeline_from_a_later_stage_and_up_to_a_stop(registry: TaskRegistry) -> None:
    spec = registry.pipeline("chain", [double, add_one, double])
    assert spec.run(5, start=1) == 12
    assert spec.run(5, start=2) == 10
    assert spec.run(5, start=0, stop=1) == 10
    assert spec.run(5, start=1, stop=1) == 5  # empty range returns the input
    assert run_spec(spec, 5, 1) == 12


def test_done_ends_the_chain_early(registry: TaskRegistry) -> None:
    calls: list[int] = []

    def record(value: int) -> int:
        calls.append(value)
        return value

    spec = registry.pipeline("guarded", [stop_if_negative, record, double])
    assert spec.run(-3) == Done("negative: -3")
    assert run_spec(spec, -3) == "negative: -3"
    assert calls == []
    assert run_spec(spec, 4) == 8 and calls == [4]


@pytest.mark.parametrize("start", [-1, 3, 10])
def test_pipeline_start_out_of_range(registry: TaskRegistry, start: int) -> None:
    spec = registry.pipeline("chain", [double, add_one, double])
    with pytest.raises(ValueError, match=r"has no stage .* \(stages 0\.\.2\)"):
        spec.run(1, start=start)


@pytest.mark.parametrize(("start", "stop"), [(2, 1), (0, 4), (1, -1)])
def test_pipeline_bad_stop(registry: TaskRegistry, start: int, stop: int) -> None:
    spec = registry.pipeline("chain", [double, add_one, double])
    with pytest.raises(ValueError, match="bad stage range"):
        spec.run(1, start=start, stop=stop)


def test_plain_task_accepts_only_stage_zero(registry: TaskRegistry) -> None:
    registry.task("double")(double)
    spec = registry.get("double")
    assert spec.check_stage(None) == 0 and spec.check_stage(0) == 0
    with pytest.raises(ValueError, match="has no stage 1"):
        spec.check_stage(1)


def test_unknown_task_lists_what_is_registered(registry: TaskRegistry) -> None:
    with pytest.raises(UnknownTaskError, match=r"unknown task 'nope'; registered: none") as empty:
        registry.get("nope")
    assert empty.value.name == "nope" and isinstance(empty.value, RegistryError | LookupError)
    registry.task("b")(double)
    registry.task("a")(add_one)
    with pytest.raises(UnknownTaskError, match=r"unknown task 'nope'; registered: a, b"):
        registry.get("nope")


@pytest.mark.parametrize("name", ["a/b", "a+b", "a#", "$x", "a b", "a@b", "héllo", "x" * 129, "tab\t",
                                  "line\n"])
def test_invalid_names_are_refused(registry: TaskRegistry, name: str) -> None:
    with pytest.raises(RegistryError, match="invalid task name"):
        registry.task(name)(double)
    with pytest.raises(RegistryError, match="invalid task name"):
        registry.add(TaskSpec(name, (double,)))
    assert len(registry) == 0


def test_empty_name_means_the_function_name_and_is_refused_on_add(registry: TaskRegistry) -> None:
    registry.task("")(double)
    assert registry.names() == ["double"]
    with pytest.raises(RegistryError, match="invalid task name"):
        registry.add(TaskSpec("", (add_one,)))


def test_every_accepted_name_can_be_announced_in_a_heartbeat(registry: TaskRegistry) -> None:
    for name in ("a", "x" * 128, "vision.ball:v2", "cpu_burn", "a-b"):
        registry.task(name)(double)
    heartbeat = Heartbeat(node="srv1", role=Role.SERVER, session=1, seq=0, interval=1.0, time=0.0,
                          capabilities=registry.capabilities())
    assert set(heartbeat.capabilities) == set(registry.names())


def test_bad_registrations(registry: TaskRegistry) -> None:
    with pytest.raises(RegistryError, match="executor"):
        registry.task("x", executor="gpu")(double)  # type: ignore[arg-type]
    with pytest.raises(RegistryError, match="callable stages"):
        registry.pipeline("empty", [])
    with pytest.raises(RegistryError, match="callable stages"):
        registry.pipeline("junk", [double, "not callable"])  # type: ignore[list-item]


def test_same_name_twice(registry: TaskRegistry) -> None:
    registry.task("double")(double)
    registry.task("double")(double)  # the same function again (a re-import) is fine
    with pytest.raises(RegistryError, match="already registered"):
        registry.task("double")(add_one)
    assert registry.get("double").function is double


def test_merge(registry: TaskRegistry) -> None:
    other = TaskRegistry()
    other.task("add_one")(add_one)
    registry.task("double")(double)
    registry.merge(other)
    assert registry.names() == ["add_one", "double"]
    clash = TaskRegistry()
    clash.task("double")(add_one)
    with pytest.raises(RegistryError):
        registry.merge(clash)


def test_task_spec_defaults() -> None:
    spec = TaskSpec("n", (double,))
    assert spec.executor == "thread" and not spec.pipeline and spec.description == ""
    assert spec.stage_names == ("double",)


# load_tasks -----------------------------------------------------------------------------------


@pytest.fixture
def module_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, str]]:
    """A directory on sys.path and a unique module name prefix; the modules are forgotten after."""
    monkeypatch.syspath_prepend(str(tmp_path))
    prefix = f"h2tasks_{uuid.uuid4().hex[:8]}"
    yield tmp_path, prefix
    for name in [n for n in sys.modules if n.startswith(prefix)]:
        del sys.modules[name]


def write_module(directory: Path, name: str, body: str) -> None:
    (directory / f"{name}.py").write_text(textwrap.dedent(body))


def test_load_tasks_from_a_module_with_its_own_registry(module_dir: tuple[Path, str]) -> None:
    directory, prefix = module_dir
    write_module(directory, f"{prefix}_own", """
        from agent_common.registry import TaskRegistry
        registry = TaskRegistry()

        @registry.task("triple")
        def triple(x):
            return 3 * x

        registry.pipeline("twice_triple", [triple, triple])
    """)
    loaded = load_tasks(f"{prefix}_own")
    assert loaded.names() == ["triple", "twice_triple"]
    assert loaded.get("twice_triple").run(2) == 18
    assert "triple" not in default_registry


def test_load_tasks_combines_modules(module_dir: tuple[Path, str]) -> None:
    directory, prefix = module_dir
    for index in (1, 2):
        write_module(directory, f"{prefix}_m{index}", f"""
            from agent_common.registry import TaskRegistry
            registry = TaskRegistry()
            registry.task("t{index}")(lambda x: x)
        """)
    assert load_tasks(f"{prefix}_m1", f"{prefix}_m2").names() == ["t1", "t2"]


def test_load_tasks_from_the_module_decorators(module_dir: tuple[Path, str]) -> None:
    directory, prefix = module_dir
    name = f"{prefix}_global"
    write_module(directory, name, f"""
        from agent_common.registry import task

        @task("{name}_echo")
        def echo(x):
            return x
    """)
    try:
        assert f"{name}_echo" in load_tasks(name)
    finally:
        default_registry._tasks.pop(f"{name}_echo", None)


def test_load_tasks_missing_module(module_dir: tuple[Path, str]) -> None:
    _directory, prefix = module_dir
    with pytest.raises(RegistryError, match=f"cannot import tasks module '{prefix}_missing'"):
        load_tasks(f"{prefix}_missing")


def test_load_tasks_module_with_a_missing_dependency(module_dir: tuple[Path, str]) -> None:
    directory, prefix = module_dir
    write_module(directory, f"{prefix}_dep", f"import {prefix}_not_installed\n")
    with pytest.raises(RegistryError, match=f"No module named '{prefix}_not_installed'"):
        load_tasks(f"{prefix}_dep")


@pytest.mark.parametrize(
    ("body", "error"),
    [("def broken(:\n", "SyntaxError"), ("raise RuntimeError('no GPU here')\n", "RuntimeError: no GPU here")],
)
def test_load_tasks_broken_module_is_a_registry_error(module_dir: tuple[Path, str], body: str,
                                                      error: str) -> None:
    directory, prefix = module_dir
    write_module(directory, f"{prefix}_broken", body)
    with pytest.raises(RegistryError, match=f"'{prefix}_broken' failed while importing: {error}"):
        load_tasks(f"{prefix}_broken")


def test_load_tasks_with_nothing_registered(module_dir: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    directory, prefix = module_dir
    write_module(directory, f"{prefix}_empty", "VALUE = 1\n")
    monkeypatch.setattr(default_registry, "_tasks", {})
    with pytest.raises(RegistryError, match=f"no tasks registered by {prefix}_empty"):
        load_tasks(f"{prefix}_empty")


def test_load_the_example_tasks() -> None:
    loaded = load_tasks("agent_common.demo_tasks")
    assert {"noop", "square"} <= set(loaded.names())
    result: Any = loaded.get("square").run({"x": 7})
    assert result == {"y": 49}


@pytest.mark.parametrize("x", [100_000_001, -(2**31 + 7), 4_294_967_295])  # squares above 2**53
def test_the_example_square_is_exact_for_integers(x: int) -> None:
    square = load_tasks("agent_common.demo_tasks").get("square")
    assert square.run({"x": x}) == {"y": x * x}


def test_the_example_square_refuses_an_integer_whose_square_is_too_big_for_the_wire() -> None:
    square = load_tasks("agent_common.demo_tasks").get("square")
    with pytest.raises(ValueError, match="64 bits"):
        square.run({"x": 2**32})
    assert square.run({"x": 1.5}) == {"y": 2.25}
