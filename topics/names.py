"""The topic tree: builders for publish topics, subscription filters, and a parser for received topics.

Every topic lives under a prefix (default ``offload/v1``)::

    {prefix}/node/{node}/task        task inbox of one node              QoS 1
    {prefix}/node/{node}/result      result inbox of one node            QoS 1
    {prefix}/node/{node}/heartbeat   periodic load report                QoS 0
    {prefix}/node/{node}/ping        round-trip probe to a node          QoS 0
    {prefix}/node/{node}/pong        probe answers back to the pinger    QoS 0
    {prefix}/node/{node}/state       birth/death, retained               QoS 1
    {prefix}/node/{node}/dead-letter copies of input a node rejected     QoS 0
    {prefix}/pool/{pool}/task        pool inbox (shared subscription)    QoS 1
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from topics.errors import TopicError

DEFAULT_PREFIX = "offload/v1"
MAX_NODE_ID_LENGTH = 64
MAX_TOPIC_BYTES = 65535

_NODE_ID = re.compile(r"[A-Za-z0-9_.:@-]+")


def _utf8_length(topic: str) -> int:
    """Length of ``topic`` in UTF-8 bytes; lone surrogates (not valid Unicode) are a TopicError."""
    try:
        return len(topic.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise TopicError(f"topic is not valid UTF-8: {exc.reason}",
                         topic=topic.encode("utf-8", "backslashreplace").decode()) from exc


class Kind(str, Enum):
    """What a node-scoped topic carries."""

    TASK = "task"
    RESULT = "result"
    HEARTBEAT = "heartbeat"
    PING = "ping"
    PONG = "pong"
    STATE = "state"
    DEAD_LETTER = "dead-letter"


def validate_node_id(node_id: str, *, what: str = "node id") -> str:
    """Return ``node_id`` if it is usable as one topic level, else raise :class:`TopicError`.

    Rejected: empty, longer than 64 characters, leading ``$``, ``/``, ``+``, ``#``, NUL, whitespace
    or any character outside ``[A-Za-z0-9_.:@-]``.
    """
    if not isinstance(node_id, str) or not node_id:
        raise TopicError(f"{what} must be a non-empty string", topic=str(node_id))
    if len(node_id) > MAX_NODE_ID_LENGTH:
        raise TopicError(f"{what} is longer than {MAX_NODE_ID_LENGTH} characters", topic=node_id)
    if node_id.startswith("$"):
        raise TopicError(f"{what} must not start with '$'", topic=node_id)
    for bad in ("/", "+", "#"):
        if bad in node_id:
            raise TopicError(f"{what} must not contain {bad!r}", topic=node_id)
    if not _NODE_ID.fullmatch(node_id):
        raise TopicError(f"{what} may only use letters, digits and _.:@-", topic=node_id)
    return node_id


def validate_publish_topic(topic: str) -> str:
    """Return ``topic`` if a client may publish to it: no wildcards, no leading ``$``, not empty."""
    if not topic:
        raise TopicError("publish topic is empty", topic=topic)
    if "+" in topic or "#" in topic:
        raise TopicError("publish topic must not contain wildcards", topic=topic)
    if topic.startswith("$"):
        raise TopicError("publish topic must not start with '$'", topic=topic)
    if "\x00" in topic or _utf8_length(topic) > MAX_TOPIC_BYTES:
        raise TopicError("publish topic has a NUL or is too long", topic=topic)
    return topic


def validate_filter(topic_filter: str) -> str:
    """Return ``topic_filter`` if it is a valid MQTT subscription filter (``$share/g/...`` allowed)."""
    if not topic_filter or "\x00" in topic_filter:
        raise TopicError("subscription filter is empty or has a NUL", topic=topic_filter)
    if _utf8_length(topic_filter) > MAX_TOPIC_BYTES:
        raise TopicError("subscription filter is too long", topic=topic_filter[:100])
    levels = topic_filter.split("/")
    if levels[0] == "$share":
        if len(levels) < 3 or not levels[1] or "+" in levels[1] or "#" in levels[1]:
            raise TopicError("shared subscription needs $share/<group>/<filter>", topic=topic_filter)
        levels = levels[2:]
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            raise TopicError("'#' must be a whole, last level", topic=topic_filter)
        if "+" in level and level != "+":
            raise TopicError("'+' must be a whole level", topic=topic_filter)
    return topic_filter


def strip_shared(topic_filter: str) -> str:
    """The filter without a ``$share/<group>/`` prefix (what the broker matches topics against)."""
    if topic_filter.startswith("$share/"):
        return topic_filter.split("/", 2)[2]
    return topic_filter


def topic_matches(topic_filter: str, topic: str) -> bool:
    """True when ``topic`` matches the MQTT filter (``+``, ``#``, ``$share``; ``$`` topics only literally)."""
    filter_levels = strip_shared(topic_filter).split("/")
    topic_levels = topic.split("/")
    if topic.startswith("$") and filter_levels[0] in ("+", "#"):
        return False
    for index, level in enumerate(filter_levels):
        if level == "#":
            return True
        if index >= len(topic_levels):
            return False
        if level != "+" and level != topic_levels[index]:
            return False
    return len(filter_levels) == len(topic_levels)


def wildcard_captures(topic_filter: str, topic: str) -> list[str]:
    """The topic levels matched by each ``+`` (and the rest for ``#``), in order; [] if no match."""
    if not topic_matches(topic_filter, topic):
        return []
    captures: list[str] = []
    topic_levels = topic.split("/")
    for index, level in enumerate(strip_shared(topic_filter).split("/")):
        if level == "+":
            captures.append(topic_levels[index])
        elif level == "#":
            captures.append("/".join(topic_levels[index:]))
    return captures


@dataclass(frozen=True, slots=True)
class ParsedTopic:
    """A received topic split into its parts."""

    kind: Kind
    node: str
    pool: str | None = None


@dataclass(frozen=True, slots=True)
class TopicTree:
    """Builders and matchers for every topic of the protocol, under one prefix."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        validate_publish_topic(self.prefix)
        if self.prefix.endswith("/") or "//" in self.prefix:
            raise TopicError("prefix must not end with '/' or contain empty levels", topic=self.prefix)

    def node(self, node_id: str, kind: Kind) -> str:
        """The topic of ``kind`` for one node."""
        return f"{self.prefix}/node/{validate_node_id(node_id)}/{kind.value}"

    def task_inbox(self, node_id: str) -> str:
        return self.node(node_id, Kind.TASK)

    def result_inbox(self, node_id: str) -> str:
        return self.node(node_id, Kind.RESULT)

    def heartbeat(self, node_id: str) -> str:
        return self.node(node_id, Kind.HEARTBEAT)

    def ping(self, node_id: str) -> str:
        return self.node(node_id, Kind.PING)

    def pong(self, node_id: str) -> str:
        return self.node(node_id, Kind.PONG)

    def state(self, node_id: str) -> str:
        return self.node(node_id, Kind.STATE)

    def dead_letter(self, node_id: str) -> str:
        return self.node(node_id, Kind.DEAD_LETTER)

    def pool_inbox(self, pool: str) -> str:
        """Where devices publish tasks for any server of ``pool``."""
        return f"{self.prefix}/pool/{validate_node_id(pool, what='pool name')}/task"

    def pool_subscription(self, pool: str) -> str:
        """The shared-subscription filter servers of ``pool`` subscribe to (MQTT 5 / Mosquitto)."""
        return f"$share/{validate_node_id(pool, what='pool name')}/{self.pool_inbox(pool)}"

    def all_of(self, kind: Kind) -> str:
        """A filter matching ``kind`` for every node, e.g. every heartbeat."""
        return f"{self.prefix}/node/+/{kind.value}"

    def parse(self, topic: str) -> ParsedTopic | None:
        """Split a received topic of this tree; ``None`` when it is not one of ours."""
        head = self.prefix + "/"
        if not topic.startswith(head):
            return None
        levels = topic[len(head) :].split("/")
        if len(levels) != 3:
            return None
        scope, name, last = levels
        try:
            if scope == "node":
                return ParsedTopic(kind=Kind(last), node=name)
            if scope == "pool" and last == Kind.TASK.value:
                return ParsedTopic(kind=Kind.TASK, node=name, pool=name)
        except ValueError:
            return None
        return None
