"""A bounded fuzz run: hostile payloads over every topic a server and a device subscribe to.

Starts a Mosquitto (:class:`topics.brokers.MosquittoBroker`), one CloudAgent (serving a pool too)
and one EdgeAgent on it, then publishes ``--count`` payloads (default 100,000) from
``bench/hostile.py``, the families ``tests/test_wire_hostile.py`` checks, spread over the server's
task, pool and ping inboxes and the device's result, pong, ping, heartbeat and state subscriptions.
It publishes in batches and waits for both agents to have handled each batch, so no queue grows.

Reported: the payloads per family and per target; both transports still connected (disconnects,
handler errors, dispatch drops); bad input per reason from both agents' ``stats()`` beside what the
codec, run here on every payload, says each should be refused for; RSS (VmRSS) at start and end and
the peak (VmHWM); and whether a valid task submitted afterwards is answered by the server.

    python -m bench.fuzz_agents [--count 100000] [--seed 1] [--batch 500] [--timeout 900]
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent_common.registry import TaskRegistry, load_tasks
from bench.hostile import FAMILIES, FUZZ_NODE, hostile
from cloud_agent.config import CloudConfig
from cloud_agent.server import CloudAgent
from edge_agent.agent import EdgeAgent, TaskRecord
from edge_agent.config import EdgeConfig
from topics.brokers import MosquittoBroker, mosquitto_binary
from topics.codec import DEFAULT_MAX_PAYLOAD, Codec
from topics.errors import DecodeError
from topics.mqtt import MqttTransport
from topics.names import Kind, TopicTree
from topics.transport import TransportConfig

POOL = "fuzzpool"


@dataclass(frozen=True)
class Target:
    """One subscription of one agent: where payloads of ``kind`` are published."""

    agent: str
    kind: Kind
    topic: str

    @property
    def label(self) -> str:
        return f"{self.agent}:{self.topic.rsplit('/', 2)[-2]}/{self.kind.value}"

    def counted_as(self, reason: str) -> str:
        """The bad-input key the agent counts ``reason`` under (a device prefixes the kind)."""
        return reason if self.agent == "server" else f"{self.kind.value}-{reason}"


def targets(tree: TopicTree) -> list[Target]:
    """Every subscription of both agents (the server's pool inbox included)."""
    return [Target("server", Kind.TASK, tree.task_inbox("srv")),
            Target("server", Kind.TASK, tree.pool_inbox(POOL)), Target("server", Kind.PING, tree.ping("srv")),
            Target("device", Kind.RESULT, tree.result_inbox("dev")),
            Target("device", Kind.PONG, tree.pong("dev")), Target("device", Kind.PING, tree.ping("dev")),
            Target("device", Kind.HEARTBEAT, tree.heartbeat(FUZZ_NODE)),
            Target("device", Kind.STATE, tree.state(FUZZ_NODE))]


def rss_kib(field_name: str = "VmRSS") -> int:
    """This process's resident memory in KiB, from /proc/self/status (VmRSS, or VmHWM: the peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field_name} in /proc/self/status")


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` passes; whether it held."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


@dataclass
class Tally:
    """What was sent, and what the codec says each payload should get, per agent."""

    sent: Counter[str] = field(default_factory=Counter)  # per agent
    families: Counter[str] = field(default_factory=Counter)
    per_target: Counter[str] = field(default_factory=Counter)
    predicted: dict[str, Counter[str]] = field(
        default_factory=lambda: {"server": Counter(), "device": Counter()})
    decoded: dict[str, Counter[str]] = field(  # payloads the codec accepts, per kind
        default_factory=lambda: {"server": Counter(), "device": Counter()})
    wrong_reason: int = 0  # the codec gave another reason than the family's
    rss: list[tuple[int, int]] = field(default_factory=list)  # (payloads sent, VmRSS KiB)


class Fleet:
    """Mosquitto, a server, a device and a fuzzing client, all stopped by :meth:`close`."""

    def __init__(self, tree: TopicTree, max_payload: int) -> None:
        self.broker = MosquittoBroker(max_queued_messages=100_000).start()
        self._stops: list[Callable[[], None]] = [self.broker.close]
        suffix = uuid.uuid4().hex[:6]
        server_config = CloudConfig.model_validate({
            "id": "srv", "broker": self.broker.url, "prefix": tree.prefix, "pools": [POOL], "workers": 2,
            "queue_size": 1000, "heartbeat_interval": 0.5, "grace_period": 0.0, "max_payload": max_payload,
            "log_level": "warning"})
        self.server_transport = MqttTransport(self._config(f"srv-{suffix}"), name="srv")
        self.server = CloudAgent(server_config, self.server_transport, load_tasks("agent_common.demo_tasks"))
        self.server.start()
        self._stops.append(lambda: self.server.stop(grace=0.0))
        device_config = EdgeConfig.model_validate({
            "id": "dev", "broker": self.broker.url, "prefix": tree.prefix, "policy": "remote",
            "probe_interval": 0.5, "heartbeat_interval": 0.5, "max_payload": max_payload})
        self.device_transport = MqttTransport(self._config(f"dev-{suffix}"), name="dev")
        self.device = EdgeAgent(device_config, self.device_transport, TaskRegistry())
        self.device.start()
        self._stops.append(self.device.stop)
        self.fuzzer = MqttTransport(self._config(f"fuzz-{suffix}"), name="fuzzer")
        self.fuzzer.connect()
        self._stops.append(self.fuzzer.close)

    def _config(self, client_id: str) -> TransportConfig:
        return TransportConfig.from_url(self.broker.url, client_id=client_id)

    def handled(self, agent: str) -> int:
        """Messages the agent's transport handed to a handler (or dropped, or saw fail)."""
        counters = (self.server_transport if agent == "server" else self.device_transport).stats()
        return counters["delivered"] + counters["dropped_dispatch_full"] + counters["handler_errors"]

    def bad_input(self, agent: str) -> dict[str, int]:
        stats = self.server.stats() if agent == "server" else self.device.stats()
        return dict(stats["bad_input"])

    def close(self) -> None:
        for stop in reversed(self._stops):
            try:
                stop()
            except Exception as exc:  # noqa: BLE001 - keep closing the rest; the figures are out
                print(f"  (while stopping: {type(exc).__name__}: {exc})", file=sys.stderr)


def run(count: int, seed: int, batch: int, timeout: float, max_payload: int) -> int:
    tree = TopicTree(f"fuzz/{uuid.uuid4().hex[:8]}")
    fleet = Fleet(tree, max_payload)
    try:
        return _fuzz(fleet, tree, count, seed, batch, timeout, max_payload)
    finally:
        fleet.close()


def _fuzz(fleet: Fleet, tree: TopicTree, count: int, seed: int, batch: int, timeout: float,
          max_payload: int) -> int:
    if not wait_until(lambda: any(v.node == "srv" and not v.stale for v in fleet.device.servers()), 15.0):
        print("the device never saw the server: not fuzzing")
        return 2
    gc.collect()
    rss_start, started = rss_kib(), time.monotonic()
    codec, rng, tally = Codec(max_payload=max_payload), random.Random(seed), Tally()
    all_targets = targets(tree)
    base = {agent: fleet.handled(agent) for agent in ("server", "device")}
    sent = 0
    while sent < count and time.monotonic() - started < timeout:
        for _ in range(min(batch, count - sent)):
            target = rng.choice(all_targets)
            item = hostile(rng, target.kind, tree, limit=max_payload)
            try:
                codec.decode(item.data, item.model, topic=target.topic)
                tally.decoded[target.agent][target.label] += 1
            except DecodeError as error:
                tally.predicted[target.agent][target.counted_as(error.reason)] += 1
                tally.wrong_reason += item.reason is not None and error.reason != item.reason
            tally.sent[target.agent] += 1
            tally.families[item.family] += 1
            tally.per_target[target.label] += 1
            fleet.fuzzer.publish(target.topic, item.data, qos=1)
            sent += 1
        for agent in ("server", "device"):  # both have handled all of it (other traffic only adds)
            wait_until(_caught_up(fleet, agent, base[agent], tally), 30.0)
        if sent % max(batch, count // 10) < batch or sent == count:
            tally.rss.append((sent, rss_kib()))
    publishing = time.monotonic() - started
    for agent in ("server", "device"):  # the last counters settle
        wait_until(_counted(fleet, agent, tally), 30.0)
    gc.collect()
    rss_end = rss_kib()
    records: list[TaskRecord] = []
    fleet.device.add_record_listener(records.append)
    try:
        answer: Any = fleet.device.submit("square", {"x": 7}, deadline=10.0).result(15.0)
    except Exception as exc:  # noqa: BLE001 - report it, whatever it is: the point of the run
        answer = f"{type(exc).__name__}: {exc}"
    wait_until(lambda: bool(records), 5.0)
    return _report(fleet, tally, sent, publishing, rss_start, rss_end, answer, records)


def _caught_up(fleet: Fleet, agent: str, base: int, tally: Tally) -> Callable[[], bool]:
    return lambda: fleet.handled(agent) - base >= tally.sent[agent]


def _counted(fleet: Fleet, agent: str, tally: Tally) -> Callable[[], bool]:
    def check() -> bool:
        counted = fleet.bad_input(agent)
        return all(counted.get(key, 0) >= n for key, n in tally.predicted[agent].items())
    return check


def _report(fleet: Fleet, tally: Tally, sent: int, seconds: float, rss_start: int, rss_end: int,
            answer: Any, records: list[TaskRecord]) -> int:
    print(f"\nfuzz run: {sent} payloads in {seconds:.1f} s ({sent / max(seconds, 1e-9):,.0f}/s), "
          f"Mosquitto {fleet.broker.url}")
    print("  families: " + ", ".join(f"{name} {tally.families[name]}" for name in FAMILIES))
    print("  targets:  " + ", ".join(f"{label} {n}" for label, n in sorted(tally.per_target.items())))
    if tally.wrong_reason:
        print(f"  !! {tally.wrong_reason} payloads got another reason than their family's")
    ok = True
    for agent, transport in (("server", fleet.server_transport), ("device", fleet.device_transport)):
        counters = transport.stats()
        counted = fleet.bad_input(agent)
        keys = sorted(set(counted) | set(tally.predicted[agent]))
        print(f"\n  {agent}: connected {'yes' if transport.connected else 'NO'}, disconnects "
              f"{counters['disconnects']}, reconnects {counters['reconnects']}, handler errors "
              f"{counters['handler_errors']}, dispatch drops {counters['dropped_dispatch_full']}; "
              f"{tally.sent[agent]} payloads, {sum(tally.decoded[agent].values())} of them decode")
        print(f"    {'bad input reason':28} {'codec says':>10} {'counted':>9}")
        for key in keys:
            predicted, got = tally.predicted[agent].get(key, 0), counted.get(key, 0)
            mark = "" if predicted == got else ("  (agent-level check)" if predicted == 0 else "  MISMATCH")
            print(f"    {key:28} {predicted:>10} {got:>9}{mark}")
            ok &= predicted <= got
        print(f"    {'total':28} {sum(tally.predicted[agent].values()):>10} {sum(counted.values()):>9}")
        ok &= transport.connected and counters["handler_errors"] == 0
    if fleet.server.stats().get("results_not_sent"):
        print(f"  server results not sent: {fleet.server.stats()['results_not_sent']}")
    target = records[0].target if records else "?"
    print(f"\n  RSS: start {rss_start / 1024:.1f} MiB, end {rss_end / 1024:.1f} MiB "
          f"({(rss_end - rss_start) / 1024:+.1f} MiB), peak {rss_kib('VmHWM') / 1024:.1f} MiB")
    print("  RSS along the run: " + ", ".join(f"{n:,}: {kib / 1024:.1f}" for n, kib in tally.rss))
    ok &= rss_end - rss_start < 50 * 1024
    print(f"  valid task afterwards: square(7) -> {answer!r} (ran on {target})")
    ok &= answer == {"y": 49} and target == "srv"
    print(f"\n  verdict: {'ok' if ok else 'PROBLEMS (see above)'}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fuzz_agents",
                                     description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--count", type=int, default=100_000,
                        help="payloads to publish (default %(default)s)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default %(default)s)")
    parser.add_argument("--batch", type=int, default=500, help="payloads between waits (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="stop publishing after this many seconds (default %(default)s)")
    parser.add_argument("--max-payload", type=int, default=DEFAULT_MAX_PAYLOAD,
                        help="both agents' max_payload (default %(default)s)")
    args = parser.parse_args(argv)
    if mosquitto_binary() is None:
        print("mosquitto not installed: apt-get install -y mosquitto")
        return 2
    if args.count < 1 or args.batch < 1:
        parser.error("--count and --batch must be positive")
    return run(args.count, args.seed, args.batch, args.timeout, args.max_payload)


if __name__ == "__main__":
    raise SystemExit(main())
