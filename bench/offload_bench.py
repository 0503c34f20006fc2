"""Offload overhead: a no-op task through the edge agent and a cloud agent vs raw paho, same broker.

1. Round trip: ``EdgeAgent.submit("noop")`` -> cloud agent -> result, one at a time, against a raw paho
   ping-pong at QoS 1 (what a task and its result cost on the wire). Goals (issue 14): p50 within
   1.3x, p99 within 1.5x.
2. Throughput: no-op tasks with a window of ``--window`` in flight, against a raw paho echo pipeline
   (QoS 1 both ways, the same window), in ``--blocks`` pairs of blocks (which one goes first
   alternates); the ratio is the median of the pairs' ratios, their range beside it. Goal: at least
   0.7x.
3. CPU per task during the throughput blocks: the device's threads (the submitting one included) and
   the server's, each thread's own CPU clock, against the raw echo's three threads per message.

Both sides run in this process (the agents' threads share our GIL, as the raw clients' do); raw and
ours alternate in blocks so that drift on a shared machine hits both alike. amqtt runs in a
subprocess, Mosquitto as usual. Bounded: each broker stops at its time budget and says so.

    python -m bench.offload_bench [--n 1000] [--tasks 6000] [--blocks 6] [--window 32]
                                  [--brokers amqtt,mosquitto]

This script imports paho directly on purpose: raw paho is the baseline being measured.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho

from agent_common.registry import TaskRegistry, load_tasks
from bench.common import Summary, ThreadCpu, print_comparison, ratio
from bench.transport_rtt import RawPahoPair, amqtt_subprocess, mosquitto
from cloud_agent.config import CloudConfig
from cloud_agent.server import CloudAgent
from edge_agent.agent import EdgeAgent
from edge_agent.config import EdgeConfig
from topics.brokers import mosquitto_binary
from topics.mqtt import MqttTransport
from topics.transport import TransportConfig

BLOCKS = 4
TIME_BUDGET = 28.0  # seconds per broker
RTT_GOAL = 1.3
P99_GOAL = 1.5
THROUGHPUT_GOAL = 0.7


class OffloadPair:
    """An edge agent that always offloads to one in-process cloud agent running ``noop``."""

    def __init__(self, url: str, workers: int) -> None:
        prefix = f"bench/offload/{uuid.uuid4().hex[:8]}"
        self.server_id = server_id = f"srv-{uuid.uuid4().hex[:6]}"
        self.edge_id = edge_id = f"edge-{uuid.uuid4().hex[:6]}"
        cloud_config = CloudConfig.model_validate({"id": server_id, "broker": url, "prefix": prefix,
                                                   "workers": workers, "queue_size": 4096,
                                                   "heartbeat_interval": 0.5})
        self.server = CloudAgent(cloud_config, MqttTransport(cloud_config.transport_config()),
                                 load_tasks("agent_common.demo_tasks"))
        self.server.start()
        edge_config = EdgeConfig.model_validate({"id": edge_id, "broker": url, "prefix": prefix,
                                                 "policy": "remote", "heartbeat_interval": 0.5,
                                                 "default_timeout": 10.0})
        self.edge = EdgeAgent(edge_config, MqttTransport(TransportConfig.from_url(url, client_id=edge_id)),
                              TaskRegistry())
        self.edge.start()
        deadline = time.monotonic() + 10.0
        while not any(v.node == server_id and not v.stale for v in self.edge.servers()):
            if time.monotonic() > deadline:
                raise RuntimeError("the edge agent never saw the server's heartbeat")
            time.sleep(0.01)

    def side(self, thread: str) -> str | None:
        """Whose work a thread of this process does: ``server``, ``device`` (the caller's thread
        included) or None (someone else's)."""
        if self.server_id in thread:
            return "server"
        return "device" if self.edge_id in thread or thread == "MainThread" else None

    def round_trip(self) -> float:
        started = time.perf_counter()
        self.edge.submit("noop", b"x" * 64).result(5.0)
        return time.perf_counter() - started

    def burst(self, count: int, window: int) -> float:
        """Seconds to get ``count`` no-op results with at most ``window`` in flight."""
        slots = threading.Semaphore(window)
        done = threading.Event()
        remaining = [count]
        lock = threading.Lock()
        errors: list[BaseException] = []

        def finished(future: concurrent.futures.Future[Any]) -> None:
            if future.exception() is not None:
                errors.append(future.exception())  # type: ignore[arg-type]
            slots.release()
            with lock:
                remaining[0] -= 1
                if remaining[0] == 0:
                    done.set()

        started = time.perf_counter()
        for _ in range(count):
            slots.acquire()
            self.edge.submit("noop", b"x" * 64).add_done_callback(finished)
        if not done.wait(60.0):
            raise TimeoutError("offload burst did not finish")
        if errors:
            raise RuntimeError(f"{len(errors)} offloaded tasks failed, first: {errors[0]}")
        return time.perf_counter() - started

    def close(self) -> None:
        self.edge.stop()
        self.server.stop(grace=0.0)


class RawEcho:
    """Raw paho echo pipeline at QoS 1: a producer with a window, an echo client republishing."""

    def __init__(self, host: str, port: int) -> None:
        self.pair = RawPahoPair(host, port, 1, b"x" * 64)  # reuse its tuned clients and topics
        self._slots = threading.Semaphore(1)
        self._remaining = 0
        self._lock = threading.Lock()
        self._done = threading.Event()
        self.pair.pinger.on_message = self._answer

    @staticmethod
    def side(thread: str) -> str | None:
        """The producer (our thread) and both raw clients' loop threads (paho names them after the
        client ids, ``raw-pinger-...``, ``raw-ponger-...``) are the echo's work."""
        return "raw" if thread == "MainThread" or thread.startswith("paho-mqtt-client-raw-") else None

    def _answer(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        self._slots.release()
        with self._lock:
            self._remaining -= 1
            if self._remaining == 0:
                self._done.set()

    def burst(self, count: int, window: int) -> float:
        self._slots = threading.Semaphore(window)
        self._remaining = count
        self._done.clear()
        started = time.perf_counter()
        for _ in range(count):
            self._slots.acquire()
            self.pair.pinger.publish(self.pair.ping_topic, self.pair.payload, qos=1)
        if not self._done.wait(60.0):
            raise TimeoutError("raw echo burst did not finish")
        return time.perf_counter() - started

    def close(self) -> None:
        self.pair.close()


def run_broker(host: str, port: int, args: argparse.Namespace) -> None:
    deadline = time.monotonic() + TIME_BUDGET
    url = f"mqtt://{host}:{port}"
    raw = RawPahoPair(host, port, 1, b"x" * 64)
    ours = OffloadPair(url, args.workers)
    samples: dict[str, list[float]] = {"raw paho QoS 1": [], "edge->cloud noop": []}
    runners: list[tuple[str, Callable[[], float]]] = [("raw paho QoS 1", raw.round_trip),
                                                      ("edge->cloud noop", ours.round_trip)]
    try:
        for _, trip in runners:
            for _ in range(args.warmup):
                trip()
        block = max(1, args.n // BLOCKS)
        for _ in range(BLOCKS):
            for label, trip in runners:
                for _ in range(block):
                    if time.monotonic() > deadline - 10.0:
                        break
                    samples[label].append(trip())
    finally:
        raw.close()
    base, mine = Summary.of("raw paho QoS 1", samples["raw paho QoS 1"]), Summary.of(
        "edge->cloud noop", samples["edge->cloud noop"])
    print_comparison("round trip, one at a time (64 B)", base, mine)
    verdict = "meets" if mine.p50_ms <= RTT_GOAL * base.p50_ms else "MISSES"
    tail = "meets" if mine.p99_ms <= P99_GOAL * base.p99_ms else "MISSES"
    print(f"  goal p50 within {RTT_GOAL}x: {verdict}; p99 within {P99_GOAL}x: {tail}")

    echo = RawEcho(host, port)
    rates: dict[str, list[float]] = {"raw paho echo": [], "edge->cloud noop": []}
    cpu: dict[str, float] = {"raw": 0.0, "device": 0.0, "server": 0.0}
    counted = {"raw": 0, "ours": 0}

    def raw_block(count: int) -> None:
        meter = ThreadCpu(echo.side)
        rates["raw paho echo"].append(count / echo.burst(count, args.window))
        cpu["raw"] += meter.spent().get("raw", 0.0)
        counted["raw"] += count

    def our_block(count: int) -> None:
        meter = ThreadCpu(ours.side)
        rates["edge->cloud noop"].append(count / ours.burst(count, args.window))
        for side, seconds in meter.spent().items():
            cpu[side] += seconds
        counted["ours"] += count

    try:
        echo.burst(200, args.window)
        ours.burst(200, args.window)
        per_block = max(1, args.tasks // args.blocks)
        for pair in range(args.blocks):
            if time.monotonic() > deadline:
                print("  (throughput cut short by the time budget)")
                break
            # Alternate which goes first, so that a drift of the machine within a pair hits both alike.
            for block in (raw_block, our_block) if pair % 2 == 0 else (our_block, raw_block):
                block(per_block)
    finally:
        echo.close()
        ours.close()
    pairs = list(zip(rates["edge->cloud noop"], rates["raw paho echo"], strict=False))
    if pairs:
        ratios = sorted(mine / base for mine, base in pairs)
        middle = statistics.median(ratios)
        print(f"\nthroughput, window {args.window}, QoS 1 ({len(pairs)} alternating pairs of blocks, "
              f"{per_block} each; medians)")
        print(f"  {'raw paho echo':28} {statistics.median(rates['raw paho echo']):>10.0f} msg/s")
        print(f"  {'edge->cloud noop':28} {statistics.median(rates['edge->cloud noop']):>10.0f} tasks/s")
        verdict = "meets" if middle >= THROUGHPUT_GOAL else "MISSES"
        print(f"  {'ratio ours/raw, per pair':28} {middle:>9.2f}x   (pairs {ratios[0]:.2f}x-"
              f"{ratios[-1]:.2f}x)  goal >= {THROUGHPUT_GOAL}x: {verdict}")
        print_cpu(cpu, counted)


def print_cpu(cpu: dict[str, float], counted: dict[str, int]) -> None:
    """CPU microseconds per message (raw echo) and per offloaded task (device, server, both)."""
    raw = cpu["raw"] / max(1, counted["raw"]) * 1e6
    device, server = (cpu[side] / max(1, counted["ours"]) * 1e6 for side in ("device", "server"))
    print("\nCPU per task during those blocks (each thread's own clock; the broker not counted)")
    print(f"  {'raw paho echo, 3 threads':28} {raw:>10.0f} us/msg")
    print(f"  {'device (submitter included)':28} {device:>10.0f} us/task")
    print(f"  {'server':28} {server:>10.0f} us/task")
    print(f"  {'device + server':28} {device + server:>10.0f} us/task   ({ratio(device + server, raw)} raw)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=1000, help="round trips per variant (after warm-up)")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--tasks", type=int, default=6000, help="tasks per variant for throughput")
    parser.add_argument("--blocks", type=int, default=6,
                        help="throughput blocks per variant, alternating with the other's")
    parser.add_argument("--window", type=int, default=32, help="tasks in flight during the throughput run")
    parser.add_argument("--workers", type=int, default=2, help="cloud agent worker threads")
    parser.add_argument("--brokers", default="amqtt,mosquitto")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for name in [item.strip() for item in args.brokers.split(",") if item.strip()]:
        if name == "mosquitto" and mosquitto_binary() is None:
            print("\n== mosquitto: not installed, skipped (apt-get install -y mosquitto)")
            continue
        if name not in ("amqtt", "mosquitto"):
            parser.error(f"unknown broker {name!r}")
        started = time.monotonic()
        with (amqtt_subprocess() if name == "amqtt" else mosquitto()) as (host, port):
            print(f"\n== {name} on {host}:{port}")
            run_broker(host, port, args)
        print(f"  [{name}: {time.monotonic() - started:.1f}s]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
