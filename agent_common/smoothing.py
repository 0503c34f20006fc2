"""Moving averages whose old value loses weight with the time nothing measured it.

A plain EWMA moves by the same gain whether its last sample is a millisecond or a minute old, so after a
pause (a server nobody sent work to, a device that stopped sending there) one new sample barely moves a
figure the pause made meaningless. :func:`aged_gain` is the gain to give the next sample instead: the
base gain while samples keep coming, approaching 1 as the old value ages. The edge agent's server table
and the cloud agent's reported service times use it (and the simulator, which mirrors the cloud agent).
"""

from __future__ import annotations

__all__ = ["aged_gain"]


def aged_gain(gain: float, idle: float, half_life: float) -> float:
    """The gain for a sample ``idle`` seconds after the previous one: the old value's weight ``1 - gain``
    halves every ``half_life`` seconds (``idle <= 0``: ``gain``)."""
    if idle <= 0.0:
        return gain
    weight: float = (1.0 - gain) * 0.5 ** (idle / half_life)
    return 1.0 - weight
