"""Hostile payloads for every topic an agent subscribes to: one catalogue, two users.

``tests/test_wire_hostile.py`` asserts, family by family, that the decoders refuse each payload with
its reason and nothing else, cheaply; ``bench/fuzz_agents.py`` publishes them by the hundred thousand
at a real server and device. Each :class:`Hostile` names its family, the topic kind it is aimed at
and the decode reason it must get (``None`` for mutations and random bytes, which may get any reason
or, rarely, decode).

Everything is built by hand (raw CBOR headers, JSON text) from a valid message of the kind, so that
no encoder gets to refuse it first. Deterministic for a given ``random.Random``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cbor2

from topics.codec import DEFAULT_MAX_PAYLOAD, MAX_DEPTH, MAX_INT, MAX_ITEMS
from topics.models import DeadLetter, Heartbeat, NodeState, Ping, Pong, Result, Task, WireModel
from topics.names import Kind, TopicTree

FUZZ_NODE = "fuzz-srv"
"""Node id of the made-up server whose heartbeats, states, results and pongs the payloads imitate."""
FUZZ_SENDER = "fuzzer"
MODELS: dict[Kind, type[WireModel]] = {Kind.TASK: Task, Kind.PING: Ping, Kind.RESULT: Result,
                                       Kind.HEARTBEAT: Heartbeat, Kind.STATE: NodeState, Kind.PONG: Pong,
                                       Kind.DEAD_LETTER: DeadLetter}
BAD_REPLY_TOPICS = ["ctl\x01", "tab\tx", "del\x7f", "c1\x85", "nbsp-is-fine\xa0but\x9f", "non\ufdd0",
                    "non\ufdef", "non\ufffe", "non\uffff", "non\U0001fffe", "non\U0010ffff", "a/+/b",
                    "a/#", "#", "$SYS/broker", "$share/g/x", "a" + "/a" * 201, "", "r" * 1025]
"""reply_to values MQTT or the protocol refuses (Mosquitto disconnects a publisher for most)."""
TAG_NUMBERS = [*range(40), 55, 256, 258, 1004, 55799, 2**16 - 1, 2**32 - 1, 2**64 - 1]


@dataclass(frozen=True, slots=True)
class Hostile:
    """One hostile payload: its family, the topic kind it targets, its bytes, the reason it must get."""

    family: str
    kind: Kind
    data: bytes
    reason: str | None

    @property
    def model(self) -> type[WireModel]:
        return MODELS[self.kind]


def valid_fields(kind: Kind, tree: TopicTree, rng: random.Random) -> dict[str, Any]:
    """A valid message of ``kind`` (as plain fields) of the made-up fleet: harmless if it decodes."""
    n = rng.randrange(10**9)
    if kind is Kind.TASK:
        return {"v": 1, "id": f"fz-{n}", "task": "noop", "sender": FUZZ_SENDER,
                "reply_to": tree.result_inbox(FUZZ_SENDER), "created": 1.7e9, "payload": {"x": n}}
    if kind is Kind.PING:
        return {"v": 1, "nonce": n, "sender": FUZZ_SENDER, "reply_to": tree.pong(FUZZ_SENDER), "sent": 0.5}
    if kind is Kind.RESULT:
        return {"v": 1, "task_id": f"fz-{n}", "status": "ok", "server": FUZZ_NODE, "payload": [n]}
    if kind is Kind.HEARTBEAT:  # capabilities no real task uses: a device never sends it work
        return {"v": 1, "node": FUZZ_NODE, "role": "server", "session": 1, "seq": n, "interval": 1.0,
                "time": 1.7e9, "capabilities": {"fuzz-only": {}}, "load": {"queue_length": 1}}
    if kind is Kind.STATE:  # an old session: never the death of anything that runs
        return {"v": 1, "node": FUZZ_NODE, "role": "server", "status": "online", "session": 1,
                "time": 1.7e9}
    if kind is Kind.PONG:
        return {"v": 1, "nonce": n, "responder": FUZZ_NODE, "sent": 0.5}
    return {"v": 1, "node": FUZZ_NODE, "topic": tree.task_inbox(FUZZ_NODE), "reason": "r", "time": 1.0}


# Raw encodings --------------------------------------------------------------------------------


def cbor_head(major: int, arg: int) -> bytes:
    """A CBOR item header with the shortest argument."""
    if arg < 24:
        return bytes([major << 5 | arg])
    width = next(w for w in (1, 2, 4, 8) if arg < 1 << (8 * w))
    return bytes([major << 5 | (24 + (1, 2, 4, 8).index(width))]) + arg.to_bytes(width, "big")


def cbor_with(fields: dict[str, Any], key: str, raw: bytes) -> bytes:
    """``fields`` as a CBOR map whose ``key`` holds ``raw`` (raw CBOR bytes, as they are)."""
    rest = {k: v for k, v in fields.items() if k != key}
    body = b"".join(cbor2.dumps(k) + cbor2.dumps(v) for k, v in rest.items())
    return cbor_head(5, len(rest) + 1) + body + cbor2.dumps(key) + raw


def json_with(fields: dict[str, Any], key: str, raw: str) -> bytes:
    """``fields`` as a JSON object whose ``key`` holds ``raw`` (JSON text, as it is)."""
    rest = json.dumps({k: v for k, v in fields.items() if k != key}, separators=(",", ":"))
    return (rest[:-1] + ("," if len(rest) > 2 else "") + json.dumps(key) + ":" + raw + "}").encode(
        "utf-8", "surrogatepass")


def value_field(kind: Kind) -> str:
    """The field a hostile value goes into: the payload where there is one."""
    return {Kind.TASK: "payload", Kind.RESULT: "payload", Kind.HEARTBEAT: "capabilities",
            Kind.STATE: "status", Kind.PING: "sent", Kind.PONG: "sent"}.get(kind, "detail")


def time_field(kind: Kind) -> str:
    """A float field that must be finite."""
    return {Kind.TASK: "created", Kind.RESULT: "queue_wait", Kind.HEARTBEAT: "time",
            Kind.STATE: "time", Kind.PING: "sent", Kind.PONG: "sent"}.get(kind, "time")


def shared_reference_bomb(levels: int) -> bytes:
    """CBOR ``[28(["x","x"]), 28([29(0), 29(0)]), 28([29(1), 29(1)]), ...]``: each shared value holds
    the previous one twice, so resolving it and copying the graph as a tree doubles per level."""
    items = [b"\xd8\x1c\x82\x61x\x61x"]
    for index in range(1, levels):
        reference = b"\xd8\x1d" + cbor_head(0, index - 1)
        items.append(b"\xd8\x1c\x82" + reference + reference)
    return cbor_head(4, levels) + b"".join(items)


# Families -------------------------------------------------------------------------------------

Maker = Callable[[random.Random, Kind, TopicTree, int], Hostile]


def _encoding(rng: random.Random, kind: Kind, tree: TopicTree) -> bytes:
    fields = valid_fields(kind, tree, rng)
    if rng.random() < 0.5:
        return cbor2.dumps(fields)
    return json.dumps(fields, separators=(",", ":")).encode()


def random_bytes(rng: random.Random, kind: Kind, tree: TopicTree, limit: int) -> Hostile:
    head = rng.choice([b"", b"{", bytes([rng.randrange(0xA0, 0xC0)])])
    data = head + rng.randbytes(rng.randrange(0, 300))
    return Hostile("random-bytes", kind, data or b"\x00", None)  # empty is a family of its own


def truncated(rng: random.Random, kind: Kind, tree: TopicTree, limit: int) -> Hostile:
    data = _encoding(rng, kind, tree)
    return Hostile("truncated", kind, data[:rng.randrange(1, len(data))], "malformed")


def mutated(rng: random.Random, kind: Kind, tree: TopicTree, limit: int) -> Hostile:
    data = bytearray(_encoding(rng, kind, tree))
    for _ in range(rng.randint(1, 4)):
        position = rng.randrange(len(data))
        action = rng.randrange(4)
        if action == 0:
            data[position] ^= 1 << rng.randrange(8)
        elif action == 1:
            data[position] = rng.randrange(256)
        elif action == 2:
            data[position:position] = rng.randbytes(rng.randint(1, 4))
        elif len(data) > 1:
            del data[position]
    return Hostile("mutated", kind, bytes(data), None)


def deep(rng: random.Random, kind: Kind, tree: TopicTree, limit: int) -> Hostile:
    depth = rng.choice([MAX_DEPTH, MAX_DEPTH + 1, 1000, 60_000])
    fields = valid_fields(kind, tree, rng)
    if rng.random() < 0.5:
        raw = (b"\x81" if rng.random() < 0.5 else b"\xa1\x61k") * depth + b"\x01"
        return Hostile("deep", kind, cbor_with(fields, value_field(kind), raw), "too-deep")
    opening, closing = ("[", "]") if rng.random() < 0.5 else ('{"k":', "}")
    raw_text = opening * depth + "1" + closing * depth
    return Hostile("deep", kind, json_with(fields, value_field(kind), raw_text), "too-deep")


def cbor_tag(rng: random.Random, kind: Kind, tree: TopicTree, limit: int) -> Hostile:
    number = rng.choice(TAG_NUMBERS) if rng.random() < 0.7 else rng.randrange(2**64)
    inner = rng.choice([b"\x01", b"\x61x", b"\x82\x01\x02", b"\xc1\x01", b"\x4a" + b"\x00" * 10])
    raw = cbor_head(6, number) + inner
    return Hostile("cbor-tag", kind, cbor_with(valid_fields(kind, tree, rng), value_field(kind), raw),
                   "malformed")


def bomb(rng: random.Random, kind: Kind, tree: TopicTree, limit: int) -> Hostile:
    raw = shared_reference_bomb(rng.choice([20, 24, 40, 200]))
    return Hostile("bomb-28-29", kind, cbor_with(valid_fields(kind, tree, rng), value_field(kind), raw),
                   "malformed")


def big_int_cbor(rng: random.Random, kind: Kind, tree: TopicTree, limit: int) -> Hostile:
    fields = valid_fields(kind, tree, rng)
    if rng.random() < 0.5:  # -2**64: plain CBOR, one beyond the range
        return Hostile("big-int-cbor", kind, cbor_with(fields, value_field(kind), b"\x3b" + b"\xff" * 8),
                       "big-int")
    digits = rng.choice([9, 100, 2500])  # a bignum is a tag (2 or 3): refused as one
    raw = bytes([0xC2 + rng.randrange(2)]) + cbor_head(2, digits) + rng.randbytes(digits)
    return Hostile("big-int-cbor", kind, cbor_with(fields, "v", raw), "malformed")


def big_int_json(rng: random.Random, kind: Kind, tree: TopicTree, limit: int) -> Hostile:
    text = rng.choice([str(MAX_INT + 1), str(-MAX_INT - 1), "9" * 401, "7" * 6000,
                       "-" + "1" * rng.randrange(21, 5000)])
    key = rng.choice(["v", value_field(kind), time_field(kind)])
    return Hostile("big-int-json", kind, json_with(valid_fields(kind, tree, rng), key, text), "big-int")


def nan_json(rng: random.Random, kind: Kind, tree: TopicTree, limit: int) -> Hostile:
    text = rng.choice(["NaN", "Infinity", "-Infinity", "1e999", "-1e400"])
    return Hostile("nan-json", kind, json_with(valid_fields(kind, tree, rng), time_field(kind), text),
                   "malformed")


def nan_cbor(rng: random.Random, kind: Kind, tree: TopicTree, limit: int) -> Hostile:
    raw = rng.choice([b"\xf9\x7e\x00", b"\xf9\x7c\x00", b"\xf9\xfc\x00", b"\xfb\x7f\xf8" + bytes(6)])
    return Hostile("nan-cbor", kind, cbor_with(valid_fields(kind, tree, rng), time_field(kind), raw),
                   "schema")


def bad_utf8(rng: random.Random, kind: Kind, tree: TopicTree, limit: int) -> Hostile:
    fields = valid_fields(kind, tree, rng)
    bad = rng.choice([b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"ok\xe2\x82"])
    choice = rng.randrange(3)
    if choice == 0:  # a CBOR text string that is not UTF-8
        return Hostile("bad-utf8", kind, cbor_with(fields, value_field(kind), cbor_head(3, len(bad)) + bad),
                       "malformed")
    if choice == 1:  # raw bytes inside a JSON string
        data = json_with(fields, value_field(kind), '"@"').replace(b'"@"', b'"' + bad + b'"')
        return Hostile("bad-utf8", kind, data, "malformed")
    escape = rng.choice(["\\ud800", "\\udfff", "x\\udc00y", "\\ud83d"])  # lone surrogate halves
    return Hostile("bad-utf8", kind, json_with(fields, value_field(kind), f'"{escape}"'), "malformed")


def bad_reply_to(rng: random.Random, kind: Kind, tree: TopicTree, limit: int) -> Hostile:
    if kind not in (Kind.TASK, Kind.PING):
        raise ValueError(f"a {kind.value} has no reply_to")
    topic = rng.choice(BAD_REPLY_TOPICS)
    fields = {**valid_fields(kind, tree, rng), "reply_to": topic}
    data = cbor2.dumps(fields) if rng.random() < 0.5 else json.dumps(fields).encode()
    return Hostile("bad-reply-to", kind, data, "bad-reply-to")


def oversized(rng: random.Random, kind: Kind, tree: TopicTree, limit: int) -> Hostile:
    size = limit + rng.choice([1, 2, 1000])
    fields = valid_fields(kind, tree, rng)
    data = cbor_with(fields, value_field(kind), cbor_head(2, size) + bytes(size))
    return Hostile("oversized", kind, data, "oversized")


def too_many_items(rng: random.Random, kind: Kind, tree: TopicTree, limit: int) -> Hostile:
    count = MAX_ITEMS + rng.choice([1, 5000])
    fields = valid_fields(kind, tree, rng)
    if rng.random() < 0.5:
        head = b"\x9f" if rng.random() < 0.5 else cbor_head(4, count)
        raw = head + b"\x00" * count + (b"\xff" if head == b"\x9f" else b"")
        return Hostile("too-many-items", kind, cbor_with(fields, value_field(kind), raw), "too-many-items")
    return Hostile("too-many-items", kind, json_with(fields, value_field(kind), "[" + "[]," * count + "0]"),
                   "too-many-items")


def out_of_bounds(rng: random.Random, kind: Kind, tree: TopicTree, limit: int) -> Hostile:
    field, value = {Kind.TASK: ("attempt", 10**6), Kind.PING: ("nonce", 2**60),
                    Kind.RESULT: ("attempt", 2**63), Kind.HEARTBEAT: ("session", 2**62),
                    Kind.STATE: ("session", 2**62), Kind.PONG: ("nonce", MAX_INT)}.get(kind, ("size", -1))
    fields = {**valid_fields(kind, tree, rng), field: value}
    if kind is Kind.HEARTBEAT and rng.random() < 0.5:
        fields["load"] = {"queue_length": 10**18}
    data = cbor2.dumps(fields) if rng.random() < 0.5 else json.dumps(fields).encode()
    return Hostile("out-of-bounds", kind, data, "schema")


def wrong_version(rng: random.Random, kind: Kind, tree: TopicTree, limit: int) -> Hostile:
    fields = {**valid_fields(kind, tree, rng), "v": rng.choice([0, 2, "1", 1.0, True, None, [1]])}
    data = cbor2.dumps(fields) if rng.random() < 0.5 else json.dumps(fields).encode()
    return Hostile("version", kind, data, "version")


def empty(rng: random.Random, kind: Kind, tree: TopicTree, limit: int) -> Hostile:
    return Hostile("empty", kind, b"", "empty")


FAMILIES: dict[str, tuple[Maker, float]] = {
    "random-bytes": (random_bytes, 10), "truncated": (truncated, 10), "mutated": (mutated, 20),
    "deep": (deep, 4), "cbor-tag": (cbor_tag, 8), "bomb-28-29": (bomb, 4), "big-int-cbor": (big_int_cbor, 4),
    "big-int-json": (big_int_json, 4), "nan-json": (nan_json, 4), "nan-cbor": (nan_cbor, 4),
    "bad-utf8": (bad_utf8, 4), "bad-reply-to": (bad_reply_to, 8), "oversized": (oversized, 0.2),
    "too-many-items": (too_many_items, 0.5), "out-of-bounds": (out_of_bounds, 4),
    "version": (wrong_version, 2), "empty": (empty, 1),
}
"""Every family: its maker and its weight in a fuzz run (the big ones rare, to keep a run short)."""
TARGETS = (Kind.TASK, Kind.PING, Kind.RESULT, Kind.HEARTBEAT, Kind.STATE, Kind.PONG)
"""Every kind an agent subscribes to: a server's tasks and pings, a device's results, heartbeats,
states, pongs and pings."""


def applies(family: str, kind: Kind) -> bool:
    """Whether ``family`` makes sense for ``kind``: only tasks and pings have a reply_to, and an empty
    retained state is how a node is forgotten (a device ignores it, by design)."""
    if family == "bad-reply-to":
        return kind in (Kind.TASK, Kind.PING)
    return not (family == "empty" and kind is Kind.STATE)


def hostile(rng: random.Random, kind: Kind, tree: TopicTree, *, family: str | None = None,
            limit: int = DEFAULT_MAX_PAYLOAD) -> Hostile:
    """One hostile payload aimed at ``kind``: of ``family``, or of one drawn by weight."""
    if family is None:
        names = [name for name in FAMILIES if applies(name, kind)]
        family = rng.choices(names, weights=[FAMILIES[name][1] for name in names])[0]
    return FAMILIES[family][0](rng, kind, tree, limit)
