"""The topic tree: builders for publish topics, subscription filters, and a parser for received topics.

Every topic lives under a prefix (default ``offload/v1``)::

    {prefix}/node/{node}/task        task inbox of one node              QoS 1
    {prefix}/node/{node}/result      result inbox of one node            QoS 1
    {prefix}/node/{node}/heartbeat   periodic load report                QoS 0, JSON
    {prefix}/node/{node}/ping        round-trip probe to a node          QoS 0
    {prefix}/node/{node}/pong        probe answers back to the pinger    QoS 0
    {prefix}/node/{node}/state       birth/death, retained               QoS 1, JSON
    {prefix}/node/{node}/dead-letter copies of input a node rejected     QoS 0, JSON
    {prefix}/pool/{pool}/task        pool inbox (shared subscription)    QoS 1
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from enum import Enum
from typing import Literal

from topics.errors import TopicError

DEFAULT_PREFIX = "offload/v1"
MAX_NODE_ID_LENGTH = 64
MAX_TOPIC_BYTES = 65535
MAX_TOPIC_SLASHES = 200
"""Mosquitto refuses a topic with more than 200 ``/`` (and disconnects a client publishing to it)."""

_NODE_ID = re.compile(r"[A-Za-z0-9_.:@-]+")
# What MQTT (and Mosquitto, which disconnects the client) refuses in any topic: C0 and C1 control
# characters, lone surrogates (not UTF-8 at all) and the Unicode non-characters.
_BAD_CHARACTER = re.compile(
    "[\\x00-\\x1f\\x7f-\\x9f\\ud800-\\udfff\\ufdd0-\\ufdef"
    + "".join(f"\\U{plane:04X}FFFE\\U{plane:04X}FFFF" for plane in range(17)) + "]"
)


def _shown(topic: str) -> str:
    """``topic`` as an error may carry it: lone surrogates escaped, at most 200 characters."""
    short = topic if len(topic) <= 200 else topic[:200] + "..."
    return short.encode("utf-8", "backslashreplace").decode()


def _character_problem(topic: str) -> str | None:
    """What is wrong with the first character MQTT refuses in ``topic``, or None."""
    if topic.isascii() and topic.isprintable():  # the usual topic: no control character (0-31, 127)
        return None
    found = _BAD_CHARACTER.search(topic)
    if found is None:
        return None
    code = ord(found.group())
    if code <= 0x9F:
        kind = "a NUL" if code == 0 else "a control character"
    elif 0xD800 <= code <= 0xDFFF:
        kind = "a lone surrogate (not UTF-8)"
    else:
        kind = "a Unicode non-character"
    return f"{kind} U+{code:04X} at index {found.start()}"


def _utf8_length(topic: str) -> int:
    """Length of ``topic`` in UTF-8 bytes; lone surrogates (not valid Unicode) are a TopicError."""
    try:
        return len(topic.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise TopicError(f"topic is not valid UTF-8: {exc.reason}", topic=_shown(topic)) from exc


class Kind(str, Enum):
    """What a node-scoped topic carries."""

    TASK = "task"
    RESULT = "result"
    HEARTBEAT = "heartbeat"
    PING = "ping"
    PONG = "pong"
    STATE = "state"
    DEAD_LETTER = "dead-letter"


@dataclass(frozen=True, slots=True)
class Delivery:
    """How a channel is published: its MQTT QoS, whether the broker keeps the last message, and
    its wire format when the channel fixes one (None: the node's configured format)."""

    qos: int
    retain: bool = False
    format: Literal["json"] | None = None


DELIVERY: dict[Kind, Delivery] = {
    Kind.TASK: Delivery(1),
    Kind.RESULT: Delivery(1),
    Kind.HEARTBEAT: Delivery(0, format="json"),
    Kind.PING: Delivery(0),
    Kind.PONG: Delivery(0),
    Kind.STATE: Delivery(1, retain=True, format="json"),
    Kind.DEAD_LETTER: Delivery(0, format="json"),
}
"""QoS, retain and format per channel (the table in this module's docstring): both agents publish
by it. The channels operators watch (heartbeats, state, dead letters) are always JSON, so any MQTT
tool (mosquitto_sub, Node-RED's JSON node, Home Assistant) reads them; every node reads both formats
on every channel."""


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


def validate_topic_name(topic: str, *, what: str = "topic") -> str:
    """Return ``topic`` if it is an MQTT topic name a broker accepts, else raise :class:`TopicError`.

    Refused: not a string, empty, ``+`` or ``#``, control characters (U+0000-001F, U+007F-009F),
    lone surrogates, Unicode non-characters (U+FDD0-FDEF, U+xFFFE, U+xFFFF), more than 65,535 UTF-8
    bytes or more than 200 ``/``. Empty levels (``a//b``) and a leading ``$`` are allowed.
    """
    if not isinstance(topic, str):
        raise TopicError(f"{what} must be a string, not {type(topic).__name__}")
    if not topic:
        raise TopicError(f"{what} is empty", topic=topic)
    if "+" in topic or "#" in topic:
        raise TopicError(f"{what} must not contain wildcards", topic=_shown(topic))
    problem = _character_problem(topic)
    if problem is not None:
        raise TopicError(f"{what} has {problem}", topic=_shown(topic))
    if len(topic) * 4 > MAX_TOPIC_BYTES and _utf8_length(topic) > MAX_TOPIC_BYTES:
        raise TopicError(f"{what} is too long: over {MAX_TOPIC_BYTES} UTF-8 bytes", topic=_shown(topic))
    if topic.count("/") > MAX_TOPIC_SLASHES:
        raise TopicError(f"{what} has more than {MAX_TOPIC_SLASHES + 1} levels", topic=_shown(topic))
    return topic


def validate_publish_topic(topic: str) -> str:
    """Return ``topic`` if a client may publish to it: a valid topic name not starting with ``$``.

    Everything published goes through this (both transports call it), and so does every topic taken
    from the wire before anything is sent there (``reply_to``): a broker disconnects a client that
    publishes to a topic it refuses, and a QoS 1 message would be resent after every reconnect.
    """
    validate_topic_name(topic, what="publish topic")
    if topic.startswith("$"):
        raise TopicError("publish topic must not start with '$'", topic=_shown(topic))
    return topic


def validate_filter(topic_filter: str) -> str:
    """Return ``topic_filter`` if it is a valid MQTT subscription filter (``$share/g/...`` allowed)."""
    if not isinstance(topic_filter, str) or not topic_filter:
        raise TopicError("subscription filter must be a non-empty string", topic=str(topic_filter))
    problem = _character_problem(topic_filter)
    if problem is not None:
        raise TopicError(f"subscription filter has {problem}", topic=_shown(topic_filter))
    if _utf8_length(topic_filter) > MAX_TOPIC_BYTES:
        raise TopicError("subscription filter is too long", topic=_shown(topic_filter))
    levels = topic_filter.split("/")
    if levels[0] == "$share":
        if len(levels) < 3 or not levels[1] or "+" in levels[1] or "#" in levels[1]:
            raise TopicError("shared subscription needs $share/<group>/<filter>", topic=topic_filter)
        levels = levels[2:]
    if len(levels) > MAX_TOPIC_SLASHES + 1:
        raise TopicError(f"subscription filter has more than {MAX_TOPIC_SLASHES + 1} levels",
                         topic=_shown(topic_filter))
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
        if len(topic) > _PARSED_LENGTH:
            return _parse(self.prefix, topic)
        return _parse_cached(self.prefix, topic)


_PARSED_LENGTH = 256
"""Topics up to this long have their parse remembered (a few per node, parsed for every message)."""


def _parse(prefix: str, topic: str) -> ParsedTopic | None:
    head = prefix + "/"
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


_parse_cached = functools.lru_cache(maxsize=1024)(_parse)
