"""Demo tasks, served by ``cloud-agent run --tasks agent_common.demo_tasks`` and run locally by devices.

* ``noop``: returns its payload (overhead measurements).
* ``square``: ``{"x": number, "cost": seconds (optional, simulated work: sleeps)}`` -> ``{"y": x*x}``,
  exact for integers (refused when the square would not fit the wire's 64-bit integers).
* ``sleep``: ``{"seconds": s}`` (or a bare number) -> ``{"slept": s}``; at most 600 s.
* ``cpu_burn``: ``{"n": iterations}`` -> ``{"n": n, "sum": ...}``: a pure-Python loop, run in the
  process pool (it holds the GIL).
* ``blur``: a numpy image (``HxW`` or ``HxWxC`` uint8) or ``{"image": array, "ksize": odd int,
  "sigma": float}`` -> the blurred array. Registered only when OpenCV (``vision`` extra) imports.
* ``http`` (built in, not in this module): registered by the server when ``http_base_url`` is set;
  forwards ``{method, path, query, headers, body}`` to that base URL only and returns
  ``{status, headers, body}``. See :mod:`cloud_agent.http_adapter`.

This module keeps its own ``registry`` so importing it never touches the global default registry.
"""

from __future__ import annotations

import math
import time
from typing import Any

from agent_common.registry import TaskRegistry

registry = TaskRegistry()

MAX_SLEEP = 600.0
MAX_BURN = 200_000_000


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {type(value).__name__}")
    return float(value)


def _seconds(value: Any, name: str) -> float:
    seconds = _number(value, name)
    if not 0.0 <= seconds <= MAX_SLEEP:
        raise ValueError(f"{name} must be between 0 and {MAX_SLEEP:.0f} seconds")
    return seconds


@registry.task("noop")
def noop(payload: Any) -> Any:
    """Return the payload unchanged."""
    return payload


SQUARE_LIMIT = math.isqrt(2**64 - 1)
"""The largest integer whose square still fits the wire's integers."""


@registry.task("square")
def square(payload: Any) -> dict[str, int | float]:
    """Square ``x`` (exactly, for an integer); sleep ``cost`` seconds first to simulate work."""
    if not isinstance(payload, dict) or "x" not in payload:
        raise ValueError('square needs {"x": number, "cost": seconds (optional)}')
    raw = payload["x"]
    x = _number(raw, "x")
    if isinstance(raw, int) and abs(raw) > SQUARE_LIMIT:
        raise ValueError(f"x must be at most {SQUARE_LIMIT} in magnitude: its square must fit 64 bits")
    cost = _seconds(payload.get("cost", 0.0), "cost")
    if cost:
        time.sleep(cost)
    return {"y": raw * raw if isinstance(raw, int) else x * x}


@registry.task("sleep")
def sleep(payload: Any) -> dict[str, float]:
    """Sleep the given seconds (a number or ``{"seconds": s}``)."""
    raw = payload.get("seconds") if isinstance(payload, dict) else payload
    seconds = _seconds(raw, "seconds")
    time.sleep(seconds)
    return {"slept": seconds}


@registry.task("cpu_burn", executor="process")
def cpu_burn(payload: Any) -> dict[str, int]:
    """Spin a pure-Python loop ``n`` times (holds the GIL, hence the process pool)."""
    raw = payload.get("n") if isinstance(payload, dict) else payload
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw <= MAX_BURN:
        raise ValueError(f"cpu_burn needs an integer n between 0 and {MAX_BURN}")
    total = 0
    for i in range(raw):
        total = (total + i * i) % 1_000_003
    return {"n": raw, "sum": total}


try:
    import cv2
    import numpy as np

    HAVE_CV2 = True
except ImportError:  # the vision extra is not installed: no blur task
    HAVE_CV2 = False


if HAVE_CV2:

    @registry.task("blur")
    def blur(payload: Any) -> Any:
        """Gaussian blur of an image array (OpenCV releases the GIL: thread pool)."""
        ksize, sigma = 5, 0.0
        image = payload
        if isinstance(payload, dict):
            image = payload.get("image")
            ksize = payload.get("ksize", 5)
            sigma = _number(payload.get("sigma", 0.0), "sigma")
        if isinstance(ksize, bool) or not isinstance(ksize, int) or ksize < 1 or ksize % 2 == 0 \
                or ksize > 99:
            raise ValueError("ksize must be an odd integer between 1 and 99")
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise ValueError("blur needs a uint8 image array of shape HxW or HxWxC")
        return cv2.GaussianBlur(image, (ksize, ksize), sigma)
