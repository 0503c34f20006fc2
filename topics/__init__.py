"""The wire contract: topic tree, message models, codec, and the transports that carry them."""

from topics.codec import Codec, EncodeError
from topics.errors import DecodeError, TopicError, WireError
from topics.models import (
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
)
from topics.names import DEFAULT_PREFIX, Kind, TopicTree, topic_matches, validate_node_id
from topics.transport import (
    BrokerRefused,
    ConnectError,
    Message,
    NotConnectedError,
    Transport,
    TransportConfig,
    TransportError,
)

__all__ = [
    "DEFAULT_PREFIX",
    "SCHEMA_VERSION",
    "BrokerRefused",
    "Codec",
    "ConnectError",
    "DeadLetter",
    "DecodeError",
    "EncodeError",
    "Executor",
    "Heartbeat",
    "Kind",
    "Load",
    "Message",
    "NodeState",
    "NotConnectedError",
    "Ping",
    "Pong",
    "Result",
    "Role",
    "Status",
    "Task",
    "TaskCapability",
    "TopicError",
    "TopicTree",
    "Transport",
    "TransportConfig",
    "TransportError",
    "WireError",
    "topic_matches",
    "validate_node_id",
]
