"""One set of tuning numbers for the device core: the agent, the scenario files and the simulator read it.

:class:`Tuning` holds how a device retries, times out and forgets, and :class:`Estimators` how fast its
estimates (round trip, bandwidth, local service time) follow new samples. The defaults are the edge
agent's; :class:`~edge_agent.config.EdgeConfig` keeps the same names as flat fields (``max_attempts``,
``failure_half_life``...) plus ``estimators``, and a scenario file sets them in its ``[tuning]`` table::

    [tuning]
    failure_half_life = 10.0
    default_timeout = 0.25

    [tuning.estimators]
    local_service_gain = 0.25
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["DEFAULT_TUNING", "Estimators", "Tuning"]

Gain = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
PositiveSeconds = Annotated[float, Field(gt=0.0, allow_inf_nan=False)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Estimators(_Frozen):
    """Gains of the device's moving averages, and when a transfer says something about bandwidth."""

    rtt_gain: Gain = 0.5
    """Round-trip EWMA gain of pongs (TCP takes 1/8 per acknowledgement; pings come every couple of
    seconds, so one old bad sample must not outweigh the next good ones)."""
    rtt_dev_gain: Gain = 0.25
    """Round-trip mean deviation gain (TCP's 1/4)."""
    bandwidth_gain: Gain = 0.25
    local_service_gain: Gain = 0.25
    """EWMA gain of the device's own service time per task name (and of its mean deviation)."""
    answer_gain: Gain = 0.3
    """EWMA gain of what answers teach (round trip, service time, queue wait, prediction error)."""
    evidence_half_life: PositiveSeconds = 2.0
    """Seconds for what answers taught (round trip, service time, queue wait) to lose half its weight
    against the next answer while none comes: after a pause the first answer moves it most of the way."""
    loss_gain: Gain = 0.1
    """EWMA gain of a server's loss estimate: each attempt left unanswered is a sample 1 (reversed if
    its answer comes late), each answer a 0."""
    min_bandwidth_bytes: Annotated[int, Field(ge=1)] = 16 * 1024
    """Only transfers of at least this many bytes (task + result) update the bandwidth estimate."""


class Tuning(_Frozen):
    """How a device retries, times out and forgets; every field but ``estimators`` is also an
    :class:`~edge_agent.config.EdgeConfig` field of the same name."""

    max_attempts: Annotated[int, Field(ge=1, le=100)] = 3
    """Options tried per task (servers and local)."""
    local_queue_size: Annotated[int, Field(ge=0, le=1_000_000)] = 32
    """Tasks that may wait for a local worker; beyond it the local option is full."""
    stale_after: Annotated[int, Field(ge=1, le=1000)] = 3
    """A server is stale after this many missed heartbeats (each of its own interval)."""
    probe_interval: PositiveSeconds = 2.0
    """Mean seconds between round-trip probes to each server (jittered +-25%)."""
    default_timeout: PositiveSeconds = 5.0
    """Floor of an offloaded attempt's timeout (also capped by the task's deadline)."""
    timeout_factor: Annotated[float, Field(ge=1.0, allow_inf_nan=False)] = 4.0
    """An attempt times out after max(floor, timeout_factor x estimate), capped by the deadline."""
    attempt_share: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5
    """With a deadline and another option left, the floor is at most this share of the time left."""
    max_timeout: PositiveSeconds = 3600.0
    """Longest an attempt ever waits."""
    failure_half_life: PositiveSeconds = 10.0
    """Seconds for a server's recent-failure count to halve."""
    estimators: Estimators = Estimators()

    @classmethod
    def of(cls, settings: Any) -> Tuning:
        """The tuning of an object with the same field names (an ``EdgeConfig``); missing ones default."""
        return cls(**{name: getattr(settings, name) for name in cls.model_fields if hasattr(settings, name)})

    def settings(self) -> dict[str, Any]:
        """The fields as keyword arguments for an ``EdgeConfig``."""
        return {name: getattr(self, name) for name in type(self).model_fields}


DEFAULT_TUNING = Tuning()
