"""Short full garbage collections for a long-running agent: start-up objects frozen once.

A full (generation 2) collection walks every object the cyclic collector tracks and holds the GIL
throughout, so every thread of the process waits for it: with both agents' ~52,000 start-up objects
(modules, pydantic schemas, configs) one took 10-16 ms on a loaded 2-core machine, and up to 270 ms
while other threads contended for the GIL; at 1,000 tasks/s that came every few seconds and set the
tail of the round trip. Frozen objects (:func:`gc.freeze`) are no longer walked; they are still freed
by reference counting, only cyclic garbage among them is never collected, which is why this happens
once per process, at the first agent's start, when what exists is what start-up made.
"""

from __future__ import annotations

import gc
import threading

_lock = threading.Lock()
_frozen = False


def freeze_startup_objects() -> bool:
    """Freeze every object alive now, the first time it is called in this process; True then."""
    global _frozen
    with _lock:
        if _frozen:
            return False
        _frozen = True
        gc.freeze()
        return True


__all__ = ["freeze_startup_objects"]
