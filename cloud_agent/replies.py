"""What the server sends back for the input it gets: results (only where the reply rules allow, in
the format the request came in) and, for input it refuses, a count by reason and a dead letter."""

from __future__ import annotations

import logging

from agent_common.badinput import BadInputLog, RateLimitedLog
from cloud_agent.node import ServerNode
from topics.codec import Codec, EncodeError, Format, sniff_format
from topics.errors import DecodeError, TopicError
from topics.models import CONTENT_CBOR, CONTENT_JSON, DeadLetter, Result
from topics.names import DELIVERY, Kind, TopicTree, topic_matches, validate_publish_topic
from topics.transport import Message, NotConnectedError, TransportError

log = logging.getLogger("cloud_agent.server")  # the server's one logger, as before its modules split

DEAD_LETTER_PAYLOAD = 4096
_NOT_REPLY_KINDS = frozenset({Kind.TASK, Kind.PING, Kind.STATE, Kind.HEARTBEAT, Kind.DEAD_LETTER})


class BadInput(ValueError):
    """Input the agent refuses: ``reason`` is a short word for counting."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class ReplyRules:
    """Where this server may publish a reply (a Result or a Pong) for a given sender.

    Only to the sender's own topics, ``{prefix}/node/{sender}/...``, or to a topic matching one of
    ``allowlist`` (MQTT filters; ``{sender}`` stands for the sender's node id). Never to a topic with
    wildcards or a leading ``$``, nor to any task, ping, state, heartbeat or dead-letter topic of
    the fleet, whatever the allowlist says.
    """

    def __init__(self, tree: TopicTree, allowlist: list[str]) -> None:
        self._tree = tree
        self._allowlist = tuple(allowlist)

    def check(self, topic: str, sender: str) -> str:
        """Return ``topic``, or raise :class:`BadInput` (``bad-reply-to``, ``reply-to-not-allowed``)."""
        try:
            validate_publish_topic(topic)
        except TopicError as exc:
            raise BadInput("bad-reply-to", str(exc)) from None
        parsed = self._tree.parse(topic)
        if parsed is not None and parsed.kind in _NOT_REPLY_KINDS:
            raise BadInput("bad-reply-to", f"reply_to {topic[:200]!r} is a {parsed.kind.value} topic")
        if topic.startswith(f"{self._tree.prefix}/node/{sender}/"):
            return topic
        if any(topic_matches(pattern.replace("{sender}", sender), topic) for pattern in self._allowlist):
            return topic
        raise BadInput("reply-to-not-allowed",
                       f"reply_to {topic[:200]!r} is not one of {sender!r}'s own topics "
                       f"({self._tree.prefix}/node/{sender}/...) nor in reply_allowlist")


def content_type(codec: Codec) -> str:
    """The ``content_type`` a Result encoded by ``codec`` declares."""
    return CONTENT_JSON if codec.format == "json" else CONTENT_CBOR


class Replies:
    """Publishes results and dead letters for one server node, and counts what it refuses.

    ``bad_input`` counts refused input by reason, ``unsent`` results that could not go by reason.
    """

    def __init__(self, node: ServerNode, *, bad_input: BadInputLog, unsent: RateLimitedLog) -> None:
        self._node = node
        config = node.config
        self._codecs: dict[Format, Codec] = {
            "cbor": Codec("cbor", max_payload=config.max_payload),
            "json": Codec("json", max_payload=config.max_payload),
        }
        self.codec = self._codecs[config.format]
        """The configured format's codec."""
        self.rules = ReplyRules(node.tree, config.reply_allowlist)
        self.bad_input = bad_input
        self._unsent = unsent

    def channel_codec(self, kind: Kind) -> Codec:
        """The codec the server's own messages on ``kind`` go out in (DELIVERY's fixed format:
        state, heartbeats and dead letters are JSON)."""
        return self._codecs[DELIVERY[kind].format or self._node.config.format]

    def codec_for(self, message: Message) -> Codec:
        """The codec of the format ``message`` is in (the configured one when it cannot tell): its
        reply goes out in the same format."""
        return self._codecs[sniff_format(message.payload) or self._node.config.format]

    def reject(self, message: Message, error: BadInput, task_id: str = "") -> None:
        """Count, log (rate-limited) and dead-letter one piece of bad input."""
        self.bad_input.record(error.reason, error.detail, topic=message.topic, task_id=task_id)
        self.dead_letter(message, error)

    def dead_letter(self, message: Message, error: BadInput | DecodeError) -> None:
        """Publish a copy of rejected input, with its reason, on this node's dead-letter topic."""
        node, reason, detail = self._node, error.reason, error.detail
        letter = DeadLetter(node=node.id, topic=message.topic[:1024] or "?", reason=reason[:64],
                            detail=detail[:4096], payload=message.payload[:DEAD_LETTER_PAYLOAD],
                            size=len(message.payload), time=max(0.0, node.clock()))
        try:
            data = self.channel_codec(Kind.DEAD_LETTER).encode(letter)
            node.transport.publish(node.tree.dead_letter(node.id), data, qos=DELIVERY[Kind.DEAD_LETTER].qos)
        except (TransportError, EncodeError) as exc:
            log.debug("%s dead letter not sent: %s", node.id, exc)

    def result(self, result: Result, reply_to: str, codec: Codec, data: bytes | None = None) -> None:
        """Publish one answer (QoS 1); waits for room (``publish_wait``) when the outgoing queue is
        full; a result that still cannot go is counted by reason and logged once per interval."""
        try:
            if data is None:
                data = codec.encode(result.model_copy(update={"content_type": content_type(codec)}))
            self._node.transport.publish(reply_to, data, qos=DELIVERY[Kind.RESULT].qos)
            return
        except NotConnectedError as exc:
            kind, detail = "not-connected", str(exc)
        except TransportError as exc:
            kind, detail = "transport", str(exc)
        except EncodeError as exc:
            kind, detail = "unencodable", str(exc)
        except TopicError as exc:
            kind, detail = "bad-topic", str(exc)
        self._node.board.count("results_not_sent")
        self._unsent.record(kind, f"result of task {result.task_id[:128]!r} to {reply_to[:200]!r}: "
                            f"{detail[:300]}")


__all__ = ["DEAD_LETTER_PAYLOAD", "BadInput", "Replies", "ReplyRules", "content_type"]
