"""The split model and controller, told as stories with fixed numbers (no clock, no I/O)."""

from __future__ import annotations

import itertools
import random

import pytest

from edge_agent.split import (
    SplitController,
    SplitError,
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
def test_server_gone_means_all_local(gone: dict[str, object]) -> None:
    arguments: dict[str, object] = {"stage_remote_s": FAST_SERVER, "rtt_s": RTT,
                                    "bandwidth_bps": GIGABIT}
    arguments.update(gone)
    decision = choose_split(LOCAL, transfer_bytes=SIZES, target_fps=60.0, current=2,
                            **arguments)  # type: ignore[arg-type]
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
def test_inconsistent_inputs_are_rejected(arguments: dict[str, object], words: str) -> None:
    base: dict[str, object] = {"stage_local_s": LOCAL, "stage_remote_s": FAST_SERVER,
                               "transfer_bytes": SIZES, "rtt_s": RTT, "bandwidth_bps": GIGABIT,
                               "target_fps": 30.0}
    base.update(arguments)
    with pytest.raises(SplitError, match=words):
        choose_split(**base)  # type: ignore[arg-type]


# Controller stories -------------------------------------------------------------------------------


def feed_local(controller: SplitController, now: float, scale: float = 1.0,
               stages: range | None = None) -> None:
    for stage in stages if stages is not None else range(7):
        controller.observe_local(stage, LOCAL[stage] * scale, now)


def feed_sizes(controller: SplitController, now: float) -> None:
    for stage, size in enumerate(SIZES):
        controller.observe_size(stage, size, now)


def test_controller_waits_for_measurements_and_a_window() -> None:
    controller = SplitController(7, 60.0, window_s=1.0)
    assert controller.split == 7
    assert controller.update(0.0) is None  # no local times yet
    feed_local(controller, 0.1)
    feed_sizes(controller, 0.1)
    controller.observe_link(RTT, GIGABIT, 0.1)
    first = controller.update(0.2)
    assert first is not None and controller.split == 2  # prior: server as fast as the device...
    assert controller.update(0.5) is None  # ...and nothing again until a window has passed


def test_controller_moves_both_ways_as_the_server_and_device_change() -> None:
    controller = SplitController(7, 60.0, window_s=1.0, hysteresis=0.15)
    controller.observe_link(RTT, GIGABIT, 0.0)
    now = 0.0
    splits = []
    # Phase 1: a fast server (a quarter of the device's time) -> offload from stage 2.
    for _ in range(5):
        now += 1.0
        feed_local(controller, now)
        feed_sizes(controller, now)
        controller.observe_remote(2, sum(FAST_SERVER[2:]), now)
        controller.update(now)
        splits.append(controller.split)
    assert splits[-1] == 2
    assert controller.speed_ratio(now, LOCAL) == pytest.approx(0.25)
    # Phase 2: the server slows to ten times the device, and sending costs the device 3 ms a
    # frame -> everything comes back.
    for _ in range(5):
        now += 1.0
        feed_local(controller, now)
        controller.observe_overhead(OVERHEAD, now)
        controller.observe_remote(2, sum(VERY_SLOW_SERVER[2:]), now)
        controller.update(now)
    assert controller.split == 7
    # Phase 3: target lowered below the device's own rate; the device slows, then recovers.
    controller.target_fps = 30.0
    for scale, expected in ((2.0, 2), (1.0, 7)):
        for _ in range(5):
            now += 1.0
            feed_local(controller, now, scale)
            controller.observe_remote(2, sum(FAST_SERVER[2:]), now)
            controller.update(now)
        assert controller.split == expected, f"device x{scale}"
    # Both directions, with a few intermediate steps while the window mixes old and new times.
    ks = [change.k for change in controller.history]
    assert ks[0] == 2 and ks[-1] == 7
    steps = list(itertools.pairwise(ks))
    assert any(b > a for a, b in steps) and any(b < a for a, b in steps)
    assert len(ks) <= 8


def test_controller_falls_back_when_the_server_disappears() -> None:
    controller = SplitController(7, 60.0, window_s=1.0, failure_limit=3, failure_cooldown_s=5.0)
    controller.observe_link(RTT, GIGABIT, 0.0)
    feed_local(controller, 0.0)
    feed_sizes(controller, 0.0)
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
    with pytest.raises(SplitError, match="target_fps"):
        SplitController(7, -1.0)


def test_controller_probes_the_server_while_everything_runs_locally() -> None:
    controller = SplitController(7, 60.0, window_s=1.0, probe_interval_s=3.0,
                                 remote_speed_prior=10.0)  # believes the server is very slow
    feed_local(controller, 0.0)
    feed_sizes(controller, 0.0)
    assert controller.remote_probe_split(0.0) is None  # no server known
    controller.observe_link(RTT, GIGABIT, 0.0)
    controller.update(0.0)
    assert controller.split == 7
    probe = controller.remote_probe_split(0.1)
    assert probe is not None and 1 <= probe < 7
    assert controller.remote_probe_split(0.2) is None  # one probe per interval
    # The probe comes back fast (a quarter of the device's time): the next window offloads.
    controller.observe_remote(probe, sum(FAST_SERVER[probe:]), 0.3)
    feed_local(controller, 1.1)
    controller.update(1.1)
    assert controller.split == 2
    assert controller.remote_probe_split(1.2) is None  # offloading measures the server anyway


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
    controller.observe_latency(2, 0.080, 0.0)
    decision = controller.evaluate(0.5)
    assert decision is not None and decision.candidates[1].fps == pytest.approx(50.0)
    feed_local(controller, 10.0)
    later = controller.evaluate(10.0)
    assert later is not None and later.candidates[1].fps == pytest.approx(1 / 0.016)  # expired
    with pytest.raises(SplitError, match="no remote part"):
        controller.observe_latency(7, 0.01, 10.0)


def test_measured_suffix_time_replaces_the_per_stage_estimate() -> None:
    # A server that adds a fixed 40 ms to every task: the speed ratio cannot express that, a
    # measured suffix time can.
    measured: list[float | None] = [None] * 7
    measured[5] = 0.040 + sum(FAST_SERVER[5:])
    estimate = estimate_split(5, LOCAL, FAST_SERVER, SIZES, RTT, GIGABIT,
                              measured_remote_s=measured)
    assert estimate.remote_s == pytest.approx(measured[5]) and estimate.bottleneck == "remote"
    assert estimate_split(4, LOCAL, FAST_SERVER, SIZES, RTT, GIGABIT,
                          measured_remote_s=measured).remote_s == pytest.approx(sum(FAST_SERVER[4:]))


def test_controller_trusts_the_measured_time_of_the_split_in_use() -> None:
    controller = SplitController(7, 30.0, window_s=1.0)
    controller.observe_link(RTT, GIGABIT, 0.0)
    feed_local(controller, 0.0, scale=2.0)  # a busy device: 17.9 fps alone
    feed_sizes(controller, 0.0)
    controller.observe_remote(2, sum(FAST_SERVER[2:]), 0.0)
    controller.update(0.0)
    assert controller.split == 2
    # The server now takes 200 ms per task whatever it runs: 5 fps at split 2.
    for step in range(1, 4):
        feed_local(controller, float(step), scale=2.0)
        controller.observe_remote(2, 0.2, float(step))
        controller.update(float(step))
    decision = controller.last_decision
    assert decision is not None and decision.candidates[1].remote_s == pytest.approx(0.2)
    assert controller.split > 2
