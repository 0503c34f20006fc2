"""Counting and logging events without log storms: once per kind per interval, with a summary."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable


class RateLimitedLog:
    """Counts events per kind and logs each kind at most once per ``interval``.

    The first event of a kind is logged at once; later ones within the interval are only counted and
    summarised (``... 57 more since the last report``) by the next line of that kind, or by
    :meth:`flush` once the interval has passed, so a burst that stops is still reported.
    """

    def __init__(self, logger: logging.Logger, *, label: str, interval: float = 10.0,
                 level: int = logging.WARNING, clock: Callable[[], float] = time.monotonic) -> None:
        self._logger = logger
        self._label = label
        self._interval = interval
        self._level = level
        self._clock = clock
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self._unreported: Counter[str] = Counter()
        self._last_logged: dict[str, float] = {}

    def record(self, kind: str, detail: str, *, context: str = "", exc_info: bool = False) -> None:
        """Count one event; log it unless this kind was logged within the interval."""
        now = self._clock()
        with self._lock:
            self.counts[kind] += 1
            last = self._last_logged.get(kind)
            if last is not None and now - last < self._interval:
                self._unreported[kind] += 1
                return
            suppressed = self._unreported.pop(kind, 0)
            self._last_logged[kind] = now
        extra = f" ({suppressed} more since the last report)" if suppressed else ""
        self._logger.log(self._level, "%s [%s] %s%s%s", self._label, kind, detail,
                         f" {context}" if context else "", extra, exc_info=exc_info)

    def flush(self) -> None:
        """Log the count of every kind whose events since its last line are due for a report."""
        now = self._clock()
        with self._lock:
            due = {kind: n for kind, n in self._unreported.items()
                   if now - self._last_logged.get(kind, now) >= self._interval}
            for kind in due:
                del self._unreported[kind]
                self._last_logged[kind] = now
        for kind, n in sorted(due.items()):
            self._logger.log(self._level, "%s [%s] %d more in the last %.0fs (%d in all)", self._label,
                             kind, n, self._interval, self.counts[kind])

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)


class BadInputLog(RateLimitedLog):
    """Counts rejected input per reason; logs each reason at most once per ``interval``."""

    def __init__(self, logger: logging.Logger, *, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(logger, label="bad input", interval=interval, clock=clock)

    def record(self, kind: str, detail: str, *, context: str = "", exc_info: bool = False,
               topic: str = "", task_id: str = "") -> None:
        """Count one rejection (``kind`` is the reason); ``topic`` and ``task_id`` go in the line."""
        where = " ".join(part for part in (f"topic={topic[:200]!r}" if topic else "",
                                           f"task={task_id[:128]!r}" if task_id else "",
                                           context) if part)
        super().record(kind, detail, context=where, exc_info=exc_info)
