"""The camera device: runs capture and a prefix of the ball pipeline, offloads the rest, in order.

    python -m examples.vision.camera --broker mqtt://127.0.0.1:1883 --split 3 --frames 300
    python -m examples.vision.camera --broker mqtt://127.0.0.1:1883 --target-fps 40 --frames 600 \
        --report run.json --plot run.png

Per frame: capture and stages ``1..k-1`` run here, each timed; the value entering stage ``k`` goes
to the edge agent with ``stage=k`` and the ``remote`` policy, and up to ``--in-flight`` frames are
outstanding at once. Outputs are delivered in frame order. A frame whose remote part fails or
times out is finished locally from the value still held here, so no frame is lost and nothing
hangs. In automatic mode (``--target-fps``) a :class:`~edge_agent.split.SplitController` is fed the
stage times, intermediate sizes, the device's per-frame sending cost, the servers' service times,
the agent's link estimates and the server's worker count, and moves the split (and JPEG
compression of the shipped value) once per window; a fully local probe frame refreshes the times
of offloaded stages now and then.

``--slowdown F`` emulates a device F times slower than this machine (a Raspberry Pi is several
times slower): every local stage is followed by a sleep of ``(F - 1)`` times the CPU time it took
(the thread's CPU time, not the wall clock: a stage preempted by another process on a busy machine
is not stretched F times over). The stretch follows this machine's noise, amplified F times.
``--device-ms 5,10,30,15,10,8,4`` instead gives each local stage the time it takes on the device
(measured there): a stage that finishes sooner here sleeps the rest, so the emulated device runs at
the same speed however busy this machine is, as long as each stage here is faster than on it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import logging
import math
import statistics
import sys
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from agent_common.badinput import BadInputLog
from agent_common.registry import Done, TaskRegistry, TaskSpec
from edge_agent.agent import EdgeAgent, payload_size
from edge_agent.records import TaskFailed, TaskRecord
from edge_agent.split import SplitController, SplitError, check_split
from examples.vision.ball import (
    BALL,
    BallVideo,
    FrameSource,
    VideoCaptureSource,
    capture,
    decode_intermediate,
    encode_intermediate,
    tracking_error,
)

log = logging.getLogger(__name__)

Where = Literal["local", "remote", "fallback"]
LINK_POLL_S = 0.25


@dataclass(frozen=True)
class CameraOptions:
    """How the camera runs: manual ``split`` or automatic ``target_fps`` (neither: all local)."""

    frames: int
    split: int | None = None
    target_fps: float | None = None
    in_flight: int = 6
    frame_timeout: float = 2.0
    camera_fps: float | None = None
    """Frame pacing of the source; automatic mode defaults it to ``target_fps``."""
    slowdown: float = 1.0
    device_stage_s: tuple[float, ...] | None = None
    """Seconds each local stage takes on the emulated device (instead of ``slowdown``)."""
    jpeg_quality: int = 80
    window_s: float = 1.0
    hysteresis: float = 0.15
    probe_interval_s: float = 3.0
    thumbnail: bool = False
    task: str = "ball"

    def __post_init__(self) -> None:
        if self.frames < 1:
            raise ValueError(f"frames must be >= 1, got {self.frames}")
        if self.split is not None and self.target_fps is not None:
            raise ValueError("choose either a manual split or a target frame rate, not both")
        if self.target_fps is not None and not (math.isfinite(self.target_fps)
                                                and self.target_fps > 0):
            raise ValueError(f"target_fps must be positive, got {self.target_fps}")
        if self.in_flight < 1 or self.frame_timeout <= 0 or self.slowdown < 1.0:
            raise ValueError("in_flight >= 1, frame_timeout > 0 and slowdown >= 1 are required")
        if self.device_stage_s is not None:
            if self.slowdown != 1.0:
                raise ValueError("choose either slowdown or device_stage_s, not both")
            if not all(math.isfinite(s) and s >= 0 for s in self.device_stage_s):
                raise ValueError(f"device_stage_s must be finite and >= 0, got "
                                 f"{self.device_stage_s}")
        if self.camera_fps is not None and self.camera_fps <= 0:
            raise ValueError(f"camera_fps must be positive, got {self.camera_fps}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be 1..100, got {self.jpeg_quality}")


def check_device_times(options: CameraOptions, stages: int) -> None:
    """Raise ValueError unless ``options.device_stage_s`` (if set) has one time per stage."""
    if options.device_stage_s is not None and len(options.device_stage_s) != stages:
        raise ValueError(f"device_stage_s needs one time per stage ({stages}), got "
                         f"{len(options.device_stage_s)}")


@dataclass(frozen=True)
class FrameOutcome:
    """One delivered frame."""

    frame: int
    split: int
    where: Where
    compressed: bool
    delivered_s: float
    latency_s: float
    result: dict[str, Any]
    error_px: float | None


@dataclass
class CameraReport:
    """What a run achieved, for JSON and plots."""

    mode: str
    frames: int
    duration_s: float
    fps: float
    local_share: float
    where: dict[str, int]
    found: int
    visible: int
    mean_error_px: float | None
    max_error_px: float | None
    latency_p50_s: float
    latency_p95_s: float
    target_fps: float | None = None
    splits: list[dict[str, Any]] = field(default_factory=list)
    fps_timeline: list[list[float]] = field(default_factory=list)
    split_timeline: list[list[float]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        error = "n/a" if self.mean_error_px is None else f"{self.mean_error_px:.2f} px"
        return (f"{self.mode}: {self.frames} frames in {self.duration_s:.2f} s = {self.fps:.1f} fps"
                f"{'' if self.target_fps is None else f' (target {self.target_fps:g})'}; "
                f"stages local {self.local_share:.0%}; {dict(self.where)}; "
                f"found {self.found}/{self.visible}; mean error {error}; "
                f"latency p50 {self.latency_p50_s * 1e3:.1f} ms")


@dataclass
class _InFlight:
    frame: int
    split: int
    value: Any
    """The value entering stage ``split`` (kept to finish locally if the remote part fails)."""
    compressed: bool
    started: float
    future: concurrent.futures.Future[Any] | None
    result: dict[str, Any] | None = None


class Camera:
    """Runs frames through the pipeline, splitting at a fixed or controlled point."""

    def __init__(self, agent: EdgeAgent | None, options: CameraOptions, *,
                 source: FrameSource | None = None, spec: TaskSpec = BALL,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep,
                 work_clock: Callable[[], float] = time.thread_time) -> None:
        self.agent = agent
        self.options = options
        self.spec = spec
        self.n = len(spec.stages)
        self.source: FrameSource = source or BallVideo(0)
        self._clock = clock
        self._sleep = sleep
        self._work_clock = work_clock
        self._lock = threading.Lock()
        self._bad = BadInputLog(log)
        if options.split is not None:
            check_split(options.split, self.n)
        check_device_times(options, self.n)
        self.controller: SplitController | None = None
        if options.target_fps is not None:
            self.controller = SplitController(
                self.n, options.target_fps, window_s=options.window_s,
                hysteresis=options.hysteresis, in_flight=options.in_flight,
                probe_interval_s=options.probe_interval_s)
        self._submissions: dict[str, tuple[float, float, int, int]] = {}
        """key -> (wall time before submit, after submit (inf while in the call), frame, split)."""
        self._next_link_poll = -math.inf
        self._next_compress_probe = -math.inf
        self.outcomes: list[FrameOutcome] = []
        self.counters: Counter[str] = Counter()
        self.split_timeline: list[tuple[float, int]] = []
        self._start = 0.0

    # Local execution ---------------------------------------------------------------------------

    def _emulate(self, started: float, worked_from: float, stage: int | None = None) -> float:
        """Stretch the work begun at ``started`` to the device's time; return its duration.

        With ``device_stage_s``, a ``stage`` lasts at least the device's time for it. Otherwise
        ``worked_from`` is the work clock (thread CPU time) at the start: the stretch is the CPU
        time spent times ``slowdown - 1``, so waiting for a core is not multiplied.
        """
        if self.options.device_stage_s is not None:
            if stage is not None:
                rest = self.options.device_stage_s[stage] - (self._clock() - started)
                if rest > 0:
                    self._sleep(rest)
        elif self.options.slowdown > 1.0:
            worked = self._work_clock() - worked_from
            if worked > 0:
                self._sleep(worked * (self.options.slowdown - 1.0))
        return self._clock() - started

    def _timed(self, stage: int, value: Any) -> Any:
        """Run one stage here, emulate the slowdown, and report the time to the controller."""
        started, worked_from = self._clock(), self._work_clock()
        if stage == 0:
            out = capture({"frame": value, "thumbnail": self.options.thumbnail}, self.source)
        else:
            out = self.spec.stages[stage](value)
        elapsed = self._emulate(started, worked_from, stage)
        if self.controller is not None:
            with self._lock:
                now = self._clock()
                self.controller.observe_local(stage, elapsed, now)
                if stage + 1 < self.n and not isinstance(out, Done):
                    self.controller.observe_size(stage + 1, payload_size(out), now)
        return out

    def _run_stages(self, value: Any, start: int, stop: int) -> Any:
        for stage in range(start, stop):
            value = self._timed(stage, value)
            if isinstance(value, Done):
                return value
        return value

    def _probe_compression(self, value: Any, stage: int) -> None:
        """Time JPEG/PNG packing of the value entering ``stage`` and tell the controller."""
        if self.controller is None or not isinstance(value, dict):
            return
        started, worked_from = self._clock(), self._work_clock()
        packed = encode_intermediate(value, self.options.jpeg_quality)
        worked = self._work_clock() - worked_from
        packed_at = self._clock()
        decode_intermediate(packed)
        done = self._clock()
        pack_s = (packed_at - started) + worked * (self.options.slowdown - 1.0)
        unpack_s = done - packed_at  # the server unpacks: no device slowdown
        with self._lock:
            self.controller.observe_size(stage, payload_size(value), done,
                                         compressed_bytes=payload_size(packed),
                                         compress_s=pack_s, decompress_s=unpack_s)

    # Links and records -----------------------------------------------------------------------

    def _poll_link(self, now: float) -> None:
        if self.controller is None or now < self._next_link_poll:
            return
        self._next_link_poll = now + LINK_POLL_S
        rtt: float | None = None
        bandwidth: float | None = None
        workers = 1
        if self.agent is not None and self.agent.connected:
            policy = self.agent.config.policy_config
            usable = [view for view in self.agent.servers()
                      if not view.stale and not view.dead and self.options.task in view.tasks]
            if usable:
                best = min(usable, key=lambda v: math.inf if v.rtt is None else v.rtt)
                rtt = best.rtt if best.rtt is not None else policy.default_rtt
                bytes_per_s = best.bandwidth if best.bandwidth is not None \
                    else policy.default_bandwidth
                bandwidth = 8.0 * bytes_per_s
                workers = max(1, best.load.workers)
        with self._lock:
            self.controller.observe_link(rtt, bandwidth, now, workers=workers)

    def _on_record(self, record: TaskRecord) -> None:
        """Agent callback: feed the server's service time of a frame to the controller."""
        if record.name != self.options.task:
            return
        with self._lock:
            match = next((key for key, (t0, t1, _, _) in self._submissions.items()
                          if t0 <= record.created <= t1), None)
            if match is None:
                return
            _, _, _, split = self._submissions.pop(match)
            if self.controller is None:
                return
            now = self._clock()
            if record.ok and record.target != "local" and record.service_time is not None:
                self.controller.observe_remote(split, record.service_time, now)
            elif record.target == "local" or not record.ok:
                self.controller.observe_failure(now)

    def _on_remote_done(self, future: concurrent.futures.Future[Any], *, split: int,
                        started: float) -> None:
        """Agent thread: a frame's remote part ended; its latency feeds the window model."""
        if future.cancelled() or future.exception() is not None or self.controller is None:
            return
        with self._lock:
            now = self._clock()
            self.controller.observe_latency(split, now - started, now)

    # The loop --------------------------------------------------------------------------------

    def _choose_split(self, now: float) -> tuple[int, bool]:
        if self.controller is None:
            return (self.options.split or self.n), False
        with self._lock:
            self.controller.update(now)
            if self.controller.wants_local_probe(now):
                self.counters["local_probes"] += 1
                return self.n, False
            probe = self.controller.remote_probe_split(now)
            if probe is not None:
                self.counters["remote_probes"] += 1
                return probe, False
            return self.controller.split, self.controller.compress

    def _submit(self, frame: int, value: Any, split: int, compress: bool, started: float
                ) -> _InFlight:
        item = _InFlight(frame, split, value, compress, started, None)
        if self.agent is None:
            return item
        if compress:
            packing, worked_from = self._clock(), self._work_clock()
            shipped = encode_intermediate(value, self.options.jpeg_quality)
            self._emulate(packing, worked_from)
        else:
            shipped = value
        key = uuid.uuid4().hex
        with self._lock:  # registered first: the result may come back before submit() returns
            self._submissions[key] = (time.time(), math.inf, frame, split)
            if len(self._submissions) > 4 * self.options.in_flight + 16:
                self._submissions.pop(next(iter(self._submissions)))
        sent = self._clock()
        try:
            item.future = self.agent.submit(self.options.task, shipped, stage=split,
                                            deadline=self.options.frame_timeout, policy="remote")
        except (LookupError, ValueError, RuntimeError) as exc:  # no server knows the task, stopped
            self.counters["submit_errors"] += 1
            log.debug("frame %d: cannot submit (%s); finishing locally", frame, exc)
            with self._lock:
                self._submissions.pop(key, None)
                if self.controller is not None:
                    self.controller.observe_failure(self._clock())
            return item
        overhead = self._clock() - sent  # sending runs at this machine's speed (see --slowdown)
        if self.controller is not None:
            item.future.add_done_callback(
                functools.partial(self._on_remote_done, split=split, started=started))
        with self._lock:
            if key in self._submissions:
                self._submissions[key] = (*self._submissions[key][:1], time.time(),
                                          frame, split)
            if self.controller is not None:
                self.controller.observe_overhead(overhead, self._clock())
        return item

    def _finish(self, item: _InFlight) -> FrameOutcome:
        """Wait for a frame's remote part (bounded) or finish it here; never raises for a frame."""
        where: Where = "local"
        result: Any = item.result
        if result is None and item.future is not None:
            remaining = item.started + self.options.frame_timeout + 0.5 - self._clock()
            try:
                result = item.future.result(timeout=max(0.0, remaining))
                where = "remote"
            except (TaskFailed, TimeoutError, concurrent.futures.CancelledError) as exc:
                self.counters["remote_failures"] += 1
                log.debug("frame %d: remote part failed (%s); finishing locally", item.frame, exc)
                if self.controller is not None and isinstance(exc, TimeoutError):
                    with self._lock:
                        self.controller.observe_failure(self._clock())
                result = None
            if result is not None and not (isinstance(result, dict)
                                           and result.get("frame") == item.frame):
                self.counters["bad_remote_results"] += 1
                self._bad.record("bad-remote-result", f"frame {item.frame}: server answered "
                                 f"{str(result)[:80]!r}; finished locally")
                result = None
        if result is None:
            if item.split < self.n:
                where = "fallback" if item.future is not None or self.agent is not None else "local"
            value = self._run_stages(item.value, item.split, self.n)
            result = value.value if isinstance(value, Done) else value
        if not isinstance(result, dict):
            raise TypeError(f"frame {item.frame}: pipeline returned {type(result).__name__}")
        now = self._clock()
        error = tracking_error(result, self.source.truth(item.frame))
        outcome = FrameOutcome(item.frame, item.split if where == "remote" else self.n, where,
                               item.compressed and where == "remote", now - self._start,
                               now - item.started, result, error)
        self.counters[where] += 1
        return outcome

    def run(self, on_frame: Callable[[FrameOutcome], None] | None = None) -> CameraReport:
        """Process ``options.frames`` frames; outputs reach ``on_frame`` in frame order."""
        if self.agent is None:
            return self._run(on_frame)
        self.agent.add_record_listener(self._on_record)
        try:
            return self._run(on_frame)
        finally:
            self.agent.remove_record_listener(self._on_record)

    def _run(self, on_frame: Callable[[FrameOutcome], None] | None) -> CameraReport:
        options = self.options
        pace = options.camera_fps or options.target_fps
        self._start = self._clock()
        window: deque[_InFlight] = deque()

        def deliver(item: _InFlight) -> None:
            outcome = self._finish(item)
            self.outcomes.append(outcome)
            if on_frame is not None:
                on_frame(outcome)

        for frame in range(options.frames):
            if pace is not None:
                due = self._start + frame / pace
                delay = due - self._clock()
                if delay > 0:
                    self._sleep(delay)
            started = self._clock()
            self._poll_link(started)
            split, compress = self._choose_split(started)
            self.split_timeline.append((started - self._start, split))
            try:
                value = self._run_stages(frame, 0, split)
            except EOFError as exc:  # a video file ran out: report what was processed
                log.info("%s; stopping after %d frames", exc, frame)
                break
            if isinstance(value, Done) or split == self.n:
                final = value.value if isinstance(value, Done) else value
                item = _InFlight(frame, split, None, False, started, None, final)
                if split == self.n and started >= self._next_compress_probe:
                    self._next_compress_probe = started + options.probe_interval_s
                    self._probe_compressions(frame)
            else:
                item = self._submit(frame, value, split, compress, started)
            window.append(item)
            while window and (len(window) >= options.in_flight or window[0].future is None
                              or window[0].future.done()):
                deliver(window.popleft())
        while window:
            deliver(window.popleft())
        return self.report()

    def _probe_compressions(self, frame: int) -> None:
        """Pack each image-carrying intermediate of one frame once (no controller timing)."""
        if self.controller is None or self.agent is None:
            return
        value: Any = capture({"frame": frame}, self.source)
        for stage in range(1, self.n):
            if isinstance(value, Done):
                return
            if any(hasattr(item, "ndim") and item.ndim >= 2 and item.size >= 1024
                   for item in value.values()):
                self._probe_compression(value, stage)
            value = self.spec.stages[stage](value)

    # Report ----------------------------------------------------------------------------------

    def report(self) -> CameraReport:
        outcomes = self.outcomes
        if not outcomes:
            raise RuntimeError("no frame was processed")
        duration = max(outcomes[-1].delivered_s, 1e-9)
        errors = [o.error_px for o in outcomes if o.error_px is not None]
        visible = sum(1 for o in outcomes if self.source.truth(o.frame) is not None)
        latencies = sorted(o.latency_s for o in outcomes)
        timeline: list[list[float]] = []  # [window start s, delivered frames per second]
        second = 0
        while second < duration:
            span = min(1.0, duration - second)
            count = sum(1 for o in outcomes if second <= o.delivered_s < second + 1)
            if span >= 0.25:  # a shorter tail says nothing about the rate
                timeline.append([float(second), count / span])
            second += 1
        history = self.controller.history if self.controller else []
        mode = ("auto" if self.controller else
                f"split {self.options.split}" if self.options.split else "local")
        return CameraReport(
            mode=mode, frames=len(outcomes), duration_s=duration, fps=len(outcomes) / duration,
            local_share=statistics.mean(o.split / self.n for o in outcomes),
            where=dict(Counter(o.where for o in outcomes)),
            found=sum(1 for o in outcomes if o.result.get("found")), visible=visible,
            mean_error_px=statistics.mean(errors) if errors else None,
            max_error_px=max(errors) if errors else None,
            # "higher": the next real latency at or above the quantile (what the indexing here did)
            latency_p50_s=float(np.percentile(latencies, 50, method="higher")),
            latency_p95_s=float(np.percentile(latencies, 95, method="higher")),
            target_fps=self.options.target_fps,
            splits=[{"time_s": change.time - self._start, "k": change.k,
                     "compress": change.compress, "expected_fps": change.expected_fps,
                     "reason": change.reason} for change in history],
            fps_timeline=timeline,
            split_timeline=[[t, float(k)] for t, k in self.split_timeline],
        )


def plot_report(report: CameraReport, path: str | Path) -> bool:
    """Draw frame rate and split over time; ``False`` when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(8, 5))
    if report.fps_timeline:
        times, rates = zip(*report.fps_timeline, strict=True)
        top.plot([t + 0.5 for t in times], rates, marker="o", label="delivered fps")
    if report.target_fps is not None:
        top.axhline(report.target_fps, color="grey", linestyle="--", label="target")
    top.set_ylabel("frames / s")
    top.legend(loc="lower right")
    if report.split_timeline:
        times, splits = zip(*report.split_timeline, strict=True)
        bottom.step(times, splits, where="post")
    bottom.set_ylabel("split k (stages local)")
    bottom.set_ylim(0.5, len(BALL.stages) + 0.5)
    bottom.set_xlabel("seconds")
    figure.suptitle(report.summary(), fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


# Command line ----------------------------------------------------------------------------------


def _milliseconds(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) / 1000.0 for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"comma-separated milliseconds expected, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m examples.vision.camera",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--broker", help="mqtt://host:port; without it everything runs locally")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--split", type=int, help="run stages 0..k-1 here, k..6 on a server")
    mode.add_argument("--target-fps", type=float, help="automatic split to hold this frame rate")
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--in-flight", type=int, default=6, help="frames outstanding at once")
    parser.add_argument("--frame-timeout", type=float, default=2.0)
    parser.add_argument("--camera-fps", type=float, help="pace the source (default: the target)")
    parser.add_argument("--slowdown", type=float, default=1.0,
                        help="emulate a device this many times slower")
    parser.add_argument("--device-ms", type=_milliseconds, metavar="MS,MS,...",
                        help="emulate a device whose stages take these times (one per stage)")
    parser.add_argument("--jpeg-quality", type=int, default=80)
    parser.add_argument("--window", type=float, default=1.0, help="seconds between re-evaluations")
    parser.add_argument("--video", help="a video file instead of the synthetic source")
    parser.add_argument("--camera", type=int, help="a camera index instead of the synthetic source")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--id", default=f"camera-{uuid.uuid4().hex[:6]}")
    parser.add_argument("--prefix", help="topic prefix of the fleet")
    parser.add_argument("--protocol", choices=("3.1.1", "5"), default="3.1.1")
    parser.add_argument("--report", help="write the report as JSON here")
    parser.add_argument("--plot", help="write a PNG plot here (needs matplotlib)")
    parser.add_argument("--wait-server", type=float, default=3.0,
                        help="seconds to wait for a server announcing the task")
    return parser


def make_agent(broker: str, node_id: str, *, prefix: str | None = None,
               protocol: str = "3.1.1") -> EdgeAgent:
    """An edge agent on ``broker`` with the ``remote`` policy and no local tasks of its own.

    The camera finishes failed frames itself (with its own timing), so the agent gets an empty
    registry: it offloads or fails, it never runs the pipeline behind the camera's back.
    """
    from edge_agent.config import EdgeConfig
    from topics.mqtt import MqttTransport

    settings: dict[str, Any] = {"id": node_id, "broker": broker, "policy": "remote",
                                "protocol": protocol, "max_attempts": 1}
    if prefix:
        settings["prefix"] = prefix
    config = EdgeConfig(**settings)
    return EdgeAgent(config, MqttTransport(config.transport_config()), TaskRegistry())


def wait_for_server(agent: EdgeAgent, task: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(not v.stale and not v.dead and task in v.tasks and v.rtt is not None
               for v in agent.servers()):
            return True
        time.sleep(0.05)
    return False


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        options = CameraOptions(
            frames=args.frames, split=args.split, target_fps=args.target_fps,
            in_flight=args.in_flight, frame_timeout=args.frame_timeout,
            camera_fps=args.camera_fps, slowdown=args.slowdown, device_stage_s=args.device_ms,
            jpeg_quality=args.jpeg_quality, window_s=args.window)
        check_split(options.split, len(BALL.stages)) if options.split is not None else None
        check_device_times(options, len(BALL.stages))
    except (ValueError, SplitError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    source: FrameSource
    if args.video is not None or args.camera is not None:
        try:
            source = VideoCaptureSource(args.video if args.video is not None else args.camera)
        except OSError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    else:
        source = BallVideo(args.seed)
    agent = None
    if args.broker:
        agent = make_agent(args.broker, args.id, prefix=args.prefix, protocol=args.protocol)
        agent.start()
        if not wait_for_server(agent, "ball", args.wait_server):
            log.warning("no server announcing 'ball' yet: frames run locally until one appears")
    try:
        report = Camera(agent, options, source=source).run()
    except EOFError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if agent is not None:
            agent.stop()
    print(report.summary())
    if args.report:
        Path(args.report).write_text(json.dumps(report.as_dict(), indent=2))
    if args.plot and not plot_report(report, args.plot):
        log.warning("matplotlib is not installed: no plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
