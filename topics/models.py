"""Pydantic models of every message on the wire.

All models are frozen, reject unknown fields and carry the schema version ``v``. Everything needed to
route a reply travels inside the message (``reply_to``), so the protocol works on MQTT 3.1.1 brokers.
Times named ``*_time`` or ``created``/``deadline`` are Unix seconds on the sender's clock; durations are
seconds.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

SCHEMA_VERSION: Literal[1] = 1

NodeId = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:@-]+$")]
TaskName = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")]
TopicName = Annotated[str, StringConstraints(min_length=1, max_length=1024)]
NonNegative = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
Count = Annotated[int, Field(ge=0)]

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
    """A unit of work sent from a device to a server (or a pool of servers)."""

    id: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    task: TaskName
    sender: NodeId
    reply_to: TopicName
    created: NonNegative
    deadline: NonNegative | None = None
    attempt: Annotated[int, Field(ge=1, le=100)] = 1
    payload: Any = None
    content_type: str = CONTENT_CBOR
    stage: Annotated[int, Field(ge=0, le=1000)] | None = None


class Result(WireModel):
    """The answer to one task, published to the task's ``reply_to``."""

    task_id: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    status: Status
    server: NodeId
    task: TaskName | None = None
    payload: Any = None
    content_type: str = CONTENT_CBOR
    error: Annotated[str, StringConstraints(max_length=4096)] | None = None
    queue_wait: NonNegative = 0.0
    service_time: NonNegative = 0.0
    attempt: Annotated[int, Field(ge=1, le=100)] = 1


class TaskCapability(Record):
    """What a node can run under one task name."""

    executor: Executor = Executor.THREAD
    stages: Annotated[int, Field(ge=1, le=1000)] | None = None


class Load(Record):
    """A node's honest load at the time of a heartbeat."""

    queue_length: Count = 0
    queue_capacity: Count = 0
    in_flight: Count = 0
    workers: Annotated[int, Field(ge=0, le=100_000)] = 1
    service_time: dict[TaskName, NonNegative] = Field(default_factory=dict)
    cpu: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] = 0.0


class Heartbeat(WireModel):
    """Periodic report of liveness, capabilities and load."""

    node: NodeId
    role: Role
    session: Annotated[int, Field(ge=0)]
    seq: Count
    interval: Annotated[float, Field(gt=0.0, le=3600.0, allow_inf_nan=False)]
    time: NonNegative
    capabilities: dict[TaskName, TaskCapability] = Field(default_factory=dict)
    pools: tuple[NodeId, ...] = ()
    load: Load = Field(default_factory=Load)


class Ping(WireModel):
    """Round-trip probe. ``sent`` is the sender's monotonic clock, echoed back untouched."""

    nonce: Annotated[int, Field(ge=0)]
    sender: NodeId
    reply_to: TopicName
    sent: float


class Pong(WireModel):
    """Answer to a :class:`Ping`, sent at once, ahead of any queued work."""

    nonce: Annotated[int, Field(ge=0)]
    responder: NodeId
    sent: float


class NodeState(WireModel):
    """Retained birth/death record. A death only counts for the session it names."""

    node: NodeId
    role: Role
    status: Literal["online", "offline"]
    session: Annotated[int, Field(ge=0)]
    time: NonNegative


class DeadLetter(WireModel):
    """A copy of input a node rejected, with the reason, for whoever operates the fleet."""

    node: NodeId
    topic: TopicName
    reason: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    detail: Annotated[str, StringConstraints(max_length=4096)] = ""
    payload: bytes = b""
    size: Count = 0
    time: NonNegative


ALL_MODELS: tuple[type[WireModel], ...] = (
    Task,
    Result,
    Heartbeat,
    Ping,
    Pong,
    NodeState,
    DeadLetter,
)
