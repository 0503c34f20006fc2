"""The split model and controller, told as stories with fixed numbers (no clock, no I/O)."""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypedDict

import pytest

from edge_agent.split import (
    Samples,
    SplitChange,
    SplitController,
    SplitError,
    SuffixCost,
    check_split,
    choose_split,
    estimate_split,
)

# A seven-stage pipeline (capture, resize, blur+hsv, mask, contours, circle, annotate).
LOCAL = [0.002, 0.010, 0.008, 0.004, 0.002, 0.001, 0.001]  # 28 ms: 35.7 fps all local
FAST_SERVER = [t * 0.25 for t in LOCAL]
SLOW_SERVER = [t * 3.0 for t in LOCAL]
VERY_SLOW_SERVER = [t * 10.0 for t in LOCAL]
OVERHEAD = 0.003  # device CPU per offloaded frame (encode, publish, take the result)
SIZES = [16, 921_600, 230_400, 230_400, 76_800, 300, 64]
RTT = 0.002
GIGABIT = 800e6  # bits per second


class ServerMeasurements(TypedDict, total=False):
    """The choose_split arguments that say what is known of the server and the link."""

    stage_remote_s: Sequence[float] | None
    rtt_s: float | None
    bandwidth_bps: float | None


class SplitArguments(ServerMeasurements, total=False):
    """The choose_split arguments test_inconsistent_inputs_are_rejected varies."""

    stage_local_s: Sequence[float]
    transfer_bytes: Sequence[int | None]
    target_fps: float
    hysteresis: float


def test_reachable_target_keeps_the_most_stages_local() -> None:
    decision = choose_split(LOCAL, FAST_SERVER, SIZES, RTT, GIGABIT, target_fps=60.0)
    # k=1 (108 fps) and k=2 (83 fps) both meet 60 fps; k=2 keeps more on the device.
    assert decision.k == 2
    assert decision.expected_fps == pytest.approx(1 / 0.012)
    assert "most stages local" in decision.reason
    assert [round(c.fps) for c in decision.candidates] == [109, 83, 50, 42, 38, 37, 36]


def test_target_the_device_meets_alone_runs_everything_locally() -> None:
    decision = choose_split(LOCAL, FAST_SERVER, SIZES, RTT, GIGABIT, target_fps=30.0)
    assert decision.k == 7
    assert decision.expected_fps == pytest.approx(1 / 0.028)
    assert decision.latency_s == pytest.approx(0.028)


def test_unreachable_target_picks_the_fastest_split() -> None:
    decision = choose_split(LOCAL, FAST_SERVER, SIZES, RTT, GIGABIT, target_fps=500.0)
    assert decision.k == 1
    assert "no split meets" in decision.reason and "limited by transfer" in decision.reason


def test_server_slows_down_split_moves_toward_local() -> None:
    before = choose_split(LOCAL, FAST_SERVER, SIZES, RTT, GIGABIT, target_fps=60.0)
    after = choose_split(LOCAL, SLOW_SERVER, SIZES, RTT, GIGABIT, target_fps=60.0,
                         current=before.k)
    # Nothing meets 60 fps now; k=2 would wait 48 ms on the server (20.8 fps). The fastest
    # splits keep stages 0..2 or 0..3 local and overlap the rest with the server (41.7 fps).
    assert before.k == 2
    assert after.k in (3, 4) and after.expected_fps == pytest.approx(1 / 0.024)
    # A server ten times slower than the device, and 3 ms of device CPU per sent frame:
    # offloading anything costs more than it saves, everything comes back.
    crawl = choose_split(LOCAL, VERY_SLOW_SERVER, SIZES, RTT, GIGABIT, target_fps=60.0,
                         current=after.k, message_overhead_s=OVERHEAD)
    assert crawl.k == 7


@pytest.mark.parametrize("gone", [
    {"stage_remote_s": None},
    {"stage_remote_s": []},
    {"rtt_s": None},
    {"bandwidth_bps": None},
    {"bandwidth_bps": 0.0},
    {"stage_remote_s": [float("inf")] * 7},
])
def test_server_gone_means_all_local(gone: ServerMeasurements) -> None:
    arguments: ServerMeasurements = {"stage_remote_s": FAST_SERVER, "rtt_s": RTT, "bandwidth_bps": GIGABIT}
    arguments.update(gone)
    decision = choose_split(LOCAL, transfer_bytes=SIZES, target_fps=60.0, current=2, **arguments)
    assert decision.k == 7
    assert all(c.fps == 0.0 for c in decision.candidates[:-1])


def test_unmeasured_transfer_size_is_not_a_split_point() -> None:
    sizes: list[int | None] = list(SIZES)
    sizes[2] = None
    decision = choose_split(LOCAL, FAST_SERVER, sizes, RTT, GIGABIT, target_fps=60.0)
    assert decision.candidates[1].fps == 0.0
    assert decision.k == 1


def test_throughput_model_pipelined_serial_and_window() -> None:
    piped = estimate_split(1, LOCAL, FAST_SERVER, SIZES, RTT, GIGABIT)
    assert piped.transfer_s == pytest.approx(921_600 * 8 / GIGABIT)
    assert piped.bottleneck == "transfer"
    assert piped.fps == pytest.approx(1 / piped.transfer_s)
    assert piped.latency_s == pytest.approx(0.002 + piped.transfer_s + RTT + 0.026 * 0.25)
    serial = estimate_split(1, LOCAL, FAST_SERVER, SIZES, RTT, GIGABIT, pipelined=False)
    assert serial.fps == pytest.approx(1 / piped.latency_s)
    one_in_flight = estimate_split(1, LOCAL, FAST_SERVER, SIZES, RTT, GIGABIT, window=1)
    assert one_in_flight.fps == pytest.approx(serial.fps)
    assert estimate_split(1, LOCAL, FAST_SERVER, SIZES, RTT, GIGABIT, window=8).fps == \
        pytest.approx(piped.fps)


def test_pipelining_changes_the_answer() -> None:
    # With one frame at a time the round trip counts in full, and k=2 no longer meets 60 fps.
    serial = choose_split(LOCAL, FAST_SERVER, SIZES, 0.004, GIGABIT, 60.0, pipelined=False)
    assert serial.k == 1
    assert choose_split(LOCAL, FAST_SERVER, SIZES, 0.004, GIGABIT, 60.0).k == 2


def test_compression_is_chosen_when_the_link_is_the_bottleneck() -> None:
    slow_link = 20e6
    packed: list[int | None] = [None, 40_000, 10_000, 6_000, 700, None, None]
    pack_s = [0.0, 0.001, 0.0005, 0.0005, 0.0003, 0.0, 0.0]
    unpack_s = [0.0, 0.001, 0.0005, 0.0005, 0.0002, 0.0, 0.0]
    raw = choose_split(LOCAL, FAST_SERVER, SIZES, RTT, slow_link, target_fps=60.0)
    assert raw.k == 5 and not raw.compress  # raw images would take 31..368 ms on this link
    decision = choose_split(LOCAL, FAST_SERVER, SIZES, RTT, slow_link, target_fps=60.0,
                            compressed_bytes=packed, compress_s=pack_s, decompress_s=unpack_s)
    assert decision.k == 2 and decision.compress
    # On a fast link compression only adds work: raw stays.
    fast = choose_split(LOCAL, FAST_SERVER, SIZES, RTT, GIGABIT, target_fps=60.0,
                        compressed_bytes=packed, compress_s=pack_s, decompress_s=unpack_s)
    assert fast.k == 2 and not fast.compress


def test_hysteresis_holds_under_jitter() -> None:
    # Target 50 fps sits right at split 3 (local 20 ms): jitter of +-6% makes it pass and fail.
    rng = random.Random(7)

    def jittered() -> list[float]:
        return [t * rng.uniform(0.94, 1.06) for t in LOCAL]

    def run(hysteresis: float) -> int:
        current, changes = 3, 0
        for _ in range(200):
            k = choose_split(jittered(), FAST_SERVER, SIZES, RTT, GIGABIT, 50.0, current,
                             hysteresis).k
            changes += k != current
            current = k
        return changes

    assert run(0.0) > 20  # without hysteresis it flaps between 2 and 3
    assert run(0.15) == 0


def test_hysteresis_still_moves_on_a_real_change() -> None:
    back = choose_split(LOCAL, FAST_SERVER, SIZES, RTT, GIGABIT, 30.0, current=2)
    assert back.k == 7  # all local beats 30 fps by 19%, more than the 15% margin
    assert "pulling stages back" in back.reason
    held = choose_split(LOCAL, FAST_SERVER, SIZES, RTT, GIGABIT, 40.0, current=7)
    assert held.k == 7 and "keeping" in held.reason  # 35.7 fps is within 15% of 40
    assert choose_split(LOCAL, FAST_SERVER, SIZES, RTT, GIGABIT, 40.0).k == 4  # from scratch
    moved = choose_split(LOCAL, FAST_SERVER, SIZES, RTT, GIGABIT, 45.0, current=7)
    assert moved.k == 3 and "toward the server" in moved.reason


@pytest.mark.parametrize("bad", [0, 8, -1, True])
def test_split_outside_the_pipeline_is_rejected(bad: int) -> None:
    with pytest.raises(SplitError, match="outside the pipeline"):
        check_split(bad, 7)
    with pytest.raises(SplitError, match="outside the pipeline"):
        choose_split(LOCAL, FAST_SERVER, SIZES, RTT, GIGABIT, 30.0, current=bad)
    with pytest.raises(SplitError, match="outside the pipeline"):
        SplitController(7, 30.0, initial=bad)


@pytest.mark.parametrize(("arguments", "words"), [
    ({"stage_local_s": LOCAL[:5]}, "stages"),
    ({"stage_local_s": [-1.0, *LOCAL[1:]]}, ">= 0"),
    ({"stage_local_s": [float("nan"), *LOCAL[1:]]}, ">= 0"),
    ({"transfer_bytes": SIZES[:3]}, "transfer_bytes"),
    ({"target_fps": 0.0}, "target_fps"),
    ({"target_fps": float("inf")}, "target_fps"),
    ({"hysteresis": 1.0}, "hysteresis"),
    ({"rtt_s": -0.1}, "rtt_s"),
])
def test_inconsistent_inputs_are_rejected(arguments: SplitArguments, words: str) -> None:
    base: SplitArguments = {"stage_local_s": LOCAL, "stage_remote_s": FAST_SERVER,
                            "transfer_bytes": SIZES, "rtt_s": RTT, "bandwidth_bps": GIGABIT,
                            "target_fps": 30.0}
    base.update(arguments)
    with pytest.raises(SplitError, match=words):
        choose_split(**base)


# Workers and the fitted remote model --------------------------------------------------------------


def test_server_workers_multiply_its_rate_for_pipelined_frames() -> None:
    measured: list[float | None] = [None, *([0.050] * 6)]  # 50 ms a frame whatever is sent
    one = choose_split(LOCAL, None, SIZES, RTT, GIGABIT, 60.0, measured_remote_s=measured)
    assert one.k == 7  # one worker: 20 fps remote, under the device's 35.7
    four = choose_split(LOCAL, None, SIZES, RTT, GIGABIT, 60.0, measured_remote_s=measured,
                        workers=4)
    assert four.k == 2 and four.expected_fps == pytest.approx(80.0)  # 4 / 50 ms
    at_two = four.candidates[1]
    assert at_two.service_s == pytest.approx(0.050) and at_two.remote_s == pytest.approx(0.0125)
    assert at_two.latency_s == pytest.approx(0.012 + at_two.transfer_s + RTT + 0.050)
    with pytest.raises(SplitError, match="workers"):
        choose_split(LOCAL, None, SIZES, RTT, GIGABIT, 30.0, measured_remote_s=measured, workers=0)


def work(k: int) -> float:
    """The device's own time for stages k..6: what a split at k sends."""
    return sum(LOCAL[k:])


def test_suffix_cost_from_two_splits_separates_the_fixed_part() -> None:
    def server(k: int) -> float:
        return 0.040 + 0.25 * work(k)

    fit = SuffixCost(((work(2), server(2)), (work(5), server(5))))
    for k in range(1, 7):
        assert fit.estimate(work(k)) == pytest.approx(server(k))
        assert fit.estimate(work(k), pessimistic=False) == pytest.approx(server(k))
    # Noise that makes longer suffixes look cheaper never gives a negative per-stage part.
    noisy = SuffixCost(((work(2), 0.010), (work(5), 0.012)))
    assert noisy.estimate(work(1)) == pytest.approx(0.011) == noisy.estimate(0.0)


def test_suffix_cost_from_one_split_is_a_range() -> None:
    fit = SuffixCost(((work(5), 0.020),))
    # Less sent: as much at worst (all of it may be fixed), in proportion at best.
    assert fit.estimate(work(6)) == pytest.approx(0.020)
    assert fit.estimate(work(6), pessimistic=False) == pytest.approx(0.010)
    # More sent: in proportion at worst (all of it may scale), as much at best.
    assert fit.estimate(work(2)) == pytest.approx(0.020 * 8)
    assert fit.estimate(work(2), pessimistic=False) == pytest.approx(0.020)
    nothing = SuffixCost(())
    assert nothing.estimate(work(2)) is None and nothing.estimate(work(2), pessimistic=False) == 0


def test_a_step_drops_the_samples_before_it_but_a_short_burst_does_not() -> None:
    samples = Samples(horizon_s=10.0, min_span_s=0.25)
    now = 0.0
    for _ in range(20):
        now += 0.05
        assert samples.add(now, 0.010) is None
    for _ in range(4):  # a 0.2 s burst at 3x: shorter than the span, noise
        now += 0.05
        assert samples.add(now, 0.030) is None
    for _ in range(10):
        now += 0.05
        assert samples.add(now, 0.010) is None
    steps = []
    for _ in range(8):  # a real step: the level stays at 0.2 s
        now += 0.05
        steps.append(samples.add(now, 0.200))
    start = next(t for t in steps if t is not None)
    assert start == pytest.approx(1.75)  # the first 0.2 s sample
    assert samples.median(now) == pytest.approx(0.200)  # the old level is gone at once


# Controller stories -------------------------------------------------------------------------------


def feed_local(controller: SplitController, now: float, scale: float = 1.0,
               stages: range | None = None) -> None:
    for stage in stages if stages is not None else range(7):
        controller.observe_local(stage, LOCAL[stage] * scale, now)


def feed_sizes(controller: SplitController, now: float) -> None:
    for stage, size in enumerate(SIZES):
        controller.observe_size(stage, size, now)


@dataclass
class FakeServer:
    """A server that needs ``fixed + ratio x`` the device's time for the stages it is sent."""

    fixed: float
    ratio: float
    workers: int = 1

    def service(self, k: int) -> float:
        return self.fixed + self.ratio * work(k)


class Rig:
    """Drives a controller as the camera does: a frame every ``1 / fps`` s (probes included),
    at most ``in_flight`` outstanding; results return when a worker of ``server`` served them.
    ``noise`` multiplies every measured time by a seeded random factor."""

    def __init__(self, controller: SplitController, server: FakeServer, fps: float, *,
                 in_flight: int = 6, noise: Callable[[], float] = lambda: 1.0) -> None:
        self.controller = controller
        self.server = server
        self.period = 1.0 / fps
        self.in_flight = in_flight
        self.noise = noise
        self.now = 0.0
        self.device = 1.0
        """How many times slower the device runs its stages than ``LOCAL``."""
        self.free = [0.0] * server.workers
        self.pending: list[tuple[float, int, float, float]] = []  # (done, split, service, start)
        self.probes: list[tuple[float, int]] = []

    def deliver(self, until: float) -> None:
        while self.pending and self.pending[0][0] <= until:
            done, k, service, start = heapq.heappop(self.pending)
            self.controller.observe_remote(k, service, done)
            self.controller.observe_latency(k, done - start, done)

    def frame(self) -> None:
        controller = self.controller
        while len(self.pending) >= self.in_flight:  # the window is full: wait for a result
            self.now = max(self.now, self.pending[0][0])
            self.deliver(self.now)
        self.deliver(self.now)
        controller.observe_link(RTT, GIGABIT, self.now, workers=self.server.workers)
        controller.update(self.now)
        k = controller.split
        if controller.wants_local_probe(self.now):
            k = 7
        elif (probe := controller.remote_probe_split(self.now)) is not None:
            k = probe
            self.probes.append((self.now, k))
        start, local = self.now, 0.0
        for stage in range(k):
            took = LOCAL[stage] * self.device * self.noise()
            local += took
            controller.observe_local(stage, took, start + local)
        feed_sizes(controller, start)
        if k < 7:
            worker = min(range(len(self.free)), key=self.free.__getitem__)
            service = self.server.service(k) * self.noise()
            begin = max(start + local, self.free[worker])
            self.free[worker] = begin + service
            heapq.heappush(self.pending, (begin + service, k, service, start))

    def run(self, seconds: float) -> None:
        end = self.now + seconds
        while self.now < end:
            self.frame()
            self.now += self.period


def changes_since(controller: SplitController, time: float) -> list[SplitChange]:
    return [change for change in controller.history if change.time >= time]


def test_controller_knows_nothing_of_a_server_it_never_measured_so_it_probes() -> None:
    controller = SplitController(7, 60.0, window_s=1.0, probe_interval_s=3.0)
    assert controller.split == 7
    assert controller.update(0.0) is None  # no local times yet
    feed_local(controller, 0.1)
    feed_sizes(controller, 0.1)
    assert controller.remote_probe_split(0.1) is None  # no server known
    controller.observe_link(RTT, GIGABIT, 0.1)
    first = controller.update(0.2)
    # No optimistic guess: a server never measured cannot carry a frame rate...
    assert first is not None and controller.split == 7
    assert all(c.fps == 0.0 for c in first.candidates[:-1])
    # ...so one frame goes to the split that would be chosen if the server cost nothing.
    assert controller.remote_probe_split(0.2) == 2
    assert controller.remote_probe_split(0.3) is None  # one probe per interval
    controller.observe_remote(2, sum(FAST_SERVER[2:]), 0.3)
    assert controller.update(0.5) is None  # nothing again until a window has passed...
    assert controller.update(1.2) is not None and controller.split == 2  # ...then offload
    controller.observe_remote(2, sum(FAST_SERVER[2:]), 4.9)
    assert controller.remote_probe_split(5.0) is None  # offloading measures the server anyway


def test_untried_splits_are_bounded_at_their_worst_not_guessed() -> None:
    controller = SplitController(7, 60.0, window_s=1.0)
    controller.observe_link(RTT, GIGABIT, 0.0)
    feed_local(controller, 0.0)
    feed_sizes(controller, 0.0)
    measured = 0.040 + 0.25 * work(5)
    controller.observe_remote(5, measured, 0.0)  # only split 5 was ever tried
    services, _ = controller.remote_costs(0.0, LOCAL, SIZES)
    assert services[5] == pytest.approx(measured)
    # Two servers agree with that one measurement: one whose time is all fixed, one whose time
    # all scales with the stages sent. No estimate may be below either of them.
    for k in (1, 2, 3, 4, 6):
        all_fixed, all_scaling = measured, measured * work(k) / work(5)
        estimate = services[k]
        assert estimate is not None and estimate >= max(all_fixed, all_scaling) - 1e-12, k
    # The speed ratio of the old model made split 2 look like 3.2 ms; it is 44 ms here.
    assert services[2] is not None and services[2] >= 0.044


def test_a_jump_in_the_servers_fixed_cost_goes_straight_to_all_local_in_one_window() -> None:
    server = FakeServer(fixed=0.0, ratio=0.25, workers=2)
    controller = SplitController(7, 60.0, window_s=1.0, probe_interval_s=2.0, in_flight=6)
    rig = Rig(controller, server, fps=60.0)
    rig.run(3.0)
    assert controller.split == 2
    jump = rig.now
    server.fixed = 0.2  # two workers serve 9.8 frames/s now, under the device's 35.7
    rig.run(3.0)
    after = changes_since(controller, jump)
    assert [change.k for change in after] == [7], controller.history
    assert after[0].time - jump <= controller.window_s
    assert "split 7 is the fastest" in after[0].reason


def test_a_recovered_server_gets_its_stages_back_through_a_probe() -> None:
    server = FakeServer(fixed=0.0, ratio=0.25, workers=2)
    controller = SplitController(7, 60.0, window_s=1.0, probe_interval_s=2.0, in_flight=6)
    rig = Rig(controller, server, fps=60.0)
    rig.run(3.0)
    server.fixed = 0.2
    rig.run(3.0)
    assert controller.split == 7
    recovered = rig.now
    server.fixed = 0.0
    rig.run(8.0)
    after = changes_since(controller, recovered)
    assert [change.k for change in after] == [2], controller.history  # straight back
    probes = [k for t, k in rig.probes if recovered <= t <= after[0].time]
    assert probes and probes[-1] == 2
    assert after[0].time - max(t for t, _ in rig.probes if t <= after[0].time) <= \
        controller.window_s  # acted on within a window of the probe


def test_a_server_that_speeds_up_takes_several_stages_at_once() -> None:
    # A 20 ms fixed cost per frame: with one worker nothing reaches 60 fps, and split 4 is
    # among the fastest (41.7 fps). Without the fixed cost split 2 meets 60 fps (83).
    server = FakeServer(fixed=0.020, ratio=0.25, workers=1)
    controller = SplitController(7, 60.0, window_s=1.0, probe_interval_s=2.0, in_flight=6)
    rig = Rig(controller, server, fps=60.0)
    rig.run(4.0)
    assert controller.split == 4, controller.history
    faster = rig.now
    server.fixed = 0.0
    rig.run(3.0)
    after = changes_since(controller, faster)
    assert [change.k for change in after] == [2], controller.history
    assert after[0].time - faster <= controller.window_s


def test_noisy_measurements_do_not_make_it_flap() -> None:
    rng = random.Random(11)

    def noise() -> float:
        # Lognormal jitter, and one sample in fifty three times slower (a preempted thread).
        return rng.lognormvariate(0.0, 0.25) * (3.0 if rng.random() < 0.02 else 1.0)

    server = FakeServer(fixed=0.002, ratio=0.25, workers=2)
    controller = SplitController(7, 70.0, window_s=0.5, probe_interval_s=2.0, in_flight=6)
    rig = Rig(controller, server, fps=70.0, noise=noise)
    rig.run(30.0)
    assert [change.k for change in controller.history] == [7, 2], controller.history


def test_controller_moves_both_ways_as_the_device_changes() -> None:
    server = FakeServer(fixed=0.0, ratio=0.25)
    controller = SplitController(7, 30.0, window_s=1.0, probe_interval_s=2.0, in_flight=6)
    rig = Rig(controller, server, fps=30.0)
    rig.run(3.0)
    assert controller.split == 7  # 35.7 fps alone
    slowed = rig.now
    rig.device = 2.0  # 17.9 fps alone: a probe finds the server, stages go there
    rig.run(4.0)
    assert [change.k for change in changes_since(controller, slowed)] == [2]
    assert changes_since(controller, slowed)[0].time - slowed <= 2 * controller.window_s
    rig.device = 1.0  # stages offloaded are timed again by a local probe frame, and come back
    rig.run(8.0)
    assert [change.k for change in controller.history] == [7, 2, 7]


def test_controller_falls_back_when_the_server_disappears() -> None:
    controller = SplitController(7, 60.0, window_s=1.0, failure_limit=3, failure_cooldown_s=5.0)
    controller.observe_link(RTT, GIGABIT, 0.0)
    feed_local(controller, 0.0)
    feed_sizes(controller, 0.0)
    controller.observe_remote(2, sum(FAST_SERVER[2:]), 0.0)
    controller.update(0.0)
    assert controller.split == 2
    controller.observe_failure(0.1)
    controller.observe_failure(0.2)
    assert controller.remote_available(0.2)
    controller.observe_failure(0.3)
    assert not controller.remote_available(0.3)
    decision = controller.update(0.3)  # at once, not after a window
    assert decision is not None and controller.split == 7
    assert controller.update(3.0) is not None and controller.split == 7  # still cooling down
    controller.observe_remote(2, sum(FAST_SERVER[2:]), 5.9)  # a late result, before the retry
    assert controller.update(6.0) is not None and controller.split == 2  # retry after cooldown
    controller.observe_link(None, None, 6.5)  # agent's server table: no server at all
    assert controller.update(6.5) is not None and controller.split == 7


def test_controller_asks_for_a_local_probe_of_offloaded_stages() -> None:
    controller = SplitController(7, 60.0, initial=2, probe_interval_s=5.0)
    assert controller.wants_local_probe(0.0)  # never measured stages 2..6
    feed_local(controller, 0.0)
    assert not controller.wants_local_probe(1.0)
    feed_local(controller, 6.0, stages=range(2))  # only the local prefix keeps being measured
    assert controller.wants_local_probe(6.0)


def test_controller_rejects_bad_measurements() -> None:
    controller = SplitController(7, 60.0)
    with pytest.raises(SplitError, match="stage 7"):
        controller.observe_local(7, 0.01, 0.0)
    with pytest.raises(SplitError, match="finite"):
        controller.observe_local(1, float("nan"), 0.0)
    with pytest.raises(SplitError, match="remote start"):
        controller.observe_remote(0, 0.01, 0.0)
    with pytest.raises(SplitError, match="workers"):
        controller.observe_link(RTT, GIGABIT, 0.0, workers=0)
    with pytest.raises(SplitError, match="target_fps"):
        SplitController(7, -1.0)


def test_measured_latency_caps_a_bounded_window() -> None:
    modelled = estimate_split(2, LOCAL, FAST_SERVER, SIZES, RTT, GIGABIT, window=4)
    assert modelled.fps == pytest.approx(1 / 0.012)
    latencies: list[float | None] = [None] * 7
    latencies[2] = 0.080  # queueing on the way: 4 frames in flight / 80 ms = 50 fps
    measured = estimate_split(2, LOCAL, FAST_SERVER, SIZES, RTT, GIGABIT, window=4,
                              measured_latency_s=latencies)
    assert measured.latency_s == pytest.approx(0.080) and measured.fps == pytest.approx(50.0)
    assert choose_split(LOCAL, FAST_SERVER, SIZES, RTT, GIGABIT, 60.0, window=4,
                        measured_latency_s=latencies).k == 1
    latencies[2] = 0.001  # never below the model
    assert estimate_split(2, LOCAL, FAST_SERVER, SIZES, RTT, GIGABIT,
                          measured_latency_s=latencies).latency_s == modelled.latency_s


def test_controller_uses_only_recent_latencies() -> None:
    controller = SplitController(7, 60.0, window_s=1.0, in_flight=4)
    controller.observe_link(RTT, GIGABIT, 0.0)
    feed_local(controller, 0.0)
    feed_sizes(controller, 0.0)
    controller.observe_remote(2, sum(FAST_SERVER[2:]), 0.0)
    controller.observe_latency(2, 0.080, 0.0)
    decision = controller.evaluate(0.5)
    assert decision is not None and decision.candidates[1].fps == pytest.approx(50.0)
    feed_local(controller, 10.0)
    controller.observe_remote(2, sum(FAST_SERVER[2:]), 10.0)
    later = controller.evaluate(10.0)
    assert later is not None and later.candidates[1].fps == pytest.approx(1 / 0.012)  # expired
    with pytest.raises(SplitError, match="no remote part"):
        controller.observe_latency(7, 0.01, 10.0)


def test_measured_suffix_time_replaces_the_per_stage_estimate() -> None:
    # A server that adds a fixed 40 ms to every task: a per-stage estimate cannot express that,
    # a measured suffix time can.
    measured: list[float | None] = [None] * 7
    measured[5] = 0.040 + sum(FAST_SERVER[5:])
    estimate = estimate_split(5, LOCAL, FAST_SERVER, SIZES, RTT, GIGABIT,
                              measured_remote_s=measured)
    assert estimate.remote_s == pytest.approx(measured[5]) and estimate.bottleneck == "remote"
    assert estimate_split(4, LOCAL, FAST_SERVER, SIZES, RTT, GIGABIT,
                          measured_remote_s=measured).remote_s == pytest.approx(sum(FAST_SERVER[4:]))
