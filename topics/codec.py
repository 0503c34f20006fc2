"""The one place a wire format lives: CBOR by default, JSON accepted and selectable.

A top-level message is a map (CBOR) or an object (JSON); the first byte tells which, so a receiver
accepts both whatever it sends. Inside payloads, two values need a representation of their own:

* ``bytes``: native in CBOR; ``{"$bytes": "<base64>"}`` in JSON.
* numpy arrays: ``{"$ndarray": {"dtype": "<u1", "shape": [480, 640, 3], "data": <bytes>}}``: raw
  bytes with dtype and shape, numeric dtypes only. Never pickle.

A map whose only key is ``$bytes`` or ``$ndarray`` is therefore reserved: encoding one is an error.

Any malformed, oversized or schema-violating payload raises :class:`~topics.errors.DecodeError`
naming the topic and the reason, and nothing else. Before cbor2 sees a CBOR message, :func:`scan_cbor`
walks its item headers once, in linear time, resolving nothing: it refuses every tag (shared references
included), undefined and simple values, integers beyond +-(2**64 - 1), more than :data:`MAX_DEPTH`
nested containers and more than :data:`MAX_ITEMS` items. JSON gets the same integer, depth and item
bounds, and no NaN or infinity (``1e999`` included).
"""

from __future__ import annotations

import base64
import json
import math
import re
import reprlib
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import cbor2
from pydantic import ValidationError

from topics.errors import DecodeError, WireError

if TYPE_CHECKING:
    import numpy as np
from topics.models import SCHEMA_VERSION, TOPIC_ERROR, WireModel

Format = Literal["cbor", "json"]
ValueFormat = Literal["cbor", "json", "raw"]
M = TypeVar("M", bound=WireModel)

DEFAULT_MAX_PAYLOAD = 1024 * 1024
MAX_DEPTH = 64
"""Most nested containers (maps and arrays, the message's own map included) in a message."""
MAX_ITEMS = 100_000
"""Most values in a message (map keys and containers included); send bulk numbers as ``$ndarray``."""
MAX_INT = 2**64 - 1
"""Largest integer magnitude on the wire: CBOR's own integer range, without big-number tags."""
_ARRAY_KINDS = frozenset("biufc")
_BYTES_KEY = "$bytes"
_ARRAY_KEY = "$ndarray"
_RESERVED_KEYS = frozenset((_BYTES_KEY, _ARRAY_KEY))
_PLAIN = (str, int, float, bool, type(None))
_SCALARS = frozenset((str, float, bool, type(None), bytes))
"""Exact types that need neither a change nor a check on either way (ints are range-checked)."""
_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 40


class _Refused(ValueError):
    """Input refused while parsing, with the :class:`DecodeError` reason to report."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class _TooDeep(_Refused):
    """A value nested deeper than :data:`MAX_DEPTH`."""

    def __init__(self, detail: str) -> None:
        super().__init__("too-deep", detail)


class EncodeError(WireError, ValueError):
    """A value that cannot go on the wire (unsupported type, or larger than the payload limit)."""


def _array_to_wire(array: np.ndarray[Any, Any]) -> dict[str, Any]:
    import numpy as np  # loaded only where arrays exist (an edge device may have none)

    if array.dtype.kind not in _ARRAY_KINDS:
        raise EncodeError(f"numpy dtype {array.dtype} cannot go on the wire (numeric dtypes only)")
    contiguous = np.ascontiguousarray(array).reshape(array.shape)  # keeps 0-d arrays 0-d
    return {_ARRAY_KEY: {"dtype": contiguous.dtype.str, "shape": list(contiguous.shape),
                         "data": contiguous.tobytes()}}


def _array_from_wire(spec: Any) -> np.ndarray[Any, Any]:
    import numpy as np

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


def _check_int(value: int) -> int:
    if -MAX_INT <= value <= MAX_INT:
        return value
    raise EncodeError(f"integer of {value.bit_length()} bits cannot go on the wire (at most +-(2**64 - 1))")


def to_wire(value: Any, *, binary: bool, depth: int = 0) -> Any:
    """Turn a payload value into plain CBOR/JSON types (``binary``: bytes may stay bytes).

    ``depth`` is the number of containers around ``value``; a container at depth :data:`MAX_DEPTH`
    (an ``$ndarray`` is three: itself, its spec, its shape) is refused, as are integers a receiver
    would refuse.
    """
    if isinstance(value, _PLAIN):
        if isinstance(value, float) and not binary and not math.isfinite(value):
            raise EncodeError("JSON cannot carry NaN or infinity")
        if type(value) is int:
            return _check_int(value)
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        return raw if binary else {_BYTES_KEY: base64.b64encode(raw).decode()}
    np = sys.modules.get("numpy")  # a numpy value exists only if numpy was imported
    if np is not None and isinstance(value, np.generic):
        return to_wire(value.item(), binary=binary, depth=depth)
    is_array = np is not None and isinstance(value, np.ndarray)
    if depth + (2 if is_array else 0) >= MAX_DEPTH:
        raise EncodeError(f"payload nested deeper than {MAX_DEPTH}")
    if is_array:
        wire = _array_to_wire(value)
        if binary:
            return wire
        spec = wire[_ARRAY_KEY]
        return {_ARRAY_KEY: {**spec, "data": to_wire(spec["data"], binary=False, depth=depth + 2)}}
    if isinstance(value, dict):
        if len(value) == 1 and next(iter(value)) in _RESERVED_KEYS:
            raise EncodeError(f"a map whose only key is {next(iter(value))!r} is reserved for the codec")
        out: dict[str, Any] = {}
        scalars = _SCALARS if binary else _TEXT_SCALARS
        for key, item in value.items():
            if type(key) is not str and not isinstance(key, str):
                raise EncodeError(f"map keys must be strings, not {type(key).__name__}")
            # the common leaves inline, as the call below would return them
            out[key] = item if type(item) in scalars or (
                type(item) is int and -MAX_INT <= item <= MAX_INT) else to_wire(
                item, binary=binary, depth=depth + 1)
        return out
    if isinstance(value, list | tuple):
        scalars = _SCALARS if binary else _TEXT_SCALARS
        return [item if type(item) in scalars else to_wire(item, binary=binary, depth=depth + 1)
                for item in value]
    if hasattr(value, "model_dump"):
        return to_wire(value.model_dump(), binary=binary, depth=depth)
    raise EncodeError(f"cannot put a {type(value).__name__} on the wire")


_TEXT_SCALARS = frozenset((str, bool, type(None)))
"""What JSON takes unchanged and unchecked (floats are checked for NaN, bytes become ``$bytes``)."""


def from_wire(value: Any, *, depth: int = 0) -> Any:
    """Inverse of :func:`to_wire`: restore bytes and arrays; reject any non-plain type."""
    if isinstance(value, _PLAIN) or type(value) is bytes:
        return value
    if depth >= MAX_DEPTH:
        raise _TooDeep(f"nested deeper than {MAX_DEPTH}")
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
            # the common leaf inline, as the call below would return it
            out[key] = item if type(item) in _SCALARS or type(item) is int else from_wire(
                item, depth=depth + 1)
        return out
    if isinstance(value, list):
        return [from_wire(item, depth=depth + 1) for item in value]
    raise ValueError(f"unsupported value of type {type(value).__name__}")


# CBOR: the structure is checked before anything is decoded -------------------------------------

# What each initial byte starts (RFC 8949 section 3), for the scanner's dispatch: _SKIP covers
# small integers, false, true, null, floats, longer integers and short strings (skip ``arg`` bytes).
_SKIP, _NEG64, _LONG_STRING, _CHUNKED, _ARRAY, _LONG_ARRAY, _OPEN, _BREAK, _REFUSED = range(9)


def _dispatch_tables() -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per initial byte: what it starts, and its inline argument or the width of its argument."""
    kinds, args = [_REFUSED] * 256, [0] * 256
    for initial in range(256):
        major, info = initial >> 5, initial & 0x1F
        width = 1 << (info - 24) if 24 <= info < 28 else 0
        if major in (0, 1) or (major == 7 and info in (20, 21, 22, 25, 26, 27)):
            if info < 24 or width:
                kinds[initial], args[initial] = _SKIP, width
        elif major in (2, 3, 4, 5):
            long_kind, short_kind = (_LONG_STRING, _SKIP) if major < 4 else (_LONG_ARRAY, _ARRAY)
            if info < 24:
                kinds[initial], args[initial] = short_kind, info * (2 if major == 5 else 1)
            elif width:
                kinds[initial], args[initial] = long_kind, width
            elif info == 31:
                kinds[initial] = _CHUNKED if major < 4 else _OPEN
        elif initial == 0xFF:
            kinds[initial] = _BREAK
    kinds[0x3B] = _NEG64  # the one integer header that can hold -2**64
    return tuple(kinds), tuple(args)


_KINDS, _ARGS = _dispatch_tables()
_ARRAY_OPEN = 3 << 70  # items still due in an open indefinite-length array: never reaches 0
_MAP_OPEN = 2 << 70  # ... in an open indefinite-length map: even, so an odd rest is a lone key
_OPEN_SPAN = 1 << 69  # far more than any count of items consumed
_TAG_NAMES = {0: "date/time", 1: "epoch time", 2: "big integer", 3: "negative big integer",
              4: "decimal fraction", 28: "shared value", 29: "shared reference",
              256: "string reference namespace", 258: "set"}


def _refused_item(data: bytes, pos: int) -> _Refused:
    """Why the item starting at ``pos`` is refused: a tag, undefined, a simple value, reserved."""
    initial = data[pos]
    major, info = initial >> 5, initial & 0x1F
    if info >= 28:
        return _Refused("malformed", f"CBOR header 0x{initial:02x} at byte {pos} is reserved or not "
                        "allowed for its type")
    width = 1 << (info - 24) if info >= 24 else 0
    arg = int.from_bytes(data[pos + 1:pos + 1 + width], "big") if width else info
    if major == 6:
        name = _TAG_NAMES.get(arg)
        return _Refused("malformed", f"CBOR tag {arg}{f' ({name})' if name else ''} at byte {pos}: "
                        "tags are refused")
    what = "undefined" if info == 23 else f"simple value {arg}"
    return _Refused("malformed", f"CBOR {what} at byte {pos} is refused")


def scan_cbor(data: bytes, *, max_depth: int = MAX_DEPTH, max_items: int = MAX_ITEMS) -> None:
    """Check that ``data`` is exactly one CBOR item the protocol allows, reading item headers only.

    One pass over the headers (string contents are skipped, not read), nothing allocated but a
    stack of open containers, at most ``max_items`` steps: so no input costs more than that, and
    nothing is resolved. Raises ``ValueError`` subclasses carrying a decode reason: ``malformed``
    (truncated, reserved or misplaced headers, tags, undefined, simple values, trailing bytes),
    ``big-int`` (-2**64), ``too-deep``, ``too-many-items``.
    """
    kinds, args = _KINDS, _ARGS
    end, pos, items = len(data), 0, 0
    stack: list[int] = []  # items still due at each enclosing level
    left = 1  # items still due at this level: the document holds one
    try:
        while left:
            initial = data[pos]
            kind = kinds[initial]
            pos += 1
            items += 1
            if items > max_items:
                raise _Refused("too-many-items", f"more than {max_items} CBOR items")
            if kind == _SKIP:
                pos += args[initial]
            elif kind in (_ARRAY, _LONG_ARRAY, _OPEN):
                if len(stack) >= max_depth:
                    raise _TooDeep(f"more than {max_depth} nested CBOR containers")
                if kind == _OPEN:
                    stack.append(left)
                    left = _ARRAY_OPEN if initial == 0x9F else _MAP_OPEN
                    continue
                if kind == _ARRAY:
                    due = args[initial]
                else:
                    width = args[initial]
                    due = int.from_bytes(data[pos:pos + width], "big") * (1 if initial < 0xA0 else 2)
                    pos += width
                if due:
                    if due > end - pos:
                        raise _Refused("malformed", f"CBOR container of {due} items at byte {pos}, "
                                       f"{max(0, end - pos)} bytes left")
                    if items + due > max_items:
                        raise _Refused("too-many-items", f"more than {max_items} CBOR items")
                    stack.append(left)
                    left = due
                    continue
            elif kind == _LONG_STRING:
                width = args[initial]
                pos += width + int.from_bytes(data[pos:pos + width], "big")
            elif kind == _CHUNKED:
                pos = _skip_chunks(data, pos, initial >> 5)
            elif kind == _NEG64:
                pos += 8
                if data[pos - 8:pos] == b"\xff" * 8:
                    raise _Refused("big-int", f"CBOR integer -2**64 at byte {pos - 9} (at most "
                                   "+-(2**64 - 1))")
            elif kind == _BREAK:  # closes an indefinite-length array, or a map after a value
                if not (left > _ARRAY_OPEN - _OPEN_SPAN or (left > _MAP_OPEN - _OPEN_SPAN and not left % 2)):
                    raise _Refused("malformed", f"CBOR break at byte {pos - 1} closes nothing (or a "
                                   "map key without its value)")
                items -= 1
                left = 1  # the container just closed is the item that completes below
            else:
                raise _refused_item(data, pos - 1)
            left -= 1
            while not left and stack:  # the item just completed may complete its container
                left = stack.pop() - 1
    except IndexError:
        pos = end + 1
    if pos > end:
        raise _Refused("malformed", "CBOR ends inside an item")
    if pos != end:
        raise _Refused("malformed", f"{end - pos} bytes after the end of the CBOR item")


def _skip_chunks(data: bytes, pos: int, major: int) -> int:
    """Skip the chunks of an indefinite-length string to its break; the position after it."""
    while True:
        initial = data[pos]  # an IndexError is a truncation, as in scan_cbor
        if initial == 0xFF:
            return pos + 1
        info = initial & 0x1F
        if initial >> 5 != major or info >= 28:
            raise _Refused("malformed", f"CBOR header 0x{initial:02x} at byte {pos} inside an "
                           "indefinite-length string")
        width = 1 << (info - 24) if info >= 24 else 0
        length = int.from_bytes(data[pos + 1:pos + 1 + width], "big") if width else info
        pos += 1 + width + length


def _loads_cbor(data: bytes, max_items: int = MAX_ITEMS) -> Any:
    """Scan, then decode. The scan found exactly one item spanning all of ``data`` (trailing bytes
    are refused there), so ``loads`` needs no stream to tell where the item ended."""
    scan_cbor(data, max_items=max_items)
    try:
        return cbor2.loads(data, max_depth=MAX_DEPTH, allow_duplicate_keys=False,
                           strict_hashable_types=True)
    except cbor2.CBORDecodeError as exc:
        if "nesting depth" in str(exc):
            raise _TooDeep(str(exc)) from exc
        raise


# JSON: the same bounds, from hooks of the standard parser and a count before parsing ---------------

_JSON_CHUNK = 1 << 16
_JSON_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")
_INT_CHARS = len(str(MAX_INT)) + 1  # digits and a sign


def _reject_constant(name: str) -> Any:
    raise ValueError(f"JSON {name} is not allowed (no NaN or infinity on the wire)")


def _json_int(text: str) -> int:
    if len(text) > _INT_CHARS or abs(value := int(text)) > MAX_INT:
        raise _Refused("big-int", f"JSON integer of {len(text.lstrip('-'))} digits "
                       "(at most +-(2**64 - 1))")
    return value


def _json_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"JSON number {text[:40]} is out of range (no NaN or infinity on the wire)")
    return value


def _json_shape(data: bytes, max_items: int) -> tuple[int, int]:
    """Upper bounds of the values (keys and containers included) and the nesting of a JSON text.

    Counts ``,`` ``:`` ``[`` ``{`` at C speed, without parsing. Only a text with more of them than
    ``max_items`` is looked at again, outside its strings, for its real count and depth (the depth
    is 0 when not computed: the parser and :func:`from_wire` bound it): linear, in chunks of
    :data:`_JSON_CHUNK` bytes, so its memory does not grow with the text.
    """
    bound = data.count(b",") + data.count(b":") + data.count(b"[") + data.count(b"{") + 1
    if bound <= max_items:
        return bound, 0
    import numpy as np  # only for the rare text past the cheap bound

    # Drop escaped backslashes, then escaped quotes: every quote left is a string's edge.
    text = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    items, depth, deepest, inside = 1, 0, 0, False
    for start in range(0, len(text), _JSON_CHUNK):
        codes = np.frombuffer(text, np.uint8, count=min(_JSON_CHUNK, len(text) - start), offset=start)
        parity = np.bitwise_xor.accumulate(codes == 0x22)
        outside = parity == inside
        inside ^= bool(parity[-1])
        opening = outside & ((codes == 0x5B) | (codes == 0x7B))
        items += int(np.count_nonzero(outside & ((codes == 0x2C) | (codes == 0x3A)))) + int(opening.sum())
        levels = np.cumsum(opening.astype(np.int8) - (outside & ((codes == 0x5D) | (codes == 0x7D))),
                           dtype=np.int32) + depth
        deepest, depth = max(deepest, int(levels.max())), int(levels[-1])
    return items, deepest


def _loads_json(data: bytes, max_items: int = MAX_ITEMS) -> Any:
    items, depth = _json_shape(data, max_items)
    if depth > MAX_DEPTH:
        raise _TooDeep(f"more than {MAX_DEPTH} nested JSON containers")
    if items > max_items:
        raise _Refused("too-many-items", f"more than {max_items} JSON values")
    value = json.loads(data.decode("utf-8"), parse_constant=_reject_constant, parse_int=_json_int,
                       parse_float=_json_float)
    if _JSON_SURROGATE.search(data):  # \ud800 escapes: pairs are fine, a lone half is not Unicode
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("a JSON string holds a lone surrogate (not Unicode)") from None
    return value


def _dumps_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()


def _failure_reason(exc: Exception) -> str:
    """The :class:`DecodeError` reason for an exception raised while parsing."""
    if isinstance(exc, _Refused):
        return exc.reason
    return "too-deep" if isinstance(exc, RecursionError) else "malformed"


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

    def __init__(self, fmt: Format = "cbor", *, max_payload: int = DEFAULT_MAX_PAYLOAD,
                 max_items: int = MAX_ITEMS) -> None:
        if fmt not in ("cbor", "json"):
            raise ValueError(f"unknown format {fmt!r}: use 'cbor' or 'json'")
        if max_payload <= 0:
            raise ValueError("max_payload must be positive")
        if max_items <= 0:
            raise ValueError("max_items must be positive")
        self.format: Format = fmt
        self.max_payload = max_payload
        self.max_items = max_items

    def __repr__(self) -> str:
        items = "" if self.max_items == MAX_ITEMS else f", max_items={self.max_items}"
        return f"Codec({self.format!r}, max_payload={self.max_payload}{items})"

    def encode(self, message: WireModel) -> bytes:
        """Serialise a message; raises :class:`EncodeError` if it is too large or not encodable."""
        return self.encode_dumped(message.model_dump(mode="python", exclude_none=True),
                                  type(message).__name__)

    def encode_dumped(self, fields: dict[str, Any], name: str) -> bytes:
        """Serialise what ``model_dump(mode="python", exclude_none=True)`` made of a ``name`` message
        (or the same fields built by code that checked them as the model would: :mod:`topics.task_wire`)."""
        data = self._dumps(to_wire(fields, binary=self.format == "cbor"))
        if len(data) > self.max_payload:
            raise EncodeError(f"encoded {name} is {len(data)} bytes, over the limit of {self.max_payload}")
        self._check_items(data, self.format)
        return data

    def _check_items(self, data: bytes, fmt: Format) -> None:
        """Refuse to send what a receiver would refuse for its number of values.

        Every value takes at least one byte, so only a message longer than ``max_items`` bytes
        needs counting (the rest of a receiver's checks :func:`to_wire` makes already).
        """
        if len(data) <= self.max_items:
            return
        items = _json_shape(data, self.max_items)[0] if fmt == "json" else 0
        try:
            if fmt == "cbor":
                scan_cbor(data, max_items=self.max_items)
        except _Refused as exc:
            raise EncodeError(f"receivers would refuse it: {exc}") from exc
        if items > self.max_items:
            raise EncodeError(f"receivers would refuse it: more than {self.max_items} JSON values")

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
            raw = (_loads_cbor if fmt == "cbor" else _loads_json)(data, self.max_items)
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
        if fmt != "raw":
            self._check_items(data, fmt)
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
                return from_wire(_loads_cbor(data, self.max_items))
            if fmt == "json":
                return from_wire(_loads_json(data, self.max_items))
        except Exception as exc:
            raise DecodeError(_failure_reason(exc), f"{fmt}: {exc}"[:300], topic=topic,
                              size=size) from exc
        raise DecodeError("malformed", f"unknown value format {fmt!r}", topic=topic, size=size)


__all__ = ["MAX_DEPTH", "MAX_INT", "MAX_ITEMS", "Codec", "DecodeError", "EncodeError", "Format",
           "ValueFormat", "scan_cbor", "sniff_format"]
