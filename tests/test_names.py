"""The topic tree: builders, parser, validators and MQTT filter matching."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from topics.errors import TopicError
from topics.names import (
    DEFAULT_PREFIX,
    MAX_NODE_ID_LENGTH,
    MAX_TOPIC_BYTES,
    MAX_TOPIC_SLASHES,
    Kind,
    ParsedTopic,
    TopicTree,
    strip_shared,
    topic_matches,
    validate_filter,
    validate_node_id,
    validate_publish_topic,
    validate_topic_name,
    wildcard_captures,
)

NODE_ID_CHARS = "ABCxyz019_.:@-"
node_ids = st.text(alphabet=NODE_ID_CHARS, min_size=1, max_size=MAX_NODE_ID_LENGTH)
prefixes = st.lists(st.text(alphabet="abcXYZ09_-.", min_size=1, max_size=8), min_size=1, max_size=4).map(
    "/".join
)


# Builders -----------------------------------------------------------------------------------


def test_builders_follow_the_documented_tree() -> None:
    tree = TopicTree()
    assert tree.prefix == DEFAULT_PREFIX == "offload/v1"
    assert tree.task_inbox("srv1") == "offload/v1/node/srv1/task"
    assert tree.result_inbox("cam-7") == "offload/v1/node/cam-7/result"
    assert tree.heartbeat("srv1") == "offload/v1/node/srv1/heartbeat"
    assert tree.ping("srv1") == "offload/v1/node/srv1/ping"
    assert tree.pong("dev") == "offload/v1/node/dev/pong"
    assert tree.state("srv1") == "offload/v1/node/srv1/state"
    assert tree.dead_letter("srv1") == "offload/v1/node/srv1/dead-letter"
    assert tree.pool_inbox("gpu") == "offload/v1/pool/gpu/task"
    assert tree.pool_subscription("gpu") == "$share/gpu/offload/v1/pool/gpu/task"
    assert tree.all_of(Kind.HEARTBEAT) == "offload/v1/node/+/heartbeat"
    assert tree.node("a", Kind.PONG) == tree.pong("a")


def test_custom_prefix_is_used_everywhere() -> None:
    tree = TopicTree("test/abc123/offload/v1")
    assert tree.task_inbox("n") == "test/abc123/offload/v1/node/n/task"
    assert tree.pool_subscription("p") == "$share/p/test/abc123/offload/v1/pool/p/task"


@pytest.mark.parametrize("prefix", ["", "a/", "a//b", "a/+/b", "a/#", "$SYS/x", "a\x00b"])
def test_bad_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(TopicError):
        TopicTree(prefix)


def test_builders_refuse_bad_node_ids_and_name_the_topic() -> None:
    tree = TopicTree()
    with pytest.raises(TopicError, match="must not contain '/'") as info:
        tree.task_inbox("a/b")
    assert info.value.topic == "a/b"
    with pytest.raises(TopicError, match="pool name"):
        tree.pool_inbox("gpu#")
    with pytest.raises(TopicError, match="pool name"):
        tree.pool_subscription("")


def test_subscription_filters_built_by_the_tree_are_valid() -> None:
    tree = TopicTree()
    for kind in Kind:
        assert validate_filter(tree.all_of(kind)) == tree.all_of(kind)
    assert validate_filter(tree.pool_subscription("gpu"))


# Validators ---------------------------------------------------------------------------------


@pytest.mark.parametrize("node_id", ["srv1", "a", "cam-7", "edge_01.lab:3@home", "x" * MAX_NODE_ID_LENGTH])
def test_valid_node_ids(node_id: str) -> None:
    assert validate_node_id(node_id) == node_id


@pytest.mark.parametrize(
    ("node_id", "message"),
    [
        ("", "non-empty"),
        ("x" * (MAX_NODE_ID_LENGTH + 1), "longer than 64"),
        ("$SYS", "must not start with '\\$'"),
        ("a/b", "'/'"),
        ("a+b", "'\\+'"),
        ("a#", "'#'"),
        ("a b", "letters, digits"),
        ("tab\t", "letters, digits"),
        ("nul\x00", "letters, digits"),
        ("trailing-newline\n", "letters, digits"),
        ("\nleading", "letters, digits"),
        ("émile", "letters, digits"),
        ("a,b", "letters, digits"),
    ],
)
def test_invalid_node_ids(node_id: str, message: str) -> None:
    with pytest.raises(TopicError, match=message):
        validate_node_id(node_id)


def test_node_id_that_is_not_a_string_is_a_topic_error() -> None:
    with pytest.raises(TopicError):
        validate_node_id(42)  # type: ignore[arg-type]


def test_what_names_the_thing_being_validated() -> None:
    with pytest.raises(TopicError, match=r"^pool name"):
        validate_node_id("", what="pool name")


@pytest.mark.parametrize("topic", ["a", "a/b/c", "/leading", "trailing/", "a//b", "ünïcode/topic", "sp ace"])
def test_valid_publish_topics(topic: str) -> None:
    assert validate_publish_topic(topic) == topic


@pytest.mark.parametrize(
    "topic",
    ["", "a/+", "a/#", "+", "#", "a/b+", "$SYS/broker", "$share/g/a", "nul\x00", "x" * (MAX_TOPIC_BYTES + 1),
     "lone\ud800surrogate"],
)
def test_invalid_publish_topics(topic: str) -> None:
    with pytest.raises(TopicError):
        validate_publish_topic(topic)


# Everything Mosquitto refuses in a topic (it disconnects the publisher): C0 and C1 controls, lone
# surrogates, the non-characters U+FDD0-FDEF and U+xFFFE/U+xFFFF of every plane.
REFUSED_CHARACTERS = [
    *(chr(code) for code in (0x00, 0x01, 0x09, 0x0A, 0x1B, 0x1F, 0x7F, 0x80, 0x85, 0x9F)),
    "\ud800", "\udbff", "\udc00", "\udfff", "\ufdd0", "\ufdef", "\ufffe", "\uffff",
    *(chr(plane << 16 | low) for plane in (1, 2, 14, 15, 16) for low in (0xFFFE, 0xFFFF)),
]
ALLOWED_CHARACTERS = [" ", "~", "\xa0", "\u00ff", "\ufdcf", "\ufdf0", "\ufffd", "\ue000",
                      "\U0001fffd", "\U0010fffd", "\U0001f600", "$"]


@pytest.mark.parametrize("character", REFUSED_CHARACTERS, ids=lambda c: f"U+{ord(c):04X}")
def test_characters_mqtt_refuses_are_refused_everywhere(character: str) -> None:
    topic = f"offload/v1/node/me/result{character}"
    with pytest.raises(TopicError, match=f"U\\+{ord(character):04X} at index 25") as info:
        validate_publish_topic(topic)
    assert "\ud800" not in info.value.topic and info.value.topic.startswith("offload/v1")
    with pytest.raises(TopicError):
        validate_topic_name(topic)
    with pytest.raises(TopicError):
        validate_filter(f"a/+/{character}")


@pytest.mark.parametrize("character", ALLOWED_CHARACTERS, ids=lambda c: f"U+{ord(c):04X}")
def test_characters_mqtt_allows_are_allowed(character: str) -> None:
    assert validate_publish_topic(f"a/b{character}c") == f"a/b{character}c"
    assert validate_filter(f"+/b{character}c/#") == f"+/b{character}c/#"


def test_at_most_201_levels_as_mosquitto_allows() -> None:
    fits = "a" + "/a" * MAX_TOPIC_SLASHES
    assert validate_publish_topic(fits) == fits
    assert validate_filter(f"$share/g/{fits}") and validate_filter(fits.replace("/a", "/+"))
    with pytest.raises(TopicError, match="more than 201 levels"):
        validate_publish_topic(fits + "/a")
    with pytest.raises(TopicError, match="more than 201 levels"):
        validate_filter(fits + "/#")


def test_topic_names_may_start_with_a_dollar_publish_topics_may_not() -> None:
    assert validate_topic_name("$SYS/broker/uptime") == "$SYS/broker/uptime"
    with pytest.raises(TopicError, match="must not start with"):
        validate_publish_topic("$SYS/broker/uptime")
    for bad in ("", "a/+", "a/#"):
        with pytest.raises(TopicError):
            validate_topic_name(bad)


@pytest.mark.parametrize("value", [None, 42, b"a/b", ["a"]])
def test_a_topic_that_is_not_a_string_is_a_topic_error(value: object) -> None:
    with pytest.raises(TopicError, match="must be a"):
        validate_publish_topic(value)  # type: ignore[arg-type]
    with pytest.raises(TopicError, match="must be a"):
        validate_filter(value)  # type: ignore[arg-type]


def test_an_error_carries_at_most_200_characters_of_a_long_topic() -> None:
    with pytest.raises(TopicError) as info:
        validate_publish_topic("x" * 70_000 + "\x01")
    assert len(info.value.topic) == 203 and info.value.topic.endswith("...")


def _mqtt_allows(character: str) -> bool:
    """The rule of MQTT 5 section 1.5.4 and Mosquitto's UTF-8 check, written out on its own."""
    code = ord(character)
    return not (code <= 0x1F or 0x7F <= code <= 0x9F or 0xD800 <= code <= 0xDFFF
                or 0xFDD0 <= code <= 0xFDEF or code & 0xFFFE == 0xFFFE or character in "+#")


@given(topic=st.text(min_size=1, max_size=40))
def test_publish_topic_validation_agrees_with_the_mqtt_rules(topic: str) -> None:
    expected = all(map(_mqtt_allows, topic)) and not topic.startswith("$")
    try:
        validate_publish_topic(topic)
    except TopicError:
        assert not expected
    else:
        assert expected


def test_publish_topic_length_counts_utf8_bytes() -> None:
    three_byte_char = "\u20ac"  # euro sign: 3 bytes in UTF-8
    fits = three_byte_char * (MAX_TOPIC_BYTES // 3)
    assert validate_publish_topic(fits) == fits
    with pytest.raises(TopicError, match="too long"):
        validate_publish_topic(fits + three_byte_char)


@pytest.mark.parametrize(
    "topic_filter",
    ["#", "+", "a/+/c", "a/#", "+/+", "/+", "a/b/c", "$SYS/#", "$share/g/a/+/c", "$share/g/#",
     "sport/+/player1"],
)
def test_valid_filters(topic_filter: str) -> None:
    assert validate_filter(topic_filter) == topic_filter


@pytest.mark.parametrize(
    "topic_filter",
    ["", "a/#/c", "a/b#", "#/a", "a+/b", "a/+b", "$share/g", "$share//a", "$share/g+/a", "$share/g#/a",
     "nul\x00", "lone\udfffsurrogate", "a/" * MAX_TOPIC_BYTES],
)
def test_invalid_filters(topic_filter: str) -> None:
    with pytest.raises(TopicError):
        validate_filter(topic_filter)


def test_strip_shared() -> None:
    assert strip_shared("$share/group/a/b/#") == "a/b/#"
    assert strip_shared("a/b") == "a/b"


# Matching: the cases from the MQTT 3.1.1 / 5 specification (section 4.7) and a few of ours ----

MATCH_CASES = [
    # filter, topic, matches
    ("sport/tennis/player1/#", "sport/tennis/player1", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
    ("sport/#", "sport", True),
    ("#", "sport/tennis", True),
    ("#", "/", True),
    ("sport/tennis/+", "sport/tennis/player1", True),
    ("sport/tennis/+", "sport/tennis/player1/ranking", False),
    ("sport/tennis/+", "sport/tennis", False),
    ("sport/+", "sport", False),
    ("sport/+", "sport/", True),
    ("+/+", "/finance", True),
    ("/+", "/finance", True),
    ("+", "/finance", False),
    ("+", "finance", True),
    ("+/tennis/#", "sport/tennis/player1", True),
    ("+/tennis/#", "sport/football", False),
    ("a/b", "a/b", True),
    ("a/b", "a/b/c", False),
    ("a/b/c", "a/b", False),
    ("A/b", "a/b", False),
    ("a//b", "a//b", True),
    ("a/+/b", "a//b", True),
    # $-topics are not matched by filters starting with a wildcard
    ("#", "$SYS/broker/uptime", False),
    ("+/monitor/Clients", "$SYS/monitor/Clients", False),
    ("$SYS/#", "$SYS/broker/uptime", True),
    ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
    # shared subscriptions match on the filter after $share/<group>/
    ("$share/g/sport/#", "sport/tennis", True),
    ("$share/g/offload/v1/pool/gpu/task", "offload/v1/pool/gpu/task", True),
    ("$share/g/offload/v1/pool/gpu/task", "offload/v1/pool/cpu/task", False),
    ("$share/g/#", "$SYS/x", False),
    # our own tree
    ("offload/v1/node/+/heartbeat", "offload/v1/node/srv1/heartbeat", True),
    ("offload/v1/node/+/heartbeat", "offload/v1/node/srv1/state", False),
    ("offload/v1/node/+/heartbeat", "offload/v2/node/srv1/heartbeat", False),
    ("offload/v1/#", "offload/v1/pool/gpu/task", True),
]


@pytest.mark.parametrize(("topic_filter", "topic", "expected"), MATCH_CASES)
def test_topic_matches_spec_table(topic_filter: str, topic: str, expected: bool) -> None:
    assert topic_matches(topic_filter, topic) is expected


@pytest.mark.parametrize(
    ("topic_filter", "topic", "captures"),
    [
        ("offload/v1/node/+/heartbeat", "offload/v1/node/srv1/heartbeat", ["srv1"]),
        ("+/node/+/+", "p/node/n/task", ["p", "n", "task"]),
        ("a/#", "a/b/c/d", ["b/c/d"]),
        ("a/#", "a", [""]),
        ("a/+/#", "a/x/y/z", ["x", "y/z"]),
        ("$share/g/a/+", "a/b", ["b"]),
        ("a/b", "a/b", []),
        ("a/+", "b/c", []),
        ("#", "$SYS/x", []),
    ],
)
def test_wildcard_captures(topic_filter: str, topic: str, captures: list[str]) -> None:
    assert wildcard_captures(topic_filter, topic) == captures


# Parsing ------------------------------------------------------------------------------------


def test_parse_node_topics() -> None:
    tree = TopicTree()
    assert tree.parse("offload/v1/node/srv1/task") == ParsedTopic(Kind.TASK, "srv1")
    assert tree.parse("offload/v1/node/srv1/dead-letter") == ParsedTopic(Kind.DEAD_LETTER, "srv1")
    assert tree.parse("offload/v1/pool/gpu/task") == ParsedTopic(Kind.TASK, "gpu", pool="gpu")


@pytest.mark.parametrize(
    "topic",
    [
        "offload/v2/node/srv1/task",
        "offload/v1/node/srv1",
        "offload/v1/node/srv1/task/extra",
        "offload/v1/node/srv1/unknown",
        "offload/v1/pool/gpu/result",
        "offload/v1/other/srv1/task",
        "offload/v1",
        "offload/v10/node/srv1/task",
        "prefix/offload/v1/node/srv1/task",
        "",
    ],
)
def test_parse_rejects_foreign_topics(topic: str) -> None:
    assert TopicTree().parse(topic) is None


@given(prefix=prefixes, node=node_ids, kind=st.sampled_from(list(Kind)))
def test_every_built_node_topic_parses_back(prefix: str, node: str, kind: Kind) -> None:
    tree = TopicTree(prefix)
    topic = tree.node(node, kind)
    assert validate_publish_topic(topic) == topic
    assert tree.parse(topic) == ParsedTopic(kind, node)
    assert topic_matches(tree.all_of(kind), topic)
    assert wildcard_captures(tree.all_of(kind), topic) == [node]


@given(prefix=prefixes, pool=node_ids)
def test_every_built_pool_topic_parses_back(prefix: str, pool: str) -> None:
    tree = TopicTree(prefix)
    topic = tree.pool_inbox(pool)
    assert tree.parse(topic) == ParsedTopic(Kind.TASK, pool, pool=pool)
    assert topic_matches(tree.pool_subscription(pool), topic)
    assert validate_filter(tree.pool_subscription(pool))


@given(node=st.text(max_size=80))
def test_node_id_validation_agrees_with_the_character_rules(node: str) -> None:
    allowed = all(c in NODE_ID_CHARS or (c.isascii() and c.isalnum()) for c in node)
    expected = 0 < len(node) <= MAX_NODE_ID_LENGTH and allowed and not node.startswith("$")
    try:
        validate_node_id(node)
    except TopicError:
        assert not expected
    else:
        assert expected


@given(levels=st.lists(st.text(alphabet="ab+#$/", max_size=3), min_size=1, max_size=5))
def test_validate_filter_raises_only_topic_error(levels: list[str]) -> None:
    topic_filter = "/".join(levels)
    try:
        validate_filter(topic_filter)
    except TopicError:
        return
    # an accepted filter never has a wildcard inside a level
    for level in strip_shared(topic_filter).split("/"):
        assert level in ("+", "#") or ("+" not in level and "#" not in level)
