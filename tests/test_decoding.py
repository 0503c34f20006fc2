"""The shared decode-or-count helper and the per-channel delivery table."""

from __future__ import annotations

import logging

from agent_common import BadInputLog, decode_or_count
from topics.codec import Codec
from topics.models import Pong
from topics.names import DELIVERY, Kind
from topics.transport import Message


def test_decode_or_count_returns_the_model() -> None:
    codec, bad = Codec(), BadInputLog(logging.getLogger("test"))
    pong = Pong(nonce=3, responder="srv1", sent=1.5)
    message = Message(topic="offload/v1/node/cam1/pong", payload=codec.encode(pong))
    assert decode_or_count(codec, message, Pong, bad, kind="pong") == pong
    assert bad.snapshot() == {}


def test_decode_or_count_counts_bad_input_by_kind_and_reason() -> None:
    codec, bad = Codec(), BadInputLog(logging.getLogger("test"))
    message = Message(topic="offload/v1/node/cam1/pong", payload=b"\xff\x00 not cbor")
    assert decode_or_count(codec, message, Pong, bad, kind="pong") is None
    (reason, count), = bad.snapshot().items()
    assert reason.startswith("pong-") and count == 1


def test_every_channel_has_one_delivery() -> None:
    assert set(DELIVERY) == set(Kind)
    assert DELIVERY[Kind.STATE].retain and DELIVERY[Kind.STATE].qos == 1
    assert not any(DELIVERY[kind].retain for kind in Kind if kind is not Kind.STATE)


def test_decode_or_count_without_kind_counts_the_reason_alone_then_calls_on_error() -> None:
    codec, bad = Codec(), BadInputLog(logging.getLogger("test"))
    message = Message(topic="offload/v1/node/srv1/ping", payload=b"\xff\x00 not cbor")
    seen: list[tuple[str, dict[str, int]]] = []
    assert decode_or_count(codec, message, Pong, bad, kind=None,
                           on_error=lambda exc: seen.append((exc.reason, bad.snapshot()))) is None
    assert seen == [("malformed", {"malformed": 1})]  # counted before on_error runs
    assert bad.snapshot() == {"malformed": 1}
