"""MQTT brokers for demos, the simulator and tests: amqtt in a thread, or Mosquitto as a subprocess.

A Mosquitto may be bridged to another broker (:class:`MosquittoBridge`): a site broker on a gateway
forwarding a fleet's topics to and from a cloud broker. Either broker may also serve MQTT over
WebSockets on a second loopback port (``websockets_port``), for a browser (the fleet dashboard).

Both wait until the broker really answers an MQTT CONNECT (a bare TCP check makes amqtt log an
ERROR), listen on loopback only, and clean up after themselves. The readiness probe speaks just
enough MQTT 3.1.1 by hand (CONNECT, CONNACK, DISCONNECT) so that this module needs no MQTT client.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from topics.transport import ProtocolVersion

log = logging.getLogger(__name__)

BrokerKind = Literal["amqtt", "mosquitto"]

_PROBE_INTERVAL = 0.02


BROKER_EXTRA_MISSING = ("the embedded broker needs amqtt, which this install lacks: "
                        "pip install 'mqtt-offload[broker]' (or give --broker mqtt://host:port)")


class BrokerError(RuntimeError):
    """A broker could not be started or stopped."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def _connect_packet(client_id: str) -> bytes:
    """An MQTT 3.1.1 CONNECT with a clean session and no credentials."""
    encoded_id = client_id.encode()
    variable = b"\x00\x04MQTT\x04\x02\x00\x0a"  # protocol name, level 4, clean session, keepalive 10
    payload = struct.pack("!H", len(encoded_id)) + encoded_id
    body = variable + payload
    return bytes([0x10, len(body)]) + body  # body < 128 bytes: one length byte


def mqtt_answers(host: str, port: int, *, timeout: float = 1.0, tls: bool = False) -> bool:
    """True when something on ``host:port`` answers an MQTT CONNECT with a CONNACK.

    A refused CONNACK (e.g. "not authorised" on a broker with users) still counts: the broker is up.
    With ``tls`` the probe speaks TLS without verifying the certificate: it only asks "is it up?".
    """
    try:
        with _probe_socket(host, port, timeout=timeout, tls=tls) as sock:
            sock.sendall(_connect_packet(f"probe-{uuid.uuid4().hex[:12]}"))
            answer = b""
            while len(answer) < 4:
                chunk = sock.recv(4 - len(answer))
                if not chunk:
                    return False
                answer += chunk
            if answer[0] != 0x20:
                return False
            if answer[3] == 0:
                sock.sendall(b"\xe0\x00")  # DISCONNECT, so the broker logs a clean goodbye
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _probe_socket(host: str, port: int, *, timeout: float, tls: bool) -> Iterator[socket.socket]:
    """A connection to ``host:port`` for a liveness probe; with ``tls``, TLS without verifying the
    certificate (the probe only asks "is it up?")."""
    with socket.create_connection((host, port), timeout=timeout) as raw:
        if not tls:
            yield raw
            return
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with context.wrap_socket(raw, server_hostname=host) as wrapped:
            yield wrapped


def _ws_frame(payload: bytes) -> bytes:
    """One binary WebSocket frame as a client sends it (masked, under 126 bytes)."""
    mask = os.urandom(4)
    return bytes([0x82, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def websocket_answers(host: str, port: int, *, timeout: float = 1.0, tls: bool = False) -> bool:
    """True when ``host:port`` takes a WebSocket upgrade for the ``mqtt`` subprotocol and answers an
    MQTT CONNECT inside it with a CONNACK (as :func:`mqtt_answers`, one layer down; a refused CONNACK
    counts). With ``tls`` the probe speaks TLS without verifying the certificate."""
    request = (f"GET /mqtt HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
               "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n").encode()
    try:
        with _probe_socket(host, port, timeout=timeout, tls=tls) as sock:
            sock.sendall(request)
            answer = b""
            while b"\r\n\r\n" not in answer:
                chunk = sock.recv(1024)
                if not chunk or len(answer) > 4096:
                    return False
                answer += chunk
            head, _, rest = answer.partition(b"\r\n\r\n")
            if head.split(b"\r\n", 1)[0].split(b" ")[1:2] != [b"101"]:
                return False
            sock.sendall(_ws_frame(_connect_packet(f"probe-{uuid.uuid4().hex[:12]}")))
            while len(rest) < 6:  # frame header (2 bytes, unmasked) + CONNACK (4 bytes)
                chunk = sock.recv(6 - len(rest))
                if not chunk:
                    return False
                rest += chunk
            if rest[0] & 0x0F != 0x02 or rest[1] != 4 or rest[2] != 0x20:
                return False
            if rest[5] == 0:
                sock.sendall(_ws_frame(b"\xe0\x00"))  # DISCONNECT
            return True
    except OSError:
        return False


def _wait_for_websockets(host: str, port: int, deadline: float, *, tls: bool = False) -> bool:
    while time.monotonic() < deadline:
        if websocket_answers(host, port, timeout=max(0.05, min(1.0, deadline - time.monotonic())), tls=tls):
            return True
        time.sleep(_PROBE_INTERVAL)
    return False


def _wait_until_answering(
    host: str, port: int, deadline: float, alive: Any = None, *, tls: bool = False
) -> bool:
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            return False
        wait = max(0.05, min(1.0, deadline - time.monotonic()))
        if mqtt_answers(host, port, timeout=wait, tls=tls):
            return True
        time.sleep(_PROBE_INTERVAL)
    return False


class _SnapshotIterDict(dict[str, Any]):
    """A dict whose iteration walks a snapshot of its keys.

    amqtt 0.12.1 iterates its subscription table with ``await`` inside the loop when a client
    connects (``Broker._handle_client_session``); a subscription made by another client meanwhile
    raised "dictionary changed size during iteration" and killed the connecting client's session.
    """

    def __iter__(self) -> Any:
        return iter(list(super().keys()))


# amqtt logs several INFO lines per connection (and its state machine library more): quiet them
# unless the application configured these loggers itself.
_CHATTY_LOGGERS = ("amqtt", "transitions")


def _quiet_chatty_loggers() -> None:
    for name in _CHATTY_LOGGERS:
        chatty = logging.getLogger(name)
        if chatty.level == logging.NOTSET:
            chatty.setLevel(logging.WARNING)


class EmbeddedBroker:
    """amqtt 0.12 in its own thread and asyncio loop: MQTT 3.1.1 only, no ``$share`` delivery.

    amqtt's own INFO chatter is lowered to WARNING unless its loggers were configured already.
    ``websockets_port`` (0: a free one) adds a listener for MQTT over WebSockets (:attr:`ws_url`).
    """

    kind: BrokerKind = "amqtt"
    protocols: tuple[ProtocolVersion, ...] = ("3.1.1",)

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, *, users: dict[str, str] | None = None,
        websockets_port: int | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.websockets_port = None if websockets_port is None else websockets_port or free_port(host)
        self.users = dict(users) if users else None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker: Any = None
        self._password_dir: tempfile.TemporaryDirectory[str] | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str | None:
        """``ws://host:port`` of the WebSockets listener, or None without one."""
        return None if self.websockets_port is None else f"ws://{self.host}:{self.websockets_port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _config(self) -> dict[str, Any]:
        # The plugin list is explicit: amqtt's defaults publish $SYS topics, warn about psutil and
        # cost about a quarter of the throughput. The bind is explicit: the default is 0.0.0.0:1883.
        plugins: dict[str, Any] = {}
        if self.users:
            plugins["amqtt.plugins.authentication.AnonymousAuthPlugin"] = {"allow_anonymous": False}
            plugins["amqtt.plugins.authentication.FileAuthPlugin"] = {
                "password_file": self._write_password_file()
            }
        else:
            plugins["amqtt.plugins.authentication.AnonymousAuthPlugin"] = {"allow_anonymous": True}
        listeners: dict[str, Any] = {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}}
        if self.websockets_port is not None:
            listeners["websockets"] = {"type": "ws", "bind": f"{self.host}:{self.websockets_port}"}
        return {"listeners": listeners, "plugins": plugins}

    def _write_password_file(self) -> str:
        from pwdlib import PasswordHash
        from pwdlib.hashers.argon2 import Argon2Hasher

        hasher = PasswordHash((Argon2Hasher(),))
        if self._password_dir is None:
            self._password_dir = tempfile.TemporaryDirectory(prefix="amqtt-users-")
        path = Path(self._password_dir.name) / "passwd"
        assert self.users is not None
        lines = [f"{user}:{hasher.hash(password)}" for user, password in self.users.items()]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return str(path)

    def start(self, timeout: float = 5.0) -> EmbeddedBroker:
        """Start the broker thread; return once it answers MQTT, or raise :class:`BrokerError`."""
        if self.running:
            return self
        if importlib.util.find_spec("amqtt") is None:
            raise BrokerError(BROKER_EXTRA_MISSING)
        _quiet_chatty_loggers()
        self._started.clear()
        self._start_error = None
        config = self._config()
        self._thread = threading.Thread(
            target=self._run, args=(config,), name=f"amqtt-{self.port}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        if not self._started.wait(timeout) or self._start_error is not None:
            self.stop()
            raise BrokerError(f"amqtt on {self.url} did not start: {self._start_error or 'timed out'}")
        if not _wait_until_answering(self.host, self.port, deadline, alive=lambda: self.running):
            self.stop()
            raise BrokerError(f"amqtt on {self.url} does not answer MQTT after {timeout:.1f}s")
        if self.websockets_port is not None and not _wait_for_websockets(
                self.host, self.websockets_port, deadline):
            self.stop()
            raise BrokerError(f"amqtt on {self.ws_url} does not answer WebSockets after {timeout:.1f}s")
        log.info("amqtt broker listening on %s", self.url)
        return self

    def _run(self, config: dict[str, Any]) -> None:
        from amqtt.broker import Broker

        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            self._broker = Broker(config, loop=loop)
            self._broker._subscriptions = _SnapshotIterDict(self._broker._subscriptions)
            loop.run_until_complete(self._broker.start())
        except Exception as exc:  # noqa: BLE001 - reported to start(), which raises BrokerError
            self._start_error = exc
            self._started.set()
            loop.close()
            return
        self._started.set()
        try:
            loop.run_forever()
        finally:
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    def stop(self, timeout: float = 5.0) -> None:
        """Shut the broker down cleanly and join its thread; idempotent."""
        loop, thread, broker = self._loop, self._thread, self._broker
        if loop is not None and thread is not None and thread.is_alive():
            if broker is not None and self._start_error is None:
                future = asyncio.run_coroutine_threadsafe(broker.shutdown(), loop)
                try:
                    future.result(timeout)
                except Exception as exc:  # noqa: BLE001 - a failed shutdown must not block the stop
                    log.warning("amqtt on %s did not shut down cleanly: %s", self.url, exc)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)
        self._thread = None
        self._loop = None
        self._broker = None

    def restart(self, timeout: float = 5.0, *, down_for: float = 0.0) -> EmbeddedBroker:
        """Stop and start a fresh broker on the same port (sessions and retained messages are lost)."""
        self.stop()
        if down_for > 0:
            time.sleep(down_for)
        return self.start(timeout)

    def close(self) -> None:
        """Stop the broker and remove its password file."""
        self.stop()
        if self._password_dir is not None:
            self._password_dir.cleanup()
            self._password_dir = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def mosquitto_binary() -> str | None:
    """Path of the ``mosquitto`` executable (PATH first, then /usr/sbin), or None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


@dataclass(frozen=True)
class MosquittoBridge:
    """A Mosquitto bridge connection to another broker, for every topic under ``prefixes``.

    Each prefix is bridged both ways at ``qos`` (``topic <prefix>/# both 1``): tasks, pings and
    devices' state go out, results, pongs, heartbeats and servers' state come in. ``try_private``
    tells a remote Mosquitto that this is a bridge, so it does not echo our own messages back and
    keeps their retain flag (retained state arrives retained). ``cleansession`` true: after a link
    outage the remote side keeps no stale backlog for us (devices retry on their own timeouts), and
    on every reconnect the remote sends its retained state again. ``notifications`` false: no
    retained ``$SYS/broker/connection/...`` records written into either broker.
    """

    address: str
    """``host:port`` of the remote broker."""
    prefixes: tuple[str, ...] = ("offload/v1",)
    name: str = "offload-bridge"
    """The connection name; also the remote client id unless ``remote_clientid`` is set."""
    qos: Literal[0, 1, 2] = 1
    remote_clientid: str | None = None
    try_private: bool = True
    cleansession: bool = True
    notifications: bool = False
    keepalive_interval: int = 10
    """Seconds between the bridge's pings: how soon a dead link is noticed (Mosquitto's minimum: 5)."""
    restart_timeout: int = 1
    """Seconds before a failed bridge connection is tried again (Mosquitto's default backs off 5-30 s)."""
    protocol_version: Literal["mqttv311", "mqttv50"] = "mqttv311"
    remote_username: str | None = None
    remote_password: str | None = None
    incoming_qos: Literal[0, 1, 2] | None = 0
    """QoS of what comes in from the remote broker, when not ``qos`` (``topic <prefix>/# out qos``
    plus ``topic <prefix>/# in incoming_qos``; None: ``qos`` both ways). 0 by default: it removes
    the bridge's PUBACKs towards the remote. Mosquitto 2.0.11's bridge socket runs with Nagle's
    algorithm, so a task sent right after the PUBACK of a result waited for the remote's delayed ACK:
    43.7 ms per offloaded round trip against 0.78 ms with 0 (``bench/bridge_rtt.py``). With
    ``cleansession true`` the remote keeps nothing for the bridge while the uplink is down anyway;
    what QoS 0 gives up is a result in flight at the moment the uplink drops, which the device then
    gets by its own retry (the server answers the duplicate from its cache)."""

    def __post_init__(self) -> None:
        host, sep, port = self.address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"bridge address must be host:port, got {self.address!r}")
        if not self.prefixes:
            raise ValueError("a bridge needs at least one topic prefix")
        for prefix in self.prefixes:
            if not prefix or any(c in prefix for c in "+#\n ") or prefix.endswith("/"):
                raise ValueError(f"bridge prefix must be a plain topic without wildcards, spaces "
                                 f"or a trailing '/', got {prefix!r}")
        if self.keepalive_interval < 5:
            raise ValueError("keepalive_interval must be at least 5 seconds (Mosquitto's minimum)")
        if (self.remote_password is not None) and self.remote_username is None:
            raise ValueError("remote_password needs remote_username")

    def lines(self) -> list[str]:
        """The mosquitto.conf lines of this bridge (a ``connection`` section: keep it last)."""
        def flag(value: bool) -> str:
            return "true" if value else "false"

        lines = [f"connection {self.name}", f"address {self.address}",
                 f"remote_clientid {self.remote_clientid or self.name}",
                 f"bridge_protocol_version {self.protocol_version}",
                 f"try_private {flag(self.try_private)}", f"cleansession {flag(self.cleansession)}",
                 f"notifications {flag(self.notifications)}", "start_type automatic",
                 f"restart_timeout {self.restart_timeout}",
                 f"keepalive_interval {self.keepalive_interval}"]
        if self.remote_username is not None:
            lines.append(f"remote_username {self.remote_username}")
        if self.remote_password is not None:
            lines.append(f"remote_password {self.remote_password}")
        for prefix in self.prefixes:
            if self.incoming_qos is None or self.incoming_qos == self.qos:
                lines.append(f"topic {prefix}/# both {self.qos}")
            else:
                lines += [f"topic {prefix}/# out {self.qos}", f"topic {prefix}/# in {self.incoming_qos}"]
        return lines


def write_mosquitto_config(
    path: Path,
    *,
    port: int,
    host: str = "127.0.0.1",
    password_file: Path | None = None,
    log_file: Path | None = None,
    max_queued_messages: int = 100_000,
    max_inflight_messages: int = 100,
    run_as_user: str | None = None,
    certfile: Path | None = None,
    keyfile: Path | None = None,
    acl_file: Path | None = None,
    username_as_client_id: bool = False,
    bridge: MosquittoBridge | None = None,
    websockets_port: int | None = None,
) -> Path:
    """Write a mosquitto.conf tuned for low-latency offloading; return ``path``.

    ``bridge`` adds a bridge connection to another broker (:class:`MosquittoBridge`).
    ``websockets_port`` adds a second listener on ``host`` speaking MQTT over WebSockets, with the
    same users, ACL, client ids and TLS (``wss://``) as the first.

    With ``certfile`` and ``keyfile`` the listener speaks TLS only (clients use ``mqtts://``).
    ``acl_file`` applies a Mosquitto ACL (e.g. ``examples/mosquitto/acl``); ``username_as_client_id``
    makes the listener use each client's user name as its client id (what that ACL relies on).
    """
    if (certfile is None) != (keyfile is None):
        raise ValueError("TLS needs both certfile and keyfile")
    lines = [
        "# Generated by mqtt-offload (topics.brokers.write_mosquitto_config).",
        f"listener {port} {host}",
    ]
    if certfile is not None and keyfile is not None:
        lines += [f"certfile {certfile}", f"keyfile {keyfile}"]
    if username_as_client_id:
        lines += ["use_username_as_clientid true"]
    if websockets_port is not None:  # listener options apply to the listener above them
        lines += ["# MQTT over WebSockets, for a browser (the fleet dashboard).",
                  f"listener {websockets_port} {host}", "protocol websockets"]
        if certfile is not None and keyfile is not None:
            lines += [f"certfile {certfile}", f"keyfile {keyfile}"]
        if username_as_client_id:
            lines += ["use_username_as_clientid true"]
    lines += [
        "# Without TCP_NODELAY, Nagle's algorithm meets delayed ACKs and a QoS 1 round trip costs",
        "# ~44 ms instead of ~0.4 ms.",
        "set_tcp_nodelay true",
        "# The default of 1000 silently drops QoS 0 and 1 messages for a slow subscriber, after the",
        "# publisher already had its PUBACK. Sized deliberately: bounded memory, no silent loss in bursts.",
        f"max_queued_messages {max_queued_messages}",
        "# QoS 1/2 messages in flight per client before the broker queues the rest.",
        f"max_inflight_messages {max_inflight_messages}",
        "# Nothing survives a restart: agents re-announce themselves on every (re)connect.",
        "persistence false",
    ]
    if password_file is not None:
        lines += ["allow_anonymous false", f"password_file {password_file}"]
    else:
        lines += ["allow_anonymous true"]
    if acl_file is not None:
        lines += [f"acl_file {acl_file}"]
    if log_file is not None:
        lines += [f"log_dest file {log_file}", "log_type error", "log_type warning",
                  "log_type notice", "log_type information", "connection_messages true"]
    else:
        lines += ["log_dest stderr"]
    if run_as_user is not None:
        lines += ["# Started as root: stay that user so the private work files remain readable.",
                  f"user {run_as_user}"]
    if bridge is not None:  # a connection section takes every following bridge option: keep it last
        lines += ["# Bridge: the fleet's topics, both ways, to and from another broker.", *bridge.lines()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


class MosquittoBroker:
    """Mosquitto as a subprocess on a loopback port; MQTT 3.1.1 and 5, ``$share`` groups."""

    kind: BrokerKind = "mosquitto"
    protocols: tuple[ProtocolVersion, ...] = ("3.1.1", "5")

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        users: dict[str, str] | None = None,
        max_queued_messages: int = 100_000,
        workdir: Path | None = None,
        tls_files: tuple[Path, Path] | None = None,
        acl_file: Path | None = None,
        username_as_client_id: bool = False,
        bridge: MosquittoBridge | None = None,
        websockets_port: int | None = None,
    ) -> None:
        """``tls_files`` = (certificate, private key): the listener then speaks TLS only.
        ``acl_file``, ``username_as_client_id`` and ``bridge``: see :func:`write_mosquitto_config`.
        ``websockets_port`` (0: a free one) adds a listener for MQTT over WebSockets (:attr:`ws_url`)."""
        binary = mosquitto_binary()
        if binary is None:
            raise BrokerError("mosquitto not installed: apt-get install -y mosquitto")
        self.binary = binary
        self.host = host
        self.port = port or free_port(host)
        self.users = dict(users) if users else None
        self.max_queued_messages = max_queued_messages
        self.tls_files = tls_files
        self.acl_file = acl_file
        self.username_as_client_id = username_as_client_id
        self.bridge = bridge
        self.websockets_port = None if websockets_port is None else websockets_port or free_port(host)
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="mosquitto-")) if workdir is None else workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_file = self.workdir / "mosquitto.log"
        self.config_file = self.workdir / "mosquitto.conf"
        self.stderr_file = self.workdir / "mosquitto.stderr"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        scheme = "mqtts" if self.tls_files else "mqtt"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str | None:
        """``ws://host:port`` (``wss://`` with TLS) of the WebSockets listener, or None without one."""
        if self.websockets_port is None:
            return None
        return f"{'wss' if self.tls_files else 'ws'}://{self.host}:{self.websockets_port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _write_files(self) -> None:
        password_file = None
        if self.users:
            password_file = self.workdir / "passwd"
            password_file.write_text("", encoding="utf-8")
            for user, password in self.users.items():
                subprocess.run(
                    ["mosquitto_passwd", "-b", str(password_file), user, password],
                    check=True, capture_output=True, timeout=10,
                )
            password_file.chmod(0o644)
        write_mosquitto_config(
            self.config_file,
            port=self.port,
            host=self.host,
            password_file=password_file,
            log_file=self.log_file,
            max_queued_messages=self.max_queued_messages,
            run_as_user="root" if hasattr(os, "geteuid") and os.geteuid() == 0 else None,
            certfile=self.tls_files[0] if self.tls_files else None,
            keyfile=self.tls_files[1] if self.tls_files else None,
            acl_file=self.acl_file,
            username_as_client_id=self.username_as_client_id,
            bridge=self.bridge,
            websockets_port=self.websockets_port,
        )

    def start(self, timeout: float = 5.0) -> MosquittoBroker:
        """Start mosquitto; return once it answers MQTT, or raise :class:`BrokerError`."""
        if self.running:
            return self
        self._write_files()
        # stderr goes to a file, not a pipe nobody reads (a full pipe would block the broker).
        with self.stderr_file.open("wb") as stderr:
            self._process = subprocess.Popen(
                [self.binary, "-c", str(self.config_file)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
            )
        deadline = time.monotonic() + timeout
        if not _wait_until_answering(self.host, self.port, deadline, alive=lambda: self.running,
                                     tls=self.tls_files is not None):
            detail = self._failure_detail()
            self.kill()
            raise BrokerError(f"mosquitto on {self.url} did not start: {detail}")
        if self.websockets_port is not None and not _wait_for_websockets(
                self.host, self.websockets_port, deadline, tls=self.tls_files is not None):
            detail = self._failure_detail()
            self.kill()
            raise BrokerError(f"mosquitto on {self.ws_url} does not answer WebSockets: {detail}")
        log.info("mosquitto (pid %s) listening on %s", self.pid, self.url)
        return self

    def _failure_detail(self) -> str:
        text = ""
        for path in (self.stderr_file, self.log_file):
            if path.exists():
                text += path.read_text(errors="replace") + "\n"
        lines = [line for line in text.splitlines() if line.strip()]
        errors = [line for line in lines if "Error" in line]
        if errors:
            return errors[-1]
        return lines[-1] if lines else "no answer to MQTT CONNECT"

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then wait (SIGKILL if it does not exit); idempotent."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
        self._reap()

    def kill(self) -> None:
        """SIGKILL, as a crash would; idempotent."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.kill()
            process.wait(5.0)
        self._reap()

    def _reap(self) -> None:
        self._process = None

    def restart(self, timeout: float = 5.0, *, down_for: float = 0.0) -> MosquittoBroker:
        """Stop and start again on the same port, optionally staying down ``down_for`` seconds."""
        self.stop()
        if down_for > 0:
            time.sleep(down_for)
        return self.start(timeout)

    def close(self) -> None:
        """Stop the broker and remove the work directory if we created it."""
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
