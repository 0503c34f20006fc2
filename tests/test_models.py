"""Model constraints: node ids, bounds, frozen records, unknown fields refused, enums stored as values."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from topics.models import (
    ALL_MODELS,
    MAX_COUNT,
    MAX_DURATION,
    MAX_ENTRIES,
    MAX_POOLS,
    MAX_QUEUE,
    MAX_UNIX_TIME,
    SCHEMA_VERSION,
    TOPIC_ERROR,
    DeadLetter,
    Heartbeat,
    Load,
    NodeState,
    Ping,
    Pong,
    Result,
    Status,
    Task,
    TaskCapability,
    WireModel,
)


def task_fields(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {"id": "t-1", "task": "square", "sender": "cam-1",
                              "reply_to": "offload/v1/node/cam-1/result", "created": 1.0}
    fields.update(overrides)
    return fields


def heartbeat_fields(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {"node": "srv1", "role": "server", "session": 1, "seq": 0, "interval": 1.0,
                              "time": 1.0}
    fields.update(overrides)
    return fields


MINIMAL: dict[type[WireModel], dict[str, Any]] = {
    Task: task_fields(),
    Result: {"task_id": "t-1", "status": "ok", "server": "srv1"},
    Heartbeat: heartbeat_fields(),
    Ping: {"nonce": 1, "sender": "cam-1", "reply_to": "offload/v1/node/cam-1/pong", "sent": 0.5},
    Pong: {"nonce": 1, "responder": "srv1", "sent": 0.5},
    NodeState: {"node": "srv1", "role": "server", "status": "online", "session": 3, "time": 1.0},
    DeadLetter: {"node": "srv1", "topic": "offload/v1/node/srv1/task", "reason": "schema", "time": 1.0},
}


def test_every_model_is_covered() -> None:
    assert set(MINIMAL) == set(ALL_MODELS)


@pytest.mark.parametrize("model", ALL_MODELS, ids=lambda m: m.__name__)
def test_minimal_messages_carry_the_schema_version(model: type[WireModel]) -> None:
    message = model.model_validate(MINIMAL[model])
    assert message.v == SCHEMA_VERSION == 1


@pytest.mark.parametrize("model", ALL_MODELS, ids=lambda m: m.__name__)
def test_models_are_frozen(model: type[WireModel]) -> None:
    message = model.model_validate(MINIMAL[model])
    field = next(iter(MINIMAL[model]))
    with pytest.raises(ValidationError, match="frozen"):
        setattr(message, field, getattr(message, field))


@pytest.mark.parametrize("model", [*ALL_MODELS, Load, TaskCapability], ids=lambda m: m.__name__)
def test_unknown_fields_are_refused(model: type[Any]) -> None:
    fields = dict(MINIMAL.get(model, {}))
    fields["surprise"] = 1
    with pytest.raises(ValidationError, match="surprise"):
        model.model_validate(fields)


@pytest.mark.parametrize("model", ALL_MODELS, ids=lambda m: m.__name__)
def test_other_schema_versions_are_refused(model: type[WireModel]) -> None:
    with pytest.raises(ValidationError):
        model.model_validate({**MINIMAL[model], "v": 2})


@pytest.mark.parametrize("node", ["srv1", "a", "edge_01.lab:3@home", "n" * 64])
def test_node_ids_that_fit_a_topic_level(node: str) -> None:
    assert Heartbeat.model_validate(heartbeat_fields(node=node)).node == node
    assert Task.model_validate(task_fields(sender=node)).sender == node


@pytest.mark.parametrize("node", ["", "n" * 65, "a/b", "a+b", "a#", "a b", "$SYS", "é", "line\n"])
def test_node_ids_that_would_break_a_topic(node: str) -> None:
    with pytest.raises(ValidationError):
        Heartbeat.model_validate(heartbeat_fields(node=node))
    with pytest.raises(ValidationError):
        Task.model_validate(task_fields(sender=node))
    with pytest.raises(ValidationError):
        Result.model_validate({"task_id": "t", "status": "ok", "server": node})


@pytest.mark.parametrize("name", ["", "bad name", "a/b", "a@b", "x" * 129])
def test_task_names_are_restricted(name: str) -> None:
    with pytest.raises(ValidationError):
        Task.model_validate(task_fields(task=name))
    with pytest.raises(ValidationError):
        Heartbeat.model_validate(heartbeat_fields(capabilities={name: {}}))


@pytest.mark.parametrize(("attempt", "ok"), [(0, False), (1, True), (100, True), (101, False), (-1, False)])
def test_attempt_bounds(attempt: int, ok: bool) -> None:
    for model, fields in ((Task, task_fields()), (Result, MINIMAL[Result])):
        if ok:
            assert model.model_validate({**fields, "attempt": attempt}).attempt == attempt
        else:
            with pytest.raises(ValidationError, match="attempt"):
                model.model_validate({**fields, "attempt": attempt})


@pytest.mark.parametrize(
    ("field", "value"),
    [("id", ""), ("id", "x" * 129), ("created", -0.5), ("created", float("nan")), ("created", float("inf")),
     ("deadline", -1.0), ("ttl", -0.1), ("ttl", 86_400.5), ("ttl", float("nan")), ("ttl", float("inf")),
     ("stage", -1), ("stage", 1001), ("reply_to", ""), ("reply_to", "r" * 1025)],
)
def test_task_constraints(field: str, value: Any) -> None:
    with pytest.raises(ValidationError, match=field):
        Task.model_validate(task_fields(**{field: value}))


def test_task_defaults() -> None:
    task = Task.model_validate(task_fields())
    assert (task.deadline, task.attempt, task.payload, task.content_type, task.stage) == (
        None, 1, None, "application/cbor", None)


@pytest.mark.parametrize(
    ("field", "value"),
    [("interval", 0.0), ("interval", 3600.5), ("session", -1), ("seq", -1), ("time", -1.0),
     ("role", "router"), ("pools", ["a/b"])],
)
def test_heartbeat_constraints(field: str, value: Any) -> None:
    with pytest.raises(ValidationError, match=field):
        Heartbeat.model_validate(heartbeat_fields(**{field: value}))


@pytest.mark.parametrize(
    ("field", "value"),
    [("cpu", 1.5), ("cpu", -0.1), ("queue_length", -1), ("workers", 100_001), ("in_flight", -1),
     ("service_time", {"square": -1.0}), ("service_time", {"bad name": 1.0})],
)
def test_load_constraints(field: str, value: Any) -> None:
    with pytest.raises(ValidationError, match=field):
        Load.model_validate({field: value})


def test_capability_stage_bounds() -> None:
    assert TaskCapability(stages=7).stages == 7
    for stages in (0, 1001):
        with pytest.raises(ValidationError):
            TaskCapability(stages=stages)
    with pytest.raises(ValidationError):
        TaskCapability.model_validate({"executor": "gpu"})


def test_enums_are_stored_as_values() -> None:
    result = Result(task_id="t", status=Status.EXPIRED, server="srv1")
    assert result.status == "expired" and type(result.status) is str
    heartbeat = Heartbeat.model_validate(heartbeat_fields(capabilities={"ball": {"executor": "process",
                                                                                 "stages": 7}}))
    assert heartbeat.role == "server"
    assert heartbeat.capabilities["ball"].executor == "process"
    assert [s.value for s in Status] == ["ok", "error", "rejected-busy", "expired", "unknown-task"]
    with pytest.raises(ValidationError):
        Result.model_validate({**MINIMAL[Result], "status": "maybe"})


def test_node_state_status_is_online_or_offline() -> None:
    with pytest.raises(ValidationError):
        NodeState.model_validate({**MINIMAL[NodeState], "status": "sleeping"})


def test_result_error_and_times() -> None:
    with pytest.raises(ValidationError):
        Result.model_validate({**MINIMAL[Result], "error": "e" * 4097})
    with pytest.raises(ValidationError):
        Result.model_validate({**MINIMAL[Result], "queue_wait": -0.1})


def test_dead_letter_reason_and_detail_are_bounded() -> None:
    with pytest.raises(ValidationError):
        DeadLetter.model_validate({**MINIMAL[DeadLetter], "reason": ""})
    with pytest.raises(ValidationError):
        DeadLetter.model_validate({**MINIMAL[DeadLetter], "reason": "r" * 65})
    with pytest.raises(ValidationError):
        DeadLetter.model_validate({**MINIMAL[DeadLetter], "detail": "d" * 4097})


def test_heartbeat_defaults_are_not_shared_between_instances() -> None:
    first = Heartbeat.model_validate(heartbeat_fields())
    second = Heartbeat.model_validate(heartbeat_fields())
    assert first.load == Load() and first.capabilities == {} and first.pools == ()
    assert first.capabilities is not second.capabilities


# Every number, string and container is bounded; topics are ones MQTT allows -------------------

BAD_TOPICS = ["a/+/b", "a/#", "$SYS/x", "nul\x00", "ctl\x01", "c1\x85", "non\ufdd0", "non\uffff",
              "non\U0010ffff", "lone\ud800", "a" + "/a" * 201, "", "r" * 1025]


@pytest.mark.parametrize("topic", BAD_TOPICS, ids=repr)
@pytest.mark.parametrize(("model", "field"), [(Task, "reply_to"), (Ping, "reply_to"), (DeadLetter, "topic")],
                         ids=lambda v: getattr(v, "__name__", v))
def test_topic_fields_refuse_what_mqtt_refuses(model: type[WireModel], field: str, topic: str) -> None:
    if model is DeadLetter and topic.startswith("$"):
        assert DeadLetter.model_validate({**MINIMAL[DeadLetter], field: topic}).topic == topic
        return
    with pytest.raises(ValidationError) as info:
        model.model_validate({**MINIMAL[model], field: topic})
    errors = info.value.errors()
    assert [(err["loc"], err["type"]) for err in errors] == [((field,), TOPIC_ERROR)]


@pytest.mark.parametrize(("model", "field", "limit"), [
    (Heartbeat, "session", MAX_COUNT), (Heartbeat, "seq", MAX_COUNT), (NodeState, "session", MAX_COUNT),
    (Ping, "nonce", MAX_COUNT), (Pong, "nonce", MAX_COUNT), (DeadLetter, "size", MAX_COUNT),
    (Load, "queue_length", MAX_QUEUE), (Load, "queue_capacity", MAX_QUEUE), (Load, "in_flight", MAX_QUEUE),
    (Load, "workers", 100_000), (Task, "attempt", 100), (Result, "attempt", 100), (Task, "stage", 1000),
    (TaskCapability, "stages", 1000),
])
def test_every_integer_has_an_upper_bound(model: type[Any], field: str, limit: int) -> None:
    fields = dict(MINIMAL.get(model, {}))
    assert getattr(model.model_validate({**fields, field: limit}), field) == limit
    for value in (limit + 1, 10**400):
        with pytest.raises(ValidationError, match=field):
            model.model_validate({**fields, field: value})


@pytest.mark.parametrize(("model", "field", "limit"), [
    (Task, "created", MAX_UNIX_TIME), (Task, "deadline", MAX_UNIX_TIME), (Heartbeat, "time", MAX_UNIX_TIME),
    (NodeState, "time", MAX_UNIX_TIME), (DeadLetter, "time", MAX_UNIX_TIME),
    (Result, "queue_wait", MAX_DURATION), (Result, "service_time", MAX_DURATION),
])
def test_times_and_durations_are_finite_and_bounded(model: type[WireModel], field: str, limit: float) -> None:
    assert getattr(model.model_validate({**MINIMAL[model], field: limit}), field) == limit
    for value in (limit * 1.0001, float("inf"), float("nan")):
        with pytest.raises(ValidationError, match=field):
            model.model_validate({**MINIMAL[model], field: value})


@pytest.mark.parametrize(("model", "field"), [(Ping, "sent"), (Pong, "sent")])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_clocks_are_finite(model: type[WireModel], field: str, value: float) -> None:
    with pytest.raises(ValidationError, match=field):
        model.model_validate({**MINIMAL[model], field: value})


def test_strings_lists_and_maps_are_bounded() -> None:
    names = [f"t{i}" for i in range(MAX_ENTRIES + 1)]
    pools = [f"p{i}" for i in range(MAX_POOLS + 1)]
    cases: list[dict[str, object]] = [{"capabilities": {n: {} for n in names}}, {"pools": pools},
                                      {"load": {"service_time": {n: 0.1 for n in names}}}]
    for fields in cases:
        assert Heartbeat.model_validate(heartbeat_fields(**{k: _trim(v) for k, v in fields.items()}))
        with pytest.raises(ValidationError, match="at most"):
            Heartbeat.model_validate(heartbeat_fields(**fields))
    with pytest.raises(ValidationError, match="content_type"):
        Task.model_validate(task_fields(content_type="c" * 256))
    with pytest.raises(ValidationError, match="content_type"):
        Result.model_validate({**MINIMAL[Result], "content_type": "c" * 256})
    with pytest.raises(ValidationError, match="payload"):
        DeadLetter.model_validate({**MINIMAL[DeadLetter], "payload": b"x" * 4097})


def _trim(value: Any) -> Any:
    """``value`` with one entry less: just inside its bound."""
    if isinstance(value, dict):
        if "service_time" in value:
            return {"service_time": _trim(value["service_time"])}
        return dict(list(value.items())[:-1])
    return value[:-1]
