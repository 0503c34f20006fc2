"""The fleet view against a real broker: three servers (CBOR and JSON), a crash, a silent loss, the CLI."""

from __future__ import annotations

import json

import pytest
from brokers_support import (
    BrokerEndpoint,
    Stack,
    connected,
    endpoint,
    retained_on,
    start_cloud,
    start_edge,
    start_servers,
    wait_for,
)

from agent_common.registry import TaskRegistry
from edge_agent.cli import main
from edge_agent.fleet import FleetWatch, NodeRow
from topics.brokers import MosquittoBroker
from topics.mqtt import MqttTransport
from topics.names import TopicTree
from topics.transport import Message

HEARTBEAT = 0.2
SERVERS = ("srv-a", "srv-b", "srv-c")


@pytest.fixture
def mosquitto(mosquitto_broker: MosquittoBroker) -> BrokerEndpoint:
    return endpoint(mosquitto_broker, "3.1.1")


def rows_of(watch: FleetWatch) -> dict[str, NodeRow]:
    return {row.node: row for row in watch.rows()}


def start_fleet(target: BrokerEndpoint, stack: Stack, prefix: str) -> dict[str, MqttTransport]:
    """Three servers on ``target`` (srv-b speaks JSON); their transports, to crash them."""
    return start_servers(target, stack, prefix, SERVERS, heartbeat_interval=HEARTBEAT,
                         formats={"srv-b": "json"})


def watch_fleet(target: BrokerEndpoint, stack: Stack, prefix: str) -> FleetWatch:
    """An observing device (it runs nothing and announces nothing) with a fleet view on it."""
    agent = start_edge(target, stack, prefix, registry=TaskRegistry(), announce=False)
    return FleetWatch(agent)


def heard_all(watch: FleetWatch) -> bool:
    rows = rows_of(watch)
    return all(node in rows and rows[node].status == "online" and rows[node].seq is not None
               for node in SERVERS)


def survivors_seq(watch: FleetWatch, gone: str) -> int:
    """Heartbeats heard from the servers still running: a clock in heartbeat intervals."""
    return sum(row.seq or 0 for row in watch.rows() if row.node in SERVERS and row.node != gone)


def test_the_view_shows_three_servers_and_a_crashed_one_offline_within_a_heartbeat(
        mosquitto: BrokerEndpoint, stack: Stack, topic_prefix: str) -> None:
    links = start_fleet(mosquitto, stack, topic_prefix)
    watch = watch_fleet(mosquitto, stack, topic_prefix)

    def all_online() -> bool:
        rows = rows_of(watch)
        return heard_all(watch) and all(rows[node].rtt is not None for node in SERVERS)

    wait_for(all_online, message="three servers online with a round trip")
    rows = rows_of(watch)
    assert {rows[node].role for node in SERVERS} == {"server"}
    # srv-b's heartbeats are JSON, the others' CBOR: all read alike.
    assert all(rows[node].workers == 2 and rows[node].queue_capacity for node in SERVERS)
    before = survivors_seq(watch, "srv-c")
    links["srv-c"].abort()  # a crash: the broker publishes its Will
    wait_for(lambda: rows_of(watch)["srv-c"].status == "offline", message="srv-c offline")
    # The Will comes at once: at most a heartbeat or two of each of the two survivors passed.
    assert survivors_seq(watch, "srv-c") - before <= 2 * 2
    assert rows_of(watch)["srv-a"].status == "online"


def test_a_server_that_vanishes_without_a_will_turns_stale_within_three_heartbeats(
        mosquitto: BrokerEndpoint, stack: Stack, topic_prefix: str) -> None:
    links = start_fleet(mosquitto, stack, topic_prefix)
    watch = watch_fleet(mosquitto, stack, topic_prefix)
    wait_for(lambda: heard_all(watch), message="a heartbeat of each server")
    before = survivors_seq(watch, "srv-a")
    links["srv-a"].close()  # a clean disconnect: the broker drops the Will; heartbeats just stop
    wait_for(lambda: rows_of(watch)["srv-a"].status == "stale", message="srv-a stale")
    passed = (survivors_seq(watch, "srv-a") - before) / 2  # per survivor
    assert passed <= 3 + 1, passed  # three intervals of silence, one heartbeat of rounding


def test_garbage_on_a_heartbeat_topic_shows_the_node_unreadable_and_the_view_goes_on(
        mosquitto: BrokerEndpoint, stack: Stack, topic_prefix: str) -> None:
    start_fleet(mosquitto, stack, topic_prefix)
    watch = watch_fleet(mosquitto, stack, topic_prefix)
    wait_for(lambda: heard_all(watch), message="a heartbeat of each server")
    tree = TopicTree(topic_prefix)
    vandal = connected(mosquitto, stack, "vandal")
    vandal.publish(tree.heartbeat("ghost"), b"\xa1\x01", qos=1)  # CBOR, not a heartbeat
    wait_for(lambda: rows_of(watch).get("ghost") is not None, message="ghost listed")
    ghost = rows_of(watch)["ghost"]
    assert ghost.status == "unreadable" and "heartbeat" in ghost.problem
    assert all(rows_of(watch)[node].status == "online" for node in SERVERS)
    vandal.publish(tree.task_inbox("srv-a"), b"not a task", qos=1)  # srv-a dead-letters it
    wait_for(lambda: rows_of(watch)["srv-a"].dead_letters, message="srv-a's dead letter")
    assert rows_of(watch)["srv-a"].dead_letters == {"malformed": 1}


def test_the_cli_lists_the_fleet_as_json_and_leaves_nothing_retained(
        mosquitto: BrokerEndpoint, stack: Stack, topic_prefix: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    start_fleet(mosquitto, stack, topic_prefix)
    argv = ["--broker", mosquitto.url, "--prefix", topic_prefix, "--id", "cli-look"]
    assert main(["servers", *argv, "--json", "--listen", "15"]) == 0
    rows = {row["node"]: row for row in json.loads(capsys.readouterr().out)}
    assert set(SERVERS) <= set(rows)
    assert all(rows[node]["status"] == "online" and rows[node]["rtt"] is not None for node in SERVERS)
    assert main(["submit", *argv, "square", '{"x": 7}']) == 0
    assert json.loads(capsys.readouterr().out) == {"y": 49}
    tree = TopicTree(topic_prefix)
    left = [m.topic for m in retained_on(mosquitto, stack, f"{topic_prefix}/#")]
    assert tree.state("cli-look") not in left, left
    assert tree.state("srv-a") in left  # the servers' births are retained, as they should be


def test_the_cli_prints_a_table_and_refuses_nonsense(
        mosquitto: BrokerEndpoint, stack: Stack, topic_prefix: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    start_fleet(mosquitto, stack, topic_prefix)
    argv = ["--broker", mosquitto.url, "--prefix", topic_prefix]
    assert main(["servers", *argv, "--listen", "15"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["node", "role", "status"]
    assert sorted(line.split()[0] for line in lines[1:]) == list(SERVERS)
    assert main(["servers", *argv, "--listen", "0"]) == 2
    assert "--listen" in capsys.readouterr().err
    assert main(["servers", "--listen", "1"]) == 2
    assert "broker" in capsys.readouterr().err


def test_heartbeats_state_and_dead_letters_are_json_from_a_cbor_configured_fleet(
        mosquitto: BrokerEndpoint, stack: Stack, topic_prefix: str) -> None:
    tree = TopicTree(topic_prefix)
    reader = connected(mosquitto, stack, "json-only")
    seen: dict[str, bytes] = {}

    def first_of_each(message: Message) -> None:
        seen.setdefault(message.topic, message.payload)

    reader.subscribe(f"{topic_prefix}/node/+/+", first_of_each, qos=1)
    start_fleet(mosquitto, stack, topic_prefix)  # srv-a and srv-c are configured for CBOR
    device = start_edge(mosquitto, stack, topic_prefix, registry=TaskRegistry(), heartbeat_interval=0.2)
    reader.publish(tree.task_inbox("srv-a"), b"not a task", qos=1)
    watched = [tree.heartbeat("srv-a"), tree.state("srv-a"), tree.dead_letter("srv-a"),
               tree.heartbeat(device.id), tree.state(device.id)]
    wait_for(lambda: all(topic in seen for topic in watched), message="each watched channel")
    for topic in watched:
        record = json.loads(seen[topic])  # what a JSON-only client (Node-RED's json node) does
        assert record["node"] in ("srv-a", device.id), topic


def test_a_device_offloads_at_once_from_the_servers_retained_birth(
        mosquitto: BrokerEndpoint, stack: Stack, topic_prefix: str) -> None:
    server = start_cloud(mosquitto, stack, topic_prefix, "srv-slow-beat", heartbeat_interval=60.0)
    wait_for(lambda: server.stats().get("heartbeats", 0) >= 1, message="its one heartbeat for a minute")
    # Started after that heartbeat: the device hears only the retained birth for the next minute.
    device = start_edge(mosquitto, stack, topic_prefix, registry=TaskRegistry(), probe_interval=60.0)
    wait_for(lambda: any(v.node == "srv-slow-beat" and "square" in v.tasks for v in device.servers()),
             message="the birth's tasks")
    assert device.submit("square", {"x": 12}).result(timeout=15.0) == {"y": 144}
