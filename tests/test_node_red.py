"""examples/node-red/flow.json in a real Node-RED (slow tier), and the flow's shape (default tier).

A Node-RED installed by scripts/ensure-node-red.sh runs the example flow headless against the
session's Mosquitto, rewritten for a test prefix; the tests ask it over its ``GET /offload`` and
``GET /fleet`` endpoints and watch the wire with their own client.
"""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import pytest
from brokers_support import BrokerEndpoint, MessageLog, Stack, connected, endpoint, require, start_cloud

from bench.node_red import FLOW_FILE, FlowSettings, NodeRed, ensure_installed, flow_for, load_flow
from topics.brokers import MosquittoBroker, free_port
from topics.codec import Codec
from topics.models import CONTENT_JSON, Heartbeat, NodeState, Result, Role, Task
from topics.names import TopicTree

# Nodes that ship with Node-RED itself: the flow must import into a bare install.
CORE_NODES = {"tab", "mqtt-broker", "mqtt in", "mqtt out", "inject", "function", "switch", "change",
              "trigger", "debug", "http in", "http response"}


def _nodes(flow: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [node for node in flow if node["type"] == kind]


def _function(flow: list[dict[str, Any]], name: str) -> str:
    (node,) = [node for node in _nodes(flow, "function") if node["name"] == name]
    code: str = node["func"]
    return code


# Default tier: the file itself -------------------------------------------------------------------


def test_flow_uses_core_nodes_only_and_is_wired_to_existing_nodes() -> None:
    flow = load_flow()
    assert {node["type"] for node in flow} <= CORE_NODES
    ids = {node["id"] for node in flow}
    assert len(ids) == len(flow)
    for node in flow:
        for output in node.get("wires", []):
            assert set(output) <= ids, f"{node.get('name')} is wired to a missing node"
        if "broker" in node and node["type"] in ("mqtt in", "mqtt out"):
            assert node["broker"] in ids


def test_flow_publishes_tasks_and_subscribes_results_at_qos_1() -> None:
    flow = load_flow()
    (publish,) = _nodes(flow, "mqtt out")
    assert publish["qos"] == "1" and publish["retain"] == "false"
    subscribe = _function(flow, "subscriptions")
    assert "/node/${sender}/result`, qos}" in subscribe
    assert 'env.get("OFFLOAD_RESULT_QOS") === "0" ? 0 : 1' in subscribe
    assert "/node/+/state`, qos: 1}" in subscribe
    (tab,) = _nodes(flow, "tab")
    env = {variable["name"]: variable["value"] for variable in tab["env"]}
    assert env == {"OFFLOAD_PREFIX": "offload/v1", "OFFLOAD_SENDER": "nodered", "OFFLOAD_TARGET": "pool/demo",
                   "OFFLOAD_TTL": "5", "OFFLOAD_GRACE": "1", "OFFLOAD_RESULT_QOS": "1"}


def test_flow_for_rewrites_the_broker_and_the_environment_only() -> None:
    original = load_flow()
    rewritten = flow_for(FlowSettings(broker="mqtt://127.0.0.1:4242", prefix="test/x", sender="nr-1",
                                      target="node/srv1", ttl=0.5, result_qos=0))
    (broker,) = _nodes(rewritten, "mqtt-broker")
    assert (broker["broker"], broker["port"]) == ("127.0.0.1", "4242")
    (tab,) = _nodes(rewritten, "tab")
    assert {v["name"]: v["value"] for v in tab["env"]}["OFFLOAD_TTL"] == "0.5"
    ws = flow_for(FlowSettings(broker="ws://127.0.0.1:9001"))
    assert [(b["broker"], b["port"]) for b in _nodes(ws, "mqtt-broker")] == [("ws://127.0.0.1:9001", "")]
    changed = [a["id"] for a, b in zip(original, rewritten, strict=True) if a != b]
    configurable = [node["id"] for node in original if node["type"] in ("tab", "mqtt-broker")]
    assert sorted(changed) == sorted(configurable)
    assert json.loads(FLOW_FILE.read_text(encoding="utf-8")) == original  # the file is untouched


# Slow tier: a real Node-RED -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def node_red_script() -> Path:
    """Node-RED's red.js, installed once per machine (skips without node/npm; fails under CI)."""
    require(shutil.which("node") is not None, "node not installed: Node.js 18+ runs Node-RED")
    script = ensure_installed()
    require(script is not None, "Node-RED is not installed and npm could not install it: "
            "bash scripts/ensure-node-red.sh says why")
    assert script is not None
    return script


def start_node_red(script: Path, broker: BrokerEndpoint, stack: Stack, prefix: str,
                   **settings: Any) -> NodeRed:
    """The example flow in a fresh Node-RED on ``broker`` under ``prefix`` (``settings``: the rest of
    :class:`FlowSettings`), stopped when the test ends."""
    flow = flow_for(FlowSettings(broker=broker.url, prefix=prefix, **settings))
    red = NodeRed(script, flow, port=free_port())
    stack.append(red.stop)
    red.start()
    return red


def fleet_status(red: NodeRed, node: str) -> str | None:
    table: dict[str, dict[str, Any]] = red.get("/fleet") or {}
    entry = table.get(node)
    return None if entry is None else str(entry["status"])


def wait_fleet(red: NodeRed, node: str, status: str, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (seen := fleet_status(red, node)) != status:
        if time.monotonic() > deadline:
            pytest.fail(f"the flow's fleet view shows {node} as {seen}, not {status}:\n{red.tail()}")
        time.sleep(0.1)
    table: dict[str, dict[str, Any]] = red.get("/fleet")
    return table[node]


def wait_for_session(red: NodeRed, node: str, session: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while ((red.get("/fleet") or {}).get(node) or {}).get("session") != session:
        assert time.monotonic() < deadline, f"{node} never showed session {session}"
        time.sleep(0.1)


@pytest.fixture
def mosquitto(mosquitto_broker: MosquittoBroker) -> BrokerEndpoint:
    return endpoint(mosquitto_broker, "3.1.1")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_flow_offloads_square_through_a_pool_or_a_server_id_and_correlates_by_task_id(
        node_red_script: Path, mosquitto: BrokerEndpoint, stack: Stack, topic_prefix: str) -> None:
    start_cloud(mosquitto, stack, topic_prefix, "srv-a", pools=["nr"])  # a CBOR server: answers JSON in JSON
    watch = connected(mosquitto, stack, "watch")
    tasks = MessageLog(watch, f"{topic_prefix}/+/+/task")
    results = MessageLog(watch, f"{topic_prefix}/node/nodered/result")
    red = start_node_red(node_red_script, mosquitto, stack, topic_prefix, target="pool/nr")
    wait_fleet(red, "srv-a", "online")  # its subscriptions are live once the retained state came in

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda x: red.get("/offload", x=x), range(8)))
    by_server_id = red.get("/offload", x=12, target="node/srv-a")

    for x, outcome in enumerate(outcomes):
        assert outcome["status"] == "ok", outcome
        assert outcome["output"] == {"y": x * x}, outcome  # each answer went back to its own request
        assert outcome["server"] == "srv-a" and outcome["target"] == f"{topic_prefix}/pool/nr/task"
    assert len({outcome["task_id"] for outcome in outcomes}) == 8
    assert by_server_id["status"] == "ok" and by_server_id["output"] == {"y": 144}
    assert by_server_id["target"] == f"{topic_prefix}/node/srv-a/task"

    codec = Codec()
    sent = [(m, codec.decode(m.payload, Task, topic=m.topic)) for m in tasks.messages]
    assert len(sent) == 9
    for message, task in sent:
        assert message.qos == 1 and message.payload.startswith(b"{")  # QoS 1, JSON
        assert task.task == "square" and task.sender == "nodered" and task.attempt == 1
        assert task.reply_to == f"{topic_prefix}/node/nodered/result" and task.ttl == 5.0
    ids = {task.id: task.payload for _, task in sent}
    assert {outcome["task_id"]: {"x": x} for x, outcome in enumerate(outcomes)}.items() <= ids.items()
    answered = [codec.decode(m.payload, Result, topic=m.topic) for m in results.messages]
    assert {r.task_id for r in answered} == set(ids) and len(ids) == 9
    assert {r.content_type for r in answered} == {CONTENT_JSON}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_flow_gives_up_after_the_ttl_when_no_server_runs_and_reports_the_servers_expired(
        node_red_script: Path, mosquitto: BrokerEndpoint, stack: Stack, topic_prefix: str) -> None:
    start_cloud(mosquitto, stack, topic_prefix, "srv-slow", pools=["slow"])
    red = start_node_red(node_red_script, mosquitto, stack, topic_prefix, target="pool/nobody",
                         ttl=0.5, grace=0.5)
    wait_fleet(red, "srv-slow", "online")  # connected and subscribed: nobody answers, not a race
    start = time.monotonic()
    outcome = red.get("/offload", x=3)
    waited = time.monotonic() - start
    assert outcome["status"] == "timeout", outcome
    assert outcome["error"].startswith("no result within 1 s (ttl 0.5 s)")
    assert 0.9 <= waited < 10.0

    # A server that takes the task but cannot finish it in time answers `expired` itself, at the ttl.
    outcome = red.get("/offload", x=3, cost=2, ttl=0.3, target="pool/slow")
    assert outcome["status"] == "expired" and outcome["server"] == "srv-slow", outcome
    assert outcome["error"].startswith("deadline passed")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fleet_view_lists_servers_from_retained_state_then_heartbeats_and_their_death(
        node_red_script: Path, mosquitto: BrokerEndpoint, stack: Stack, topic_prefix: str) -> None:
    # Its first heartbeat goes out before Node-RED starts, the next one a minute later: all the flow
    # can know of it at first is its retained state, which names its tasks.
    early = start_cloud(mosquitto, stack, topic_prefix, "srv-early", pools=["nr"], heartbeat_interval=60.0)
    red = start_node_red(node_red_script, mosquitto, stack, topic_prefix)
    entry = wait_fleet(red, "srv-early", "online (no heartbeat yet)")
    assert entry["role"] == "server" and entry["state"] == "online" and entry["session"] > 0
    assert "square" in entry["tasks"] and entry["pools"] == [] and "seen" not in entry

    # Heartbeats fill in its pools and load.
    start_cloud(mosquitto, stack, topic_prefix, "srv-b", pools=["nr", "gpu"])
    entry = wait_fleet(red, "srv-b", "online")
    assert entry["role"] == "server" and "square" in entry["tasks"] and entry["pools"] == ["nr", "gpu"]
    assert entry["workers"] == 2 and entry["queue_length"] == 0 and entry["in_flight"] == 0
    assert entry["interval"] == pytest.approx(0.2, rel=0.2)
    table: dict[str, dict[str, Any]] = red.get("/fleet")
    assert sorted(table) == ["srv-b", "srv-early"]

    early.stop(grace=0.0)  # a clean stop publishes the retained offline state
    gone = wait_fleet(red, "srv-early", "offline")
    assert gone["state"] == "offline"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fleet_view_applies_the_session_rules_and_marks_silent_servers_stale(
        node_red_script: Path, mosquitto: BrokerEndpoint, stack: Stack, topic_prefix: str) -> None:
    tree, json_codec = TopicTree(topic_prefix), Codec("json")
    wire = connected(mosquitto, stack, "fake-server")

    def state(status: Literal["online", "offline"], session: int) -> None:
        record = NodeState(node="hb", role=Role.SERVER, status=status, session=session, time=time.time())
        wire.publish(tree.state("hb"), json_codec.encode(record), qos=1, retain=True)

    def heartbeat(session: int, seq: int) -> None:
        beat = Heartbeat(node="hb", role=Role.SERVER, session=session, seq=seq, interval=0.2,
                         time=time.time())
        wire.publish(tree.heartbeat("hb"), json_codec.encode(beat), qos=0)

    red = start_node_red(node_red_script, mosquitto, stack, topic_prefix)
    state("online", 2)
    wait_fleet(red, "hb", "online (no heartbeat yet)")
    heartbeat(2, 0)
    wait_fleet(red, "hb", "online")
    stale = wait_fleet(red, "hb", "stale")  # no heartbeat for 3 intervals: hung, though connected
    assert stale["state"] == "online" and stale["seq"] == 0

    state("offline", 1)  # a late Will of an earlier run: ignored
    heartbeat(2, 0)      # a heartbeat already seen: ignored
    heartbeat(2, 1)
    entry = wait_fleet(red, "hb", "online")
    assert entry["state"] == "online" and entry["seq"] == 1 and entry["session"] == 2

    heartbeat(3, 0)  # a restart
    wait_for_session(red, "hb", 3)
    state("offline", 3)
    wait_fleet(red, "hb", "offline")

    wire.publish(tree.state("hb"), b"", qos=1, retain=True)  # the operator forgets the node
    deadline = time.monotonic() + 20
    while "hb" in (red.get("/fleet") or {}):
        assert time.monotonic() < deadline, "the forgotten node stayed in the fleet view"
        time.sleep(0.1)
