"""Pydantic models of every message on the wire.

All models are frozen, reject unknown fields and carry the schema version ``v``. Everything needed to
route a reply travels inside the message (``reply_to``), so the protocol works on MQTT 3.1.1 brokers.
Times named ``*_time`` or ``created``/``deadline`` are Unix seconds on the sender's clock; durations are
seconds. A task's deadline travels as ``ttl`` (seconds left when sent), which no clock offset affects.

Every field is bounded: integers, floats (finite), strings, lists and maps. A topic taken from the wire
(``reply_to``) must be one a client may publish to (:func:`topics.names.validate_publish_topic`); its
error has the type :data:`TOPIC_ERROR`, which the codec reports as the reason ``bad-reply-to``.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, WithJsonSchema
from pydantic_core import PydanticCustomError

from topics.errors import TopicError
from topics.names import validate_publish_topic, validate_topic_name

SCHEMA_VERSION: Literal[1] = 1

MAX_COUNT = 2**53
"""Largest counter, session number or nonce: every integer up to it survives a JSON double."""
MAX_QUEUE = 10**9
"""Largest queue length, capacity or number of tasks in flight a node may report."""
MAX_UNIX_TIME = 1e11
"""Latest Unix time on the wire (year 5138): times are finite and bounded."""
MAX_DURATION = 1e9
"""Longest duration in seconds (about 31 years)."""
MAX_TTL = 86_400.0
"""Longest ``Task.ttl`` in seconds (one day): a task that may wait longer has no useful deadline."""
MAX_TOPIC_LENGTH = 1024
"""Longest topic, in characters, a message may name (``reply_to``, ``DeadLetter.topic``)."""
MAX_ENTRIES = 1024
"""Most entries of a map keyed by task name (capabilities, service times)."""
MAX_POOLS = 256
MAX_DEAD_LETTER_PAYLOAD = 4096
TOPIC_ERROR = "bad_topic"
"""Pydantic error type of a topic field whose value MQTT (or the protocol) does not allow."""


def _topic_checker(validate: Callable[[str], str]) -> Callable[[str], str]:
    """A pydantic validator: ``validate`` (a topics.names check) with its TopicError as TOPIC_ERROR."""

    def check(value: str) -> str:
        if not value or len(value) > MAX_TOPIC_LENGTH:
            raise PydanticCustomError(TOPIC_ERROR, "a topic needs 1 to {limit} characters",
                                      {"limit": MAX_TOPIC_LENGTH})
        try:
            return validate(value)
        except TopicError as exc:
            raise PydanticCustomError(TOPIC_ERROR, "{problem}", {"problem": str(exc)}) from None
    return check


def _topic_schema(rules: str) -> WithJsonSchema:
    return WithJsonSchema({"type": "string", "minLength": 1, "maxLength": MAX_TOPIC_LENGTH,
                           "format": "mqtt-topic", "$comment": rules})


NodeId = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:@-]+$")]
TaskName = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")]
TopicName = Annotated[str, AfterValidator(_topic_checker(validate_publish_topic)),
                      _topic_schema("a topic a client may publish to: no wildcards, no leading $, no "
                                    "control or non-characters, at most 201 levels")]
"""A topic a node publishes to when a message says so (``reply_to``)."""
ReceivedTopic = Annotated[str, AfterValidator(_topic_checker(validate_topic_name)),
                          _topic_schema("an MQTT topic name: no wildcards, no control or "
                                        "non-characters, at most 201 levels")]
"""A topic something arrived on (a leading ``$`` allowed): only recorded, never published to."""
UnixTime = Annotated[float, Field(ge=0.0, le=MAX_UNIX_TIME, allow_inf_nan=False)]
Duration = Annotated[float, Field(ge=0.0, le=MAX_DURATION, allow_inf_nan=False)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
QueueCount = Annotated[int, Field(ge=0, le=MAX_QUEUE)]
Attempt = Annotated[int, Field(ge=1, le=100)]
TaskId = Annotated[str, StringConstraints(min_length=1, max_length=128)]
ContentType = Annotated[str, StringConstraints(max_length=255)]
Text = Annotated[str, StringConstraints(max_length=4096)]

CONTENT_CBOR = "application/cbor"
CONTENT_JSON = "application/json"
CONTENT_BYTES = "application/octet-stream"


class Status(str, Enum):
    """How a task ended on the server."""

    OK = "ok"
    ERROR = "error"
    REJECTED_BUSY = "rejected-busy"
    EXPIRED = "expired"
    UNKNOWN_TASK = "unknown-task"


class Role(str, Enum):
    SERVER = "server"
    DEVICE = "device"


class Executor(str, Enum):
    """Where a registered task runs on a node."""

    THREAD = "thread"
    PROCESS = "process"


class Record(BaseModel):
    """Base of every wire record: frozen, strict about unknown fields, enums stored as their values."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_enum_values=True)


class WireModel(Record):
    """Base of every top-level message: a :class:`Record` with the schema version ``v``."""

    v: Literal[1] = SCHEMA_VERSION


class Task(WireModel):
    """A unit of work sent from a device to a server (or a pool of servers).

    ``ttl`` is the deadline as seconds left when the message is sent: the server counts it on its own
    clock from receipt. ``deadline`` (absolute, on the sender's clock) is still accepted from clients
    that send it; with both, ``ttl`` wins.
    """

    id: TaskId
    task: TaskName
    sender: NodeId
    reply_to: TopicName
    created: UnixTime
    deadline: UnixTime | None = None
    ttl: Annotated[float, Field(ge=0.0, le=MAX_TTL, allow_inf_nan=False)] | None = None
    attempt: Attempt = 1
    payload: Any = None
    content_type: ContentType = CONTENT_CBOR
    stage: Annotated[int, Field(ge=0, le=1000)] | None = None


class Result(WireModel):
    """The answer to one task, published to the task's ``reply_to``."""

    task_id: TaskId
    status: Status
    server: NodeId
    task: TaskName | None = None
    payload: Any = None
    content_type: ContentType = CONTENT_CBOR
    error: Text | None = None
    queue_wait: Duration = 0.0
    service_time: Duration = 0.0
    attempt: Attempt = 1


class TaskCapability(Record):
    """What a node can run under one task name."""

    executor: Executor = Executor.THREAD
    stages: Annotated[int, Field(ge=1, le=1000)] | None = None


class Load(Record):
    """A node's honest load at the time of a heartbeat."""

    queue_length: QueueCount = 0
    queue_capacity: QueueCount = 0
    in_flight: QueueCount = 0
    workers: Annotated[int, Field(ge=0, le=100_000)] = 1
    service_time: Annotated[dict[TaskName, Duration], Field(max_length=MAX_ENTRIES)] = Field(
        default_factory=dict)
    cpu: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] = 0.0


class Heartbeat(WireModel):
    """Periodic report of liveness, capabilities and load."""

    node: NodeId
    role: Role
    session: Count
    seq: Count
    interval: Annotated[float, Field(gt=0.0, le=3600.0, allow_inf_nan=False)]
    time: UnixTime
    capabilities: Annotated[dict[TaskName, TaskCapability], Field(max_length=MAX_ENTRIES)] = Field(
        default_factory=dict)
    pools: Annotated[tuple[NodeId, ...], Field(max_length=MAX_POOLS)] = ()
    load: Load = Field(default_factory=Load)


class Ping(WireModel):
    """Round-trip probe. ``sent`` is the sender's monotonic clock, echoed back untouched."""

    nonce: Count
    sender: NodeId
    reply_to: TopicName
    sent: Finite


class Pong(WireModel):
    """Answer to a :class:`Ping`, sent at once, ahead of any queued work."""

    nonce: Count
    responder: NodeId
    sent: Finite


class NodeState(WireModel):
    """Retained birth/death record. A death only counts for the session it names."""

    node: NodeId
    role: Role
    status: Literal["online", "offline"]
    session: Count
    time: UnixTime
    tasks: Annotated[tuple[TaskName, ...], Field(max_length=MAX_ENTRIES)] = ()
    """What a server serves (in its birth), so a device can offload before its first heartbeat."""
    interval: Annotated[float, Field(gt=0.0, le=3600.0, allow_inf_nan=False)] | None = None
    """Seconds between its heartbeats (in its birth): how long the birth stands for one."""
    pools: Annotated[tuple[NodeId, ...], Field(max_length=MAX_POOLS)] = ()
    """The pools whose shared inbox a server reads (in its birth, as in its heartbeats)."""


class DeadLetter(WireModel):
    """A copy of input a node rejected, with the reason, for whoever operates the fleet."""

    node: NodeId
    topic: ReceivedTopic
    reason: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    detail: Text = ""
    payload: Annotated[bytes, Field(max_length=MAX_DEAD_LETTER_PAYLOAD)] = b""
    size: Count = 0
    time: UnixTime


ALL_MODELS: tuple[type[WireModel], ...] = (
    Task,
    Result,
    Heartbeat,
    Ping,
    Pong,
    NodeState,
    DeadLetter,
)
