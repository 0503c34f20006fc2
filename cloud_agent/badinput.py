"""Counting and logging bad input without log storms: once per reason per interval."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable


class BadInputLog:
    """Counts rejected input per reason and logs each reason at most once per ``interval``.

    The first occurrence of a reason is logged at once; later ones are summarised
    (``... 57 more since the last report``) when the interval has passed.
    """

    def __init__(self, logger: logging.Logger, *, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._logger = logger
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self._unreported: Counter[str] = Counter()
        self._last_logged: dict[str, float] = {}

    def record(self, reason: str, detail: str, *, topic: str = "", task_id: str = "") -> None:
        """Count one rejection; log it unless this reason was logged within the interval."""
        now = self._clock()
        with self._lock:
            self.counts[reason] += 1
            last = self._last_logged.get(reason)
            if last is not None and now - last < self._interval:
                self._unreported[reason] += 1
                return
            suppressed = self._unreported.pop(reason, 0)
            self._last_logged[reason] = now
        context = " ".join(part for part in (f"topic={topic}" if topic else "",
                                             f"task={task_id}" if task_id else "") if part)
        extra = f" ({suppressed} more since the last report)" if suppressed else ""
        self._logger.warning("bad input [%s] %s%s%s", reason, detail,
                             f" {context}" if context else "", extra)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)
