"""The fleet dashboard in a real headless Chromium against a real Mosquitto (MQTT over WebSockets),
and once against amqtt's WebSockets listener.

Three cloud agents heartbeat every 0.2 s; the page (served by ``edge-agent dashboard``'s server, and
once from its installed file as ``--print`` gives it) must list them online, mark a crashed one
offline and a silent one stale within three heartbeats, counted in heartbeats of the survivors (their
``seq``, heard by an observer of our own), and show garbage as an unreadable node while it goes on.
Every wait polls the DOM with a bound; none is a fixed sleep.

``OFFLOAD_DASHBOARD_SCREENSHOT=docs/img/dashboard.png`` also writes the screenshot there, after a
minute of load (how the picture in docs/edge-agent.md is made).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from brokers_support import (
    BrokerEndpoint,
    Stack,
    connected,
    endpoint,
    make_test_certificates,
    require,
    require_mosquitto,
    start_cloud,
    start_edge,
    start_servers,
    wait_for,
)
from cdp_support import CHROMIUM_MISSING, Browser, chromium_binary

from agent_common.registry import TaskRegistry
from edge_agent.agent import EdgeAgent
from edge_agent.dashboard import DashboardServer, page_path, page_query
from topics.brokers import EmbeddedBroker, MosquittoBroker
from topics.codec import Codec
from topics.errors import DecodeError
from topics.models import Heartbeat
from topics.mqtt import MqttTransport
from topics.names import DEFAULT_PREFIX, Kind, TopicTree
from topics.transport import Message, TlsConfig, TransportConfig

ACL = Path(__file__).resolve().parent.parent / "examples" / "mosquitto" / "acl"

HEARTBEAT = 0.2
SERVERS = ("srv1", "srv2", "srv3")
SCREENSHOT_ENV = "OFFLOAD_DASHBOARD_SCREENSHOT"

ROWS = """JSON.stringify(Object.fromEntries([...document.querySelectorAll('#nodes tbody tr')].map(row =>
  [row.dataset.node, Object.fromEntries([...row.cells].map(cell => [cell.dataset.column, cell.textContent]))
    ])))"""


@pytest.fixture(scope="module")
def ws_broker() -> Iterator[MosquittoBroker]:
    """A Mosquitto with a WebSockets listener, for this module."""
    require_mosquitto()
    broker = MosquittoBroker(websockets_port=0).start()
    yield broker
    broker.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    binary = chromium_binary()
    require(binary is not None, CHROMIUM_MISSING)
    assert binary is not None
    with Browser(binary) as running:
        yield running


@pytest.fixture(scope="module")
def page_server() -> Iterator[DashboardServer]:
    with DashboardServer() as server:
        yield server


@pytest.fixture
def mqtt(ws_broker: MosquittoBroker) -> BrokerEndpoint:
    return endpoint(ws_broker, "3.1.1")


class HeartbeatClock:
    """The last ``seq`` heard from each node, by a subscriber of our own: time in heartbeats."""

    def __init__(self, transport: MqttTransport, tree: TopicTree) -> None:
        self._codec = Codec("json")
        self._seq: dict[str, int] = {}
        self._lock = threading.Lock()
        transport.subscribe(tree.all_of(Kind.HEARTBEAT), self._on_heartbeat, qos=0)

    def _on_heartbeat(self, message: Message) -> None:
        try:
            beat = self._codec.decode(message.payload, Heartbeat, topic=message.topic)
        except DecodeError:
            return
        with self._lock:
            self._seq[beat.node] = beat.seq

    def seq(self, *nodes: str) -> int:
        """The sum of the last seq of ``nodes``."""
        with self._lock:
            return sum(self._seq.get(node, 0) for node in nodes)


def start_fleet(target: BrokerEndpoint, stack: Stack, prefix: str) -> dict[str, MqttTransport]:
    """Three servers (srv2 configured for CBOR: its heartbeats are JSON all the same); their links."""
    return start_servers(target, stack, prefix, SERVERS, heartbeat_interval=HEARTBEAT,
                         formats={node: "json" for node in SERVERS if node != "srv2"})


def open_page(browser: Browser, url: str) -> None:
    browser.navigate("about:blank")  # the previous test's page (and its reconnects to a gone broker) ends
    browser.errors.clear()
    browser.navigate(url)
    browser.wait_for("document.getElementById('link').dataset.state === 'connected'",
                     message="the page's broker connection")


def rows(browser: Browser) -> dict[str, dict[str, str]]:
    shown: dict[str, dict[str, str]] = json.loads(browser.evaluate(ROWS))
    return shown


def status_is(node: str, status: str) -> str:
    return f"document.querySelector('#nodes tr[data-node=\"{node}\"]')?.dataset.status === '{status}'"


def all_online_with_rtt() -> str:
    return ("[" + ",".join(f"'{node}'" for node in SERVERS) + "].every(node => {"
            " const row = document.querySelector(`#nodes tr[data-node=\"${node}\"]`);"
            " return row && row.dataset.status === 'online'"
            " && row.querySelector('[data-column=rtt]').textContent !== '-'; })")


@pytest.mark.mosquitto
def test_the_page_lists_a_running_fleet_and_a_crashed_server_turns_offline_within_three_heartbeats(
        mqtt: BrokerEndpoint, ws_broker: MosquittoBroker, browser: Browser, page_server: DashboardServer,
        stack: Stack, topic_prefix: str, tmp_path: Path) -> None:
    tree = TopicTree(topic_prefix)
    clock = HeartbeatClock(connected(mqtt, stack, "clock"), tree)
    links = start_fleet(mqtt, stack, topic_prefix)
    assert ws_broker.ws_url is not None
    screenshot_to = os.environ.get(SCREENSHOT_ENV)
    history = "&history=60" if screenshot_to else ""
    open_page(browser, page_server.url(page_query(ws_broker.ws_url, topic_prefix)) + history)
    browser.wait_for(all_online_with_rtt(), message="three servers online with a round trip")
    shown = rows(browser)
    for node in SERVERS:
        row = shown[node]
        assert row["role"] == "server" and row["workers"] == "2" and row["queue"] == "0/64", row
        assert float(row["rtt"]) > 0 and row["session"].isdigit(), row
    assert browser.evaluate("document.querySelectorAll('#charts .chart').length") == 3

    device = start_edge(mqtt, stack, topic_prefix, registry=TaskRegistry(), id="cam-1")
    wait_for(lambda: sum("square" in view.tasks for view in device.servers()) == 3,
             message="the device knows the three servers")
    browser.wait_for("document.querySelector('#nodes tr[data-node=\"cam-1\"]')?.dataset.status === 'online'",
                     message="the device listed")
    load_for(device, 60.0 if screenshot_to else 1.5)
    vandal = connected(mqtt, stack, "vandal")
    vandal.publish(tree.task_inbox("srv1"), b"not a task", qos=1)  # srv1 dead-letters it
    browser.wait_for("document.querySelector('#dead-letters tr[data-node=\"srv1\"]')?.dataset.reason"
                     " === 'malformed'", message="srv1's dead letter in the list")
    browser.wait_for("document.querySelector('#nodes tr[data-node=\"srv1\"] [data-column=service]')"
                     ".textContent.startsWith('square=')", message="srv1's service time")
    picture = browser.screenshot(tmp_path / "dashboard.png")
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if screenshot_to:
        shutil.copyfile(picture, screenshot_to)

    survivors = ("srv1", "srv2")
    before = clock.seq(*survivors)
    started = time.monotonic()
    links["srv3"].abort()  # a crash: the broker publishes srv3's Will
    browser.wait_for(status_is("srv3", "offline"), message="srv3 offline on the page")
    passed = (clock.seq(*survivors) - before) / len(survivors)
    print(f"srv3 offline on the page after {passed:.1f} heartbeats of the survivors "
          f"({time.monotonic() - started:.3f} s)")
    assert passed <= 3, passed
    after = rows(browser)
    assert after["srv1"]["status"] == "online" and after["srv2"]["status"] == "online"
    assert browser.errors == []


def load_for(device: EdgeAgent, seconds: float) -> None:
    """Tasks of 20-150 ms from the device at ~30 per second, waited for: queues and service times."""
    rng = random.Random(7)
    handles = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        handles.append(device.submit("square", {"x": rng.randrange(1000), "cost": rng.uniform(0.02, 0.15)},
                                     deadline=5.0))
        time.sleep(rng.expovariate(30.0))  # the load's pace, not a wait for a condition
    for handle in handles:
        handle.result(timeout=10.0)


@pytest.mark.mosquitto
def test_a_server_that_goes_silent_without_a_will_turns_stale_within_three_heartbeats(
        mqtt: BrokerEndpoint, ws_broker: MosquittoBroker, browser: Browser, page_server: DashboardServer,
        stack: Stack, topic_prefix: str) -> None:
    clock = HeartbeatClock(connected(mqtt, stack, "clock"), TopicTree(topic_prefix))
    links = start_fleet(mqtt, stack, topic_prefix)
    assert ws_broker.ws_url is not None
    open_page(browser, page_server.url(page_query(ws_broker.ws_url, topic_prefix)))
    browser.wait_for(all_online_with_rtt(), message="three servers online")
    survivors = ("srv2", "srv3")
    before = clock.seq(*survivors)
    links["srv1"].close()  # a clean disconnect: no Will, its heartbeats just stop
    browser.wait_for(status_is("srv1", "stale"), message="srv1 stale on the page")
    passed = (clock.seq(*survivors) - before) / len(survivors)
    assert passed <= 3 + 1, passed  # three intervals of silence, one heartbeat of rounding
    assert browser.errors == []


@pytest.mark.mosquitto
def test_garbage_shows_the_node_unreadable_and_the_page_goes_on(
        mqtt: BrokerEndpoint, ws_broker: MosquittoBroker, browser: Browser, page_server: DashboardServer,
        stack: Stack, topic_prefix: str) -> None:
    tree = TopicTree(topic_prefix)
    start_fleet(mqtt, stack, topic_prefix)
    assert ws_broker.ws_url is not None
    open_page(browser, page_server.url(page_query(ws_broker.ws_url, topic_prefix)))
    browser.wait_for(all_online_with_rtt(), message="three servers online")
    vandal = connected(mqtt, stack, "vandal")
    garbage = {
        "ghost": b"\xff\xfe not even UTF-8",
        "cbor": b"\xa1\x01\x02",  # a CBOR map: these channels are JSON
        "schema": json.dumps({"v": 1, "node": "schema", "role": "server", "session": 1, "seq": -1,
                              "interval": 0.2, "time": 1.0}).encode(),
        "extra": json.dumps({"v": 1, "node": "extra", "role": "server", "session": 1, "seq": 1,
                             "interval": 0.2, "time": 1.0, "evil": True}).encode(),
        "<img src=x onerror=window.pwned=1>": b"{\"node\": 1",
    }
    for node, payload in garbage.items():
        vandal.publish(f"{tree.prefix}/node/{node}/heartbeat", payload, qos=1)
    vandal.publish(tree.state("limbo"), b"[1, 2]", qos=1)
    vandal.publish(tree.dead_letter("srv2"), b"{}", qos=1)  # a dead letter without its fields
    browser.wait_for(" && ".join(status_is(node, "unreadable") for node in [*garbage, "limbo"]),
                     message="every vandalised node unreadable")
    shown = rows(browser)
    assert shown["ghost"]["status"] == "unreadable (heartbeat: malformed)"
    assert shown["cbor"]["status"] == "unreadable (heartbeat: malformed)"
    assert shown["schema"]["status"] == "unreadable (heartbeat: schema)"
    assert shown["extra"]["status"] == "unreadable (heartbeat: schema)"
    assert shown["limbo"]["status"] == "unreadable (state: malformed)"
    assert "<img src=x onerror=window.pwned=1>" in shown  # shown as text, never as HTML
    assert browser.evaluate("window.pwned === undefined && !document.querySelector('#nodes img')")
    # srv2's own next heartbeat makes it readable again; the others never stopped
    browser.wait_for(all_online_with_rtt(), message="the servers still online and updating")
    seq = int(rows(browser)["srv1"]["seq"])
    srv1 = "document.querySelector('#nodes tr[data-node=\"srv1\"]')"
    browser.wait_for(f"Number({srv1}.dataset.seq) > {seq + 2}", message="srv1's heartbeats still shown")
    assert browser.errors == []


@pytest.mark.mosquitto
def test_a_flood_of_node_names_is_capped_and_the_page_goes_on(
        mqtt: BrokerEndpoint, ws_broker: MosquittoBroker, browser: Browser, page_server: DashboardServer,
        stack: Stack, topic_prefix: str) -> None:
    tree = TopicTree(topic_prefix)
    start_fleet(mqtt, stack, topic_prefix)
    assert ws_broker.ws_url is not None
    open_page(browser, page_server.url(page_query(ws_broker.ws_url, topic_prefix)) + "&max_nodes=5")
    browser.wait_for(all_online_with_rtt(), message="three servers online")
    vandal = connected(mqtt, stack, "vandal")
    for index in range(200):
        vandal.publish(tree.heartbeat(f"fake-{index:03d}"), b"{}", qos=1)
    browser.wait_for("document.getElementById('unlisted').textContent.includes('198 messages')",
                     message="the flood counted")
    shown = rows(browser)
    assert set(shown) == {*SERVERS, "fake-000", "fake-001"}, sorted(shown)
    browser.wait_for(all_online_with_rtt(), message="the servers still online")
    assert browser.errors == []


@pytest.mark.mosquitto
def test_the_printed_file_url_opens_the_same_page(
        mqtt: BrokerEndpoint, ws_broker: MosquittoBroker, browser: Browser, stack: Stack,
        topic_prefix: str) -> None:
    start_cloud(mqtt, stack, topic_prefix, "srv1", heartbeat_interval=HEARTBEAT)
    assert ws_broker.ws_url is not None
    open_page(browser, f"{page_path().as_uri()}?{page_query(ws_broker.ws_url, topic_prefix)}")
    browser.wait_for(status_is("srv1", "online"), message="srv1 online (page from its file)")
    assert browser.errors == []  # the CSP lets the vendored script and its worker run from file:// too


def test_the_page_reads_the_fleet_through_amqtts_websockets_listener_too(
        browser: Browser, page_server: DashboardServer, stack: Stack, topic_prefix: str) -> None:
    broker = EmbeddedBroker(websockets_port=0).start()
    stack.append(broker.close)
    assert broker.ws_url is not None
    start_cloud(endpoint(broker), stack, topic_prefix, "srv1", heartbeat_interval=HEARTBEAT)
    open_page(browser, page_server.url(page_query(broker.ws_url, topic_prefix)))
    browser.wait_for(status_is("srv1", "online") + " && document.querySelector("
                     "'#nodes tr[data-node=\"srv1\"] [data-column=rtt]').textContent !== '-'",
                     message="srv1 online with a round trip, over amqtt")
    assert browser.errors == []


def spki_hash(certificate: Path) -> str:
    """Base64 SHA-256 of a certificate's public key: what Chromium trusts by
    ``--ignore-certificate-errors-spki-list`` (this one certificate, not every one)."""
    openssl = shutil.which("openssl")
    require(openssl is not None, "openssl not installed: needed for the test certificates")
    assert openssl is not None
    key = subprocess.run([openssl, "x509", "-in", str(certificate), "-pubkey", "-noout"], check=True,
                         capture_output=True, timeout=30).stdout
    der = subprocess.run([openssl, "pkey", "-pubin", "-outform", "der"], input=key, check=True,
                         capture_output=True, timeout=30).stdout
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


@pytest.mark.mosquitto
def test_the_page_logs_in_over_wss_under_the_shipped_acl(
        page_server: DashboardServer, stack: Stack, tmp_path: Path) -> None:
    """The secured broker of docs/security.md (TLS, passwords, examples/mosquitto/acl) with a wss
    listener: the page logs in as ``operator``, lists srv1 with a round trip (pings and its own pong
    topic allowed) and srv1's dead letters (operators read them); a wrong password is refused."""
    require_mosquitto()
    binary = chromium_binary()
    require(binary is not None, CHROMIUM_MISSING)
    assert binary is not None
    tmp_path.chmod(0o755)
    certificates = make_test_certificates(tmp_path)
    passwords = {user: secrets.token_urlsafe(12) for user in ("srv1", "cam1", "operator")}
    broker = MosquittoBroker(users=passwords, tls_files=(certificates.cert_file, certificates.key_file),
                             acl_file=ACL, username_as_client_id=True, websockets_port=0,
                             workdir=tmp_path / "mosquitto").start()
    stack.append(broker.close)
    assert broker.ws_url is not None and broker.ws_url.startswith("wss://")

    def secure(user: str) -> TransportConfig:
        return TransportConfig.from_url(broker.url, client_id=user, username=user, password=passwords[user],
                                        tls=TlsConfig(ca_file=str(certificates.ca_file)),
                                        reconnect_max_delay=0.5)

    start_cloud(endpoint(broker), stack, DEFAULT_PREFIX, "srv1", heartbeat_interval=HEARTBEAT,
                transport=MqttTransport(secure("srv1"), name="srv1"))
    url = page_server.url(page_query(broker.ws_url, DEFAULT_PREFIX, username="operator"))
    log_in = ("(() => { const box = document.getElementById('password'); box.value = {password};"
              " document.querySelector('#login button').click(); return true; })()")
    flags = [f"--ignore-certificate-errors-spki-list={spki_hash(certificates.cert_file)}"]
    with Browser(binary, flags=flags) as browser:
        browser.navigate(url)
        assert browser.evaluate("document.getElementById('link').dataset.state") == "login"
        assert browser.evaluate(log_in.replace("{password}", json.dumps("wrong")))
        browser.wait_for("document.getElementById('error').textContent === 'the broker refused the login'"
                         " && !document.getElementById('login').hidden", message="the wrong password refused")
        browser.errors.clear()
        assert browser.evaluate(log_in.replace("{password}", json.dumps(passwords["operator"])))
        browser.wait_for("document.getElementById('link').dataset.state === 'connected'",
                         message="logged in as operator")
        browser.wait_for(status_is("srv1", "online") + " && document.querySelector("
                         "'#nodes tr[data-node=\"srv1\"] [data-column=rtt]').textContent !== '-'",
                         message="srv1 online with a round trip under the ACL")
        assert browser.evaluate("document.getElementById('self').textContent") == "operator"
        assert browser.evaluate("location.search").find("password") < 0
        device = MqttTransport(secure("cam1"), name="cam1")  # any user may write to a task inbox
        device.connect()
        stack.append(lambda: device.close(timeout=2.0))
        device.publish(f"{DEFAULT_PREFIX}/node/srv1/task", b"not a task", qos=1)
        browser.wait_for("document.querySelector('#dead-letters tr[data-node=\"srv1\"]')?.dataset.reason"
                         " === 'malformed'", message="srv1's dead letter, read as operator")
        assert browser.errors == []


def heartbeat_cases() -> dict[str, bytes]:
    """Heartbeats of one node each (the node id is the case's name), valid and not."""
    def beat(name: str, **changes: object) -> bytes:
        fields: dict[str, object] = {"v": 1, "node": name, "role": "server", "session": 1, "seq": 1,
                                     "interval": 3600.0, "time": 1.0}
        fields.update(changes)
        return json.dumps({key: value for key, value in fields.items() if value != "<missing>"}).encode()

    full: dict[str, object] = {
        "capabilities": {"square": {"executor": "thread"}, "cpu_burn": {"executor": "process", "stages": 3}},
        "pools": ["gpu"], "load": {"queue_length": 2, "queue_capacity": 64, "in_flight": 1, "workers": 2,
                                   "service_time": {"square": 0.01}, "cpu": 0.5}}
    changes: dict[str, dict[str, object]] = {
        "valid": {}, "valid-full": full, "seq-integral-float": {"seq": 1.0}, "time-int": {"time": 1},
        "stages-null": {"capabilities": {"t": {"stages": None}}},
        "seq-negative": {"seq": -1}, "seq-fraction": {"seq": 1.5}, "seq-huge": {"seq": 2**60},
        "interval-zero": {"interval": 0}, "interval-long": {"interval": 3601},
        "role-unknown": {"role": "gateway"},
        "unknown-field": {"evil": 1}, "missing-seq": {"seq": "<missing>"}, "node-null": {"node": None},
        "v-2": {"v": 2}, "v-true": {"v": True}, "time-negative": {"time": -1},
        "cpu-high": {"load": {"cpu": 1.5}}, "load-unknown": {"load": {"gpu": 1}}, "load-null": {"load": None},
        "service-negative": {"load": {"service_time": {"square": -0.1}}},
        "service-bad-name": {"load": {"service_time": {"a b": 0.1}}},
        "executor-bad": {"capabilities": {"square": {"executor": "gpu"}}},
        "pool-bad": {"pools": ["a/b"]}, "pools-too-many": {"pools": [f"p{i}" for i in range(257)]},
        "pools-string": {"pools": "gpu"},
        # Stricter than the agents: pydantic's lax mode turns these into numbers, the page refuses
        # them (the protocol's integers and numbers are JSON numbers).
        "strict-seq-string": {"seq": "5"}, "strict-seq-bool": {"seq": True},
        "strict-interval-string": {"interval": "0.2"},
    }
    cases = {name: beat(name, **change) for name, change in changes.items()}
    cases.update({"not-json": b"hello", "truncated": b'{"v": 1', "array": b"[1]", "empty": b"",
                  "bad-utf8": b'{"node": "\xff"}',
                  "nan": beat("nan").replace(b'"time": 1.0', b'"time": NaN')})
    return cases


@pytest.mark.mosquitto
def test_the_page_reads_heartbeats_as_the_agents_decoder_does(
        mqtt: BrokerEndpoint, ws_broker: MosquittoBroker, browser: Browser, page_server: DashboardServer,
        stack: Stack, topic_prefix: str) -> None:
    """Each case is decoded by topics.codec (what every agent runs) and shown by the page: a heartbeat
    the codec reads is online on the page, one it refuses is unreadable with the codec's reason."""
    tree = TopicTree(topic_prefix)
    assert ws_broker.ws_url is not None
    open_page(browser, page_server.url(page_query(ws_broker.ws_url, topic_prefix)))
    cases = heartbeat_cases()
    codec = Codec("json")
    expected: dict[str, str] = {}
    for name, payload in cases.items():
        try:
            codec.decode(payload, Heartbeat, topic=tree.heartbeat(name))
            expected[name] = "unreadable (heartbeat: schema)" if name.startswith("strict-") else "online"
        except DecodeError as exc:
            assert not name.startswith("strict-"), name
            expected[name] = f"unreadable (heartbeat: {exc.reason})"
    assert set(expected.values()) > {"online", "unreadable (heartbeat: schema)"}
    vandal = connected(mqtt, stack, "vandal")
    for name, payload in cases.items():
        vandal.publish(tree.heartbeat(name), payload, qos=1)
    vandal.publish(tree.heartbeat("impostor"), cases["valid"], qos=1)  # names "valid" on another topic
    browser.wait_for(f"document.querySelectorAll('#nodes tbody tr').length >= {len(cases)}",
                     message="every case listed")
    shown = {node: row["status"] for node, row in rows(browser).items()}
    assert shown == expected  # and "impostor" is not listed: ignored, as the agents ignore it
    assert browser.errors == []
