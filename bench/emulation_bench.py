"""Emulation overhead: how many agents and messages per second one machine sustains.

Real agents (every device an EdgeAgent, every server a CloudAgent, each on its own MQTT connection)
in this one process, driven by a Poisson workload with the ``remote`` policy so that every task
crosses the broker twice. For each fleet size the offered load rises; a step is sustained when
almost every task completes and the p95 latency stays under ``--p95-limit`` ms. Prints, per broker
and fleet size, the offered and achieved task rates, the ratio achieved/offered, the broker messages
per second (tasks, results, heartbeats, pings) and latencies.

    python -m bench.emulation_bench [--devices 10,40] [--servers 4] [--rates 200,400,800] [--seconds 4]

Bounded: every step runs ``--seconds`` of workload plus its drain; the whole run stops by itself.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
from collections.abc import Iterator

from sim.emulate import run_emulation
from sim.report import summarize
from sim.scenario import Scenario, parse_scenario
from topics.brokers import EmbeddedBroker, MosquittoBroker, mosquitto_binary


def fleet(devices: int, servers: int, total_rate: float, seconds: float) -> Scenario:
    """``devices`` devices offering ``total_rate`` tasks/s of 1 ms work to ``servers`` servers."""
    return parse_scenario({
        "name": f"bench-{devices}x{servers}", "duration": seconds, "seed": 11,
        "heartbeat_interval": 1.0, "ping_interval": 2.0, "timeout_min": 2.0, "max_attempts": 2,
        "policies": ["remote"],
        "tasks": {"noop": {"service_time": 0.001, "result_bytes": 64}},
        "devices": [{"name": "dev", "count": devices, "task": "noop", "payload_bytes": 256,
                     "workload": {"kind": "poisson", "rate": total_rate / devices}}],
        "servers": [{"name": "srv", "count": servers, "workers": 4, "queue_size": 10_000}],
        "links": {"default": {"delay": 0.0, "jitter": 0.0, "bandwidth": 1e9}},
    }, "bench")


@contextlib.contextmanager
def broker(kind: str) -> Iterator[str]:
    if kind == "amqtt":
        with EmbeddedBroker() as embedded:
            yield embedded.url
    else:
        with MosquittoBroker() as spawned:
            yield spawned.url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="10,40", help="fleet sizes (devices), comma-separated")
    parser.add_argument("--servers", type=int, default=4)
    parser.add_argument("--rates", default="200,400,800", help="offered tasks/s, comma-separated")
    parser.add_argument("--seconds", type=float, default=4.0, help="workload seconds per step")
    parser.add_argument("--p95-limit", type=float, default=250.0, help="ms; above it a step fails")
    parser.add_argument("--brokers", default="amqtt,mosquitto")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    kinds = [k for k in args.brokers.split(",") if k != "mosquitto" or mosquitto_binary()]
    print(f"{'broker':10} {'agents':>6} {'offered/s':>9} {'done/s':>7} {'ratio':>6} {'msgs/s':>7} "
          f"{'p50 ms':>7} {'p95 ms':>7}  sustained")
    for kind in kinds:
        with broker(kind) as url:
            for devices in (int(d) for d in args.devices.split(",")):
                for rate in (float(r) for r in args.rates.split(",")):
                    scenario = fleet(devices, args.servers, rate, args.seconds)
                    started = time.monotonic()
                    result = run_emulation(scenario, "remote", broker_url=url)
                    summary = summarize(result.records, duration=args.seconds)
                    offered = len(result.records) / args.seconds
                    agents = devices + args.servers
                    beats = agents / scenario.heartbeat_interval
                    pings = 2 * devices * args.servers / scenario.ping_interval
                    messages = 2 * summary.throughput + beats + pings
                    ok = summary.completed >= 0.99 * summary.tasks and (summary.p95 or 1e9) * 1000 \
                        < args.p95_limit
                    print(f"{kind:10} {agents:6d} {offered:9.0f} {summary.throughput:7.0f} "
                          f"{summary.throughput / offered if offered else 0:6.2f} {messages:7.0f} "
                          f"{(summary.p50 or 0) * 1000:7.1f} {(summary.p95 or 0) * 1000:7.1f}  "
                          f"{'yes' if ok else 'no'} ({time.monotonic() - started:.0f} s)", flush=True)
                    if not ok:
                        break


if __name__ == "__main__":
    main()
