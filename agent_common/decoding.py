"""One way for a message handler to decode and validate its input, or count it as bad input."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from agent_common.badinput import BadInputLog
from topics.codec import Codec
from topics.errors import DecodeError
from topics.models import WireModel
from topics.transport import Message

M = TypeVar("M", bound=WireModel)


def decode_or_count(codec: Codec, message: Message, model: type[M], bad: BadInputLog, *,
                    kind: str | None, on_error: Callable[[DecodeError], None] | None = None) -> M | None:
    """``message`` decoded and validated as ``model``, or None after counting it in ``bad``.

    The reason counted is ``<kind>-<decode reason>`` (``heartbeat-malformed``), or the decode
    reason alone when ``kind`` is None (``malformed``: the server's task and ping inboxes), logged
    with the topic at most once per interval. ``on_error`` then gets the error, for what a handler
    does beyond counting (the server dead-letters it, and answers an invalid task); the handler
    only has to return on None.
    """
    try:
        return codec.decode(message.payload, model, topic=message.topic)
    except DecodeError as exc:
        bad.record(exc.reason if kind is None else f"{kind}-{exc.reason}", exc.detail, topic=message.topic)
        if on_error is not None:
            on_error(exc)
        return None
