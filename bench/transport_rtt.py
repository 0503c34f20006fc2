"""Round-trip latency: raw paho ping-pong vs the same ping-pong through MqttTransport.

Both run in the same process against the same broker, in alternating blocks so that drift on a
shared machine hits both alike; the script prints p50/p99 and the ratio ours/raw for QoS 0 and 1.
amqtt runs in a subprocess (in-process it would share our GIL); Mosquitto is used when installed.

    python -m bench.transport_rtt [--n 2000] [--warmup 200] [--brokers amqtt,mosquitto]

This script imports paho directly on purpose: raw paho is the baseline being measured.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from bench.common import Summary, print_comparison
from topics.brokers import MosquittoBroker, free_port, mosquitto_binary, mqtt_answers
from topics.mqtt import MqttTransport
from topics.transport import Message, TransportConfig

ROUND_TRIP_TIMEOUT = 2.0
BLOCKS = 4  # raw and ours alternate this many times per QoS level
TIME_BUDGET = 30.0  # seconds per broker; the run stops early (and says so) beyond it


class Pair(Protocol):
    """A pinger and a ponger: ``round_trip()`` returns seconds for one ping and its pong."""

    def round_trip(self) -> float: ...

    def close(self) -> None: ...


class RawPahoPair:
    """Two bare paho clients (TCP_NODELAY, loop_start); the ponger answers on paho's thread."""

    def __init__(self, host: str, port: int, qos: int, payload: bytes) -> None:
        prefix = f"bench/raw/{uuid.uuid4().hex[:8]}"
        self.ping_topic, self.pong_topic = f"{prefix}/ping", f"{prefix}/pong"
        self.qos, self.payload = qos, payload
        self.answered = threading.Event()
        self.pinger = self._client(host, port, "pinger")
        self.ponger = self._client(host, port, "ponger")
        self.ponger.on_message = self._pong
        self.pinger.on_message = lambda client, userdata, message: self.answered.set()
        self._subscribe(self.ponger, self.ping_topic)
        self._subscribe(self.pinger, self.pong_topic)

    @staticmethod
    def _client(host: str, port: int, role: str) -> paho.Client:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"raw-{role}-{uuid.uuid4().hex[:8]}")

        def nodelay(client: paho.Client, userdata: Any, sock: Any) -> None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        client.on_socket_open = nodelay
        connected = threading.Event()
        client.on_connect = lambda c, u, flags, reason, props: connected.set()
        client.connect(host, port, keepalive=30)
        client.loop_start()
        if not connected.wait(5.0):
            raise RuntimeError(f"raw paho {role}: no CONNACK from {host}:{port}")
        return client

    def _subscribe(self, client: paho.Client, topic: str) -> None:
        done = threading.Event()
        client.on_subscribe = lambda c, u, mid, codes, props: done.set()
        client.subscribe(topic, self.qos)
        if not done.wait(5.0):
            raise RuntimeError(f"raw paho: no SUBACK for {topic}")

    def _pong(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        client.publish(self.pong_topic, message.payload, qos=self.qos)

    def round_trip(self) -> float:
        self.answered.clear()
        started = time.perf_counter()
        self.pinger.publish(self.ping_topic, self.payload, qos=self.qos)
        if not self.answered.wait(ROUND_TRIP_TIMEOUT):
            raise TimeoutError("raw paho: pong lost")
        return time.perf_counter() - started

    def close(self) -> None:
        for client in (self.pinger, self.ponger):
            client.disconnect()
            client.loop_stop()


class TransportPair:
    """The same ping-pong through two MqttTransports; handlers run on their dispatch threads."""

    def __init__(self, url: str, qos: int, payload: bytes) -> None:
        prefix = f"bench/ours/{uuid.uuid4().hex[:8]}"
        self.ping_topic, self.pong_topic = f"{prefix}/ping", f"{prefix}/pong"
        self.qos, self.payload = qos, payload
        self.answered = threading.Event()
        self.pinger = MqttTransport(TransportConfig.from_url(url, keepalive=30), name="pinger")
        self.ponger = MqttTransport(TransportConfig.from_url(url, keepalive=30), name="ponger")
        self.pinger.connect()
        self.ponger.connect()
        self.ponger.subscribe(self.ping_topic, self._pong, qos=qos)
        self.pinger.subscribe(self.pong_topic, lambda message: self.answered.set(), qos=qos)

    def _pong(self, message: Message) -> None:
        self.ponger.publish(self.pong_topic, message.payload, qos=self.qos)

    def round_trip(self) -> float:
        self.answered.clear()
        started = time.perf_counter()
        self.pinger.publish(self.ping_topic, self.payload, qos=self.qos)
        if not self.answered.wait(ROUND_TRIP_TIMEOUT):
            raise TimeoutError("MqttTransport: pong lost")
        return time.perf_counter() - started

    def close(self) -> None:
        self.pinger.close()
        self.ponger.close()


@contextmanager
def amqtt_subprocess() -> Iterator[tuple[str, int]]:
    """amqtt in its own interpreter (so it does not share our GIL); stopped by closing its stdin."""
    port = free_port()
    code = ("import sys; from topics.brokers import EmbeddedBroker; "
            f"b = EmbeddedBroker(port={port}).start(); sys.stdin.read(); b.close()")
    process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15.0
        while not mqtt_answers("127.0.0.1", port, timeout=0.5):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("amqtt subprocess did not start")
            time.sleep(0.05)
        yield "127.0.0.1", port
    finally:
        assert process.stdin is not None
        process.stdin.close()
        try:
            process.wait(5.0)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5.0)


@contextmanager
def mosquitto() -> Iterator[tuple[str, int]]:
    with MosquittoBroker() as broker:
        yield broker.host, broker.port


def measure(pair: Pair, count: int, samples: list[float], deadline: float) -> None:
    for _ in range(count):
        if time.monotonic() > deadline:
            return
        samples.append(pair.round_trip())


def compare(host: str, port: int, qos: int, args: argparse.Namespace, deadline: float) -> bool:
    """Warm up, then alternate raw and ours in blocks; print the comparison. False if cut short."""
    payload = bytes(args.payload)
    url = f"mqtt://{host}:{port}"
    makers: list[tuple[str, Callable[[], Pair]]] = [
        ("raw paho", lambda: RawPahoPair(host, port, qos, payload)),
        ("MqttTransport", lambda: TransportPair(url, qos, payload)),
    ]
    pairs = [(label, make()) for label, make in makers]
    results: dict[str, list[float]] = {label: [] for label, _ in pairs}
    try:
        for _label, pair in pairs:
            measure(pair, args.warmup, [], deadline)
        block = max(1, int(args.n) // BLOCKS)
        for _ in range(BLOCKS):
            for label, pair in pairs:
                measure(pair, block, results[label], deadline)
    finally:
        for _label, pair in pairs:
            pair.close()
    raw, ours = results["raw paho"], results["MqttTransport"]
    if not raw or not ours:
        print(f"  QoS {qos}: time budget exhausted before any measurement")
        return False
    print_comparison(f"QoS {qos}, {len(payload)} B payload", Summary.of("raw paho", raw),
                     Summary.of("MqttTransport", ours))
    return bool(len(raw) == len(ours) == block * BLOCKS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=2000, help="round trips per variant (after warm-up)")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--payload", type=int, default=64, help="payload size in bytes")
    parser.add_argument("--brokers", default="amqtt,mosquitto")
    args = parser.parse_args(argv)
    wanted = [name.strip() for name in args.brokers.split(",") if name.strip()]
    for name in wanted:
        if name == "mosquitto" and mosquitto_binary() is None:
            print("\n== mosquitto: not installed, skipped (apt-get install -y mosquitto)")
            continue
        if name not in ("amqtt", "mosquitto"):
            parser.error(f"unknown broker {name!r}")
        broker = amqtt_subprocess() if name == "amqtt" else mosquitto()
        started = time.monotonic()
        with broker as (host, port):
            print(f"\n== {name} on {host}:{port} (round-trip latency, ms)")
            deadline = time.monotonic() + TIME_BUDGET
            for qos in (0, 1):
                if not compare(host, port, qos, args, deadline):
                    print(f"  (cut short by the {TIME_BUDGET:.0f}s budget)")
        print(f"  [{name}: {time.monotonic() - started:.1f}s]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
