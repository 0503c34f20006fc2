"""The one place a wire format lives: CBOR by default, JSON accepted and selectable.

A top-level message is a map (CBOR) or an object (JSON); the first byte tells which, so a receiver
accepts both whatever it sends. Inside payloads, two values need a representation of their own:

* ``bytes``: native in CBOR; ``{"$bytes": "<base64>"}`` in JSON.
* numpy arrays: ``{"$ndarray": {"dtype": "<u1", "shape": [480, 640, 3], "data": <bytes>}}``: raw
  bytes with dtype and shape, numeric dtypes only. Never pickle.

A map whose only key is ``$bytes`` or ``$ndarray`` is therefore reserved: encoding one is an error.

Any malformed, oversized or schema-violating payload raises :class:`~topics.errors.DecodeError`
naming the topic and the reason, and nothing else.
"""

from __future__ import annotations

import base64
import io
import json
import math
import reprlib
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import cbor2
import numpy as np
from pydantic import ValidationError

from topics.errors import DecodeError, WireError
from topics.models import SCHEMA_VERSION, TOPIC_ERROR, WireModel

Format = Literal["cbor", "json"]
ValueFormat = Literal["cbor", "json", "raw"]
M = TypeVar("M", bound=WireModel)

DEFAULT_MAX_PAYLOAD = 1024 * 1024
MAX_DEPTH = 64
_ARRAY_KINDS = frozenset("biufc")
_BYTES_KEY = "$bytes"
_ARRAY_KEY = "$ndarray"
_RESERVED_KEYS = frozenset((_BYTES_KEY, _ARRAY_KEY))
_PLAIN = (str, int, float, bool, type(None))
_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 40


class _TooDeep(ValueError):
    """A value nested deeper than :data:`MAX_DEPTH`."""


class EncodeError(WireError, ValueError):
    """A value that cannot go on the wire (unsupported type, or larger than the payload limit)."""


def _array_to_wire(array: np.ndarray[Any, Any]) -> dict[str, Any]:
    if array.dtype.kind not in _ARRAY_KINDS:
        raise EncodeError(f"numpy dtype {array.dtype} cannot go on the wire (numeric dtypes only)")
    contiguous = np.ascontiguousarray(array).reshape(array.shape)  # keeps 0-d arrays 0-d
    return {_ARRAY_KEY: {"dtype": contiguous.dtype.str, "shape": list(contiguous.shape),
                         "data": contiguous.tobytes()}}


def _array_from_wire(spec: Any) -> np.ndarray[Any, Any]:
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data"}:
        raise ValueError("$ndarray needs exactly dtype, shape and data")
    dtype = np.dtype(str(spec["dtype"]))
    if dtype.kind not in _ARRAY_KINDS or dtype.hasobject:
        raise ValueError(f"$ndarray dtype {dtype} is not numeric")
    shape = spec["shape"]
    if not isinstance(shape, list) or len(shape) > 32 or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
    ):
        raise ValueError("$ndarray shape must be a list of non-negative integers")
    data = spec["data"]
    if isinstance(data, str):
        data = base64.b64decode(data, validate=True)
    if not isinstance(data, bytes):
        raise ValueError("$ndarray data must be bytes")
    if math.prod(shape) * dtype.itemsize != len(data):
        raise ValueError(f"$ndarray data has {len(data)} bytes, shape {shape} x {dtype} needs "
                         f"{math.prod(shape) * dtype.itemsize}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def to_wire(value: Any, *, binary: bool, depth: int = 0) -> Any:
    """Turn a payload value into plain CBOR/JSON types (``binary``: bytes may stay bytes)."""
    if isinstance(value, _PLAIN):
        if isinstance(value, float) and not binary and not math.isfinite(value):
            raise EncodeError("JSON cannot carry NaN or infinity")
        return value
    if depth > MAX_DEPTH:
        raise EncodeError(f"payload nested deeper than {MAX_DEPTH}")
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        return raw if binary else {_BYTES_KEY: base64.b64encode(raw).decode()}
    if isinstance(value, np.ndarray):
        wire = _array_to_wire(value)
        if binary:
            return wire
        spec = wire[_ARRAY_KEY]
        return {_ARRAY_KEY: {**spec, "data": to_wire(spec["data"], binary=False, depth=depth + 1)}}
    if isinstance(value, np.generic):
        return to_wire(value.item(), binary=binary, depth=depth + 1)
    if isinstance(value, dict):
        if len(value) == 1 and next(iter(value)) in _RESERVED_KEYS:
            raise EncodeError(f"a map whose only key is {next(iter(value))!r} is reserved for the codec")
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise EncodeError(f"map keys must be strings, not {type(key).__name__}")
            out[key] = to_wire(item, binary=binary, depth=depth + 1)
        return out
    if isinstance(value, list | tuple):
        return [to_wire(item, binary=binary, depth=depth + 1) for item in value]
    if hasattr(value, "model_dump"):
        return to_wire(value.model_dump(), binary=binary, depth=depth + 1)
    raise EncodeError(f"cannot put a {type(value).__name__} on the wire")


def from_wire(value: Any, *, depth: int = 0) -> Any:
    """Inverse of :func:`to_wire`: restore bytes and arrays; reject any non-plain type."""
    if isinstance(value, _PLAIN):
        return value
    if depth > MAX_DEPTH:
        raise _TooDeep(f"nested deeper than {MAX_DEPTH}")
    if isinstance(value, bytes):
        return value
    if isinstance(value, dict):
        if len(value) == 1:
            if _BYTES_KEY in value:
                encoded = value[_BYTES_KEY]
                if not isinstance(encoded, str):
                    raise ValueError("$bytes must hold a base64 string")
                return base64.b64decode(encoded, validate=True)
            if _ARRAY_KEY in value:
                return _array_from_wire(from_wire(value[_ARRAY_KEY], depth=depth + 1))
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"map key of type {type(key).__name__} (strings only)")
            out[key] = from_wire(item, depth=depth + 1)
        return out
    if isinstance(value, list):
        return [from_wire(item, depth=depth + 1) for item in value]
    raise ValueError(f"unsupported value of type {type(value).__name__}")


def _loads_cbor(data: bytes) -> Any:
    stream = io.BytesIO(data)
    try:
        value = cbor2.CBORDecoder(stream, max_depth=MAX_DEPTH, allow_duplicate_keys=False,
                                  strict_hashable_types=True).decode()
    except cbor2.CBORDecodeError as exc:
        if "nesting depth" in str(exc):
            raise _TooDeep(str(exc)) from exc
        raise
    if stream.tell() != len(data):
        raise ValueError(f"{len(data) - stream.tell()} bytes after the end of the CBOR item")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"JSON {name} is not allowed (no NaN or infinity on the wire)")


def _loads_json(data: bytes) -> Any:
    return json.loads(data.decode("utf-8"), parse_constant=_reject_constant)


def _dumps_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()


def _failure_reason(exc: Exception) -> str:
    """The :class:`DecodeError` reason for an exception raised while parsing."""
    return "too-deep" if isinstance(exc, RecursionError | _TooDeep) else "malformed"


def _schema_reason(errors: list[Any]) -> str:
    """``bad-<field>`` when every problem is a refused topic in one field, else ``schema``."""
    fields = {str(err["loc"][0]) for err in errors if err["loc"]}
    if errors and len(fields) == 1 and all(err["type"] == TOPIC_ERROR for err in errors):
        return "bad-" + fields.pop().replace("_", "-")
    return "schema"


def sniff_format(data: bytes) -> Format | None:
    """``cbor`` when the first byte starts a CBOR map, ``json`` for ``{``, else ``None``."""
    stripped = data.lstrip(b" \t\r\n")
    if not stripped:
        return None
    first = stripped[0]
    if first == 0x7B:  # '{': in CBOR this would be a 27-byte text string, never a message
        return "json"
    if 0xA0 <= first <= 0xBF:
        return "cbor"
    return None


class Codec:
    """Encodes messages in one format, decodes either, enforcing a payload size limit."""

    def __init__(self, fmt: Format = "cbor", *, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        if fmt not in ("cbor", "json"):
            raise ValueError(f"unknown format {fmt!r}: use 'cbor' or 'json'")
        if max_payload <= 0:
            raise ValueError("max_payload must be positive")
        self.format: Format = fmt
        self.max_payload = max_payload

    def __repr__(self) -> str:
        return f"Codec({self.format!r}, max_payload={self.max_payload})"

    def encode(self, message: WireModel) -> bytes:
        """Serialise a message; raises :class:`EncodeError` if it is too large or not encodable."""
        fields = message.model_dump(mode="python", exclude_none=True)
        data = self._dumps(to_wire(fields, binary=self.format == "cbor"))
        if len(data) > self.max_payload:
            raise EncodeError(f"encoded {type(message).__name__} is {len(data)} bytes, over the "
                              f"limit of {self.max_payload}")
        return data

    def _dumps(self, value: Any) -> bytes:
        try:
            if self.format == "cbor":
                return cbor2.dumps(value)
            return _dumps_json(value)
        except (TypeError, ValueError, cbor2.CBOREncodeError) as exc:
            raise EncodeError(f"cannot encode: {exc}") from exc

    def decode(self, data: bytes, model: type[M], *, topic: str = "") -> M:
        """Parse and validate ``data`` as ``model``; raises only :class:`DecodeError`."""
        fields = self.decode_mapping(data, topic=topic)
        version = fields.get("v", SCHEMA_VERSION)
        if type(version) is not int or version != SCHEMA_VERSION:
            raise DecodeError("version", f"schema version {_SHORT.repr(version)}, this node speaks "
                              f"{SCHEMA_VERSION}", topic=topic, size=len(data))
        try:
            return model.model_validate(fields)
        except ValidationError as exc:
            errors = exc.errors(include_url=False, include_input=False)
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in errors[:5])
            raise DecodeError(_schema_reason(errors), f"not a valid {model.__name__}: {problems}"[:1000],
                              topic=topic, size=len(data)) from exc

    def decode_mapping(self, data: bytes, *, topic: str = "") -> dict[str, Any]:
        """Parse ``data`` into a plain dict with bytes and arrays restored (no schema check)."""
        size = len(data)
        if size == 0:
            raise DecodeError("empty", "empty payload", topic=topic)
        if size > self.max_payload:
            raise DecodeError("oversized", f"{size} bytes, over the limit of {self.max_payload}",
                              topic=topic, size=size)
        fmt = sniff_format(data)
        if fmt is None:
            raise DecodeError("malformed", "neither a CBOR map nor a JSON object",
                              topic=topic, size=size)
        try:
            raw = _loads_cbor(data) if fmt == "cbor" else _loads_json(data)
            if not isinstance(raw, dict):
                raise ValueError(f"top level is a {type(raw).__name__}, not a map")
            restored = from_wire(raw)
        except Exception as exc:
            raise DecodeError(_failure_reason(exc), f"{fmt}: {exc}"[:300], topic=topic, size=size) from exc
        assert isinstance(restored, dict)
        return restored

    # Free-form values (bridged topics, task payloads carried as raw bytes) -----------------

    def encode_value(self, value: Any, fmt: ValueFormat) -> bytes:
        """Encode a bare value as CBOR, JSON or raw bytes (``raw`` needs bytes or str)."""
        if fmt == "raw":
            if isinstance(value, str):
                data = value.encode()
            elif isinstance(value, bytes | bytearray | memoryview):
                data = bytes(value)
            else:
                raise EncodeError(f"raw output needs bytes or str, not {type(value).__name__}")
        elif fmt == "cbor":
            data = self._dumps_value(cbor2.dumps, to_wire(value, binary=True))
        elif fmt == "json":
            data = self._dumps_value(_dumps_json, to_wire(value, binary=False))
        else:
            raise EncodeError(f"unknown value format {fmt!r}")
        if len(data) > self.max_payload:
            raise EncodeError(f"encoded value is {len(data)} bytes, over {self.max_payload}")
        return data

    @staticmethod
    def _dumps_value(dumps: Callable[[Any], bytes], value: Any) -> bytes:
        try:
            return dumps(value)
        except (TypeError, ValueError, cbor2.CBOREncodeError) as exc:
            raise EncodeError(f"cannot encode: {exc}") from exc

    def decode_value(self, data: bytes, fmt: ValueFormat, *, topic: str = "") -> Any:
        """Decode a bare value; raises only :class:`DecodeError`."""
        size = len(data)
        if size > self.max_payload:
            raise DecodeError("oversized", f"{size} bytes, over the limit of {self.max_payload}",
                              topic=topic, size=size)
        if fmt == "raw":
            return bytes(data)
        try:
            if fmt == "cbor":
                return from_wire(_loads_cbor(data))
            if fmt == "json":
                return from_wire(_loads_json(data))
        except Exception as exc:
            raise DecodeError(_failure_reason(exc), f"{fmt}: {exc}"[:300], topic=topic,
                              size=size) from exc
        raise DecodeError("malformed", f"unknown value format {fmt!r}", topic=topic, size=size)


__all__ = ["Codec", "DecodeError", "EncodeError", "Format", "ValueFormat", "sniff_format"]
