"""The protocol as an AsyncAPI 3.0 document, generated from the models, and the generated parts of
``docs/protocol.md`` (field tables and examples).

    python -m topics.asyncapi > docs/asyncapi.json          # the AsyncAPI document
    python -m topics.asyncapi --sync-doc docs/protocol.md   # refresh the generated doc sections

Both outputs are deterministic, so a test can regenerate them and fail on drift.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from topics.codec import DEFAULT_MAX_PAYLOAD, Codec
from topics.errors import TopicError
from topics.models import (
    CONTENT_CBOR,
    CONTENT_JSON,
    SCHEMA_VERSION,
    DeadLetter,
    Executor,
    Heartbeat,
    Load,
    NodeState,
    Ping,
    Pong,
    Result,
    Role,
    Status,
    Task,
    TaskCapability,
    WireModel,
)
from topics.names import DEFAULT_PREFIX, Kind, TopicTree

ASYNCAPI_VERSION = "3.0.0"
MQTT_BINDING_VERSION = "0.2.0"
_SCHEMA_REF = "#/components/schemas/{model}"


@dataclass(frozen=True, slots=True)
class ChannelSpec:
    """One topic kind of the protocol: who publishes it, who subscribes, with which QoS."""

    key: str
    scope: str  # "node" or "pool"
    kind: Kind
    model: type[WireModel]
    qos: int
    retain: bool
    sender: str
    receiver: str
    summary: str


CHANNELS: tuple[ChannelSpec, ...] = (
    ChannelSpec("nodeTask", "node", Kind.TASK, Task, 1, False, "device", "server",
                "Task inbox of one server."),
    ChannelSpec("poolTask", "pool", Kind.TASK, Task, 1, False, "device", "server",
                "Task inbox of a pool of servers, which subscribe with $share/{pool}/<this topic> so "
                "that each task reaches one of them (MQTT 5 brokers and Mosquitto; amqtt accepts "
                "$share subscriptions and never delivers to them)."),
    ChannelSpec("nodeResult", "node", Kind.RESULT, Result, 1, False, "server", "device",
                "Result inbox of one device: the conventional reply_to of its tasks."),
    ChannelSpec("nodeHeartbeat", "node", Kind.HEARTBEAT, Heartbeat, 0, False, "server", "device",
                "Periodic liveness, capabilities and load of a node (devices publish theirs too)."),
    ChannelSpec("nodePing", "node", Kind.PING, Ping, 0, False, "device", "server",
                "Round-trip probe to a server, answered ahead of queued work."),
    ChannelSpec("nodePong", "node", Kind.PONG, Pong, 0, False, "server", "device",
                "Probe answers: the conventional reply_to of a device's pings."),
    ChannelSpec("nodeState", "node", Kind.STATE, NodeState, 1, True, "server", "device",
                "Retained birth (online) and death (offline, also the MQTT Will) of a node."),
    ChannelSpec("nodeDeadLetter", "node", Kind.DEAD_LETTER, DeadLetter, 0, False, "server", "operator",
                "Copies of input a node rejected, with the reason, for whoever runs the fleet."),
)

FIELD_NOTES: dict[type[BaseModel], dict[str, str]] = {
    Task: {
        "v": "schema version; a receiver refuses any other value",
        "id": "task id chosen by the sender, unique per sender; a retry reuses it",
        "task": "name of a registered task on the server",
        "sender": "node id of the device",
        "reply_to": "topic the Result goes to, normally `{prefix}/node/{sender}/result`",
        "created": "Unix time the device created the task",
        "deadline": "legacy: Unix time on the sender's clock after which the answer is useless; "
                    "read only when `ttl` is absent, and only right if both clocks agree",
        "ttl": "seconds left until the deadline when this message is sent (every send recomputes "
               "it); the server answers `expired` that long after receipt, on its own clock",
        "attempt": "1 for the first send, +1 for each retry (echoed in the Result)",
        "payload": "the task's input: any CBOR/JSON value, `$bytes`, `$ndarray`",
        "content_type": "how the payload is meant, informative",
        "stage": "pipeline tasks: the first stage to run (earlier ones ran on the device)",
    },
    Result: {
        "v": "schema version",
        "task_id": "the `id` of the Task answered",
        "status": "how the task ended: see Result statuses",
        "server": "node id of the server that answered",
        "task": "the task name, echoed",
        "payload": "the task's output (status `ok`)",
        "content_type": "format the server answered in (that of the request)",
        "error": "what went wrong (every status but `ok`)",
        "queue_wait": "seconds the task waited in the server's queue",
        "service_time": "seconds the task ran",
        "attempt": "the `attempt` of the Task this answers",
    },
    Heartbeat: {
        "v": "schema version",
        "node": "node id of the sender",
        "role": "`server` or `device`",
        "session": "session number of this run (milliseconds since the epoch at start)",
        "seq": "heartbeat counter within the session, from 0",
        "interval": "seconds until the next heartbeat (jittered by +-10 %)",
        "time": "Unix time of sending",
        "capabilities": "task name -> how it runs there",
        "pools": "pools whose inbox this server also serves",
        "load": "the node's load when sending",
    },
    Load: {
        "queue_length": "tasks waiting for a worker",
        "queue_capacity": "tasks that may wait before new ones are answered `rejected-busy`",
        "in_flight": "tasks running now",
        "workers": "tasks that can run at once",
        "service_time": "task name -> moving average of its run time in seconds",
        "cpu": "share of all cores the agent process used since the last heartbeat",
    },
    TaskCapability: {
        "executor": "`thread` or `process` (a process pool, for GIL-bound work)",
        "stages": "number of stages of a pipeline task; absent for plain tasks",
    },
    Ping: {
        "v": "schema version",
        "nonce": "sender's probe number, echoed",
        "sender": "node id of the prober",
        "reply_to": "topic the Pong goes to, normally `{prefix}/node/{sender}/pong`",
        "sent": "the sender's monotonic clock; echoed untouched, never compared across nodes",
    },
    Pong: {
        "v": "schema version",
        "nonce": "the Ping's nonce",
        "responder": "node id of the server answering",
        "sent": "the Ping's `sent`, unchanged",
    },
    NodeState: {
        "v": "schema version",
        "node": "node id",
        "role": "`server` or `device`",
        "status": "`online` (birth) or `offline` (death)",
        "session": "session the record is about; an `offline` for an older session is ignored",
        "time": "Unix time the record was made (for the Will: when the node connected)",
        "tasks": "the tasks a server serves (its birth carries them, so a device can offload "
                 "before the first heartbeat; empty in a death, and for older nodes)",
        "interval": "seconds between the node's heartbeats (in a birth): until its first heartbeat, "
                    "the birth counts as one, stale after the same silence",
        "pools": "the pools whose shared inbox a server reads (in a birth, as in its heartbeats)",
    },
    DeadLetter: {
        "v": "schema version",
        "node": "node id of the node that rejected the input",
        "topic": "topic the input arrived on",
        "reason": "short word: a decode reason or an agent's own (`wrong-node`, `bad-reply-to`...)",
        "detail": "what exactly was wrong",
        "payload": "the first 4096 bytes of the rejected input",
        "size": "full size of the rejected input in bytes",
        "time": "Unix time of the rejection",
    },
}
"""The meaning of every field, for the AsyncAPI schemas and the field tables of the protocol doc."""

# Examples -------------------------------------------------------------------------------------

_T0 = 1_700_000_000.0
_TREE = TopicTree()
EXAMPLES: dict[str, WireModel] = {
    "task-square": Task(id="t-1", task="square", sender="me", reply_to=_TREE.result_inbox("me"),
                        created=_T0, payload={"x": 7}),
    "task-frame": Task(id="cam-1:000042", task="ball", sender="cam-1",
                       reply_to=_TREE.result_inbox("cam-1"), created=_T0 + 0.25,
                       ttl=0.5, attempt=2, stage=3,
                       payload=np.arange(12, dtype=np.uint8).reshape(2, 2, 3)),
    "result-ok": Result(task_id="t-1", status=Status.OK, server="srv1", task="square",
                        payload={"y": 49}, content_type=CONTENT_JSON, queue_wait=0.0004,
                        service_time=0.0021),
    "result-busy": Result(task_id="t-9", status=Status.REJECTED_BUSY, server="srv1", task="square",
                          content_type=CONTENT_JSON,
                          error="queue full (64 waiting, 4 running)"),
    "result-unknown": Result(task_id="t-2", status=Status.UNKNOWN_TASK, server="srv1", task="cube",
                             content_type=CONTENT_JSON,
                             error="unknown task 'cube'; this server runs noop, sleep, square"),
    "result-expired": Result(task_id="cam-1:000042", status=Status.EXPIRED, server="srv1",
                             task="ball", error="deadline passed while queued", queue_wait=0.5,
                             attempt=2),
    "result-error": Result(task_id="t-3", status=Status.ERROR, server="srv1", task="square",
                           content_type=CONTENT_JSON,
                           error='ValueError: square needs {"x": number, "cost": seconds (optional)}',
                           service_time=0.00002),
    "heartbeat": Heartbeat(node="srv1", role=Role.SERVER, session=1_700_000_000_000, seq=42,
                           interval=1.0, time=_T0 + 42.1,
                           capabilities={"square": TaskCapability(),
                                         "cpu_burn": TaskCapability(executor=Executor.PROCESS),
                                         "ball": TaskCapability(stages=7)},
                           pools=("gpu",),
                           load=Load(queue_length=3, queue_capacity=64, in_flight=4, workers=4,
                                     service_time={"square": 0.002, "ball": 0.0051}, cpu=0.37)),
    "ping": Ping(nonce=17, sender="cam-1", reply_to=_TREE.pong("cam-1"), sent=5234.125),
    "pong": Pong(nonce=17, responder="srv1", sent=5234.125),
    "state-online": NodeState(node="srv1", role=Role.SERVER, status="online",
                              session=1_700_000_000_000, time=_T0),
    "state-offline": NodeState(node="srv1", role=Role.SERVER, status="offline",
                               session=1_700_000_000_000, time=_T0),
    "dead-letter": DeadLetter(node="srv1", topic=_TREE.task_inbox("srv1"), reason="malformed",
                              detail="neither a CBOR map nor a JSON object", payload=b"hello", size=5,
                              time=_T0 + 3.0),
}
"""Named example messages: in the AsyncAPI document and, as JSON, in the protocol doc."""


def example_json(name: str) -> str:
    """An example as the JSON a node sends with ``--format json``, indented for reading."""
    wire = Codec("json").encode(EXAMPLES[name])
    return json.dumps(json.loads(wire), indent=2)


# Schemas and field tables ---------------------------------------------------------------------


def _schemas() -> dict[str, Any]:
    """JSON schemas of every model, references pointing into ``components/schemas``."""
    schemas: dict[str, Any] = {}
    for model in [spec.model for spec in CHANNELS]:
        schema = model.model_json_schema(ref_template=_SCHEMA_REF, mode="validation")
        for name, definition in {**schema.pop("$defs", {}), model.__name__: schema}.items():
            if name in schemas and schemas[name] != definition:
                raise ValueError(f"two different schemas named {name}")
            schemas[name] = definition
    for described, notes in FIELD_NOTES.items():
        properties = schemas[described.__name__]["properties"]
        for field_name, note in notes.items():
            properties[field_name]["description"] = note
    return schemas


_NODE_PATTERN = "^[A-Za-z0-9_.:@-]+$"
_TASK_PATTERN = "^[A-Za-z0-9_.:-]+$"


def _bound(value: float) -> str:
    """A schema bound as a person reads it: ``100000``, ``2^53``, ``10^9``, ``1e+11``."""
    if isinstance(value, int) and value > 10**6 and value & (value - 1) == 0:
        return f"2^{value.bit_length() - 1}"
    if isinstance(value, int) and value > 10**6 and str(value).rstrip("0") == "1":
        return f"10^{len(str(value)) - 1}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _describe(schema: dict[str, Any], schemas: dict[str, Any]) -> str:
    """A short human description of a JSON schema: type and constraints."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        target = schemas[name]
        if "enum" in target:
            return " \\| ".join(f"`{value}`" for value in target["enum"])
        return f"[{name}](#{name.lower()})"
    if "anyOf" in schema:
        options = [option for option in schema["anyOf"] if option.get("type") != "null"]
        described = " or ".join(_describe(option, schemas) for option in options)
        return f"{described} or null" if len(options) < len(schema["anyOf"]) else described
    if "const" in schema:
        return f"`{json.dumps(schema['const'])}`"
    if "enum" in schema:
        return " \\| ".join(f"`{value}`" for value in schema["enum"])
    kind = schema.get("type")
    if kind is None:
        return "any"
    if kind == "string":
        high = schema.get("maxLength")
        if schema.get("format") == "binary":
            return "bytes" if high is None else f"bytes, at most {high}"
        if schema.get("format") == "mqtt-topic":
            return f"[topic](#topic-names), 1-{high} chars"
        if schema.get("pattern") == _NODE_PATTERN:
            return "node id"
        if schema.get("pattern") == _TASK_PATTERN:
            return "task name"
        low = schema.get("minLength")
        if low is not None and high is not None:
            return f"string, {low}-{high} chars"
        return f"string, at most {high} chars" if high is not None else "string"
    if kind in ("integer", "number"):
        words = {"integer": "integer", "number": "number"}[kind]
        bounds = [f">= {_bound(schema['minimum'])}" for _ in [0] if "minimum" in schema]
        bounds += [f"> {_bound(schema['exclusiveMinimum'])}" for _ in [0] if "exclusiveMinimum" in schema]
        bounds += [f"<= {_bound(schema['maximum'])}" for _ in [0] if "maximum" in schema]
        return f"{words} {', '.join(bounds)}".strip()
    if kind == "array":
        most = f", at most {schema['maxItems']}" if "maxItems" in schema else ""
        return f"list of {_describe(schema.get('items', {}), schemas)}{most}"
    if kind == "object":
        most = f", at most {schema['maxProperties']}" if "maxProperties" in schema else ""
        values = schema.get("additionalProperties")
        if isinstance(values, dict):
            return f"map of string to {_describe(values, schemas)}{most}"
        pattern_values = list(schema.get("patternProperties", {}).values())
        if pattern_values:
            return f"map of task name to {_describe(pattern_values[0], schemas)}{most}"
        return "map"
    return str(kind)


def _default(model: type[BaseModel], field_name: str) -> str:
    info = model.model_fields[field_name]
    if info.is_required():
        return "required"
    factory = info.default_factory
    value = factory() if factory is not None else info.default  # type: ignore[call-arg]
    if isinstance(value, BaseModel):
        return "all defaults"
    if isinstance(value, bytes):
        return "empty" if not value else f"`{value!r}`"
    if hasattr(value, "value"):
        value = value.value
    return f"`{json.dumps(value if not isinstance(value, tuple) else list(value))}`"


def field_table(model: type[BaseModel]) -> str:
    """The Markdown field table of ``model``: name, type and constraints, default, meaning."""
    schemas = _schemas()
    properties = schemas[model.__name__]["properties"]
    rows = ["| Field | Type and constraints | Default | Meaning |", "|---|---|---|---|"]
    for field_name in model.model_fields:
        rows.append(f"| `{field_name}` | {_describe(properties[field_name], schemas)} | "
                    f"{_default(model, field_name)} | {FIELD_NOTES[model][field_name]} |")
    return "\n".join(rows)


# The AsyncAPI document ------------------------------------------------------------------------


def _address(prefix: str, spec: ChannelSpec) -> str:
    name = "{pool}" if spec.scope == "pool" else "{nodeId}"
    return f"{prefix}/{spec.scope}/{name}/{spec.kind.value}"


def _message_key(spec: ChannelSpec, fmt: str) -> str:
    return f"{spec.model.__name__[0].lower()}{spec.model.__name__[1:]}{fmt.capitalize()}"


def _messages(schemas: dict[str, Any]) -> dict[str, Any]:
    messages: dict[str, Any] = {}
    for model in dict.fromkeys(spec.model for spec in CHANNELS):
        name = model.__name__
        examples = [{"name": key, "payload": json.loads(Codec("json").encode(message))}
                    for key, message in EXAMPLES.items() if type(message) is model]
        for fmt, content_type in (("cbor", CONTENT_CBOR), ("json", CONTENT_JSON)):
            message_name = f"{name}{fmt.capitalize()}"
            body: dict[str, Any] = {
                "name": message_name,
                "title": f"{name} ({fmt.upper()})",
                "summary": (model.__doc__ or "").strip().split("\n")[0],
                "contentType": content_type,
                "payload": {"$ref": _SCHEMA_REF.format(model=name)},
            }
            if fmt == "json":
                body["examples"] = examples
            messages[message_name] = body
    return messages


def build_asyncapi(prefix: str = DEFAULT_PREFIX) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of the protocol under ``prefix``."""
    TopicTree(prefix)
    if "{" in prefix or "}" in prefix:
        raise TopicError("prefix must not contain braces (they mark channel parameters)", topic=prefix)
    schemas = _schemas()
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for spec in CHANNELS:
        parameter = ({"pool": {"description": "pool name (same rules as a node id)",
                               "examples": ["gpu"]}} if spec.scope == "pool" else
                     {"nodeId": {"description": "node id: 1-64 of A-Z a-z 0-9 _ . : @ -",
                                 "examples": ["srv1"]}})
        messages = {f"{spec.kind.value.replace('-', '')}{fmt.capitalize()}":
                    {"$ref": f"#/components/messages/{spec.model.__name__}{fmt.capitalize()}"}
                    for fmt in ("cbor", "json")}
        channels[spec.key] = {
            "address": _address(prefix, spec),
            "title": f"{spec.scope}/{{{next(iter(parameter))}}}/{spec.kind.value}",
            "summary": spec.summary,
            "parameters": parameter,
            "messages": messages,
        }
        binding = {"mqtt": {"qos": spec.qos, "retain": spec.retain,
                            "bindingVersion": MQTT_BINDING_VERSION}}
        refs = [{"$ref": f"#/channels/{spec.key}/messages/{key}"} for key in messages]
        suffix = spec.key[0].upper() + spec.key[1:]
        for action, role in (("send", spec.sender), ("receive", spec.receiver)):
            operations[f"{action}{suffix}"] = {
                "action": action,
                "channel": {"$ref": f"#/channels/{spec.key}"},
                "summary": f"A {role} {action}s: {spec.summary}",
                "tags": [{"name": role}],
                "messages": refs,
                "bindings": binding,
            }
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "mqtt-offload wire protocol",
            "version": f"{SCHEMA_VERSION}.0.0",
            "description": (
                "Task offloading over MQTT: devices publish tasks to the server that will finish "
                "them soonest and get results back on the task's reply_to. Messages are CBOR maps "
                "(default) or JSON objects; receivers accept both and tell them apart by the first "
                f"byte. At most {DEFAULT_MAX_PAYLOAD} bytes per message by default. See "
                "docs/protocol.md."),
            "license": {"name": "Apache-2.0", "url": "https://www.apache.org/licenses/LICENSE-2.0"},
        },
        "defaultContentType": CONTENT_CBOR,
        "servers": {
            "local": {
                "host": "127.0.0.1:1883",
                "protocol": "mqtt",
                "protocolVersion": "3.1.1",
                "description": "A local Mosquitto (MQTT 3.1.1 or 5; pools need $share support).",
            },
        },
        "channels": channels,
        "operations": operations,
        "components": {"schemas": schemas, "messages": _messages(schemas)},
    }


def render_asyncapi(prefix: str = DEFAULT_PREFIX) -> str:
    """The document as committed: sorted keys, indent 2, trailing newline."""
    return json.dumps(build_asyncapi(prefix), indent=2, sort_keys=True) + "\n"


# Generated sections of docs/protocol.md -------------------------------------------------------

_REGION = re.compile(r"(<!-- generated: (?P<what>[a-z]+) (?P<name>[A-Za-z0-9_-]+) -->\n)"
                     r"(?P<body>.*?)(<!-- end generated -->)", re.DOTALL)
_TABLE_MODELS: dict[str, type[BaseModel]] = {model.__name__: model for model in FIELD_NOTES}


def generated_section(what: str, name: str) -> str:
    """The text of one generated section: ``fields <Model>`` or ``example <name>``."""
    if what == "fields":
        if name not in _TABLE_MODELS:
            raise KeyError(f"no field table for {name!r}: known {', '.join(sorted(_TABLE_MODELS))}")
        return field_table(_TABLE_MODELS[name]) + "\n"
    if what == "example":
        if name not in EXAMPLES:
            raise KeyError(f"no example named {name!r}: known {', '.join(EXAMPLES)}")
        model = type(EXAMPLES[name]).__name__
        return f"<!-- model: {model} -->\n```json\n{example_json(name)}\n```\n"
    raise KeyError(f"unknown generated section kind {what!r}: use fields or example")


def sync_doc(text: str) -> str:
    """``text`` with every generated section rewritten from the models."""
    return _REGION.sub(lambda match: match.group(1) + generated_section(match["what"], match["name"])
                       + match.group(5), text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m topics.asyncapi", description=__doc__.split("\n")[0])
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="topic prefix (default %(default)s)")
    parser.add_argument("--sync-doc", metavar="FILE", type=Path,
                        help="rewrite the generated sections of this Markdown file in place")
    args = parser.parse_args(argv)
    if args.sync_doc is not None:
        path: Path = args.sync_doc
        original = path.read_text(encoding="utf-8")
        updated = sync_doc(original)
        if updated != original:
            path.write_text(updated, encoding="utf-8")
        print(f"{path}: {'updated' if updated != original else 'up to date'}", file=sys.stderr)
        return 0
    sys.stdout.write(render_asyncapi(args.prefix))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
