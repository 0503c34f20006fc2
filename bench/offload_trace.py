"""Where an offloaded no-op's round trip goes: a timestamp at each step, median over many round trips.

One edge agent and one cloud agent in this process (as in ``bench/offload_bench``), the ``remote``
policy, one task at a time. The agents' methods are wrapped to take a ``perf_counter`` timestamp on
entry and exit; the table prints the median time of each step since ``submit()`` and the step's own
share. The wrappers cost about 1 us each, so the total is slightly above ``offload_bench``'s.
Also printed: the raw paho QoS 1 ping-pong on the same broker, for scale.

    python -m bench.offload_trace [--n 500] [--broker mosquitto|amqtt]

Diagnostic only: it patches methods of this process's classes and restores them on exit.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

from bench.offload_bench import OffloadPair
from bench.transport_rtt import RawPahoPair, amqtt_subprocess, mosquitto
from cloud_agent.admission import Admission
from cloud_agent.workers import Workers
from edge_agent.agent import EdgeAgent
from topics.mqtt import MqttTransport

Marks = list[tuple[str, float]]

STEPS: list[tuple[type, str]] = [
    (EdgeAgent, "submit"),  # decide, encode, publish (on the caller's thread)
    (MqttTransport, "publish"),  # paho queues the packet and wakes the network thread
    (MqttTransport, "_on_message"),  # network thread: route to the dispatch thread
    (Admission, "on_task"),  # the server's dispatch thread: decode, validate, admit to the work queue
    (Workers, "_run"),  # the server's worker: run, encode the result, publish
    (EdgeAgent, "_on_result"),  # dispatch thread: decode the result, finish the task
]


@contextlib.contextmanager
def traced(marks: Marks) -> Iterator[None]:
    """Wrap the steps above (and ``Future.set_result``) to append (label, time) to ``marks``."""
    originals: list[tuple[type, str, Any]] = []

    def wrap(owner: type, name: str) -> None:
        original = getattr(owner, name)
        originals.append((owner, name, original))
        label = f"{owner.__name__}.{name}"

        @functools.wraps(original)
        def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
            marks.append((label + " >", time.perf_counter()))
            try:
                return original(self, *args, **kwargs)
            finally:
                marks.append((label + " <", time.perf_counter()))

        setattr(owner, name, timed)

    for owner, name in STEPS:
        wrap(owner, name)
    set_result = concurrent.futures.Future.set_result
    originals.append((concurrent.futures.Future, "set_result", set_result))

    def marked_set_result(self: concurrent.futures.Future[Any], value: Any) -> None:
        marks.append(("Future.set_result", time.perf_counter()))
        set_result(self, value)

    concurrent.futures.Future.set_result = marked_set_result  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        for owner, name, original in reversed(originals):
            setattr(owner, name, original)


def trace(url: str, n: int) -> tuple[tuple[str, ...], list[float], int]:
    """(labels, median microseconds since submit per label, round trips with that step sequence).

    The pair is built inside the patch: handlers are bound when the agents subscribe.
    """
    marks: Marks = []
    sequences: dict[tuple[str, ...], list[list[float]]] = {}
    with traced(marks):
        pair = OffloadPair(url, workers=2)
        try:
            warm_up(pair)
            for _ in range(n):
                marks.clear()
                started = time.perf_counter()
                pair.edge.submit("noop", b"x" * 64).result(5.0)
                ended = time.perf_counter()
                labels = ("submit", *(label for label, _ in marks), "caller woken")
                times = [0.0, *((at - started) * 1e6 for _, at in marks), (ended - started) * 1e6]
                sequences.setdefault(labels, []).append(times)
        finally:
            pair.close()
    # Threads interleave differently now and then (a heartbeat, a probe): keep the usual sequence.
    labels, rows = max(sequences.items(), key=lambda item: len(item[1]))
    return labels, [statistics.median(column) for column in zip(*rows, strict=True)], len(rows)


def warm_up(pair: OffloadPair) -> None:
    for _ in range(200):
        pair.round_trip()
    time.sleep(0.3)


def print_trace(labels: tuple[str, ...], medians: list[float], kept: int, n: int) -> None:
    print(f"  {kept} of {n} round trips took the usual path; medians since submit():")
    previous = 0.0
    for label, at in zip(labels, medians, strict=True):
        print(f"    {label:34s} {at:8.1f} us   +{at - previous:6.1f}")
        previous = at


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500, help="traced round trips (after warm-up)")
    parser.add_argument("--broker", choices=("mosquitto", "amqtt"), default="mosquitto")
    args = parser.parse_args(argv)
    start: Callable[[], contextlib.AbstractContextManager[tuple[str, int]]] = (
        mosquitto if args.broker == "mosquitto" else amqtt_subprocess)
    with start() as (host, port):
        url = f"mqtt://{host}:{port}"
        raw = RawPahoPair(host, port, 1, b"x" * 64)
        try:
            for _ in range(100):
                raw.round_trip()
            raw_p50 = statistics.median(raw.round_trip() for _ in range(args.n)) * 1e6
        finally:
            raw.close()
        pair = OffloadPair(url, workers=2)
        try:
            warm_up(pair)
            untraced = statistics.median(pair.round_trip() for _ in range(args.n)) * 1e6
        finally:
            pair.close()
        labels, medians, kept = trace(url, args.n)
    print(f"{args.broker} on {url}: raw paho QoS 1 ping-pong p50 {raw_p50:.1f} us; "
          f"offloaded no-op p50 {untraced:.1f} us untraced ({untraced / raw_p50:.2f}x)")
    print_trace(labels, medians, kept, args.n)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
