"""The offloaded round trip across a site-to-cloud Mosquitto bridge, against one broker, same run.

One cloud agent (``noop``) and one edge agent (policy ``remote``): first both on one Mosquitto, then
the device on a site Mosquitto bridged to the cloud Mosquitto the server uses (the bridge of
``topics.brokers.MosquittoBridge``, as ``docs/deployment.md`` configures it). Sequential no-op tasks,
p50/p99 of the device's measured latency, alternating the two setups ``--rounds`` times so the
machine's drift falls on both; prints the ratio bridged / single.

    python -m bench.bridge_rtt [--tasks 300] [--rounds 3]

Bounded: ``tasks x rounds x 2`` tasks, each with a 5 s deadline; it ends by itself.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Sequence

from agent_common.registry import load_tasks
from cloud_agent.config import CloudConfig
from cloud_agent.server import CloudAgent
from edge_agent.agent import EdgeAgent
from edge_agent.config import EdgeConfig
from edge_agent.records import TaskRecord
from topics.brokers import MosquittoBridge, MosquittoBroker
from topics.mqtt import MqttTransport
from topics.transport import TransportConfig

BRIDGES = (("bridged, QoS 1 both ways", None), ("bridged, QoS 1 out, QoS 0 in", 0))


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(device_url: str, server_url: str, prefix: str, tasks: int) -> list[float]:
    """Round trips (s) of ``tasks`` sequential no-ops from a device on one broker to a server on another."""
    server_id, device_id = f"srv-{uuid.uuid4().hex[:6]}", f"dev-{uuid.uuid4().hex[:6]}"
    cloud = CloudConfig(id=server_id, broker=server_url, prefix=prefix, workers=2, heartbeat_interval=0.5,
                        grace_period=0.0)
    server = CloudAgent(cloud, MqttTransport(cloud.transport_config()), load_tasks("agent_common.demo_tasks"))
    edge = EdgeConfig(id=device_id, broker=device_url, prefix=prefix, policy="remote", probe_interval=0.5)
    device = EdgeAgent(edge, MqttTransport(TransportConfig.from_url(device_url, client_id=device_id)),
                       load_tasks("agent_common.demo_tasks"))
    records: list[TaskRecord] = []
    server.start()
    device.start()
    try:
        end = time.monotonic() + 15.0
        while time.monotonic() < end and not any(v.node == server_id and not v.stale and "noop" in v.tasks
                                                 for v in device.servers()):
            time.sleep(0.02)
        device.add_record_listener(records.append)
        for _ in range(20):  # warm-up: connections, caches, the first estimates
            device.submit("noop", 0, deadline=5.0).result(timeout=10.0)
        records.clear()
        for n in range(tasks):
            device.submit("noop", n, deadline=5.0).result(timeout=10.0)
        return [r.latency for r in records if r.latency is not None and r.target == server_id]
    finally:
        device.stop()
        server.stop(grace=0.0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    prefix = f"bench/{uuid.uuid4().hex[:6]}"
    cloud = MosquittoBroker().start()
    sites = {name: MosquittoBroker(bridge=MosquittoBridge(
        address=f"{cloud.host}:{cloud.port}", prefixes=(prefix,), name=f"site-{uuid.uuid4().hex[:6]}",
        incoming_qos=incoming)).start() for name, incoming in BRIDGES}
    runs: dict[str, list[float]] = {"one broker": [], **{name: [] for name, _ in BRIDGES}}
    try:
        for _ in range(args.rounds):
            runs["one broker"] += measure(cloud.url, cloud.url, prefix, args.tasks)
            for name, site in sites.items():
                runs[name] += measure(site.url, cloud.url, prefix, args.tasks)
    finally:
        for site in sites.values():
            site.close()
        cloud.close()
    single = runs["one broker"]
    print("| setup | tasks | p50 ms | p99 ms | mean ms | p50 vs one broker |")
    print("|---|---|---|---|---|---|")
    for name, values in runs.items():
        print(f"| {name} | {len(values)} | {1000 * _quantile(values, 0.5):.3f} | "
              f"{1000 * _quantile(values, 0.99):.3f} | {1000 * statistics.mean(values):.3f} | "
              f"{_quantile(values, 0.5) / _quantile(single, 0.5):.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
