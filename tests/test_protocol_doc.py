"""docs/protocol.md and docs/asyncapi.json can never go stale: regenerated and checked against the models."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from topics.asyncapi import (
    CHANNELS,
    EXAMPLES,
    FIELD_NOTES,
    build_asyncapi,
    field_table,
    generated_section,
    main,
    render_asyncapi,
    sync_doc,
)
from topics.codec import Codec
from topics.errors import TopicError
from topics.models import ALL_MODELS, Load, TaskCapability, WireModel
from topics.names import Kind, TopicTree

DOCS = Path(__file__).resolve().parent.parent / "docs"
PROTOCOL = DOCS / "protocol.md"
ASYNCAPI = DOCS / "asyncapi.json"
MODELS: dict[str, type[WireModel]] = {model.__name__: model for model in ALL_MODELS}
KIND_MODELS: dict[Kind, type[WireModel]] = {spec.kind: spec.model for spec in CHANNELS}
JSON_BLOCK = re.compile(r"(?P<marker><!-- model: (?P<model>\w+) -->\n)?```json\n(?P<body>.*?)```", re.DOTALL)


@pytest.fixture(scope="module")
def doc() -> str:
    return PROTOCOL.read_text(encoding="utf-8")


# Drift ----------------------------------------------------------------------------------------


def test_asyncapi_document_is_up_to_date() -> None:
    committed = ASYNCAPI.read_text(encoding="utf-8")
    assert committed == render_asyncapi(), (
        "docs/asyncapi.json is stale: run `python -m topics.asyncapi > docs/asyncapi.json`")


def test_generated_doc_sections_are_up_to_date(doc: str) -> None:
    assert sync_doc(doc) == doc, (
        "generated sections of docs/protocol.md are stale: run "
        "`python -m topics.asyncapi --sync-doc docs/protocol.md`")


def test_render_is_deterministic_sorted_and_ends_with_a_newline() -> None:
    text = render_asyncapi()
    assert text == render_asyncapi() and text.endswith("}\n") and not text.endswith("\n\n")
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"


# The examples in the doc decode -----------------------------------------------------------------


def test_every_json_block_names_its_model_and_decodes(doc: str) -> None:
    blocks = list(JSON_BLOCK.finditer(doc))
    assert blocks, "no ```json blocks found in docs/protocol.md"
    for block in blocks:
        line = doc.count("\n", 0, block.start()) + 1
        assert block["model"], f"protocol.md line {line}: a ```json block without <!-- model: X -->"
        assert block["model"] in MODELS, f"protocol.md line {line}: unknown model {block['model']}"
        decoded = Codec().decode(block["body"].encode(), MODELS[block["model"]], topic=f"protocol.md:{line}")
        assert isinstance(decoded, MODELS[block["model"]])


def test_every_model_has_an_example_and_a_field_table(doc: str) -> None:
    examples = {block["model"] for block in JSON_BLOCK.finditer(doc)}
    assert examples >= set(MODELS), f"models without an example: {set(MODELS) - examples}"
    tabled: list[type[BaseModel]] = [*ALL_MODELS, Load, TaskCapability]
    for model in tabled:
        assert f"<!-- generated: fields {model.__name__} -->" in doc, f"no field table for {model.__name__}"


def test_every_field_has_a_note() -> None:
    assert set(FIELD_NOTES) == {*ALL_MODELS, Load, TaskCapability}
    for model, notes in FIELD_NOTES.items():
        assert list(notes) == list(model.model_fields), (
            f"FIELD_NOTES[{model.__name__}] in topics/asyncapi.py must describe exactly its fields, in order")
        for field_name in model.model_fields:
            assert f"| `{field_name}` |" in field_table(model)


def test_shell_examples_decode(doc: str) -> None:
    tree = TopicTree()
    published = re.findall(r"mosquitto_pub .*?-t (\S+) -m '(\{.*?\})'", doc)
    assert len(published) >= 2
    for topic, body in published:
        parsed = tree.parse(topic)
        assert parsed is not None, f"mosquitto_pub to {topic}, not a protocol topic"
        Codec().decode(body.encode(), KIND_MODELS[parsed.kind], topic=topic)
    printed = re.findall(r"^(offload/v1/\S+) (\{.*\})$", doc, re.MULTILINE)
    assert printed, "no mosquitto_sub output line in the worked exchange"
    for topic, body in printed:
        parsed = tree.parse(topic)
        assert parsed is not None
        Codec().decode(body.encode(), KIND_MODELS[parsed.kind], topic=topic)


def test_topic_table_matches_the_channels(doc: str) -> None:
    rows = {match["topic"]: match for match in re.finditer(
        r"^\| `(?P<topic>offload/v1/\S+)` \| [^|]+ \| (?P<qos>\d) \| (?P<retained>[^|]+) \| "
        r"\[(?P<model>\w+)\]",
        doc, re.MULTILINE)}
    assert len(rows) == len(CHANNELS)
    for spec in CHANNELS:
        placeholder = "{pool}" if spec.scope == "pool" else "{node}"
        row = rows[f"offload/v1/{spec.scope}/{placeholder}/{spec.kind.value}"]
        assert int(row["qos"]) == spec.qos
        assert ("yes" in row["retained"]) is spec.retain
        assert row["model"] == spec.model.__name__


def test_sync_doc_fills_and_refreshes_sections() -> None:
    stale = ("before\n<!-- generated: example pong -->\nold text\n<!-- end generated -->\n"
             "<!-- generated: fields Load -->\n<!-- end generated -->\nafter\n")
    synced = sync_doc(stale)
    assert "old text" not in synced and synced.startswith("before\n") and synced.endswith("after\n")
    assert '<!-- model: Pong -->\n```json\n{\n  "v": 1,' in synced
    assert "| `queue_length` |" in synced
    assert sync_doc(synced) == synced
    with pytest.raises(KeyError, match="no example named"):
        generated_section("example", "nope")
    with pytest.raises(KeyError, match="no field table"):
        generated_section("fields", "Nope")
    with pytest.raises(KeyError, match="use fields or example"):
        generated_section("table", "Task")


def test_main_writes_the_document_and_syncs_a_file(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    assert capsys.readouterr().out == render_asyncapi()
    assert main(["--prefix", "lab/offload/v1"]) == 0
    assert '"address": "lab/offload/v1/node/{nodeId}/task"' in capsys.readouterr().out
    target = tmp_path / "doc.md"
    target.write_text("<!-- generated: example ping -->\n<!-- end generated -->\n")
    assert main(["--sync-doc", str(target)]) == 0
    assert "<!-- model: Ping -->" in target.read_text()
    assert "updated" in capsys.readouterr().err


# The AsyncAPI document is consistent ------------------------------------------------------------


def resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = document
    for part in ref[2:].split("/"):
        assert part in node, f"dangling $ref {ref}"
        node = node[part]
    return node


def all_refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in all_refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in all_refs(value)]
    return []


def test_asyncapi_structure() -> None:
    document = build_asyncapi()
    assert document["asyncapi"] == "3.0.0"
    assert {"title", "version", "description"} <= set(document["info"])
    for ref in all_refs(document):
        resolve(document, ref)
    assert len(document["channels"]) == len(CHANNELS)
    for key, channel in document["channels"].items():
        placeholders = set(re.findall(r"\{(\w+)\}", channel["address"]))
        assert placeholders == set(channel["parameters"]), key
        content_types = sorted(resolve(document, message["$ref"])["contentType"]
                               for message in channel["messages"].values())
        assert content_types == ["application/cbor", "application/json"]
    for key, operation in document["operations"].items():
        assert operation["action"] in ("send", "receive")
        channel_ref = operation["channel"]["$ref"]
        resolve(document, channel_ref)
        for message in operation["messages"]:
            assert message["$ref"].startswith(channel_ref + "/messages/"), key
        assert set(operation["bindings"]["mqtt"]) == {"qos", "retain", "bindingVersion"}
    assert len(document["operations"]) == 2 * len(CHANNELS)


def test_asyncapi_channels_match_the_topic_tree() -> None:
    document = build_asyncapi()
    tree = TopicTree()
    for spec in CHANNELS:
        channel = document["channels"][spec.key]
        topic = channel["address"].replace("{nodeId}", "srv1").replace("{pool}", "gpu")
        parsed = tree.parse(topic)
        assert parsed is not None and parsed.kind is spec.kind
        assert topic == (tree.pool_inbox("gpu") if spec.scope == "pool" else tree.node("srv1", spec.kind))
        operation = document["operations"]["send" + spec.key[0].upper() + spec.key[1:]]
        assert operation["bindings"]["mqtt"]["qos"] == spec.qos
        assert operation["bindings"]["mqtt"]["retain"] is spec.retain


def test_asyncapi_schemas_and_examples_come_from_the_models() -> None:
    document = build_asyncapi()
    schemas = document["components"]["schemas"]
    for model in ALL_MODELS:
        schema = schemas[model.__name__]
        assert set(schema["properties"]) == set(model.model_fields)
        assert schema["additionalProperties"] is False
        assert all("description" in prop for prop in schema["properties"].values())
    examples = 0
    for name, message in document["components"]["messages"].items():
        model = MODELS[message["payload"]["$ref"].rsplit("/", 1)[-1]]
        for example in message.get("examples", []):
            Codec().decode(json.dumps(example["payload"]).encode(), model, topic=name)
            examples += 1
    assert examples == len(EXAMPLES)


def test_prefix_is_checked() -> None:
    assert build_asyncapi("lab/v1")["channels"]["poolTask"]["address"] == "lab/v1/pool/{pool}/task"
    for prefix in ("", "a/+", "a/{b}", "a/"):
        with pytest.raises(TopicError):
            build_asyncapi(prefix)
