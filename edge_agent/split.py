"""Where to split a pipeline between device and server: a pure model and a pure controller.

Split ``k`` runs stages ``0..k-1`` on the device and ships the value entering stage ``k`` to a server
that runs ``k..n-1`` and returns the result; ``k = n`` runs everything locally. Stage 0 (capture)
always runs on the device, so ``1 <= k <= n``.

Throughput model, for split ``k < n``::

    local(k)    = sum(stage_local_s[0:k]) + message_overhead_s  (+ compressing, if chosen)
    transfer(k) = 8 * bytes(k) / bandwidth_bps
    service(k)  = the server's time for one frame's suffix k..n-1  (+ decompressing, if chosen)
    remote(k)   = service(k) / workers         a server works on ``workers`` frames at once
    latency(k)  = local + transfer + rtt + service   (or the measured one, if larger)
    fps(k)      = 1 / max(local, transfer, remote)         pipelined: frames in flight overlap,
                  min(that, window / latency)              and a bounded window caps it
    fps(k)      = 1 / latency                              one frame at a time

``service(k)`` is ``measured_remote_s[k]`` where given, else the sum of per-stage estimates
``stage_remote_s[k:]``, else unknown (the split cannot run). All local,
``fps(n) = 1 / sum(stage_local_s)``. ``message_overhead_s`` is the device's own CPU cost of
sending one frame and taking its result back (encoding, publishing, decoding): it is what makes
offloading a cheap tail of stages not worth it.

The rule: the split that meets the target with the MOST stages local; if none meets it, the fastest
one. Hysteresis keeps the current split while it still meets the target within ``hysteresis``
(relative) and moves toward local only when the more local split beats the target by the same
margin, so measurement jitter does not make it flap.

:class:`SplitController` fills the model in from what it measures. The server's time for a suffix
is a fixed part per frame plus a part that scales with the work sent (the device's own time for
stages ``k..n-1``), fitted by :class:`SuffixCost` to the splits measured recently; so is the time
from sending a frame to its result (link, broker, server queue and service), which bounds the
latency. Measured splits use their own medians. Where only one split was measured the fixed part
is only bounded (between 0 and all of it), and untried splits get the worst case of that range;
where none was, they cannot be chosen and one probe frame goes to the split that would win if
the server cost nothing. Every measured quantity is cut at a step change (:class:`Samples`): a
run of new samples far from the recent median drops the older ones at once and triggers a
re-evaluation, instead of a median that catches up a horizon later.

Nothing here reads a clock or does I/O: :class:`SplitController` is fed measurements stamped with a
``now`` argument and re-evaluates once per window, or at once after a step change.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

MIN_PERIOD_S = 1e-6


class SplitError(ValueError):
    """Inconsistent model inputs, or a split point outside the pipeline."""


@dataclass(frozen=True, slots=True)
class SplitEstimate:
    """The modelled cost of one split point (``remote_s``: the server's share of a frame period,
    ``service_s / workers``; ``service_s``: its time for one frame's suffix)."""

    k: int
    fps: float
    latency_s: float
    local_s: float
    transfer_s: float
    remote_s: float
    compress: bool = False
    service_s: float = 0.0

    @property
    def bottleneck(self) -> str:
        """Which part limits the frame rate: ``local``, ``transfer``, ``remote`` or ``none``."""
        if self.fps == 0.0:
            return "none"
        parts = {"local": self.local_s, "transfer": self.transfer_s, "remote": self.remote_s}
        return max(parts, key=lambda name: parts[name])


@dataclass(frozen=True, slots=True)
class SplitDecision:
    """The chosen split, its modelled frame rate and latency, and why."""

    k: int
    expected_fps: float
    reason: str
    latency_s: float = 0.0
    compress: bool = False
    candidates: tuple[SplitEstimate, ...] = ()


def _check_times(name: str, values: Sequence[float], n: int, *, allow_inf: bool) -> None:
    if len(values) != n:
        raise SplitError(f"{name} has {len(values)} entries, the pipeline has {n} stages")
    for index, value in enumerate(values):
        if math.isnan(value) or value < 0 or (math.isinf(value) and not allow_inf):
            raise SplitError(f"{name}[{index}] = {value!r}: must be a finite number >= 0")


def check_split(k: int, n: int) -> int:
    """Validate a split point: ``1 <= k <= n`` (capture always runs on the device)."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise SplitError(f"split {k!r} is outside the pipeline: use 1..{n} "
                         f"(stage 0, capture, always runs on the device; {n} = all local)")
    return k


def estimate_split(k: int, stage_local_s: Sequence[float], stage_remote_s: Sequence[float] | None,
                   transfer_bytes: Sequence[int | None], rtt_s: float | None,
                   bandwidth_bps: float | None, *, pipelined: bool = True,
                   window: int | None = None, message_overhead_s: float = 0.0,
                   measured_latency_s: Sequence[float | None] | None = None,
                   measured_remote_s: Sequence[float | None] | None = None,
                   compress: bool = False, compressed_bytes: Sequence[int | None] | None = None,
                   compress_s: Sequence[float] | None = None,
                   decompress_s: Sequence[float] | None = None, workers: int = 1) -> SplitEstimate:
    """The throughput model above for one split ``k`` (``fps == 0`` when it cannot run)."""
    n = len(stage_local_s)
    local = math.fsum(stage_local_s[:k])
    if k == n:
        fps = 1.0 / max(local, MIN_PERIOD_S)
        return SplitEstimate(k, fps, local, local, 0.0, 0.0)
    local += message_overhead_s
    link_known = (rtt_s is not None and math.isfinite(rtt_s)
                  and bandwidth_bps is not None and bandwidth_bps > 0)
    size: int | None = transfer_bytes[k]
    if compress:
        size = compressed_bytes[k] if compressed_bytes is not None else None
        local += compress_s[k] if compress_s is not None else math.inf
    service = math.inf
    suffix = measured_remote_s[k] if measured_remote_s is not None else None
    if suffix is not None:
        service = suffix
    elif stage_remote_s is not None and len(stage_remote_s) == n:
        service = math.fsum(stage_remote_s[k:])
    if compress:
        service += decompress_s[k] if decompress_s is not None else math.inf
    remote = service / workers
    if not link_known or size is None or not math.isfinite(service) or not math.isfinite(local):
        return SplitEstimate(k, 0.0, math.inf, local, math.inf, remote, compress, service)
    assert bandwidth_bps is not None and rtt_s is not None
    transfer = 8.0 * size / bandwidth_bps
    latency = local + transfer + rtt_s + service
    measured = measured_latency_s[k] if measured_latency_s is not None else None
    if measured is not None and measured > latency:
        latency = measured
    if pipelined:
        fps = 1.0 / max(local, transfer, remote, MIN_PERIOD_S)
        if window is not None:
            fps = min(fps, window / max(latency, MIN_PERIOD_S))
    else:
        fps = 1.0 / max(latency, MIN_PERIOD_S)
    return SplitEstimate(k, fps, latency, local, transfer, remote, compress, service)


def choose_split(stage_local_s: Sequence[float], stage_remote_s: Sequence[float] | None,
                 transfer_bytes: Sequence[int | None], rtt_s: float | None,
                 bandwidth_bps: float | None, target_fps: float, current: int | None = None,
                 hysteresis: float = 0.15, pipelined: bool = True, *, window: int | None = None,
                 message_overhead_s: float = 0.0,
                 measured_latency_s: Sequence[float | None] | None = None,
                 measured_remote_s: Sequence[float | None] | None = None,
                 compressed_bytes: Sequence[int | None] | None = None,
                 compress_s: Sequence[float] | None = None,
                 decompress_s: Sequence[float] | None = None, workers: int = 1) -> SplitDecision:
    """Pick the split meeting ``target_fps`` with the most stages local (see the module doc).

    ``stage_remote_s`` and ``measured_remote_s`` both ``None`` (or ``rtt_s``/``bandwidth_bps``
    ``None``) means no server: the answer is all local. ``measured_remote_s[k]`` is the server's
    time for suffix ``k`` (``None``: use ``stage_remote_s``); ``workers`` how many frames the
    server runs at once. ``transfer_bytes[k]`` is the size of the value entering stage ``k``
    (``None``: never measured, so ``k`` cannot be a split point yet);
    ``compressed_bytes[k]``, ``compress_s[k]`` and ``decompress_s[k]`` describe the optional
    compressed form of it (``None`` entries: not available), used when it gives a higher rate.
    """
    n = len(stage_local_s)
    if n < 1:
        raise SplitError("a pipeline needs at least one stage")
    _check_times("stage_local_s", stage_local_s, n, allow_inf=False)
    if stage_remote_s is not None and len(stage_remote_s) == 0:
        stage_remote_s = None
    if stage_remote_s is not None:
        _check_times("stage_remote_s", stage_remote_s, n, allow_inf=True)
    if len(transfer_bytes) != n or any(b is not None and b < 0 for b in transfer_bytes):
        raise SplitError(f"transfer_bytes needs {n} sizes >= 0 (or None), got "
                         f"{list(transfer_bytes)}")
    for name, extra in (("compressed_bytes", compressed_bytes), ("compress_s", compress_s),
                        ("decompress_s", decompress_s), ("measured_latency_s", measured_latency_s),
                        ("measured_remote_s", measured_remote_s)):
        if extra is not None and len(extra) != n:
            raise SplitError(f"{name} has {len(extra)} entries, the pipeline has {n} stages")
    if not math.isfinite(target_fps) or target_fps <= 0:
        raise SplitError(f"target_fps must be a positive number, got {target_fps!r}")
    if not 0.0 <= hysteresis < 1.0:
        raise SplitError(f"hysteresis must be in [0, 1), got {hysteresis!r}")
    if rtt_s is not None and (math.isnan(rtt_s) or rtt_s < 0):
        raise SplitError(f"rtt_s must be >= 0, got {rtt_s!r}")
    if current is not None:
        check_split(current, n)
    if window is not None and window < 1:
        raise SplitError(f"window must be >= 1 frame, got {window}")
    if not math.isfinite(message_overhead_s) or message_overhead_s < 0:
        raise SplitError(f"message_overhead_s must be >= 0, got {message_overhead_s!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise SplitError(f"workers must be an integer >= 1, got {workers!r}")

    can_compress = compressed_bytes is not None and compress_s is not None \
        and decompress_s is not None
    estimates: list[SplitEstimate] = []
    for k in range(1, n + 1):
        raw = estimate_split(k, stage_local_s, stage_remote_s, transfer_bytes, rtt_s,
                             bandwidth_bps, pipelined=pipelined, window=window,
                             message_overhead_s=message_overhead_s,
                             measured_latency_s=measured_latency_s,
                             measured_remote_s=measured_remote_s, workers=workers)
        if can_compress and k < n and compressed_bytes is not None \
                and compressed_bytes[k] is not None:
            packed = estimate_split(k, stage_local_s, stage_remote_s, transfer_bytes, rtt_s,
                                    bandwidth_bps, pipelined=pipelined, window=window,
                                    message_overhead_s=message_overhead_s,
                                    measured_latency_s=measured_latency_s,
                                    measured_remote_s=measured_remote_s, compress=True,
                                    compressed_bytes=compressed_bytes,
                                    compress_s=compress_s, decompress_s=decompress_s,
                                    workers=workers)
            if packed.fps > raw.fps:
                raw = packed
        estimates.append(raw)
    by_k = {e.k: e for e in estimates}
    candidates = tuple(estimates)

    def decide(chosen: SplitEstimate, reason: str) -> SplitDecision:
        return SplitDecision(chosen.k, chosen.fps, reason, chosen.latency_s, chosen.compress,
                             candidates)

    meeting = [e for e in estimates if e.fps >= target_fps]
    fastest = max(estimates, key=lambda e: (e.fps, e.k))
    best = max(meeting, key=lambda e: e.k) if meeting else fastest

    if current is None:
        if meeting:
            return decide(best, f"split {best.k} meets {target_fps:g} fps with the most stages "
                                f"local ({best.fps:.1f} fps modelled)")
        return decide(best, f"no split meets {target_fps:g} fps; split {best.k} is the fastest "
                            f"({best.fps:.1f} fps, limited by {best.bottleneck})")

    now = by_k[current]
    if now.fps >= target_fps * (1.0 - hysteresis):
        more_local = [e for e in estimates
                      if e.k > current and e.fps >= target_fps * (1.0 + hysteresis)]
        if more_local:
            chosen = max(more_local, key=lambda e: e.k)
            return decide(chosen, f"split {chosen.k} now carries {target_fps:g} fps with margin "
                                  f"({chosen.fps:.1f} fps): pulling stages back to the device")
        return decide(now, f"split {current} still meets {target_fps:g} fps within "
                           f"{hysteresis:.0%} ({now.fps:.1f} fps): keeping it")
    if meeting:
        direction = "toward the device" if best.k > current else "toward the server"
        return decide(best, f"split {current} falls short ({now.fps:.1f} fps < {target_fps:g}); "
                            f"split {best.k} meets it ({best.fps:.1f} fps): moving {direction}")
    if fastest.fps > now.fps * (1.0 + hysteresis):
        return decide(fastest, f"no split meets {target_fps:g} fps; split {fastest.k} is the "
                               f"fastest ({fastest.fps:.1f} fps vs {now.fps:.1f})")
    return decide(now, f"no split meets {target_fps:g} fps; split {current} is within "
                       f"{hysteresis:.0%} of the fastest ({now.fps:.1f} fps): keeping it")


# Measurements -------------------------------------------------------------------------------------

STEP_RUN = 3
"""At least this many newest samples on one side of the reference make a step change..."""
STEP_REFERENCE = 4
"""...judged against at least this many recent samples before them..."""
STEP_RELATIVE = 0.3
"""...when they all lie further than this fraction of the reference median from it,..."""
STEP_SPREAD = 4.0
"""...this many robust standard deviations (1.4826 x the median absolute deviation)..."""


class Samples:
    """Recent timestamped measurements of one quantity, cut at a step change.

    A step: the newest samples, at least :data:`STEP_RUN` and all of the last ``min_span_s``
    (so a burst shorter than that is noise), all lie on the same side of the median of the
    recent ones before them, further than :data:`STEP_RELATIVE` of it, :data:`STEP_SPREAD`
    robust standard deviations and ``floor_s``. The samples before the step are then dropped:
    the median is of the new level at once, not a horizon later.
    """

    def __init__(self, horizon_s: float, *, floor_s: float = 0.0, min_span_s: float = 0.0,
                 maxlen: int = 128) -> None:
        self.horizon_s = horizon_s
        self.floor_s = floor_s
        self.min_span_s = min_span_s
        self._values: deque[tuple[float, float]] = deque(maxlen=maxlen)

    def add(self, now: float, value: float) -> float | None:
        """Store a sample; the time of the first sample of a step it completes, else ``None``."""
        self._values.append((now, value))
        values = list(self._values)
        cut = len(values) - STEP_RUN
        while cut > 0 and now - values[cut - 1][0] <= self.min_span_s:
            cut -= 1
        reference = [v for t, v in values[:max(cut, 0)] if now - t <= self.horizon_s]
        if cut <= 0 or len(reference) < STEP_REFERENCE:
            return None
        run = [v for _, v in values[cut:]]
        center = statistics.median(reference)
        spread = 1.4826 * statistics.median(abs(v - center) for v in reference)
        margin = max(STEP_RELATIVE * abs(center), STEP_SPREAD * spread, self.floor_s)
        if all(v > center + margin for v in run) or all(v < center - margin for v in run):
            start = values[cut][0]
            self.drop_before(start)
            return start
        return None

    def drop_before(self, time: float) -> None:
        while self._values and self._values[0][0] < time:
            self._values.popleft()

    def recent(self, now: float) -> list[float]:
        return [v for t, v in self._values if now - t <= self.horizon_s]

    def median(self, now: float, fallback_count: int = 0) -> float | None:
        """Median of the samples within the horizon; of the last ``fallback_count`` if none
        are that recent (``None`` when there are none)."""
        recent = self.recent(now)
        if not recent and fallback_count > 0:
            recent = [v for _, v in list(self._values)[-fallback_count:]]
        return statistics.median(recent) if recent else None

    def newest(self) -> float | None:
        return self._values[-1][0] if self._values else None


class SampleGroup:
    """One quantity measured at several indices: per split point (the server's time for the
    suffix ``k..n-1``, a frame's latency) or per stage (the device's stage times).

    A step in any index's samples is a change of the whole (the server, the link, the device),
    so it drops the older samples of every index: they say nothing about after the change.
    """

    def __init__(self, size: int, horizon_s: float, *, floor_s: float = 0.0,
                 min_span_s: float = 0.0) -> None:
        self._members = [Samples(horizon_s, floor_s=floor_s, min_span_s=min_span_s)
                         for _ in range(size)]

    def __getitem__(self, index: int) -> Samples:
        return self._members[index]

    def add(self, index: int, now: float, value: float) -> bool:
        """Store a sample of ``index``; ``True`` when it completed a step change."""
        step = self._members[index].add(now, value)
        if step is None:
            return False
        for samples in self._members:
            samples.drop_before(step)
        return True

    def medians(self, now: float) -> dict[int, float]:
        """Median of the recent samples of every index that has some."""
        return {i: m for i, samples in enumerate(self._members)
                if (m := samples.median(now)) is not None}

    def newest(self) -> float | None:
        times = [t for samples in self._members if (t := samples.newest()) is not None]
        return max(times) if times else None


# The remote model ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SuffixCost:
    """A remote time per frame as ``fixed + per_work * work``, fitted to measured splits.

    ``work`` of split ``k`` is the device's own time for stages ``k..n-1`` (what is sent);
    ``points`` are (work, median measured time) of the splits measured recently. Both
    coefficients are ``>= 0``. From two or more splits they are a least-squares fit. From one
    split ``(w1, t1)`` only the bounds are known, ``0 <= fixed <= t1``, so an estimate is a
    range: ``t1 * min(1, w / w1)`` at best and ``t1 * max(1, w / w1)`` at worst (a split that
    sends less may cost as much: the time may all be fixed). From none, nothing is known.
    """

    points: tuple[tuple[float, float], ...]

    def _coefficients(self) -> tuple[float, float] | None:
        """(fixed, per_work) when two distinct amounts of work were measured."""
        xs = [x for x, _ in self.points]
        ys = [y for _, y in self.points]
        mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
        var_x = math.fsum((x - mean_x) ** 2 for x in xs)
        if len(self.points) < 2 or var_x <= 1e-12 * max(mean_x * mean_x, 1e-12):
            return None
        slope = math.fsum((x - mean_x) * (y - mean_y) for x, y in self.points) / var_x
        fixed = mean_y - slope * mean_x
        if slope < 0.0:
            return mean_y, 0.0
        if fixed < 0.0:
            return 0.0, math.fsum(x * y for x, y in self.points) / math.fsum(x * x for x in xs)
        return fixed, slope

    def estimate(self, work: float, *, pessimistic: bool = True) -> float | None:
        """The time of a suffix of ``work``: at worst (or at best), ``None`` when unbounded."""
        if not self.points:
            return None if pessimistic else 0.0
        fitted = self._coefficients()
        if fitted is not None:
            return fitted[0] + fitted[1] * work
        x1 = statistics.fmean(x for x, _ in self.points)
        t1 = statistics.fmean(y for _, y in self.points)
        if x1 <= 0.0:  # all of it fixed as far as we know; the per-work part is unbounded
            return t1 if work <= 0.0 or not pessimistic else None
        scale = work / x1
        return t1 * (max(1.0, scale) if pessimistic else min(1.0, scale))


# Controller ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SplitChange:
    """One entry of the controller's history."""

    time: float
    k: int
    expected_fps: float
    compress: bool
    reason: str


class SplitController:
    """Re-evaluates the split once per window from measurements it is fed (pure: no clock).

    Fed per-stage local times, the device's per-message overhead, the server's service time of
    whole suffixes (a server reports stages ``k..n-1`` as one number), frame latencies, the
    sizes of values entering each stage, the link (round trip, bandwidth and the server's
    workers; ``None`` when no server is reachable) and remote failures. Remote times of every
    split come from :class:`SuffixCost` fits of what was measured, at their worst where only
    bounds are known; splits the server was never measured on cannot be chosen, they are
    probed (:meth:`remote_probe_split`). A step change in a measured time is acted on at once,
    without waiting for the window. After ``failure_limit`` consecutive failures the server
    counts as gone for ``failure_cooldown_s``. A step must hold for ``step_span_s`` (a quarter
    window by default) and move at least ``step_floor_s``.
    """

    def __init__(self, n_stages: int, target_fps: float, *, window_s: float = 1.0,
                 hysteresis: float = 0.15, pipelined: bool = True, in_flight: int | None = None,
                 initial: int | None = None, horizon_s: float | None = None,
                 failure_limit: int = 3, failure_cooldown_s: float = 5.0,
                 probe_interval_s: float = 5.0, step_floor_s: float = 0.002,
                 step_span_s: float | None = None) -> None:
        if n_stages < 1:
            raise SplitError("a pipeline needs at least one stage")
        if not math.isfinite(target_fps) or target_fps <= 0:
            raise SplitError(f"target_fps must be a positive number, got {target_fps!r}")
        if window_s <= 0 or failure_limit < 1 or step_floor_s < 0 or (
                step_span_s is not None and step_span_s < 0):
            raise SplitError("window_s and failure_limit must be positive, step_floor_s and "
                             "step_span_s >= 0")
        self.n = n_stages
        self.target_fps = target_fps
        self.window_s = window_s
        self.hysteresis = hysteresis
        self.pipelined = pipelined
        self.in_flight = in_flight
        self.horizon_s = horizon_s if horizon_s is not None else 3.0 * window_s
        self.failure_limit = failure_limit
        self.failure_cooldown_s = failure_cooldown_s
        self.probe_interval_s = probe_interval_s
        self._split = check_split(initial if initial is not None else n_stages, n_stages)
        self._compress = False
        span = step_span_s if step_span_s is not None else window_s / 4

        def samples() -> Samples:
            return Samples(self.horizon_s, floor_s=step_floor_s, min_span_s=span)

        self._local = SampleGroup(n_stages, self.horizon_s, floor_s=step_floor_s,
                                  min_span_s=span)
        self._sizes = [samples() for _ in range(n_stages)]
        self._packed = [samples() for _ in range(n_stages)]
        self._pack_s = [samples() for _ in range(n_stages)]
        self._unpack_s = [samples() for _ in range(n_stages)]
        self._overhead = samples()
        self._service = SampleGroup(n_stages, self.horizon_s, floor_s=step_floor_s,
                                    min_span_s=span)
        self._latency = SampleGroup(n_stages, self.horizon_s, floor_s=step_floor_s,
                                    min_span_s=span)
        self._rtt: float | None = None
        self._bandwidth: float | None = None
        self._workers = 1
        self._failures = 0
        self._down_until = -math.inf
        self._last_eval: float | None = None
        self._stepped = False
        self._last_remote_probe = -math.inf
        self.last_decision: SplitDecision | None = None
        self.history: list[SplitChange] = []

    @property
    def split(self) -> int:
        return self._split

    @property
    def compress(self) -> bool:
        """Whether the value entering the remote part should travel compressed."""
        return self._compress

    @property
    def workers(self) -> int:
        """How many frames the server works on at once, as last reported by the link."""
        return self._workers

    # Measurements ---------------------------------------------------------------------------

    def _stage(self, stage: int) -> int:
        if isinstance(stage, bool) or not 0 <= stage < self.n:
            raise SplitError(f"stage {stage!r} outside the pipeline (0..{self.n - 1})")
        return stage

    @staticmethod
    def _seconds(what: str, seconds: float) -> float:
        if not seconds >= 0 or math.isinf(seconds):
            raise SplitError(f"{what} must be finite and >= 0, got {seconds!r}")
        return seconds

    def observe_local(self, stage: int, seconds: float, now: float) -> None:
        """Time one stage took on the device."""
        if self._local.add(self._stage(stage), now, self._seconds("stage time", seconds)):
            self._stepped = True

    def observe_size(self, stage: int, nbytes: int, now: float, *,
                     compressed_bytes: int | None = None, compress_s: float | None = None,
                     decompress_s: float | None = None) -> None:
        """Encoded size of the value entering ``stage``, and of its compressed form if measured."""
        if nbytes < 0:
            raise SplitError(f"size must be >= 0, got {nbytes}")
        self._sizes[self._stage(stage)].add(now, float(nbytes))
        if compressed_bytes is not None and compress_s is not None and decompress_s is not None:
            self._packed[stage].add(now, float(compressed_bytes))
            self._pack_s[stage].add(now, compress_s)
            self._unpack_s[stage].add(now, decompress_s)

    def observe_remote(self, start: int, seconds: float, now: float) -> None:
        """A server ran stages ``start..n-1`` in ``seconds``; also clears the failure count."""
        if not 1 <= start < self.n:
            raise SplitError(f"remote start stage {start} outside 1..{self.n - 1}")
        if self._service.add(start, now, self._seconds("remote time", seconds)):
            self._stepped = True
        self._failures = 0

    def observe_overhead(self, seconds: float, now: float) -> None:
        """The device's CPU time to send one frame and take its result back."""
        self._overhead.add(now, self._seconds("overhead", seconds))

    def observe_latency(self, split: int, seconds: float, now: float) -> None:
        """A frame split at ``split`` took ``seconds`` from its start to its remote result."""
        if not 1 <= split < self.n:
            raise SplitError(f"split {split} has no remote part (1..{self.n - 1})")
        if self._latency.add(split, now, self._seconds("latency", seconds)):
            self._stepped = True

    def observe_link(self, rtt_s: float | None, bandwidth_bps: float | None, now: float, *,
                     workers: int = 1) -> None:
        """The round trip and bandwidth to the best server (``None``: no server), and how many
        frames it works on at once."""
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise SplitError(f"workers must be an integer >= 1, got {workers!r}")
        self._rtt = rtt_s
        self._bandwidth = bandwidth_bps
        self._workers = workers

    def observe_failure(self, now: float) -> None:
        """A remote frame failed or timed out; enough in a row mark the server as gone."""
        self._failures += 1
        if self._failures >= self.failure_limit:
            self._down_until = now + self.failure_cooldown_s
            self._failures = 0

    # Estimates ------------------------------------------------------------------------------

    def remote_available(self, now: float) -> bool:
        return (now >= self._down_until and self._rtt is not None
                and self._bandwidth is not None and self._bandwidth > 0)

    def local_times(self, now: float) -> list[float] | None:
        """Median local time per stage, ``None`` while some stage was never measured."""
        times = [self._local[stage].median(now, fallback_count=5) for stage in range(self.n)]
        if any(t is None for t in times):
            return None
        return [t for t in times if t is not None]

    def _sizes_now(self, now: float
                   ) -> tuple[list[int | None], list[int | None], list[float], list[float]]:
        def median(samples: Samples) -> float | None:
            return samples.median(now, fallback_count=5)

        sizes = [None if (m := median(s)) is None else int(m) for s in self._sizes]
        packed = [None if (m := median(s)) is None else int(m) for s in self._packed]
        pack_s = [median(s) or 0.0 for s in self._pack_s]
        unpack_s = [median(s) or 0.0 for s in self._unpack_s]
        return sizes, packed, pack_s, unpack_s

    def remote_costs(self, now: float, local: Sequence[float], sizes: Sequence[int | None], *,
                     pessimistic: bool = True
                     ) -> tuple[list[float | None], list[float | None]]:
        """Per split: the server's service time of its suffix, and the frame's latency.

        A split measured recently has its own medians; the others are estimated by
        :class:`SuffixCost` fits over the measured ones, at worst (or at best); ``None`` where
        nothing bounds them. Latency is the local prefix, the transfer and the measured time
        from sending to the result (link, broker, server queue and service), fitted the same way.
        """
        work = [math.fsum(local[k:]) for k in range(self.n)]
        overhead = self._overhead.median(now, fallback_count=5) or 0.0
        bandwidth = self._bandwidth or math.inf

        def before_remote(k: int) -> float:
            transfer = 8.0 * (sizes[k] or 0) / bandwidth
            return math.fsum(local[:k]) + overhead + transfer

        service = self._service.medians(now)
        calls = {k: max(0.0, latency - before_remote(k))
                 for k, latency in self._latency.medians(now).items()}
        service_fit = SuffixCost(tuple((work[k], t) for k, t in sorted(service.items())))
        call_fit = SuffixCost(tuple((work[k], t) for k, t in sorted(calls.items())))
        services: list[float | None] = [None] * self.n
        latencies: list[float | None] = [None] * self.n
        for k in range(1, self.n):
            services[k] = service.get(k, service_fit.estimate(work[k], pessimistic=pessimistic))
            call = calls.get(k, call_fit.estimate(work[k], pessimistic=pessimistic))
            if call is not None:
                latencies[k] = before_remote(k) + call
        return services, latencies

    def evaluate(self, now: float, *, current: int | None = -1,
                 pessimistic: bool = True) -> SplitDecision | None:
        """The decision the model makes now (``None`` until every stage has a local time).

        ``pessimistic=False`` takes every remote time at the best its bounds allow (the
        decision probing looks for); ``current`` ``None`` decides from scratch.
        """
        local = self.local_times(now)
        if local is None:
            return None
        sizes, packed, pack_s, unpack_s = self._sizes_now(now)
        available = self.remote_available(now)
        services: list[float | None] | None = None
        latencies: list[float | None] | None = None
        if available:
            services, latencies = self.remote_costs(now, local, sizes, pessimistic=pessimistic)
        return choose_split(local, None, sizes, self._rtt if available else None,
                            self._bandwidth if available else None, self.target_fps,
                            self._split if current == -1 else current, self.hysteresis,
                            self.pipelined, window=self.in_flight,
                            message_overhead_s=self._overhead.median(now, 5) or 0.0,
                            measured_latency_s=latencies, measured_remote_s=services,
                            compressed_bytes=packed, compress_s=pack_s, decompress_s=unpack_s,
                            workers=self._workers)

    # Probes ---------------------------------------------------------------------------------

    def remote_probe_split(self, now: float) -> int | None:
        """A split to send one frame to because what the server would do there is unknown and
        could change the decision: the split the model picks with every remote time at its
        best, when that differs from the decision at worst and is not measured recently.

        At most one probe per ``probe_interval_s``; while everything runs locally the last
        remote result counts as a probe (frames still returning measure the server anyway).
        """
        if not self.remote_available(now):
            return None
        latest = self._last_remote_probe
        if self._split == self.n:
            latest = max(latest, self._service.newest() or -math.inf)
        if now - latest <= self.probe_interval_s:
            return None
        worst = self.evaluate(now)
        best = self.evaluate(now, pessimistic=False)
        if worst is None or best is None or best.k == self.n or best.k == worst.k \
                or best.k in self._service.medians(now):
            return None
        self._last_remote_probe = now
        return best.k

    def wants_local_probe(self, now: float) -> bool:
        """True when a stage that runs remotely has no fresh local time: run one frame locally."""
        for stage in range(self._split, self.n):
            newest = self._local[stage].newest()
            if newest is None or now - newest > self.probe_interval_s:
                return True
        return False

    # Deciding -------------------------------------------------------------------------------

    def update(self, now: float) -> SplitDecision | None:
        """Re-evaluate if a window has passed, a measured time stepped or the server went away;
        apply the result."""
        down = self._split < self.n and not self.remote_available(now)
        due = self._last_eval is None or now - self._last_eval >= self.window_s
        if not (down or due or self._stepped):
            return None
        decision = self.evaluate(now)
        if decision is None:
            if down:  # no local times yet, but no server either: all local is the only option
                decision = SplitDecision(self.n, 0.0, "server unavailable: all local")
            else:
                return None
        self._stepped = False
        self._last_eval = now
        self.last_decision = decision
        if decision.k != self._split or decision.compress != self._compress or not self.history:
            self.history.append(SplitChange(now, decision.k, decision.expected_fps,
                                            decision.compress, decision.reason))
        self._split = decision.k
        self._compress = decision.compress
        return decision


__all__ = [
    "SampleGroup",
    "Samples",
    "SplitChange",
    "SplitController",
    "SplitDecision",
    "SplitError",
    "SplitEstimate",
    "SuffixCost",
    "check_split",
    "choose_split",
    "estimate_split",
]
