"""How long the automatic split takes to bring every stage home after the server slows down.

    python -m bench.split_recovery [--runs 5] [--delay 0.2] [--slowdown 40] [--window 0.5]

As ``tests/test_vision_live.py`` does, on a Mosquitto subprocess: one cloud agent serving the
``ball`` pipeline (2 workers, in this process, so its per-frame delay can be changed mid-run) and
one camera whose device is emulated ``--slowdown`` times slower. Per run the target is set from
the same run's measured rates (all local, and split 2), a third of the way above all local, so
the camera offloads. Once the split has settled, the server needs ``--delay`` s more per frame
(with two workers, ``2 / delay`` frames/s at most, under the all-local rate). Read from
``controller.history``: the changes after the slowdown, and the time from the slowdown until the
split reached all local (``never``: not within the run), in seconds and in controller windows.
Also the time from the first slowed result the agent saw (the controller's first evidence).
``--trace`` prints every evaluation (modelled fps per split) of runs slower than two windows.

It reads only ``Camera``, ``CameraOptions`` and ``SplitController.history``/``split``, which older
versions of the camera have too: run this file by path with ``PYTHONPATH`` at another checkout to
measure that code (the imported modules are printed).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import edge_agent.split
from agent_common.registry import TaskRegistry
from cloud_agent.config import CloudConfig
from cloud_agent.server import CloudAgent
from edge_agent.agent import EdgeAgent
from edge_agent.config import EdgeConfig
from edge_agent.records import TaskRecord
from examples.vision.ball import STAGES, SlowingServer
from examples.vision.camera import Camera, CameraOptions, FrameOutcome
from topics.brokers import MosquittoBroker, mosquitto_binary
from topics.mqtt import MqttTransport
from topics.transport import TransportConfig

N = len(STAGES)


@dataclass
class Fleet:
    """One cloud agent and one edge agent on a broker, under a topic prefix of their own."""

    server: CloudAgent
    agent: EdgeAgent
    delayed: SlowingServer

    @classmethod
    def start(cls, url: str) -> Fleet:
        suffix, prefix = uuid.uuid4().hex[:6], f"bench/{uuid.uuid4().hex[:8]}"
        delayed = SlowingServer()
        cloud = CloudConfig(id=f"srv-{suffix}", broker=url, prefix=prefix,
                            tasks=["examples.vision.ball"], workers=2, heartbeat_interval=0.3,
                            grace_period=0.5)
        server = CloudAgent(cloud, MqttTransport(TransportConfig.from_url(url, client_id=cloud.id)),
                            delayed.registry)
        edge = EdgeConfig(id=f"cam-{suffix}", broker=url, prefix=prefix, policy="remote",
                          max_attempts=1, probe_interval=0.3)
        agent = EdgeAgent(edge, MqttTransport(TransportConfig.from_url(url, client_id=edge.id)),
                          TaskRegistry())
        server.start()
        agent.start()
        deadline = time.monotonic() + 10.0
        while not any(v.rtt is not None and "ball" in v.tasks and not v.stale
                      for v in agent.servers()):
            if time.monotonic() > deadline:
                raise RuntimeError("no server became usable within 10 s")
            time.sleep(0.02)
        return cls(server, agent, delayed)

    def stop(self) -> None:
        self.agent.stop()
        self.server.stop(grace=0.2)


@dataclass
class Recovery:
    """One run: what the controller did after the slowdown."""

    target: float
    before: int
    path: list[int]
    """The split of every change after the slowdown, up to and including all local."""
    to_local_s: float
    """Slowdown to the change to all local (``inf``: never)."""
    from_evidence_s: float
    """First slowed result seen by the agent to that change (``inf``: never)."""
    window_s: float
    reason: str
    decisions: list[str]
    """Every evaluation from the slowdown to all local: time, split, modelled fps per split."""

    @property
    def windows(self) -> float:
        return self.to_local_s / self.window_s


def measure_fps(agent: EdgeAgent, split: int, slowdown: float, frames: int) -> float:
    return Camera(agent, CameraOptions(frames=frames, split=split, slowdown=slowdown)).run().fps


def run_once(fleet: Fleet, *, slowdown: float, delay: float, window_s: float,
             clock: Callable[[], float] = time.monotonic) -> Recovery:
    local_fps = measure_fps(fleet.agent, N, slowdown, 40)
    offloaded_fps = measure_fps(fleet.agent, 2, slowdown, 60)
    target = float(round(local_fps + 0.4 * (offloaded_fps - local_fps)))
    slow_at = int(3.0 * target)  # about 3 s at the target: the split has settled by then
    frames = slow_at + int(4.0 * local_fps)  # about 4 s more once all local
    camera = Camera(fleet.agent, CameraOptions(frames=frames, target_fps=target,
                                               slowdown=slowdown, window_s=window_s,
                                               probe_interval_s=2.0, frame_timeout=1.0),
                    clock=clock)
    controller = camera.controller
    if controller is None:
        raise RuntimeError("the camera built no controller in automatic mode")
    marks: dict[str, float] = {}
    decisions: list[tuple[float, Any]] = []
    update = controller.update

    def recording_update(now: float) -> Any:  # every evaluation, for --trace
        decision = update(now)
        if decision is not None:
            decisions.append((now, decision))
        return decision

    controller.update = recording_update  # type: ignore[method-assign]

    def on_frame(outcome: FrameOutcome) -> None:
        if outcome.frame == slow_at:
            marks["before"] = controller.split
            marks["slowed"] = clock()
            fleet.delayed.seconds = delay

    def on_record(record: TaskRecord) -> None:
        if ("slowed" in marks and "evidence" not in marks and record.service_time is not None
                and record.service_time >= delay):
            marks["evidence"] = clock()

    fleet.agent.add_record_listener(on_record)
    try:
        camera.run(on_frame)
    finally:
        fleet.agent.remove_record_listener(on_record)
        fleet.delayed.seconds = 0.0
    slowed = marks["slowed"]
    after = [change for change in controller.history if change.time >= slowed]
    reached = next((change for change in after if change.k == N), None)
    path = [change.k for change in after[:after.index(reached) + 1]] if reached else \
        [change.k for change in after]
    to_local = reached.time - slowed if reached else math.inf
    evidence = marks.get("evidence")
    from_evidence = reached.time - evidence if reached and evidence is not None else math.inf
    until = reached.time if reached else math.inf
    trace = [f"{now - slowed:+.2f} s: split {d.k}; " + " ".join(
        f"{c.k}:{c.fps:.1f}" for c in d.candidates) for now, d in decisions
        if slowed - window_s <= now <= until]
    return Recovery(target, int(marks["before"]), path, to_local, from_evidence, window_s,
                    reached.reason if reached else (after[-1].reason if after else ""), trace)


def seconds(value: float) -> str:
    return "never" if math.isinf(value) else f"{value:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--delay", type=float, default=0.2, help="extra server seconds per frame")
    parser.add_argument("--slowdown", type=float, default=40.0, help="device emulated this slower")
    parser.add_argument("--window", type=float, default=0.5, help="controller window, seconds")
    parser.add_argument("--trace", action="store_true",
                        help="print every evaluation of runs slower than two windows")
    args = parser.parse_args(argv)
    if mosquitto_binary() is None:
        print("mosquitto is not installed: nothing to measure", file=sys.stderr)
        return 2
    print(f"split recovery: {os.cpu_count()} cores, python {sys.version.split()[0]}, "
          f"controller from {edge_agent.split.__file__}")
    print(f"server +{args.delay * 1e3:.0f} ms per frame mid-run, device x{args.slowdown:g}, "
          f"window {args.window:g} s, {args.runs} runs")
    results: list[Recovery] = []
    with MosquittoBroker() as broker:
        for run in range(1, args.runs + 1):
            fleet = Fleet.start(broker.url)
            try:
                result = run_once(fleet, slowdown=args.slowdown, delay=args.delay,
                                  window_s=args.window)
            finally:
                fleet.stop()
            results.append(result)
            print(f"  run {run}: target {result.target:.0f} fps, split {result.before} -> "
                  f"{' -> '.join(map(str, result.path)) or '(no change)'}; all local after "
                  f"{seconds(result.to_local_s)} s = {result.windows:.1f} windows "
                  f"({seconds(result.from_evidence_s)} s after the first slowed result); "
                  f"{result.reason[:90]!r}")
            if args.trace and not result.windows <= 2.0:
                for line in result.decisions:
                    print(f"      {line}")
    to_local = [r.to_local_s for r in results]
    windows = [r.windows for r in results]
    steps = [len(r.path) for r in results]
    never = sum(math.isinf(v) for v in to_local)
    print(f"time to all local: median {seconds(statistics.median(to_local))} s, "
          f"max {seconds(max(to_local))} s; windows: median {statistics.median(windows):.1f}, "
          f"max {max(windows):.1f}; changes on the way: median {statistics.median(steps):g}, "
          f"max {max(steps)}; never reached all local: {never}/{len(results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
