"""A device's Task messages encoded without building a :class:`~topics.models.Task` per task.

The fields a device sends are its own (id, sender, reply_to, clocks, attempt) or checked at submit,
and the model would only check them again. :class:`TaskEncoder` checks each field with exact-type
tests that accept a subset of what the model accepts, then encodes the same mapping the model would
dump. Anything outside that subset (a str subclass, an int where a float goes, a name with a
character the schema refuses, a stage out of range) is built as the model and encoded as before:
the same bytes for what is accepted, the same ``ValidationError`` or ``EncodeError`` for what is not.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import TypeAdapter

from topics.codec import Codec
from topics.models import CONTENT_CBOR, MAX_TTL, MAX_UNIX_TIME, SCHEMA_VERSION, Task

_TASK_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
"""``TaskName``'s pattern and length bounds (ASCII only, so ``fullmatch`` agrees with pydantic's)."""
_MAX_ID = 128
_MAX_ATTEMPT = 100
_MAX_STAGE = 1000
_PLAIN_PAYLOAD = frozenset((bytes, str, int, float, bool))
"""Payload types the model's ``Any`` serialiser returns unchanged (``None`` is left out of the map)."""
_ANY = TypeAdapter(Any)
"""The serialiser of ``Task.payload`` (``Any``), for payloads that are containers or objects."""


class TaskEncoder:
    """Encodes the Tasks one sender sends to one reply topic, checked as :class:`Task` checks them."""

    def __init__(self, codec: Codec, *, sender: str, reply_to: str) -> None:
        Task(id="probe", task="probe", sender=sender, reply_to=reply_to, created=0.0)  # raises if bad
        self._codec = codec
        self._sender = sender
        self._reply_to = reply_to

    def encode(self, *, task_id: str, name: str, created: float, attempt: int, ttl: float | None,
               payload: Any, stage: int | None) -> bytes:
        """The bytes ``codec.encode(Task(...))`` makes of these fields, or its error."""
        if not (type(task_id) is str and 0 < len(task_id) <= _MAX_ID
                and type(name) is str and _TASK_NAME.fullmatch(name) is not None
                and type(created) is float and 0.0 <= created <= MAX_UNIX_TIME
                and type(attempt) is int and 1 <= attempt <= _MAX_ATTEMPT
                and (ttl is None or (type(ttl) is float and 0.0 <= ttl <= MAX_TTL))
                and (stage is None or (type(stage) is int and 0 <= stage <= _MAX_STAGE))):
            return self._codec.encode(Task(id=task_id, task=name, sender=self._sender,
                                           reply_to=self._reply_to, created=created, attempt=attempt,
                                           ttl=ttl, payload=payload, stage=stage))
        fields: dict[str, Any] = {"v": SCHEMA_VERSION, "id": task_id, "task": name, "sender": self._sender,
                                  "reply_to": self._reply_to, "created": created}
        if ttl is not None:
            fields["ttl"] = ttl
        fields["attempt"] = attempt
        if payload is not None:
            fields["payload"] = payload if type(payload) in _PLAIN_PAYLOAD else _ANY.dump_python(
                payload, mode="python", exclude_none=True)
        fields["content_type"] = CONTENT_CBOR
        if stage is not None:
            fields["stage"] = stage
        return self._codec.encode_dumped(fields, "Task")


__all__ = ["TaskEncoder"]
