"""TaskEncoder against the model path: the same bytes for every Task it takes, the same error otherwise."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from topics.codec import Codec, EncodeError
from topics.models import Task
from topics.task_wire import TaskEncoder

SENDER = "edge-1"
REPLY_TO = "offload/v1/node/edge-1/result"


class Colour(str, enum.Enum):
    RED = "red"


@dataclasses.dataclass
class Point:
    x: int
    label: str | None = None


class Box(BaseModel):
    size: float
    note: str | None = None


class Name(str):
    """A str subclass: the encoder leaves it to the model."""


def model_path(codec: Codec, fields: dict[str, Any]) -> bytes:
    return codec.encode(Task(sender=SENDER, reply_to=REPLY_TO, id=fields["task_id"], task=fields["name"],
                             created=fields["created"], attempt=fields["attempt"], ttl=fields["ttl"],
                             payload=fields["payload"], stage=fields["stage"]))


def outcome(call: Any) -> tuple[str, Any]:
    """What a call did: its bytes, or its error's type and text (NaN inputs make errors() unequal)."""
    try:
        return "bytes", call()
    except (ValidationError, EncodeError) as exc:
        return type(exc).__name__, str(exc)


leaves = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12)
          | st.binary(max_size=12) | st.sampled_from([Colour.RED, Point(1), Point(2, "p"), Box(size=1.5),
                                                      Box(size=2.0, note="n")]))
payloads = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
                        | st.dictionaries(st.text(max_size=5) | st.sampled_from(["$bytes", "$ndarray"]),
                                          inner, max_size=4), max_leaves=12)
names = (st.from_regex(r"[A-Za-z0-9_.:-]{1,130}", fullmatch=True) | st.text(max_size=6)
         | st.sampled_from(["noop", "a" * 128, "a" * 129, "no op", "noop\n", "", "é"])
         | st.builds(Name, st.just("noop")))
ids = st.text(max_size=3) | st.sampled_from(["edge-1-1", "x" * 128, "x" * 129])
times = st.floats() | st.integers(-2, 2**40) | st.sampled_from([0.0, -0.0, 1e11, 1e11 + 1e-3, 1.7e9])
attempts = st.integers(-1, 102) | st.booleans() | st.sampled_from([1.0, 2.5])
ttls = st.none() | st.floats() | st.integers(-1, 90_000) | st.sampled_from([0.0, -0.0, 86_400.0, 86_400.5])
stages = st.none() | st.integers(-2, 1002) | st.booleans() | st.sampled_from([1.0])
fields_of = st.fixed_dictionaries({"task_id": ids, "name": names, "created": times, "attempt": attempts,
                                   "ttl": ttls, "payload": payloads, "stage": stages})
valid_fields = st.fixed_dictionaries({
    "task_id": st.text(min_size=1, max_size=128),
    "name": st.from_regex(r"[A-Za-z0-9_.:-]{1,128}", fullmatch=True),
    "created": st.floats(0.0, 1e11), "attempt": st.integers(1, 100),
    "ttl": st.none() | st.floats(0.0, 86_400.0),
    "payload": payloads, "stage": st.none() | st.integers(0, 1000)})
"""Fields the encoder takes directly (the payload may still be refused)."""
codecs = st.sampled_from([Codec("cbor"), Codec("json"), Codec("cbor", max_payload=80),
                          Codec("json", max_items=6)])


@given(fields=fields_of | valid_fields, codec=codecs)
@settings(max_examples=800, suppress_health_check=[HealthCheck.too_slow])
def test_same_bytes_or_same_error_as_the_model(fields: dict[str, Any], codec: Codec) -> None:
    encoder = TaskEncoder(codec, sender=SENDER, reply_to=REPLY_TO)
    assert outcome(lambda: encoder.encode(**fields)) == outcome(lambda: model_path(codec, fields))


@given(fields=(fields_of | valid_fields).filter(lambda f: f["payload"] is None
                                                         or isinstance(f["payload"], bytes)))
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_what_the_encoder_sends_decodes_as_the_fields(fields: dict[str, Any]) -> None:
    codec = Codec("cbor")
    kind, data = outcome(lambda: TaskEncoder(codec, sender=SENDER, reply_to=REPLY_TO).encode(**fields))
    if kind != "bytes":
        return  # refused: the test above holds it to the model's refusal
    task = codec.decode(data, Task)
    assert (task.id, task.task, task.sender, task.reply_to, task.created, task.attempt, task.ttl,
            task.payload, task.stage) == (fields["task_id"], fields["name"], SENDER, REPLY_TO,
                                          fields["created"], fields["attempt"], fields["ttl"],
                                          fields["payload"], fields["stage"])


def test_the_common_task_takes_the_direct_path(monkeypatch: pytest.MonkeyPatch) -> None:
    codec = Codec("cbor")
    encoder = TaskEncoder(codec, sender=SENDER, reply_to=REPLY_TO)
    fields: dict[str, Any] = {"task_id": "edge-1-7", "name": "detect.v2", "created": 1.7e9, "attempt": 2,
                              "ttl": 4.5, "payload": b"x" * 64, "stage": 1}
    expected = model_path(codec, fields)

    def no_model(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was built")

    monkeypatch.setattr("topics.task_wire.Task", no_model)
    assert encoder.encode(**fields) == expected


@pytest.mark.parametrize(("sender", "reply_to", "field"), [
    ("edge 1", REPLY_TO, "sender"), (SENDER, "offload/+/result", "reply_to"), (SENDER, "$SYS/x", "reply_to"),
])
def test_a_bad_sender_or_reply_topic_is_refused_when_the_encoder_is_made(sender: str, reply_to: str,
                                                                        field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        TaskEncoder(Codec(), sender=sender, reply_to=reply_to)
    assert [err["loc"] for err in caught.value.errors()] == [(field,)]
