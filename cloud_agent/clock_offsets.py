"""How far each sender's clock is from ours, measured on every admitted task; one warning per sender."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

log = logging.getLogger("cloud_agent.server")  # the server's one logger, as before its modules split

CLOCK_OFFSET_LIMIT = 1.0
"""Seconds of disagreement between a sender's clock and ours beyond which we warn (once per sender).

Deadlines sent as ``ttl`` absorb any offset; what cannot is every absolute time: a legacy
``deadline`` is shifted by the whole offset (the tasks offloaded here have deadlines of 0.1 s to a
few seconds), and heartbeat and state times read by operators are wrong by as much. The measure,
``Task.created`` minus our clock at receipt, also contains the one-way transit (milliseconds, well
under a second even over a congested uplink), so below one second it cannot tell skew from delay.
"""
_OFFSET_SENDERS = 4096  # senders remembered as already warned about (bounded memory)


class ClockOffsetWatch:
    """Measures each sender's clock offset from ``Task.created`` and warns once when it is too large."""

    def __init__(self, limit: float = CLOCK_OFFSET_LIMIT) -> None:
        self.limit = limit
        self.offsets: OrderedDict[str, float] = OrderedDict()
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    def observe(self, sender: str, created: float, received: float) -> float:
        """Record ``created - received`` for ``sender``; log a warning the first time it exceeds the
        limit. Returns the offset (positive: the sender's clock is ahead of ours)."""
        offset = created - received
        with self._lock:
            self.offsets[sender] = offset
            self.offsets.move_to_end(sender)
            while len(self.offsets) > _OFFSET_SENDERS:
                self.offsets.popitem(last=False)
            first = abs(offset) > self.limit and sender not in self._warned
            if first and len(self._warned) < _OFFSET_SENDERS:
                self._warned.add(sender)
        if first:
            log.warning("clock of %s is %+.3f s off ours (beyond %.1f s): its ttl deadlines are fine, "
                        "but an absolute deadline or time from it is off by as much; fix its NTP",
                        sender, offset, self.limit)
        return offset


__all__ = ["CLOCK_OFFSET_LIMIT", "ClockOffsetWatch"]
