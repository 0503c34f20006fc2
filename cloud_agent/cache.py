"""What the server remembers of the tasks it answered, so that a retry gets the same answer.

A retry is the same task when its content digest (name, payload, stage, reply_to) matches the one the
cached result answered; the same id with other content is a reused id, answered as such.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import cbor2

from topics.codec import Codec, EncodeError
from topics.models import Result, Status, Task

_DIGEST_CODEC = Codec("cbor", max_payload=1 << 40)
_FLAT = frozenset((bytes, str, type(None), bool, float))
"""Payload types the wire form leaves as they are (and that need no check to be encoded)."""


def content_digest(task: Task) -> bytes:
    """What makes a retry the same task: name, payload, stage and reply_to (not attempt or times)."""
    fields = [task.task, task.reply_to, task.stage, task.payload]
    if type(task.payload) in _FLAT:  # what encode_value would give, without its checks
        data = cbor2.dumps(fields)
    else:
        try:
            data = _DIGEST_CODEC.encode_value(fields, "cbor")
        except EncodeError:
            data = repr(fields).encode("utf-8", "backslashreplace")
    return hashlib.blake2b(data, digest_size=16).digest()


class ResultCache:
    """Finished results by (sender, task id) with the content digest of the task they answer:
    bounded LRU (count and encoded bytes) with a TTL."""

    def __init__(self, capacity: int, ttl: float, max_bytes: int) -> None:
        self._capacity = capacity
        self._ttl = ttl
        self._max_bytes = max_bytes
        self._bytes = 0
        self._items: OrderedDict[tuple[str, str], tuple[float, Result, int, bytes]] = OrderedDict()

    def entry(self, key: tuple[str, str], now: float) -> tuple[Result, bytes] | None:
        """The cached result of ``key`` and the digest of the task it answered, or None."""
        item = self._items.get(key)
        if item is None:
            return None
        if now - item[0] > self._ttl:
            self._pop(key)
            return None
        self._items.move_to_end(key)
        return item[1], item[3]

    def get(self, key: tuple[str, str], now: float) -> Result | None:
        found = self.entry(key, now)
        return None if found is None else found[0]

    def _pop(self, key: tuple[str, str]) -> None:
        _, _, size, _ = self._items.pop(key)
        self._bytes -= size

    def put(self, key: tuple[str, str], result: Result, now: float, size: int = 0,
            digest: bytes = b"") -> None:
        if self._capacity <= 0:
            return
        if size > self._max_bytes:  # too large to keep: keep the answer without its payload
            result = result.model_copy(update={"status": Status.ERROR.value, "payload": None,
                                               "error": "result already sent; too large to resend"})
            size = 0
        if key in self._items:
            self._pop(key)
        self._items[key] = (now, result, size, digest)
        self._bytes += size
        while len(self._items) > self._capacity or self._bytes > self._max_bytes:
            self._pop(next(iter(self._items)))

    def __len__(self) -> int:
        return len(self._items)


__all__ = ["ResultCache", "content_digest"]
