"""Server-side overhead of the cloud agent per no-op task, against a raw paho echo client.

For each broker (embedded amqtt, Mosquitto if installed) one run measures, one request at a time:

* ``echo``: a raw paho client that republishes each request's bytes to the reply topic (the floor:
  two broker hops, no decoding);
* ``agent``: a :class:`~cloud_agent.server.CloudAgent` running the ``noop`` task (receive, decode,
  duplicate check, queue, run on a worker thread, encode a Result, publish).

Both get the same kind of encoded Task bytes at QoS 1 from the same requester (an MqttTransport), in
``--blocks`` alternating blocks per side (which side goes first alternates), so that a drift of the
machine hits both alike; each block's tasks are fresh (new ids, created just before) and encoded
before its clock starts. Prints p50/mean/p99 per task over all blocks, the agent/echo ratio of the
medians and the difference (the agent's own cost). Bounded: ``--count`` requests per side (default
1000), ~10-30 s in all.

    python bench/server_overhead.py [--count 1000] [--blocks 5] [--brokers amqtt,mosquitto]
"""

from __future__ import annotations

import argparse
import itertools
import socket
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from agent_common.registry import load_tasks
from cloud_agent.config import CloudConfig
from cloud_agent.server import CloudAgent
from topics.brokers import EmbeddedBroker, MosquittoBroker, mosquitto_binary
from topics.codec import Codec
from topics.models import Task
from topics.mqtt import MqttTransport
from topics.names import Kind, TopicTree
from topics.transport import Message, TransportConfig

PREFIX = "bench/overhead"
TREE = TopicTree(PREFIX)
ECHO_TOPIC = f"{PREFIX}/echo"


class RawEcho:
    """A bare paho client: every message on ECHO_TOPIC goes back, unchanged, to the reply topic."""

    def __init__(self, host: str, port: int, reply_topic: str) -> None:
        self.reply_topic = reply_topic
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-echo")
        self.client.on_socket_open = self._nodelay
        self.client.on_message = self._echo
        self.client.on_connect = self._subscribe
        self._ready = threading.Event()
        self.client.connect(host, port)
        self.client.loop_start()
        if not self._ready.wait(5.0):
            raise RuntimeError("echo client did not connect")

    @staticmethod
    def _nodelay(client: Any, userdata: Any, sock: Any) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _subscribe(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        client.subscribe(ECHO_TOPIC, qos=1)
        self._ready.set()

    def _echo(self, client: Any, userdata: Any, message: Any) -> None:
        client.publish(self.reply_topic, message.payload, qos=1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Requester:
    """Sends one request at a time and waits for its reply (any message on the reply topic)."""

    def __init__(self, transport: MqttTransport, reply_topic: str) -> None:
        self.transport = transport
        self._arrived = threading.Event()
        self.online: set[str] = set()
        transport.subscribe(reply_topic, lambda _m: self._arrived.set(), qos=1)
        transport.subscribe(TREE.all_of(Kind.STATE), self._state, qos=1)

    def _state(self, message: Message) -> None:
        self.online.add(message.topic)

    def measure(self, topic: str, payloads: list[bytes]) -> list[float]:
        """Round trips in seconds, one request outstanding at a time."""
        times: list[float] = []
        for payload in payloads:
            self._arrived.clear()
            began = time.perf_counter()
            self.transport.publish(topic, payload, qos=1)
            if not self._arrived.wait(5.0):
                raise RuntimeError(f"no reply within 5 s to a request on {topic}")
            times.append(time.perf_counter() - began)
        return times


def summary(times: list[float]) -> tuple[float, float, float]:
    ordered = sorted(times)
    return (statistics.median(ordered), statistics.fmean(ordered),
            ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))])


def run_on(name: str, url_host: str, port: int, count: int, blocks: int) -> None:
    codec = Codec("cbor")
    reply = TREE.result_inbox("bench-dev")
    numbers = itertools.count()

    def requests(how_many: int) -> list[bytes]:
        """Fresh tasks (new ids, ``created`` now), encoded before the clock starts."""
        return [codec.encode(Task(id=f"t{i}", task="noop", sender="bench-dev", reply_to=reply,
                                  created=time.time(), payload={"i": i}))
                for i in itertools.islice(numbers, how_many)]

    transport = MqttTransport(TransportConfig.from_url(f"mqtt://{url_host}:{port}", client_id="bench-dev"))
    transport.connect()
    requester = Requester(transport, reply)
    echo = RawEcho(url_host, port, reply)
    config = CloudConfig(id="bench-srv", prefix=PREFIX, workers=2, queue_size=64,
                         heartbeat_interval=1.0, result_cache_size=count + 100)
    agent = CloudAgent(config, MqttTransport(TransportConfig.from_url(f"mqtt://{url_host}:{port}",
                                                                      client_id="bench-srv")),
                       load_tasks("agent_common.demo_tasks"))
    agent.start()
    inbox = TREE.task_inbox("bench-srv")
    echo_times: list[float] = []
    agent_times: list[float] = []
    try:
        deadline = time.monotonic() + 5.0  # the birth comes after the agent's subscriptions
        while TREE.state("bench-srv") not in requester.online and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
        warm_up = requests(50)
        requester.measure(ECHO_TOPIC, warm_up)
        requester.measure(inbox, requests(50))
        per_block = max(1, count // blocks)
        for block in range(blocks):
            # Alternating blocks, which side goes first alternating too: a drift of the machine hits both.
            sides = [(ECHO_TOPIC, echo_times), (inbox, agent_times)]
            for topic, times in sides if block % 2 == 0 else sides[::-1]:
                times.extend(requester.measure(topic, requests(per_block)))
    finally:
        agent.stop(grace=1.0)
        echo.close()
        transport.close()
    e50, emean, e99 = summary(echo_times)
    a50, amean, a99 = summary(agent_times)
    print(f"\n{name}: {len(agent_times)} no-op tasks per side in {blocks} alternating blocks, QoS 1, "
          f"one outstanding, {len(warm_up[0])} B requests")
    print(f"  raw paho echo : p50 {e50 * 1e3:7.3f} ms  mean {emean * 1e3:7.3f} ms  p99 {e99 * 1e3:7.3f} ms")
    print(f"  cloud agent   : p50 {a50 * 1e3:7.3f} ms  mean {amean * 1e3:7.3f} ms  p99 {a99 * 1e3:7.3f} ms")
    print(f"  ratio agent/echo (p50) {a50 / e50:5.2f}x; server-side overhead per task "
          f"~{(a50 - e50) * 1e3:.3f} ms (p50), {(amean - emean) * 1e3:.3f} ms (mean)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000, help="requests per side (default 1000)")
    parser.add_argument("--blocks", type=int, default=5, help="alternating blocks per side (default 5)")
    parser.add_argument("--brokers", default="amqtt,mosquitto", help="comma-separated: amqtt,mosquitto")
    args = parser.parse_args(argv)
    starters: dict[str, Callable[[], Any]] = {"amqtt": lambda: EmbeddedBroker().start()}
    if mosquitto_binary() is not None:
        starters["mosquitto"] = lambda: MosquittoBroker().start()
    for name in args.brokers.split(","):
        if name not in starters:
            print(f"\n{name}: not available, skipped")
            continue
        broker = starters[name]()
        try:
            label = "embedded amqtt 0.12 (same process)" if name == "amqtt" else "Mosquitto (subprocess)"
            run_on(label, broker.host, broker.port, args.count, args.blocks)
        finally:
            broker.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
