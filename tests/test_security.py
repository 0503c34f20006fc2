"""The shipped Mosquitto ACL (examples/mosquitto/acl) on a real Mosquitto with TLS and passwords.

One broker for the module, started with the ACL file from the repository itself, a throw-away CA
and passwords set with ``mosquitto_passwd``; one server ``srv1``, one device ``cam1`` (the victim)
and a second device's credentials ``cam2`` (the attacker). Whether something was refused is never
judged by waiting: each probe is followed by a control message the observer may receive, published
later on the same connection, and the test waits for that control.
"""

from __future__ import annotations

import datetime
import ipaddress
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from brokers_support import make_test_certificates, require_mosquitto, wait_for
from pydantic import SecretStr

from agent_common.registry import TaskRegistry, load_tasks
from cloud_agent.config import CloudConfig
from cloud_agent.server import CloudAgent
from edge_agent.agent import EdgeAgent
from edge_agent.config import EdgeConfig
from edge_agent.records import TaskRecord
from topics.brokers import MosquittoBroker
from topics.codec import Codec
from topics.models import MAX_COUNT, Heartbeat, Load, NodeState, Pong, Result, Role, Status, TaskCapability
from topics.mqtt import MqttTransport
from topics.names import TopicTree
from topics.transport import ConnectError, Message, TlsConfig, TransportConfig

REPO = Path(__file__).resolve().parent.parent
ACL = REPO / "examples" / "mosquitto" / "acl"
SNIPPET = REPO / "examples" / "mosquitto" / "offload.conf"
TREE = TopicTree()  # the ACL is written for the default prefix offload/v1
CODEC = Codec("cbor")
USERS = ("srv1", "cam1", "cam2", "operator")

pytestmark = pytest.mark.mosquitto


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """(CA, server certificate for 127.0.0.1, its key): with ``cryptography``, else openssl."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        made = make_test_certificates(directory)
        return made.ca_file, made.cert_file, made.key_file
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mqtt-offload test CA")])
    usage = x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False)
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(usage, critical=True)
          .sign(ca_key, hashes.SHA256()))
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
              .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(minutes=5))
              .not_valid_after(now + datetime.timedelta(days=1))
              .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                             critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .sign(ca_key, hashes.SHA256()))
    ca_file, cert_file, key_file = directory / "ca.crt", directory / "server.crt", directory / "server.key"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    for path in (ca_file, cert_file, key_file):
        path.chmod(0o644)  # Debian's mosquitto may run as user mosquitto: it must read them
    return ca_file, cert_file, key_file


@dataclass
class Fleet:
    broker: MosquittoBroker
    ca_file: Path
    stranger_ca: Path
    """A CA that did not sign the broker's certificate."""
    passwords: dict[str, str]
    server: CloudAgent
    server_transport: MqttTransport
    edge: EdgeAgent
    closers: list[Callable[[], None]]

    def config(self, user: str | None, *, client_id: str = "", password: str | None = None,
               ca_file: Path | bool = True) -> TransportConfig:
        """A TLS client config logging in as ``user`` (its own password unless given)."""
        values: dict[str, Any] = {"client_id": client_id or user or "", "reconnect_max_delay": 0.5,
                                  "connect_timeout": 5.0}
        if user is not None:
            values["username"] = user
            values["password"] = password if password is not None else self.passwords[user]
        if ca_file is not False:
            values["tls"] = TlsConfig(ca_file=str(self.ca_file if ca_file is True else ca_file))
        return TransportConfig.from_url(self.broker.url, **values)

    def client(self, user: str, **kwargs: Any) -> MqttTransport:
        transport = MqttTransport(self.config(user, **kwargs), name=f"test-{user}")
        self.closers.append(transport.close)
        return transport


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    require_mosquitto()
    directory = tmp_path_factory.mktemp("secure-broker")
    directory.chmod(0o755)
    ca_file, cert_file, key_file = make_certificates(directory)
    stranger_ca = make_certificates(tmp_path_factory.mktemp("stranger-ca"))[0]
    passwords = {user: secrets.token_urlsafe(12) for user in USERS}
    broker = MosquittoBroker(users=passwords, tls_files=(cert_file, key_file), acl_file=ACL,
                             username_as_client_id=True, workdir=directory / "mosquitto").start()
    closers: list[Callable[[], None]] = []
    try:
        server_config = CloudConfig.model_validate({
            "id": "srv1", "broker": broker.url, "username": "srv1", "password": passwords["srv1"],
            "tls_ca_file": str(ca_file), "heartbeat_interval": 0.5, "workers": 2, "grace_period": 0.0})
        server_transport = MqttTransport(server_config.transport_config(), name="srv1")
        server = CloudAgent(server_config, server_transport, load_tasks("agent_common.demo_tasks"))
        server.start()
        closers.append(lambda: server.stop(grace=0.0))
        edge_config = EdgeConfig(id="cam1", broker=broker.url, username="cam1",
                                 password=SecretStr(passwords["cam1"]), tls=TlsConfig(ca_file=str(ca_file)),
                                 policy="remote", probe_interval=0.2, heartbeat_interval=1.0,
                                 default_timeout=10.0)
        edge = EdgeAgent(edge_config, MqttTransport(edge_config.transport_config(), name="cam1"),
                         TaskRegistry())
        edge.start()
        closers.append(edge.stop)
        wait_for(lambda: any(v.node == "srv1" and not v.stale for v in edge.servers()), timeout=10.0,
                 message="cam1 hears srv1 under the ACL")
        yield Fleet(broker, ca_file, stranger_ca, passwords, server, server_transport, edge, closers)
    finally:
        for close in reversed(closers):
            close()
        broker.close()


def collect(transport: MqttTransport, topic_filter: str) -> list[Message]:
    seen: list[Message] = []
    transport.subscribe(topic_filter, seen.append, qos=1)
    return seen


def bad_heartbeats(edge: EdgeAgent) -> int:
    counts = edge.stats()["bad_input"]
    return sum(count for reason, count in counts.items() if reason.startswith("heartbeat-"))


def control_via_own_heartbeat(attacker: MqttTransport, edge: EdgeAgent) -> None:
    """Publish a malformed heartbeat on the attacker's own heartbeat topic (the ACL allows it) and
    wait until the victim counted it: everything the attacker published before was handled too."""
    before = bad_heartbeats(edge)
    attacker.publish(TREE.heartbeat(attacker.client_id), b"control", qos=1)
    wait_for(lambda: bad_heartbeats(edge) > before, message="the control heartbeat at the victim")


def srv1_view(edge: EdgeAgent) -> Any:
    return next(v for v in edge.servers() if v.node == "srv1")


# ---------------------------------------------------------------------------------------- tests


def test_shipped_snippet_sets_what_the_tested_broker_runs_with(fleet: Fleet) -> None:
    def directives(path: Path) -> dict[str, str]:
        lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
        return dict(line.split(None, 1) for line in lines if line)

    shipped, tested = directives(SNIPPET), directives(fleet.broker.config_file)
    for key in ("allow_anonymous", "use_username_as_clientid", "set_tcp_nodelay"):
        assert shipped[key] == tested[key], key
    for key in ("password_file", "acl_file", "certfile", "keyfile"):
        assert key in shipped and key in tested, key
    assert Path(tested["acl_file"]) == ACL  # the shipped file itself, not a copy


def test_offloading_works_under_the_acl_with_tls(fleet: Fleet) -> None:
    records: list[TaskRecord] = []
    fleet.edge.add_record_listener(records.append)
    try:
        assert fleet.edge.submit("square", {"x": 7}).result(10) == {"y": 49}
        wait_for(lambda: len(records) == 1)
    finally:
        fleet.edge.remove_record_listener(records.append)
    assert records[0].target == "srv1"
    wait_for(lambda: srv1_view(fleet.edge).rtt is not None, message="a pong from srv1 (pongs allowed)")


def test_connections_need_tls_a_trusted_certificate_and_a_password(fleet: Fleet) -> None:
    for config in (fleet.config("cam2", ca_file=False),                      # plain MQTT on a TLS port
                   fleet.config("cam2", ca_file=fleet.stranger_ca),           # a CA that did not sign it
                   fleet.config("srv1", password=fleet.passwords["cam2"]),   # someone else's password
                   fleet.config(None, client_id="anonymous")):              # no user at all
        transport = MqttTransport(config, name="refused")
        with pytest.raises(ConnectError):
            transport.connect(timeout=5.0)
        transport.close()


def test_a_device_cannot_read_another_devices_results_or_the_servers_tasks(fleet: Fleet) -> None:
    spy = fleet.client("cam2")
    spy.connect()
    stolen = collect(spy, TREE.result_inbox("cam1"))     # Mosquitto 2.0 acknowledges every
    everything = collect(spy, "offload/v1/#")            # subscription and filters each message
    assert fleet.edge.submit("square", {"x": 3}).result(10) == {"y": 9}
    control = Result(task_id="control", status=Status.OK, server="srv1", payload="control")
    # Published by srv1 after cam1's result: had the spy been able to read that, it came first.
    fleet.server_transport.publish(TREE.result_inbox("cam2"), CODEC.encode(control), qos=1)
    wait_for(lambda: any(m.topic == TREE.result_inbox("cam2") for m in everything), message="the control")
    assert stolen == []
    read = {m.topic for m in everything}
    assert TREE.result_inbox("cam1") not in read and TREE.task_inbox("srv1") not in read
    assert TREE.state("srv1") in read  # the public liveness view is readable
    wait_for(lambda: any(m.topic == TREE.heartbeat("srv1") for m in everything), message="a heartbeat")


def test_a_device_cannot_forge_a_result_into_another_devices_inbox(fleet: Fleet) -> None:
    forger = fleet.client("cam2")
    forger.connect()
    before = fleet.edge.stats()
    future = fleet.edge.submit("sleep", {"seconds": 0.5})
    wait_for(lambda: fleet.edge.stats()["in_flight"] == 1)
    task_id = future.task_id  # suppose the forger even knew the id
    for status in (Status.OK, Status.REJECTED_BUSY):
        forged = Result(task_id=task_id, status=status, server="srv1", payload={"slept": 999.0})
        forger.publish(TREE.result_inbox("cam1"), CODEC.encode(forged), qos=1)
    control_via_own_heartbeat(forger, fleet.edge)
    assert future.result(10) == {"slept": 0.5}  # the real result, from the first attempt
    after = fleet.edge.stats()
    for key in ("unknown_results", "late_results", "late_results_used", "retries"):
        assert after.get(key, 0) == before.get(key, 0), key


def test_a_device_cannot_speak_as_a_server(fleet: Fleet) -> None:
    impostor = fleet.client("cam2")
    impostor.connect()
    session = srv1_view(fleet.edge).session
    newest = MAX_COUNT  # the highest session a receiver accepts: it would outrank any real one
    death = NodeState(node="srv1", role=Role.SERVER, status="offline", session=newest, time=0.0)
    beat = Heartbeat(node="srv1", role=Role.SERVER, session=newest, seq=1, interval=1.0, time=0.0,
                     capabilities={"square": TaskCapability()}, load=Load(queue_length=10**6))
    pong = Pong(nonce=1, responder="srv1", sent=0.0)
    impostor.publish(TREE.state("srv1"), CODEC.encode(death), qos=1, retain=True)
    impostor.publish(TREE.heartbeat("srv1"), CODEC.encode(beat), qos=1)
    impostor.publish(TREE.pong("cam1"), CODEC.encode(pong), qos=1)
    impostor.publish(TREE.state("cam2"), CODEC.encode(death), qos=1)  # allowed topic, lying payload
    control_via_own_heartbeat(impostor, fleet.edge)
    view = srv1_view(fleet.edge)
    assert (view.session, view.dead, view.stale) == (session, False, False)
    assert fleet.edge.stats()["bad_input"].get("state-topic", 0) == 1
    assert fleet.edge.stats()["servers"]["unknown_pongs"] == 0
    watcher = fleet.client("operator")
    retained = collect(watcher, TREE.state("srv1"))
    watcher.connect()
    wait_for(lambda: len(retained) == 1, message="srv1's retained state")
    state = CODEC.decode(retained[0].payload, NodeState)
    assert (state.status, state.session) == ("online", session)  # the real birth, not the forgery
    assert fleet.edge.submit("square", {"x": 4}).result(10) == {"y": 16}


def test_a_device_cannot_take_a_servers_client_id(fleet: Fleet) -> None:
    before = fleet.server_transport.stats()
    thief = fleet.client("cam2", client_id="srv1")  # the broker names it after its user: cam2
    thief.connect()
    assert fleet.edge.submit("square", {"x": 5}).result(10) == {"y": 25}  # srv1 still answers
    after = fleet.server_transport.stats()
    assert (after["disconnects"], after["reconnects"]) == (before["disconnects"], before["reconnects"])
    assert fleet.server_transport.connected and thief.connected


def test_a_serving_device_logs_its_peer_in_as_its_own_user() -> None:
    """Under the ACL the client id is the user name: a peer logging in as the device would kick the
    device's own connection off, again and again."""
    from edge_agent.cli import build_peer

    config = EdgeConfig(id="cam1", broker="mqtt://127.0.0.1:1", username="cam1",
                        password=SecretStr("device-secret"), peer_username="cam1-peer",
                        peer_password=SecretStr("peer-secret"),
                        tasks=["agent_common.demo_tasks"])
    peer = build_peer(config, load_tasks("agent_common.demo_tasks"))
    transport = peer.config.transport_config()
    assert (transport.client_id, transport.username) == ("cam1-peer", "cam1-peer")
    assert transport.password is not None and transport.password.get_secret_value() == "peer-secret"
    shared = build_peer(config.model_copy(update={"peer_username": None, "peer_password": None}),
                        load_tasks("agent_common.demo_tasks")).config.transport_config()
    assert shared.username == "cam1"  # without peer credentials: the device's, as before
