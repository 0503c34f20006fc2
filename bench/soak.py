"""Soak: no-op tasks at a steady rate through one device and two servers on Mosquitto, for minutes.

Each of the three agents runs in a process of its own (so that each one's memory can be read), all
on one Mosquitto. The device submits ``--rate`` no-op tasks a second on a fixed schedule (the
``remote`` policy: every task goes to one of the servers) and records each round trip, submit to
result, in a buffer allocated before the run: the benchmark's bookkeeping takes no memory that
grows. Every minute it prints p50/p99 of the round trips that ended in that minute, and this
script adds each process's resident memory (``VmRSS``) read at the same moment.

Verdict (issue 14): p99 at most 5x p50 in every minute; each process's memory flat within 10%
from the end of the first minute (warm-up) on; every task answered, none failed.

    python -m bench.soak [--minutes 10] [--rate 1000]

Bounded: ``--minutes`` (at most 60), at most ``--max-in-flight`` tasks outstanding (the submitter
waits beyond it and counts it), every child process stopped at the end or after a timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import IO, Any

import numpy as np

P99_OVER_P50 = 5.0
MEMORY_DRIFT = 0.10
READY_TIMEOUT = 20.0


def rss_mib(pid: int) -> float:
    """Resident memory of process ``pid`` in MiB (``VmRSS`` from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


# ---------------------------------------------------------------------------------- child roles

def run_server(url: str, prefix: str, node_id: str) -> int:
    """A cloud agent running the demo tasks until its stdin closes."""
    from agent_common.registry import load_tasks
    from cloud_agent.config import CloudConfig
    from cloud_agent.server import CloudAgent
    from topics.mqtt import MqttTransport

    config = CloudConfig.model_validate({"id": node_id, "broker": url, "prefix": prefix, "workers": 2,
                                         "queue_size": 4096, "heartbeat_interval": 1.0})
    agent = CloudAgent(config, MqttTransport(config.transport_config()),
                       load_tasks("agent_common.demo_tasks"))
    agent.start()
    print("ready", flush=True)
    sys.stdin.read()  # the parent closes it to stop us
    agent.stop(grace=2.0)
    return 0


class Minutes:
    """Round trips by the minute they ended in, in two buffers allocated once (no growth)."""

    def __init__(self, capacity: int) -> None:
        self._buffers = (np.empty(capacity), np.empty(capacity))
        self._current = 0
        self._count = 0
        self.dropped = 0
        """Round trips beyond a buffer's capacity (not in that minute's percentiles)."""
        self.failed = 0
        self.first_failure = ""
        self._lock = threading.Lock()

    def add(self, seconds: float) -> None:
        with self._lock:
            if self._count < len(self._buffers[0]):
                self._buffers[self._current][self._count] = seconds
                self._count += 1
            else:
                self.dropped += 1

    def fail(self, error: BaseException) -> None:
        with self._lock:
            self.failed += 1
            if not self.first_failure:
                self.first_failure = f"{type(error).__name__}: {error}"[:300]

    def roll(self) -> np.ndarray[Any, Any]:
        """The finished minute's round trips (valid until the next roll); a new minute starts."""
        with self._lock:
            done, count = self._buffers[self._current], self._count
            self._current, self._count = 1 - self._current, 0
        return done[:count]


def run_device(url: str, prefix: str, node_id: str, servers: list[str], args: argparse.Namespace) -> int:
    """The device: paced no-op tasks for ``args.minutes``; one JSON line per minute on stdout."""
    from agent_common.registry import TaskRegistry
    from edge_agent.agent import EdgeAgent
    from edge_agent.config import EdgeConfig
    from topics.mqtt import MqttTransport
    from topics.transport import TransportConfig

    config = EdgeConfig.model_validate({"id": node_id, "broker": url, "prefix": prefix, "policy": "remote",
                                        "heartbeat_interval": 1.0, "default_timeout": 10.0})
    edge = EdgeAgent(config, MqttTransport(TransportConfig.from_url(url, client_id=node_id)), TaskRegistry())
    edge.start()
    deadline = time.monotonic() + READY_TIMEOUT
    while {view.node for view in edge.servers() if not view.stale} < set(servers):
        if time.monotonic() > deadline:
            raise RuntimeError("the device never saw both servers' heartbeats")
        time.sleep(0.05)
    minutes = Minutes(int(args.rate * 60 * 1.5) + 1000)
    in_flight = threading.BoundedSemaphore(args.max_in_flight)
    payload = b"x" * 64
    print("ready", flush=True)

    def finished_from(started: float) -> Callable[[Future[Any]], None]:
        def finished(future: Future[Any]) -> None:
            ended = time.perf_counter()
            error = future.exception()
            if error is None:
                minutes.add(ended - started)
            else:
                minutes.fail(error)
            in_flight.release()
        return finished

    interval = 1.0 / args.rate
    begin = time.perf_counter()
    submitted = waited = 0
    for minute in range(1, args.minutes + 1):
        minute_end = begin + 60.0 * minute
        while True:
            due = begin + submitted * interval
            if due >= minute_end:
                break
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            if not in_flight.acquire(blocking=False):
                waited += 1
                if not in_flight.acquire(timeout=30.0):
                    raise RuntimeError(f"{args.max_in_flight} tasks outstanding for 30 s")
            started = time.perf_counter()  # before submit(): the round trip includes deciding and sending
            edge.submit("noop", payload).add_done_callback(finished_from(started))
            submitted += 1
        rest = minute_end - time.perf_counter()
        if rest > 0:
            time.sleep(rest)
        trips = minutes.roll()
        line = {"minute": minute, "n": len(trips), "submitted": submitted, "waited": waited,
                "failed": minutes.failed, "dropped": minutes.dropped,
                "p50_ms": float(np.percentile(trips, 50)) * 1e3 if len(trips) else None,
                "p99_ms": float(np.percentile(trips, 99)) * 1e3 if len(trips) else None,
                "max_ms": float(trips.max()) * 1e3 if len(trips) else None}
        print(json.dumps(line), flush=True)
    for _ in range(args.max_in_flight):  # every outstanding task answered (or timed out)
        if not in_flight.acquire(timeout=15.0):
            break
    trips = minutes.roll()
    print(json.dumps({"final": True, "submitted": submitted, "answered_late": len(trips),
                      "failed": minutes.failed, "first_failure": minutes.first_failure,
                      "counters": {key: value for key, value in edge.stats().items()
                                   if isinstance(value, int) and value}}), flush=True)
    edge.stop()
    return 0


# ---------------------------------------------------------------------------------- the parent

def spawn(role: str, url: str, prefix: str, node_id: str, extra: list[str]) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "bench.soak", "--role", role, "--url", url, "--prefix", prefix,
               "--id", node_id, *extra]
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def read_line(stream: IO[str] | None, what: str) -> str:
    assert stream is not None
    line = stream.readline()
    if not line:
        raise RuntimeError(f"{what} ended early")
    return line.strip()


def run_parent(args: argparse.Namespace) -> int:
    from bench.transport_rtt import mosquitto

    prefix = f"bench/soak/{uuid.uuid4().hex[:8]}"
    servers = [f"srv-{index}-{uuid.uuid4().hex[:4]}" for index in range(2)]
    device_id = f"edge-{uuid.uuid4().hex[:6]}"
    children: list[subprocess.Popen[str]] = []
    ok = True
    with mosquitto() as (host, port):
        url = f"mqtt://{host}:{port}"
        print(f"soak: {args.minutes} min at {args.rate} no-op tasks/s, 1 device, 2 servers, Mosquitto "
              f"on {url}")
        try:
            for server in servers:
                children.append(spawn("server", url, prefix, server, []))
            for child, server in zip(children, servers, strict=True):
                if read_line(child.stdout, f"server {server}") != "ready":
                    raise RuntimeError(f"server {server} did not start")
            device = spawn("device", url, prefix, device_id,
                           ["--minutes", str(args.minutes), "--rate", str(args.rate),
                            "--max-in-flight", str(args.max_in_flight), "--servers", ",".join(servers)])
            children.append(device)
            if read_line(device.stdout, "device") != "ready":
                raise RuntimeError("device did not start")
            pids = {"device": device.pid, "server 1": children[0].pid, "server 2": children[1].pid}
            print(f"\n  {'min':>3} {'tasks':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'p99/p50':>8}  "
                  + "  ".join(f"{name + ' MiB':>12}" for name in pids))
            memory: dict[str, list[float]] = {name: [] for name in pids}
            while True:
                report = json.loads(read_line(device.stdout, "device"))
                if report.get("final"):
                    break
                for name, pid in pids.items():
                    memory[name].append(rss_mib(pid))
                p50, p99 = report["p50_ms"], report["p99_ms"]
                spread = p99 / p50 if p50 else float("inf")
                ok &= spread <= P99_OVER_P50
                print(f"  {report['minute']:>3} {report['n']:>7} {p50 or 0:>8.3f} {p99 or 0:>8.3f} "
                      f"{report['max_ms'] or 0:>8.1f} {spread:>7.2f}x  "
                      + "  ".join(f"{memory[name][-1]:>12.1f}" for name in pids), flush=True)
            print(f"\n  submitted {report['submitted']}, failed {report['failed']}"
                  f"{' (' + report['first_failure'] + ')' if report['failed'] else ''}, "
                  f"device counters {report['counters']}")
            ok &= report["failed"] == 0
            verdict = "meets" if ok else "MISSES"
            print(f"  goal p99 <= {P99_OVER_P50:.0f}x p50 every minute, nothing failed: {verdict}")
            for name, values in memory.items():
                after = values  # read at the end of each minute: the warm-up one is the first
                drift = (max(after) - min(after)) / min(after) if after else 0.0
                flat = "meets" if drift <= MEMORY_DRIFT else "MISSES"
                print(f"  {name:9} RSS {min(after):.1f}..{max(after):.1f} MiB after warm-up, drift "
                      f"{drift * 100:.1f}% (goal <= {MEMORY_DRIFT * 100:.0f}%): {flat}")
        finally:
            for child in children:
                if child.stdin is not None and not child.stdin.closed:
                    child.stdin.close()
            for child in children:
                try:
                    child.wait(timeout=20.0)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait(timeout=5.0)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--minutes", type=int, default=10, choices=range(1, 61), metavar="1..60")
    parser.add_argument("--rate", type=int, default=1000, help="tasks per second")
    parser.add_argument("--max-in-flight", type=int, default=5000)
    parser.add_argument("--role", choices=("parent", "server", "device"), default="parent",
                        help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    parser.add_argument("--id", help=argparse.SUPPRESS)
    parser.add_argument("--servers", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "server":
        return run_server(args.url, args.prefix, args.id)
    if args.role == "device":
        return run_device(args.url, args.prefix, args.id, args.servers.split(","), args)
    return run_parent(args)


if __name__ == "__main__":
    raise SystemExit(main())
