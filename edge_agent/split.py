"""Where to split a pipeline between device and server: a pure model and a pure controller.

Split ``k`` runs stages ``0..k-1`` on the device and ships the value entering stage ``k`` to a server
that runs ``k..n-1`` and returns the result; ``k = n`` runs everything locally. Stage 0 (capture)
always runs on the device, so ``1 <= k <= n``.

Throughput model, for split ``k < n``::

    local(k)    = sum(stage_local_s[0:k]) + message_overhead_s  (+ compressing, if chosen)
    transfer(k) = 8 * bytes(k) / bandwidth_bps
    remote(k)   = sum(stage_remote_s[k:n]) (+ decompressing, if chosen)
    latency(k)  = local + transfer + rtt + remote
    fps(k)      = 1 / max(local, transfer, remote)         pipelined: frames in flight overlap,
                  min(that, window / latency)              and a bounded window caps it
    fps(k)      = 1 / latency                              one frame at a time

where a measured server time of the whole suffix ``k..n-1`` (``measured_remote_s[k]``) replaces
the sum of per-stage estimates (a server's fixed cost per task shows there), and a measured
latency of split ``k`` (``measured_latency_s[k]``: frame start to result, which also holds the
queueing the sum above leaves out) replaces the modelled one when it is larger. All local,
``fps(n) = 1 / sum(stage_local_s)``. ``message_overhead_s`` is the device's own CPU cost of
sending one frame and taking its result back (encoding, publishing, decoding): it is what makes
offloading a cheap tail of stages not worth it.

The rule: the split that meets the target with the MOST stages local; if none meets it, the fastest
one. Hysteresis keeps the current split while it still meets the target within ``hysteresis``
(relative) and moves toward local only when the more local split beats the target by the same
margin, so measurement jitter does not make it flap.

Nothing here reads a clock or does I/O: :class:`SplitController` is fed measurements stamped with a
``now`` argument and re-evaluates once per window.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

MIN_PERIOD_S = 1e-6


class SplitError(ValueError):
    """Inconsistent model inputs, or a split point outside the pipeline."""


@dataclass(frozen=True, slots=True)
class SplitEstimate:
    """The modelled cost of one split point."""

    k: int
    fps: float
    latency_s: float
    local_s: float
    transfer_s: float
    remote_s: float
    compress: bool = False

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
                   decompress_s: Sequence[float] | None = None) -> SplitEstimate:
    """The throughput model above for one split ``k`` (``fps == 0`` when it cannot run)."""
    n = len(stage_local_s)
    local = math.fsum(stage_local_s[:k])
    if k == n:
        fps = 1.0 / max(local, MIN_PERIOD_S)
        return SplitEstimate(k, fps, local, local, 0.0, 0.0)
    local += message_overhead_s
    remote_known = (stage_remote_s is not None and len(stage_remote_s) == n
                    and rtt_s is not None and math.isfinite(rtt_s)
                    and bandwidth_bps is not None and bandwidth_bps > 0)
    size: int | None = transfer_bytes[k]
    if compress:
        size = compressed_bytes[k] if compressed_bytes is not None else None
        local += compress_s[k] if compress_s is not None else math.inf
    remote = math.inf
    if remote_known:
        assert stage_remote_s is not None
        remote = math.fsum(stage_remote_s[k:])
        suffix = measured_remote_s[k] if measured_remote_s is not None else None
        if suffix is not None:
            remote = suffix
        if compress:
            remote += decompress_s[k] if decompress_s is not None else math.inf
    if not remote_known or size is None or not math.isfinite(remote) or not math.isfinite(local):
        return SplitEstimate(k, 0.0, math.inf, local, math.inf, remote, compress)
    assert bandwidth_bps is not None and rtt_s is not None
    transfer = 8.0 * size / bandwidth_bps
    latency = local + transfer + rtt_s + remote
    measured = measured_latency_s[k] if measured_latency_s is not None else None
    if measured is not None and measured > latency:
        latency = measured
    if pipelined:
        fps = 1.0 / max(local, transfer, remote, MIN_PERIOD_S)
        if window is not None:
            fps = min(fps, window / max(latency, MIN_PERIOD_S))
    else:
        fps = 1.0 / max(latency, MIN_PERIOD_S)
    return SplitEstimate(k, fps, latency, local, transfer, remote, compress)


def choose_split(stage_local_s: Sequence[float], stage_remote_s: Sequence[float] | None,
                 transfer_bytes: Sequence[int | None], rtt_s: float | None,
                 bandwidth_bps: float | None, target_fps: float, current: int | None = None,
                 hysteresis: float = 0.15, pipelined: bool = True, *, window: int | None = None,
                 message_overhead_s: float = 0.0,
                 measured_latency_s: Sequence[float | None] | None = None,
                 measured_remote_s: Sequence[float | None] | None = None,
                 compressed_bytes: Sequence[int | None] | None = None,
                 compress_s: Sequence[float] | None = None,
                 decompress_s: Sequence[float] | None = None) -> SplitDecision:
    """Pick the split meeting ``target_fps`` with the most stages local (see the module doc).

    ``stage_remote_s`` ``None`` (or ``rtt_s``/``bandwidth_bps`` ``None``) means no server: the
    answer is all local. ``transfer_bytes[k]`` is the size of the value entering stage ``k``
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

    can_compress = compressed_bytes is not None and compress_s is not None \
        and decompress_s is not None
    estimates: list[SplitEstimate] = []
    for k in range(1, n + 1):
        raw = estimate_split(k, stage_local_s, stage_remote_s, transfer_bytes, rtt_s,
                             bandwidth_bps, pipelined=pipelined, window=window,
                             message_overhead_s=message_overhead_s,
                             measured_latency_s=measured_latency_s,
                             measured_remote_s=measured_remote_s)
        if can_compress and k < n and compressed_bytes is not None \
                and compressed_bytes[k] is not None:
            packed = estimate_split(k, stage_local_s, stage_remote_s, transfer_bytes, rtt_s,
                                    bandwidth_bps, pipelined=pipelined, window=window,
                                    message_overhead_s=message_overhead_s,
                                    measured_latency_s=measured_latency_s,
                                    measured_remote_s=measured_remote_s, compress=True,
                                    compressed_bytes=compressed_bytes,
                                    compress_s=compress_s, decompress_s=decompress_s)
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


# Controller ---------------------------------------------------------------------------------------


@dataclass
class _Samples:
    """Recent timestamped measurements of one quantity."""

    values: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=64))

    def add(self, now: float, value: float) -> None:
        self.values.append((now, value))

    def median(self, now: float, horizon_s: float, fallback_count: int = 5) -> float | None:
        """Median of samples within ``horizon_s``; the last ``fallback_count`` if none are that
        recent (``0``: ``None`` then)."""
        if not self.values:
            return None
        recent = [v for t, v in self.values if now - t <= horizon_s]
        if not recent:
            if fallback_count <= 0:
                return None
            recent = [v for _, v in list(self.values)[-fallback_count:]]
        return statistics.median(recent)

    def newest(self) -> float | None:
        return self.values[-1][0] if self.values else None


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

    Feed it per-stage local times, the device's per-message overhead, the remote service time of
    whole suffixes (a server reports stages ``k..n-1`` as one number), the sizes of values
    entering each stage, the link (round trip, bandwidth; ``None`` when no server is reachable)
    and remote failures. Remote
    per-stage times are the local ones scaled by the server's measured speed ratio
    (``remote_speed_prior`` until a remote result arrives). After ``failure_limit`` consecutive
    failures the server counts as gone for ``failure_cooldown_s``.
    """

    def __init__(self, n_stages: int, target_fps: float, *, window_s: float = 1.0,
                 hysteresis: float = 0.15, pipelined: bool = True, in_flight: int | None = None,
                 initial: int | None = None, horizon_s: float | None = None,
                 remote_speed_prior: float = 1.0, failure_limit: int = 3,
                 failure_cooldown_s: float = 5.0, probe_interval_s: float = 5.0) -> None:
        if n_stages < 1:
            raise SplitError("a pipeline needs at least one stage")
        if not math.isfinite(target_fps) or target_fps <= 0:
            raise SplitError(f"target_fps must be a positive number, got {target_fps!r}")
        if window_s <= 0 or remote_speed_prior <= 0 or failure_limit < 1:
            raise SplitError("window_s, remote_speed_prior and failure_limit must be positive")
        self.n = n_stages
        self.target_fps = target_fps
        self.window_s = window_s
        self.hysteresis = hysteresis
        self.pipelined = pipelined
        self.in_flight = in_flight
        self.horizon_s = horizon_s if horizon_s is not None else 3.0 * window_s
        self.remote_speed_prior = remote_speed_prior
        self.failure_limit = failure_limit
        self.failure_cooldown_s = failure_cooldown_s
        self.probe_interval_s = probe_interval_s
        self._split = check_split(initial if initial is not None else n_stages, n_stages)
        self._compress = False
        self._local = [_Samples() for _ in range(n_stages)]
        self._sizes = [_Samples() for _ in range(n_stages)]
        self._packed = [_Samples() for _ in range(n_stages)]
        self._pack_s = [_Samples() for _ in range(n_stages)]
        self._unpack_s = [_Samples() for _ in range(n_stages)]
        self._remote: deque[tuple[float, int, float]] = deque(maxlen=64)
        self._overhead = _Samples()
        self._latency = [_Samples() for _ in range(n_stages)]
        self._rtt: float | None = None
        self._bandwidth: float | None = None
        self._failures = 0
        self._down_until = -math.inf
        self._last_eval: float | None = None
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

    # Measurements ---------------------------------------------------------------------------

    def _stage(self, stage: int) -> int:
        if isinstance(stage, bool) or not 0 <= stage < self.n:
            raise SplitError(f"stage {stage!r} outside the pipeline (0..{self.n - 1})")
        return stage

    def observe_local(self, stage: int, seconds: float, now: float) -> None:
        """Time one stage took on the device."""
        if not seconds >= 0 or math.isinf(seconds):
            raise SplitError(f"stage time must be finite and >= 0, got {seconds!r}")
        self._local[self._stage(stage)].add(now, seconds)

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
        if not seconds >= 0 or math.isinf(seconds):
            raise SplitError(f"remote time must be finite and >= 0, got {seconds!r}")
        self._remote.append((now, start, seconds))
        self._failures = 0

    def observe_overhead(self, seconds: float, now: float) -> None:
        """The device's CPU time to send one frame and take its result back."""
        if not seconds >= 0 or math.isinf(seconds):
            raise SplitError(f"overhead must be finite and >= 0, got {seconds!r}")
        self._overhead.add(now, seconds)

    def observe_latency(self, split: int, seconds: float, now: float) -> None:
        """A frame split at ``split`` took ``seconds`` from its start to its remote result."""
        if not 1 <= split < self.n:
            raise SplitError(f"split {split} has no remote part (1..{self.n - 1})")
        if not seconds >= 0 or math.isinf(seconds):
            raise SplitError(f"latency must be finite and >= 0, got {seconds!r}")
        self._latency[split].add(now, seconds)

    def observe_link(self, rtt_s: float | None, bandwidth_bps: float | None, now: float) -> None:
        """The current round trip and bandwidth to the best server (``None``: no server)."""
        self._rtt = rtt_s
        self._bandwidth = bandwidth_bps

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
        times = [s.median(now, self.horizon_s) for s in self._local]
        if any(t is None for t in times):
            return None
        return [t for t in times if t is not None]

    def speed_ratio(self, now: float, local: Sequence[float]) -> float:
        """Remote / local time for the same stages, pooled over recent remote results.

        Pooled (total remote over total local) so that results for long suffixes dominate the
        noisy ones of a tiny tail.
        """
        recent = [r for r in self._remote if now - r[0] <= self.horizon_s] or list(self._remote)[-5:]
        remote_total = math.fsum(seconds for _, _, seconds in recent)
        local_total = math.fsum(math.fsum(local[start:]) for _, start, _ in recent)
        if not recent or local_total <= 0:
            return self.remote_speed_prior
        return remote_total / local_total

    def _remote_by_split(self, now: float) -> list[float | None]:
        """Median recent server time of each split's suffix, where results for it arrived."""
        by_split: list[list[float]] = [[] for _ in range(self.n)]
        for time, start, seconds in self._remote:
            if now - time <= self.horizon_s:
                by_split[start].append(seconds)
        return [statistics.median(values) if values else None for values in by_split]

    def remote_probe_split(self, now: float) -> int | None:
        """A split to try remotely for one frame while all runs locally and the server's speed
        is unknown or stale: the remote split the model currently rates fastest."""
        if self._split < self.n or not self.remote_available(now):
            return None
        newest = max(self._remote[-1][0] if self._remote else -math.inf, self._last_remote_probe)
        if now - newest <= self.probe_interval_s:
            return None
        decision = self.evaluate(now, current=None)
        if decision is None:
            return None
        remote = [c for c in decision.candidates if c.k < self.n and c.fps > 0]
        if not remote:
            return None
        self._last_remote_probe = now
        return max(remote, key=lambda c: (c.fps, c.k)).k

    def wants_local_probe(self, now: float) -> bool:
        """True when a stage that runs remotely has no fresh local time: run one frame locally."""
        for stage in range(self._split, self.n):
            newest = self._local[stage].newest()
            if newest is None or now - newest > self.probe_interval_s:
                return True
        return False

    def _sizes_now(self, now: float
                   ) -> tuple[list[int | None], list[int | None], list[float], list[float]]:
        def median(samples: _Samples) -> float | None:
            return samples.median(now, self.horizon_s)

        sizes = [None if (m := median(s)) is None else int(m) for s in self._sizes]
        packed = [None if (m := median(s)) is None else int(m) for s in self._packed]
        pack_s = [median(s) or 0.0 for s in self._pack_s]
        unpack_s = [median(s) or 0.0 for s in self._unpack_s]
        return sizes, packed, pack_s, unpack_s

    def evaluate(self, now: float, *, current: int | None = -1) -> SplitDecision | None:
        """The decision the model makes now (``None`` until every stage has a local time)."""
        local = self.local_times(now)
        if local is None:
            return None
        sizes, packed, pack_s, unpack_s = self._sizes_now(now)
        remote: list[float] | None = None
        if self.remote_available(now):
            ratio = self.speed_ratio(now, local)
            remote = [t * ratio for t in local]
            unpack_s = [t * ratio for t in unpack_s]
        return choose_split(local, remote, sizes, self._rtt if remote else None,
                            self._bandwidth if remote else None, self.target_fps,
                            self._split if current == -1 else current, self.hysteresis,
                            self.pipelined, window=self.in_flight,
                            message_overhead_s=self._overhead.median(now, self.horizon_s) or 0.0,
                            measured_latency_s=[s.median(now, self.horizon_s, 0)
                                                for s in self._latency],
                            measured_remote_s=self._remote_by_split(now) if remote else None,
                            compressed_bytes=packed,
                            compress_s=pack_s, decompress_s=unpack_s)

    def update(self, now: float) -> SplitDecision | None:
        """Re-evaluate if a window has passed (or the server just went away); apply the result."""
        down = self._split < self.n and not self.remote_available(now)
        if not down and self._last_eval is not None and now - self._last_eval < self.window_s:
            return None
        decision = self.evaluate(now)
        if decision is None:
            if down:  # no local times yet, but no server either: all local is the only option
                decision = SplitDecision(self.n, 0.0, "server unavailable: all local")
            else:
                return None
        self._last_eval = now
        self.last_decision = decision
        if decision.k != self._split or decision.compress != self._compress or not self.history:
            self.history.append(SplitChange(now, decision.k, decision.expected_fps,
                                            decision.compress, decision.reason))
        self._split = decision.k
        self._compress = decision.compress
        return decision


__all__ = [
    "SplitChange",
    "SplitController",
    "SplitDecision",
    "SplitError",
    "SplitEstimate",
    "check_split",
    "choose_split",
    "estimate_split",
]
