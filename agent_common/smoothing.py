"""Moving averages whose old value loses weight with the time nothing measured it.

A plain EWMA moves by the same gain whether its last sample is a millisecond or a minute old, so after a
pause (a server nobody sent work to, a device that stopped sending there) one new sample barely moves a
figure the pause made meaningless. :func:`aged_gain` is the gain to give the next sample instead: the
base gain while samples keep coming, approaching 1 as the old value ages. The edge agent's server table
uses it, and so does :func:`fold_service`: the service-time average a server reports, kept by the cloud
agent and by the simulator's servers alike.
"""

from __future__ import annotations

__all__ = ["REPORTED_SERVICE_GAIN", "REPORTED_SERVICE_HALF_LIFE", "aged_gain", "fold_service"]

REPORTED_SERVICE_GAIN = 0.2
"""Gain of the service-time average per task name that a server's heartbeats report."""
REPORTED_SERVICE_HALF_LIFE = 2.0
"""Seconds without a run of a task for its average's old value to lose half its weight against the next
run: after a pause the report follows the first new run instead of repeating a figure from before it."""


def aged_gain(gain: float, idle: float, half_life: float) -> float:
    """The gain for a sample ``idle`` seconds after the previous one: the old value's weight ``1 - gain``
    halves every ``half_life`` seconds (``idle <= 0``: ``gain``)."""
    if idle <= 0.0:
        return gain
    weight: float = (1.0 - gain) * 0.5 ** (idle / half_life)
    return 1.0 - weight


def fold_service(previous: float | None, service: float, idle: float) -> float:
    """A server's reported service-time average of a task after a run of ``service`` s that began ``idle``
    s after the previous run ended (``previous``: the average before it, ``None`` for the first run)."""
    if previous is None:
        return service
    gain = aged_gain(REPORTED_SERVICE_GAIN, idle, REPORTED_SERVICE_HALF_LIFE)
    return previous + gain * (service - previous)
