"""Vision pipeline: frames per second at every split point, and time to converge in automatic mode.

    python -m bench.vision_bench [--frames 200] [--slowdowns 1,25] [--brokers amqtt,mosquitto]

For each broker (the embedded amqtt broker in this process, Mosquitto as a subprocess) a cloud
agent serving ``examples.vision.ball`` runs as a subprocess (its own interpreter, as on a real
server), and the camera runs here. Every row is compared with the all-local run (split 7) of the
same broker and slowdown, measured in the same run. ``slowdown`` emulates a device that runs the
vision stages that many times slower than this machine (sending costs what it costs here).

Automatic mode: target = midway between all local and the best offloaded rate just measured;
reported are the time until the split last changed and until a 1-second window delivered 90% of
the target.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

from bench.common import ratio
from examples.vision.ball import STAGES
from examples.vision.camera import Camera, CameraOptions, make_agent, wait_for_server
from topics.brokers import EmbeddedBroker, MosquittoBroker, mosquitto_binary

N = len(STAGES)


@contextlib.contextmanager
def broker_running(kind: str) -> Iterator[str]:
    broker: Any = EmbeddedBroker() if kind == "amqtt" else MosquittoBroker()
    broker.start()
    try:
        yield broker.url
    finally:
        broker.close()


@contextlib.contextmanager
def server_process(url: str, prefix: str) -> Iterator[subprocess.Popen[bytes]]:
    """``cloud-agent run`` for the ball pipeline, stopped (by its own PID) afterwards."""
    command = [sys.executable, "-m", "cloud_agent", "run", "--broker", url, "--prefix", prefix,
               "--id", f"bench-{uuid.uuid4().hex[:6]}", "--tasks", "examples.vision.ball",
               "--workers", "2", "--heartbeat-interval", "0.5", "--log-level", "warning"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def run_split(agent: Any, split: int, frames: int, slowdown: float) -> tuple[float, float, str]:
    camera = Camera(agent, CameraOptions(frames=frames, split=split, slowdown=slowdown))
    report = camera.run()
    where = ",".join(f"{k}:{v}" for k, v in sorted(report.where.items()))
    return report.fps, report.latency_p50_s, where


def converge(agent: Any, target: float, slowdown: float, seconds: float) -> dict[str, Any]:
    options = CameraOptions(frames=int(target * seconds), target_fps=target, slowdown=slowdown,
                            window_s=0.5, probe_interval_s=2.0)
    camera = Camera(agent, options)
    report = camera.run()
    assert camera.controller is not None
    history = camera.controller.history
    settled_at = history[-1].time - camera._start if history else 0.0
    reached = next((t + 1.0 for t, rate in report.fps_timeline if rate >= 0.9 * target), None)
    return {"fps": report.fps, "final_split": camera.controller.split, "changes": len(history),
            "split_settled_s": settled_at, "target_reached_s": reached,
            "local_share": report.local_share}


def bench_broker(kind: str, frames: int, slowdowns: list[float]) -> None:
    prefix = f"bench/{uuid.uuid4().hex[:8]}"
    with broker_running(kind) as url, server_process(url, prefix) as server:
        agent = make_agent(url, f"cam-{uuid.uuid4().hex[:6]}", prefix=prefix)
        agent.start()
        try:
            if not wait_for_server(agent, "ball", 15.0):
                error = server.stderr.read().decode() if server.poll() is not None and server.stderr \
                    else "still starting"
                print(f"{kind}: no server answered ({error.strip()[:300]})")
                return
            run_split(agent, 3, 30, 1.0)  # warm up both ends
            for slowdown in slowdowns:
                print(f"\n{kind}, device slowdown x{slowdown:g}, {frames} frames per row, "
                      f"6 in flight")
                print(f"  {'split':>5} {'local stages':>12} {'fps':>8} {'p50 ms':>8} "
                      f"{'vs local':>9}  where")
                rows = {k: run_split(agent, k, frames, slowdown) for k in range(N, 0, -1)}
                local_fps = rows[N][0]
                for k in range(1, N + 1):
                    fps, p50, where = rows[k]
                    print(f"  {k:>5} {k:>12} {fps:>8.1f} {p50 * 1e3:>8.1f} "
                          f"{ratio(fps, local_fps):>9}  {where}")
                best = max(rows[k][0] for k in range(1, N))
                if best <= 1.1 * local_fps:
                    print(f"  automatic mode: offloading does not pay here (best offloaded "
                          f"{best:.0f} fps vs {local_fps:.0f} local); target {local_fps * 0.8:.0f}")
                    target = round(local_fps * 0.8)
                else:
                    target = round((best + local_fps) / 2)
                result = converge(agent, target, slowdown, seconds=4.0)
                reached = result["target_reached_s"]
                print(f"  automatic, target {target} fps: {result['fps']:.1f} fps "
                      f"({ratio(result['fps'], local_fps)} local), final split "
                      f"{result['final_split']}, {result['changes']} changes, split settled at "
                      f"{result['split_settled_s']:.2f} s, 90% of target reached "
                      f"{'never' if reached is None else f'by {reached:.0f} s'}")
        finally:
            agent.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--slowdowns", default="1,25", help="comma-separated device slowdowns")
    parser.add_argument("--brokers", default="amqtt,mosquitto")
    args = parser.parse_args(argv)
    slowdowns = [float(s) for s in args.slowdowns.split(",") if s]
    print(f"vision bench: {os.cpu_count()} cores, python {sys.version.split()[0]}")
    for kind in args.brokers.split(","):
        if kind == "mosquitto" and mosquitto_binary() is None:
            print("mosquitto: not installed, skipped")
            continue
        if kind not in ("amqtt", "mosquitto"):
            print(f"unknown broker {kind!r}: use amqtt or mosquitto", file=sys.stderr)
            return 2
        started = time.monotonic()
        bench_broker(kind, args.frames, slowdowns)
        print(f"  ({kind} section took {time.monotonic() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
