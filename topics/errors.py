"""The error types of the wire contract: one root, each carrying the topic it concerns."""

from __future__ import annotations


class WireError(Exception):
    """Root of every error raised by the wire contract."""

    def __init__(self, message: str, *, topic: str = "") -> None:
        super().__init__(f"{message} (topic {topic!r})" if topic else message)
        self.topic = topic


class TopicError(WireError, ValueError):
    """A node id, topic or filter that the protocol does not allow."""


class DecodeError(WireError, ValueError):
    """A payload that could not be decoded: malformed, oversized or violating the schema.

    ``reason`` is a short, stable word for counting (``oversized``, ``malformed``, ``schema``,
    ``version``, ``empty``); ``detail`` says what exactly was wrong.
    """

    def __init__(self, reason: str, detail: str, *, topic: str = "", size: int = 0) -> None:
        super().__init__(f"cannot decode payload: {reason}: {detail}", topic=topic)
        self.reason = reason
        self.detail = detail
        self.size = size
