"""The codec: every model round-trips through CBOR and JSON, and bad input raises only DecodeError."""

from __future__ import annotations

import json
import math
from typing import Any

import cbor2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import topics.codec as codec_module
from topics.codec import DEFAULT_MAX_PAYLOAD, MAX_DEPTH, MAX_INT, Codec, EncodeError, scan_cbor, sniff_format
from topics.errors import DecodeError, TopicError, WireError
from topics.models import (
    ALL_MODELS,
    MAX_COUNT,
    MAX_DURATION,
    MAX_UNIX_TIME,
    SCHEMA_VERSION,
    DeadLetter,
    Executor,
    Heartbeat,
    Load,
    NodeState,
    Ping,
    Pong,
    Result,
    Role,
    Status,
    Task,
    TaskCapability,
    WireModel,
)
from topics.names import validate_publish_topic

CODECS = [Codec("cbor"), Codec("json")]
TOPIC = "offload/v1/node/srv1/task"

# Strategies ---------------------------------------------------------------------------------

node_ids = st.text(alphabet="abcXYZ019_.:@-", min_size=1, max_size=64)
task_names = st.text(alphabet="abcXYZ019_.:-", min_size=1, max_size=40)
finite = st.floats(allow_nan=False, allow_infinity=False)
non_negative = st.floats(min_value=0.0, max_value=MAX_UNIX_TIME)
durations = st.floats(min_value=0.0, max_value=MAX_DURATION)
counts = st.integers(0, MAX_COUNT)
short_text = st.text(max_size=40)
ids = st.text(min_size=1, max_size=128)
# What MQTT allows in a topic name, written out independently of topics.names: no C0/C1 controls
# (category Cc), no surrogates (Cs), no wildcards, no non-characters.
topic_characters = st.characters(exclude_categories=("Cc", "Cs"), exclude_characters="+#").filter(
    lambda c: (ord(c) & 0xFFFE) != 0xFFFE and not 0xFDD0 <= ord(c) <= 0xFDEF)
received_topics = st.text(topic_characters, min_size=1, max_size=80)
topics = received_topics.filter(lambda topic: not topic.startswith("$"))

ARRAY_DTYPES = ["|u1", "|i1", "<i2", ">i4", "<u8", "<f2", "<f4", ">f8", "<c8", "<c16", "|b1"]
arrays = st.sampled_from(ARRAY_DTYPES).flatmap(
    lambda dtype: hnp.arrays(np.dtype(dtype), hnp.array_shapes(min_dims=0, max_dims=3, min_side=0,
                                                                  max_side=4))
)
leaves = (st.none() | st.booleans() | st.integers(-MAX_INT, MAX_INT) | finite | short_text
          | st.binary(max_size=64) | arrays)
map_keys = short_text.filter(lambda key: key not in ("$bytes", "$ndarray"))
payloads = st.recursive(
    leaves,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(map_keys, children, max_size=4),
    max_leaves=20,
)

tasks = st.builds(
    Task, id=ids, task=task_names, sender=node_ids, reply_to=topics, created=non_negative,
    deadline=st.none() | non_negative, ttl=st.none() | st.floats(0.0, 86_400.0), attempt=st.integers(1, 100),
    payload=payloads,
    content_type=short_text, stage=st.none() | st.integers(0, 1000),
)
results = st.builds(
    Result, task_id=ids, status=st.sampled_from(Status), server=node_ids, task=st.none() | task_names,
    payload=payloads, content_type=short_text, error=st.none() | st.text(max_size=200),
    queue_wait=durations, service_time=durations, attempt=st.integers(1, 100),
)
capabilities = st.builds(TaskCapability, executor=st.sampled_from(Executor),
                         stages=st.none() | st.integers(1, 1000))
loads = st.builds(
    Load, queue_length=st.integers(0, 10**6), queue_capacity=st.integers(0, 10**6),
    in_flight=st.integers(0, 1000), workers=st.integers(0, 100_000),
    service_time=st.dictionaries(task_names, durations, max_size=4),
    cpu=st.floats(0.0, 1.0),
)
heartbeats = st.builds(
    Heartbeat, node=node_ids, role=st.sampled_from(Role), session=counts,
    seq=counts, interval=st.floats(0.001, 3600.0), time=non_negative,
    capabilities=st.dictionaries(task_names, capabilities, max_size=4),
    pools=st.lists(node_ids, max_size=3).map(tuple), load=loads,
)
pings = st.builds(Ping, nonce=counts, sender=node_ids, reply_to=topics, sent=finite)
pongs = st.builds(Pong, nonce=counts, responder=node_ids, sent=finite)
states = st.builds(NodeState, node=node_ids, role=st.sampled_from(Role),
                   status=st.sampled_from(["online", "offline"]), session=counts,
                   time=non_negative)
dead_letters = st.builds(
    DeadLetter, node=node_ids, topic=received_topics, reason=st.text(min_size=1, max_size=64),
    detail=st.text(max_size=200), payload=st.binary(max_size=200), size=st.integers(0, 10**7),
    time=non_negative,
)
MODEL_STRATEGIES: dict[type[WireModel], st.SearchStrategy[Any]] = {
    Task: tasks, Result: results, Heartbeat: heartbeats, Ping: pings, Pong: pongs,
    NodeState: states, DeadLetter: dead_letters,
}
any_message = st.one_of(*MODEL_STRATEGIES.values())


def same(left: Any, right: Any) -> bool:
    """Deep equality that compares arrays by dtype, shape and exact bytes (NaN-safe)."""
    if isinstance(left, np.ndarray) or isinstance(right, np.ndarray):
        return (isinstance(left, np.ndarray) and isinstance(right, np.ndarray)
                and left.dtype == right.dtype and left.shape == right.shape
                and left.tobytes() == right.tobytes())
    if isinstance(left, dict) and isinstance(right, dict):
        return left.keys() == right.keys() and all(same(left[k], right[k]) for k in left)
    if isinstance(left, list | tuple) and isinstance(right, list | tuple):
        return len(left) == len(right) and all(same(a, b) for a, b in zip(left, right, strict=True))
    if isinstance(left, float) and isinstance(right, float):
        return left == right and math.copysign(1, left) == math.copysign(1, right)
    return type(left) is type(right) and bool(left == right)


def valid_task(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {"v": 1, "id": "t-1", "task": "square", "sender": "me",
                              "reply_to": "offload/v1/node/me/result", "created": 1_700_000_000,
                              "payload": {"x": 7}}
    fields.update(overrides)
    return fields


def as_json(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields).encode()


def expect_decode_error(codec: Codec, data: bytes, model: type[WireModel], reason: str,
                        topic: str = TOPIC) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        codec.decode(data, model, topic=topic)
    assert info.value.reason == reason, info.value
    assert info.value.topic == topic
    return info.value


# Round trips --------------------------------------------------------------------------------


def test_every_model_has_a_strategy() -> None:
    assert set(MODEL_STRATEGIES) == set(ALL_MODELS)


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.format)
@given(message=any_message)
@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
def test_every_model_round_trips(codec: Codec, message: WireModel) -> None:
    data = codec.encode(message)
    assert sniff_format(data) == codec.format
    decoded = codec.decode(data, type(message), topic=TOPIC)
    assert type(decoded) is type(message)
    assert same(decoded.model_dump(), message.model_dump())
    for other in CODECS:  # whatever a node sends, every node reads
        assert same(other.decode(data, type(message)).model_dump(), message.model_dump())


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.format)
@given(payload=payloads)
@settings(max_examples=150)
def test_payload_values_round_trip(codec: Codec, payload: Any) -> None:
    task = Task.model_validate(valid_task(payload=payload))
    assert same(codec.decode(codec.encode(task), Task).payload, payload)
    for fmt in ("cbor", "json"):
        assert same(codec.decode_value(codec.encode_value(payload, fmt), fmt), payload)


def test_numpy_arrays_of_several_dtypes_and_shapes_keep_dtype_shape_and_bytes() -> None:
    frame = (np.arange(120 * 160 * 3) % 251).astype(np.uint8).reshape(120, 160, 3)
    values = [frame, np.linspace(0, 1, 12, dtype=">f8").reshape(3, 4), np.zeros((0, 5), "<i2"),
              np.array(3.5, dtype="<f4"), np.array([True, False]), np.array([1 + 2j], "<c16"),
              np.asfortranarray(np.arange(6, dtype="<i8").reshape(2, 3)), frame[::2, ::3, 1]]
    for codec in CODECS:
        for array in values:
            decoded = codec.decode(codec.encode(Task.model_validate(valid_task(payload=array))), Task)
            assert same(decoded.payload, array)


def test_cbor_carries_arrays_as_raw_bytes_and_json_as_base64() -> None:
    array = np.arange(1000, dtype="<u2")
    task = Task.model_validate(valid_task(payload=array))
    raw = cbor2.loads(Codec("cbor").encode(task))["payload"]["$ndarray"]
    assert raw == {"dtype": "<u2", "shape": [1000], "data": array.tobytes()}
    text = json.loads(Codec("json").encode(task))["payload"]["$ndarray"]
    assert text["dtype"] == "<u2" and text["shape"] == [1000]
    assert set(text["data"]) == {"$bytes"}
    assert len(Codec("cbor").encode(task)) < len(Codec("json").encode(task))


def test_numpy_scalars_become_plain_numbers() -> None:
    task = Task.model_validate(valid_task(payload={"n": np.int32(3), "f": np.float64(0.5)}))
    for codec in CODECS:
        assert codec.decode(codec.encode(task), Task).payload == {"n": 3, "f": 0.5}


def test_bytes_travel_as_dollar_bytes_in_json() -> None:
    letter = DeadLetter(node="srv1", topic=TOPIC, reason="schema", payload=b"\x00\xff", time=1.0)
    wire = json.loads(Codec("json").encode(letter))
    assert wire["payload"] == {"$bytes": "AP8="}
    assert cbor2.loads(Codec("cbor").encode(letter))["payload"] == b"\x00\xff"


def test_json_array_data_may_be_a_plain_base64_string() -> None:
    fields = valid_task(payload={"$ndarray": {"dtype": "<u1", "shape": [2, 2], "data": "AQIDBA=="}})
    decoded = Codec("json").decode(as_json(fields), Task)
    assert same(decoded.payload, np.array([[1, 2], [3, 4]], dtype="<u1"))


def test_missing_version_means_version_one_and_none_fields_are_left_out() -> None:
    fields = valid_task()
    del fields["v"]
    decoded = Codec().decode(as_json(fields), Task)
    assert decoded.v == SCHEMA_VERSION and decoded.deadline is None
    assert "deadline" not in json.loads(Codec("json").encode(decoded))


def test_enums_are_stored_as_their_values() -> None:
    result = Result(task_id="t-1", status=Status.REJECTED_BUSY, server="srv1")
    assert json.loads(Codec("json").encode(result))["status"] == "rejected-busy"
    assert Codec().decode(Codec().encode(result), Result).status == "rejected-busy"


# Encoding refusals --------------------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.format)
@pytest.mark.parametrize(
    "payload",
    [
        np.array([1, "a"], dtype=object),
        np.array(["text"]),
        np.array(["2024-01-01"], dtype="datetime64[D]"),
        np.zeros(2, dtype=[("a", "<i4"), ("b", "<f4")]),
        {1: "integer key"},
        {"$bytes": "aGk="},
        {"$ndarray": {"dtype": "<u1", "shape": [0], "data": b""}},
        {1, 2},
        object(),
        complex(1, 2),
    ],
    ids=["object-array", "str-array", "datetime-array", "structured-array", "int-key", "reserved-bytes",
         "reserved-ndarray", "set", "object", "complex"],
)
def test_unencodable_payloads_raise_encode_error(codec: Codec, payload: Any) -> None:
    task = Task.model_validate(valid_task(payload=payload))
    with pytest.raises(EncodeError):
        codec.encode(task)


def test_json_refuses_nan_on_encode_cbor_carries_it_in_payloads() -> None:
    task = Task.model_validate(valid_task(payload={"x": math.nan, "y": -math.inf}))
    with pytest.raises(EncodeError, match="NaN"):
        Codec("json").encode(task)
    payload = Codec("cbor").decode(Codec("cbor").encode(task), Task).payload
    assert math.isnan(payload["x"]) and payload["y"] == -math.inf


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_times_and_clocks_are_finite_in_both_formats(value: float) -> None:
    data = cbor2.dumps({"v": 1, "nonce": 1, "sender": "me", "reply_to": "r", "sent": value})
    assert "sent" in expect_decode_error(Codec(), data, Ping, "schema").detail
    data = cbor2.dumps({"v": 1, "nonce": 1, "responder": "me", "sent": value})
    assert "sent" in expect_decode_error(Codec(), data, Pong, "schema").detail
    data = cbor2.dumps(valid_task(created=value))
    assert "created" in expect_decode_error(Codec(), data, Task, "schema").detail


def test_too_deep_payload_refused_on_encode() -> None:
    nested: Any = 1
    for _ in range(MAX_DEPTH + 2):
        nested = [nested]
    for codec in CODECS:
        with pytest.raises(EncodeError, match="deeper"):
            codec.encode(Task.model_validate(valid_task(payload=nested)))


def test_encode_over_the_limit_raises() -> None:
    codec = Codec("cbor", max_payload=200)
    with pytest.raises(EncodeError, match="over the limit of 200"):
        codec.encode(Task.model_validate(valid_task(payload=b"x" * 300)))
    with pytest.raises(EncodeError, match="over 200"):
        codec.encode_value(b"x" * 300, "raw")


def test_codec_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown format"):
        Codec("xml")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive"):
        Codec(max_payload=0)
    assert Codec().max_payload == DEFAULT_MAX_PAYLOAD == 1024 * 1024
    assert repr(Codec("json", max_payload=10)) == "Codec('json', max_payload=10)"


# Decoding errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.format)
def test_oversized_is_refused_before_parsing(codec: Codec) -> None:
    small = Codec(codec.format, max_payload=100)
    data = codec.encode(Task.model_validate(valid_task(payload="y" * 200)))
    error = expect_decode_error(small, data, Task, "oversized")
    assert error.size == len(data)
    with pytest.raises(DecodeError) as info:
        small.decode_value(b"z" * 101, "raw", topic=TOPIC)
    assert info.value.reason == "oversized"


def test_one_mebibyte_frame_fits_the_default_limit_as_cbor_only() -> None:
    frame = np.zeros((480, 640, 3), np.uint8)  # 900 KiB
    task = Task.model_validate(valid_task(payload=frame))
    assert len(Codec("cbor").encode(task)) < DEFAULT_MAX_PAYLOAD
    with pytest.raises(EncodeError):
        Codec("json").encode(task)  # base64 grows it by a third


@pytest.mark.parametrize("version", [0, 2, "1", True, 1.0, None, [1]])
@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.format)
def test_wrong_version(codec: Codec, version: Any) -> None:
    data = codec.encode_value(valid_task(v=version), codec.format)
    error = expect_decode_error(codec, data, Task, "version")
    assert "this node speaks 1" in error.detail


def test_array_as_version_is_a_version_error() -> None:
    data = Codec().encode_value(valid_task(v=np.arange(4)), "cbor")
    expect_decode_error(Codec(), data, Task, "version")


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"surprise": 1}, "surprise"),
        ({"id": ""}, "id"),
        ({"id": 7}, "id"),
        ({"task": "bad name"}, "task"),
        ({"sender": "a/b"}, "sender"),
        ({"created": -1}, "created"),
        ({"created": "yesterday"}, "created"),
        ({"attempt": 0}, "attempt"),
        ({"attempt": 101}, "attempt"),
        ({"stage": -1}, "stage"),
        ({"reply_to": None}, "reply_to"),
    ],
)
@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.format)
def test_schema_violations_name_the_field(codec: Codec, overrides: dict[str, Any], field: str) -> None:
    data = codec.encode_value(valid_task(**overrides), codec.format)
    error = expect_decode_error(codec, data, Task, "schema")
    assert field in error.detail and "Task" in error.detail


@pytest.mark.parametrize("reply_to", ["a/+/b", "$SYS/x", "ctl\x01", "c1\x9f", "non\ufffe", "non\U0001ffff",
                                      "a" + "/a" * 201, "", "r" * 1025])
@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.format)
def test_a_reply_to_mqtt_refuses_is_a_bad_reply_to(codec: Codec, reply_to: str) -> None:
    data = codec.encode_value(valid_task(reply_to=reply_to), codec.format)
    assert "reply_to" in expect_decode_error(codec, data, Task, "bad-reply-to").detail
    ping = {"v": 1, "nonce": 1, "sender": "me", "reply_to": reply_to, "sent": 0.5}
    expect_decode_error(codec, codec.encode_value(ping, codec.format), Ping, "bad-reply-to")
    letter = {"v": 1, "node": "srv1", "topic": reply_to, "reason": "r", "time": 1.0}
    if not reply_to.startswith("$"):  # a topic something arrived on may be a $SYS one
        expect_decode_error(codec, codec.encode_value(letter, codec.format), DeadLetter, "bad-topic")


def test_a_bad_reply_to_among_other_problems_is_a_schema_error() -> None:
    fields = valid_task(reply_to="a/#")
    del fields["sender"]
    error = expect_decode_error(Codec(), cbor2.dumps(fields), Task, "schema")
    assert "reply_to" in error.detail and "sender" in error.detail
    expect_decode_error(Codec(), cbor2.dumps(valid_task(reply_to=7)), Task, "schema")


def test_missing_required_field_is_a_schema_error() -> None:
    fields = valid_task()
    del fields["sender"]
    assert "sender" in expect_decode_error(Codec(), as_json(fields), Task, "schema").detail


def test_decoding_as_the_wrong_model_is_a_schema_error() -> None:
    data = Codec().encode(Pong(nonce=1, responder="srv1", sent=1.0))
    expect_decode_error(Codec(), data, Task, "schema")


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_json_nan_and_infinity_are_rejected(constant: bytes) -> None:
    data = b'{"v":1,"nonce":1,"sender":"me","reply_to":"r","sent":' + constant + b"}"
    error = expect_decode_error(Codec("json"), data, Ping, "malformed")
    assert "not allowed" in error.detail
    with pytest.raises(DecodeError):
        Codec().decode_value(b"[" + constant + b"]", "json")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"   ", "malformed"),
        (b"[1, 2]", "malformed"),
        (b"\x82\x01\x02", "malformed"),  # CBOR array
        (b"hello", "malformed"),
        (b'{"v": 1,', "malformed"),
        (b'{"v": 1} trailing', "malformed"),
        (b'{"p":"\xff"}', "malformed"),  # not UTF-8
        (b'{"a": 1, "a": 2}', "schema"),  # JSON keeps the last duplicate; "a" is then unknown
        (b"\xa1\x61p\x01\x00", "malformed"),  # CBOR map followed by a stray byte
        (b"\xa2\x61p\x01\x61p\x02", "malformed"),  # duplicate CBOR keys
        (b"\xa1\x01\x02", "malformed"),  # integer map key
        (b"\xa1\x61p\xc1\x05", "malformed"),  # CBOR datetime tag
        (b"\xa1\x61p\xd9\x01\x02\x80", "malformed"),  # CBOR set tag
        (b"\xa1\x61p\xf7", "malformed"),  # CBOR undefined
        (b"\xa1\x61p\x5b" + b"\xff" * 8, "malformed"),  # absurd byte-string length
        (b"\xa1\x61p\x5f\x41a", "malformed"),  # unterminated indefinite string
        (b'{"p": {"$bytes": "not base64!"}}', "malformed"),
        (b'{"p": {"$bytes": 5}}', "malformed"),
        (b'{"p": {"$ndarray": [1]}}', "malformed"),
        (b'{"p": {"$ndarray": {"dtype": "|O", "shape": [1], "data": "AAAAAAAAAAA="}}}', "malformed"),
        (b'{"p": {"$ndarray": {"dtype": "<U1", "shape": [1], "data": "AAAAAA=="}}}', "malformed"),
        (b'{"p": {"$ndarray": {"dtype": "nonsense", "shape": [1], "data": "AA=="}}}', "malformed"),
        (b'{"p": {"$ndarray": {"dtype": "<u1", "shape": [-1], "data": "AA=="}}}', "malformed"),
        (b'{"p": {"$ndarray": {"dtype": "<u1", "shape": [true], "data": "AA=="}}}', "malformed"),
        (b'{"p": {"$ndarray": {"dtype": "<u1", "shape": 1, "data": "AA=="}}}', "malformed"),
        (b'{"p": {"$ndarray": {"dtype": "<u1", "shape": [1], "data": 1}}}', "malformed"),
        (b'{"p": {"$ndarray": {"dtype": "<u1", "shape": [1], "data": "AA==", "x": 1}}}', "malformed"),
    ],
)
def test_malformed_input(data: bytes, reason: str) -> None:
    expect_decode_error(Codec(), data, Task, reason)


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.format)
def test_ndarray_with_mismatched_length_is_refused(codec: Codec) -> None:
    wire = {"dtype": "<u2", "shape": [2, 3], "data": b"\x00" * 11}
    fields = valid_task(payload={"$ndarray": wire})
    data = (cbor2.dumps(fields) if codec.format == "cbor"
            else as_json(valid_task(payload={"$ndarray": {**wire, "data": "A" * 12 + "AA=="}})))
    error = expect_decode_error(codec, data, Task, "malformed")
    assert "needs 12" in error.detail


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.format)
def test_deep_nesting_is_too_deep(codec: Codec) -> None:
    for depth in (MAX_DEPTH + 5, 100_000):
        if codec.format == "cbor":
            data = b"\xa1\x61p" + b"\x81" * depth + b"\x01"
        else:
            data = b'{"p":' + b"[" * depth + b"1" + b"]" * depth + b"}"
        expect_decode_error(Codec(max_payload=10**6), data, Task, "too-deep")


def test_nesting_just_inside_the_limit_decodes() -> None:
    nested: Any = 1
    for _ in range(MAX_DEPTH - 2):
        nested = [nested]
    for codec in CODECS:
        task = Task.model_validate(valid_task(payload=nested))
        assert codec.decode(codec.encode(task), Task).payload == nested


def test_the_error_names_the_topic_reason_and_size() -> None:
    data = b"\x00garbage"
    with pytest.raises(DecodeError) as info:
        Codec().decode(data, Heartbeat, topic="offload/v1/node/x/heartbeat")
    error = info.value
    assert isinstance(error, WireError) and isinstance(error, ValueError)
    assert error.topic == "offload/v1/node/x/heartbeat"
    assert "offload/v1/node/x/heartbeat" in str(error) and "malformed" in str(error)
    assert error.size == len(data)


def test_sniff_format() -> None:
    assert sniff_format(b'{"v":1}') == "json"
    assert sniff_format(b' \r\n\t{"v":1}') == "json"
    assert sniff_format(b"\xa0") == "cbor"
    assert sniff_format(b"\xbf\xff") == "cbor"
    assert sniff_format(b"\x9f") is None
    assert sniff_format(b"") is None
    assert sniff_format(b"  ") is None


def test_decode_value_formats() -> None:
    codec = Codec()
    assert codec.decode_value(b"\x00\x01", "raw") == b"\x00\x01"
    assert codec.decode_value(b"[1, 2.5, null]", "json") == [1, 2.5, None]
    assert codec.decode_value(cbor2.dumps("text"), "cbor") == "text"
    assert codec.encode_value("héllo", "raw") == "héllo".encode()
    with pytest.raises(EncodeError, match="raw output needs bytes or str"):
        codec.encode_value(5, "raw")
    with pytest.raises(EncodeError, match="unknown value format"):
        codec.encode_value(5, "xml")  # type: ignore[arg-type]
    with pytest.raises(DecodeError) as info:
        codec.decode_value(b"{", "json", topic="bridge/in")
    assert info.value.reason == "malformed" and info.value.topic == "bridge/in"
    with pytest.raises(DecodeError):
        codec.decode_value(b"1", "xml")  # type: ignore[arg-type]


# CBOR structure: refused before anything is decoded --------------------------------------------


def cbor_task(payload_cbor: bytes) -> bytes:
    """A valid CBOR Task whose payload is ``payload_cbor``, raw CBOR bytes as given."""
    fields = cbor2.dumps(valid_task(payload=None))
    assert fields.endswith(b"\x67payload\xf6")
    return fields[:-1] + payload_cbor


def tag_header(number: int) -> bytes:
    if number < 24:
        return bytes([0xC0 + number])
    width = next(w for w in (1, 2, 4, 8) if number < 1 << (8 * w))
    return bytes([0xD8 + (1, 2, 4, 8).index(width)]) + number.to_bytes(width, "big")


@pytest.mark.parametrize("number", [*range(40), 55, 256, 258, 1004, 55799, 2**16 - 1, 2**32 - 1, 2**64 - 1])
def test_every_cbor_tag_is_refused_before_cbor2_sees_it(number: int,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []
    monkeypatch.setattr(cbor2, "CBORDecoder", lambda *args, **kwargs: calls.append(args))
    for tagged in (b"\x01", b"\x81\x01", b"\x41\x00", tag_header(1) + b"\x01"):
        error = expect_decode_error(Codec(), cbor_task(tag_header(number) + tagged), Task, "malformed")
        assert f"CBOR tag {number}" in error.detail and "tags are refused" in error.detail
    assert calls == []


@pytest.mark.parametrize(("data", "what"), [
    (b"\xf7", "undefined"), (b"\xf0", "simple value 16"), (b"\xf8\x20", "simple value 32"),
    (b"\x1c", "reserved"), (b"\x3f", "reserved"), (b"\x5c", "reserved"), (b"\xfc", "reserved"),
    (b"\xdf\x01", "reserved"), (b"\xff", "closes nothing"), (b"\xbf\x61k\xff", "map key without"),
    (b"\x9f\x01", "ends inside"), (b"\x5f\x41a\x61b\xff", "indefinite-length string"),
    (b"\x7f\x5f\xff\xff", "indefinite-length string"), (b"\x9b" + b"\xff" * 8, "container of"),
    (b"\xbb" + b"\x00" * 7 + b"\x09", "container of 18 items"), (b"\x3b\xff", "ends inside"),
])
def test_malformed_cbor_structure_is_named(data: bytes, what: str) -> None:
    assert what in expect_decode_error(Codec(), cbor_task(data), Task, "malformed").detail


def test_indefinite_lengths_are_accepted() -> None:
    payload = b"\xbf\x61a\x9f\x01\x9f\xff\x5f\x41x\x42yz\xff\xff\x61b\x7f\x61h\x62ey\xff\xff"
    decoded = Codec().decode(cbor_task(payload), Task)
    assert decoded.payload == {"a": [1, [], b"xyz"], "b": "hey"}


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.format)
def test_integers_beyond_64_bits_are_big_int(codec: Codec) -> None:
    for value in (MAX_INT, -MAX_INT):
        data = codec.encode_value(valid_task(payload=value), codec.format)
        assert codec.decode(data, Task).payload == value
    if codec.format == "cbor":
        expect_decode_error(codec, cbor_task(b"\x3b" + b"\xff" * 8), Task, "big-int")
        for bignum in (b"\xc2\x49\x01" + b"\x00" * 8, b"\xc3\x41\x00"):  # tags 2 and 3
            assert "big integer" in expect_decode_error(codec, cbor_task(bignum), Task, "malformed").detail
        return
    for text in (str(MAX_INT + 1), str(-MAX_INT - 1), "9" * 6000, "-" + "1" * 4301):
        expect_decode_error(codec, b'{"v":1,"payload":' + text.encode() + b"}", Task, "big-int")
    expect_decode_error(codec, b'{"v":' + b"7" * 6000 + b"}", Task, "big-int")
    error = expect_decode_error(codec, as_json(valid_task(attempt=MAX_INT)), Task, "schema")
    assert "attempt" in error.detail


@pytest.mark.parametrize("number", [b"1e999", b"-1e999", b"1" * 400 + b".0"])
def test_json_numbers_beyond_a_double_are_refused(number: bytes) -> None:
    error = expect_decode_error(Codec("json"), b'{"v":1,"payload":' + number + b"}", Task, "malformed")
    assert "out of range" in error.detail


def test_json_lone_surrogates_are_refused_pairs_are_not() -> None:
    expect_decode_error(Codec(), b'{"p":"\\ud800"}', Task, "malformed")
    expect_decode_error(Codec(), b'{"p":"\\udc00x"}', Task, "malformed")
    decoded = Codec().decode(as_json(valid_task(payload="\U0001f600")), Task)  # sent as \ud83d\ude00
    assert decoded.payload == "\U0001f600"


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.format)
def test_more_than_max_items_values_are_too_many(codec: Codec) -> None:
    small = Codec(codec.format, max_items=1000)
    fits = small.encode_value(valid_task(payload=list(range(980))), codec.format)
    assert small.decode(fits, Task).payload == list(range(980))
    too_many = codec.encode_value(valid_task(payload=list(range(1000))), codec.format)
    expect_decode_error(small, too_many, Task, "too-many-items")
    with pytest.raises(EncodeError, match="receivers would refuse it"):
        small.encode(Task.model_validate(valid_task(payload=list(range(1000)))))
    if codec.format == "cbor":  # indefinite lengths are counted too
        expect_decode_error(small, cbor_task(b"\x9f" + b"\x00" * 1000 + b"\xff"), Task, "too-many-items")


def test_json_string_contents_do_not_count_as_values() -> None:
    commas = ",:[{" * 30_000
    task = Task.model_validate(valid_task(payload=commas))
    assert Codec().decode(Codec("json").encode(task), Task).payload == commas


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.format)
def test_encoder_and_decoder_agree_on_depth(codec: Codec) -> None:
    deepest: Any = 1
    for _ in range(MAX_DEPTH - 1):  # with the message's own map: MAX_DEPTH containers
        deepest = [deepest]
    task = Task.model_validate(valid_task(payload=deepest))
    assert codec.decode(codec.encode(task), Task).payload == deepest
    with pytest.raises(EncodeError, match="deeper"):
        codec.encode(Task.model_validate(valid_task(payload=[deepest])))
    too_deep = (cbor_task(b"\x81" * MAX_DEPTH + b"\x01") if codec.format == "cbor"
                else b'{"p":' + b"[" * MAX_DEPTH + b"1" + b"]" * MAX_DEPTH + b"}")
    expect_decode_error(codec, too_deep, Task, "too-deep")
    array: Any = np.zeros(2, np.uint8)
    for _ in range(MAX_DEPTH - 4):  # an $ndarray is three containers: itself, its spec, its shape
        array = [array]
    assert same(codec.decode(codec.encode(Task.model_validate(valid_task(payload=array))), Task).payload,
                array)
    with pytest.raises(EncodeError, match="deeper"):
        codec.encode(Task.model_validate(valid_task(payload=[array])))


def test_payload_integers_beyond_64_bits_are_not_encoded() -> None:
    for codec in CODECS:
        for value in (MAX_INT + 1, -MAX_INT - 1, 10**6000):
            with pytest.raises(EncodeError, match="bits cannot go on the wire"):
                codec.encode(Task.model_validate(valid_task(payload={"n": [value]})))


def test_scan_cbor_reads_headers_only() -> None:
    frame = cbor2.dumps({"v": 1, "data": bytes(900_000), "list": list(range(10))})
    scan_cbor(frame)
    with pytest.raises(ValueError, match="bytes after the end"):
        scan_cbor(frame + b"\x00")
    with pytest.raises(ValueError, match="ends inside"):
        scan_cbor(frame[:1000])
    with pytest.raises(ValueError, match="container of 10 items"):
        scan_cbor(frame[:-1])
    with pytest.raises(ValueError, match="more than 5 CBOR items"):
        scan_cbor(cbor2.dumps([1, 2, 3, 4, 5]), max_items=5)
    with pytest.raises(ValueError, match="more than 2 nested"):
        scan_cbor(cbor2.dumps([[[1]]]), max_depth=2)


# Robustness: nothing but DecodeError, whatever arrives ---------------------------------------


DECODE_REASONS = {"empty", "oversized", "malformed", "too-deep", "too-many-items", "big-int", "schema",
                  "version", "bad-reply-to", "bad-topic"}


def decode_or_decode_error(data: bytes, model: type[WireModel]) -> None:
    for codec in CODECS:
        try:
            decoded = codec.decode(data, model, topic=TOPIC)
        except DecodeError as error:
            assert error.reason in DECODE_REASONS
            assert error.topic == TOPIC
        else:
            assert isinstance(decoded, model)


@given(data=st.binary(max_size=300), model=st.sampled_from(ALL_MODELS))
@settings(max_examples=300)
def test_random_bytes_raise_only_decode_error(data: bytes, model: type[WireModel]) -> None:
    decode_or_decode_error(data, model)


@given(head=st.integers(0xA0, 0xBF), tail=st.binary(max_size=300), model=st.sampled_from(ALL_MODELS))
@settings(max_examples=300)
def test_random_cbor_maps_raise_only_decode_error(head: int, tail: bytes, model: type[WireModel]) -> None:
    decode_or_decode_error(bytes([head]) + tail, model)


@given(text=st.text(max_size=200), model=st.sampled_from(ALL_MODELS))
@settings(max_examples=200)
def test_random_json_objects_raise_only_decode_error(text: str, model: type[WireModel]) -> None:
    decode_or_decode_error(("{" + text).encode("utf-8", "surrogatepass"), model)


@given(message=any_message, fmt=st.sampled_from(["cbor", "json"]), data=st.data())
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_mutated_valid_encodings_raise_only_decode_error(message: WireModel, fmt: str,
                                                         data: st.DataObject) -> None:
    encoded = bytearray(Codec("json" if fmt == "json" else "cbor").encode(message))
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        action = data.draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]), label="action")
        position = data.draw(st.integers(0, max(0, len(encoded) - 1)), label="position")
        if action == "flip" and encoded:
            encoded[position] ^= 1 << data.draw(st.integers(0, 7), label="bit")
        elif action == "set" and encoded:
            encoded[position] = data.draw(st.integers(0, 255), label="byte")
        elif action == "insert":
            encoded[position:position] = data.draw(st.binary(min_size=1, max_size=4), label="bytes")
        elif action == "delete" and encoded:
            del encoded[position]
        elif action == "truncate":
            del encoded[position:]
    decode_or_decode_error(bytes(encoded), type(message))


cbor_heads = st.tuples(st.integers(0, 7), st.sampled_from([*range(24), 24, 25, 26, 27, 28, 31]),
                       st.integers(0, 2**64 - 1))


def cbor_head(major: int, info: int, arg: int) -> bytes:
    """One CBOR item header, arguments of any width; ``info`` 28/31 as they are (reserved, indefinite)."""
    if info < 24 or info in (28, 31):
        return bytes([major << 5 | info])
    width = 1 << (info - 24)
    return bytes([major << 5 | info]) + (arg % (1 << (8 * width))).to_bytes(width, "big")


@given(heads=st.lists(cbor_heads, max_size=40), filler=st.binary(max_size=20),
       model=st.sampled_from(ALL_MODELS))
@settings(max_examples=400)
def test_random_cbor_headers_raise_only_decode_error(heads: list[tuple[int, int, int]], filler: bytes,
                                                     model: type[WireModel]) -> None:
    decode_or_decode_error(b"\xbf" + b"".join(cbor_head(*head) for head in heads) + filler, model)


@given(message=any_message, data=st.data())
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
def test_a_tag_anywhere_is_refused(message: WireModel, data: st.DataObject) -> None:
    encoded = Codec("cbor").encode(message)
    starts = [position for position in _item_starts(encoded) if position > 0]
    position = data.draw(st.sampled_from(starts), label="position")
    number = data.draw(st.integers(0, 2**64 - 1), label="tag")
    tagged = encoded[:position] + tag_header(number) + encoded[position:]
    error = expect_decode_error(Codec(), tagged, type(message), "malformed")
    assert f"CBOR tag {number}" in error.detail


def _item_starts(data: bytes) -> list[int]:
    """The offset of every item header in a definite-length CBOR encoding (cbor2's output)."""
    starts, pos, stack = [], 0, [1]
    while stack:
        starts.append(pos)
        initial = data[pos]
        major, info = initial >> 5, initial & 0x1F
        width = 1 << (info - 24) if 24 <= info < 28 else 0
        arg = int.from_bytes(data[pos + 1:pos + 1 + width], "big") if width else info
        pos += 1 + width
        due = 0
        if major in (2, 3):
            pos += arg
        elif major in (4, 5):
            due = arg * (2 if major == 5 else 1)
        stack[-1] -= 1
        if due:
            stack.append(due)
        while stack and stack[-1] == 0:
            stack.pop()
    return starts


@given(value=st.integers(MAX_INT + 1, 10**4000) | st.integers(-(10**4000), -MAX_INT - 1),
       where=st.sampled_from(["v", "attempt", "payload", "nested"]))
@settings(max_examples=150)
def test_json_integers_beyond_64_bits_are_big_int_wherever_they_are(value: int, where: str) -> None:
    text = str(value).encode()
    body = {"v": b'{"v":' + text + b"}", "attempt": b'{"v":1,"attempt":' + text + b"}",
            "payload": b'{"payload":' + text + b"}",
            "nested": b'{"payload":{"a":[1,{"b":' + text + b"}]}}"}[where]
    expect_decode_error(Codec(), body, Task, "big-int")


@given(topic=st.text(max_size=60), fmt=st.sampled_from(["cbor", "json"]))
@settings(max_examples=300)
def test_any_reply_to_decodes_only_if_mqtt_allows_it(topic: str, fmt: str) -> None:
    codec = Codec(fmt)  # type: ignore[arg-type]
    data = codec.encode_value(valid_task(reply_to=topic), codec.format)
    try:
        task = codec.decode(data, Task)
    except DecodeError as error:
        assert error.reason == "bad-reply-to", error
        with pytest.raises(TopicError):
            validate_publish_topic(topic)
    else:
        assert validate_publish_topic(task.reply_to) == topic


def _json_truth(value: Any, depth: int = 1) -> tuple[int, int]:
    """(values + empty containers, nesting) of a parsed JSON value: what the text count must give."""
    if isinstance(value, list | dict):
        children = list(value.values()) if isinstance(value, dict) else value
        count = 1 + (len(value) if isinstance(value, dict) else 0) + (not value)
        deepest = depth
        for child in children:
            items, nested = _json_truth(child, depth + 1)
            count, deepest = count + items, max(deepest, nested)
        return count, deepest
    return 1, depth - 1


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10) | st.text(alphabet='ab\\",:[]{}', max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.text(alphabet='k\\",:[{', max_size=4), children, max_size=4),
    max_leaves=30,
)


@given(value=json_values, chunk=st.sampled_from([1, 3, 64, 1 << 16]))
@settings(max_examples=300)
def test_json_values_are_counted_outside_strings_across_chunks(value: Any, chunk: int) -> None:
    text = json.dumps({"p": value}).encode()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(codec_module, "_JSON_CHUNK", chunk)
        assert codec_module._json_shape(text, 0) == _json_truth({"p": value})
