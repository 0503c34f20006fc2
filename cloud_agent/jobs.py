"""The admitted tasks of one server and what admission and the workers share about them, under one lock.

A job goes ``queued -> running -> finished``, or ``queued -> dropped`` when it is answered (expired,
shut down) while still in the queue. Between admission and its answer a job is *in progress* under
its key (sender, task id): a retry of it then waits for the same answer instead of running again.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from agent_common.registry import TaskSpec
from agent_common.smoothing import REPORTED_SERVICE_GAIN, REPORTED_SERVICE_HALF_LIFE, fold_service
from cloud_agent.cache import ResultCache
from cloud_agent.config import CloudConfig
from topics.codec import Codec
from topics.models import Load, Task

EWMA_ALPHA = REPORTED_SERVICE_GAIN
"""Gain of the service-time average per task name that heartbeats report."""
SERVICE_HALF_LIFE = REPORTED_SERVICE_HALF_LIFE
"""Seconds for that average's old value to lose half its weight while the task does not run."""


@dataclass(eq=False)
class Job:
    """One admitted task from admission to its (single) answer."""

    task: Task
    spec: TaskSpec
    codec: Codec
    key: tuple[str, str]
    digest: bytes
    accepted: float
    deadline: float | None  # monotonic
    state: str = "queued"  # queued -> running -> finished; queued -> dropped (answered in the queue)
    answered: bool = False
    started: float = 0.0
    waiters: list[tuple[str, Codec, int]] = field(default_factory=list)


class JobBoard:
    """The queue, the jobs in progress, the result cache, the service times and the counters.

    Everything here is guarded by :attr:`lock`; a caller that reads or changes several of them at
    once (admission: cache, jobs in progress, room) holds it around all of them, so that a retry
    always finds either the job in progress or its cached result.
    """

    def __init__(self, config: CloudConfig, cache: ResultCache) -> None:
        self._queue_size = config.queue_size
        self._workers = config.workers
        self.lock = threading.Lock()
        self.work_ready = threading.Condition(self.lock)
        """Notified when a job is queued (and to wake every worker at shutdown)."""
        self.idle = threading.Condition(self.lock)
        """Notified when a job leaves the queue or finishes (what a draining stop waits for)."""
        self.queue: deque[Job] = deque()
        self.in_progress: dict[tuple[str, str], Job] = {}
        self.running = 0
        self.cache = cache
        self.ewma: dict[str, float] = {}
        """Service time per task name, smoothed: what heartbeats report."""
        self.ewma_at: dict[str, float] = {}
        """Task name -> monotonic time its last run ended (what ages its average)."""
        self.counters: Counter[str] = Counter()
        self.draining = False
        """Set by a stopping server: new tasks get rejected-busy."""

    def count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counters[key] += n

    def ran(self, task: str, began: float, ended: float) -> None:
        """A run of ``task`` took ``ended - began`` s: fold it into its reported average (caller holds
        the lock); the longer since the last run ended, the more the new one weighs."""
        idle = began - self.ewma_at.get(task, began)
        self.ewma[task] = fold_service(self.ewma.get(task), ended - began, idle)
        self.ewma_at[task] = ended

    def has_room(self) -> bool:
        """Room for one more task: ``queue_size`` waiting beyond the workers (caller holds the lock)."""
        return len(self.queue) + self.running < self._queue_size + self._workers

    def enqueue(self, job: Job) -> None:
        """Queue ``job`` for the workers; it is in progress from now on (caller holds the lock)."""
        self.queue.append(job)
        self.in_progress[job.key] = job
        self.work_ready.notify()

    def load(self, cpu: float) -> Load:
        """The load a heartbeat reports, with ``cpu`` as this process's CPU share."""
        with self.lock:
            return Load(queue_length=len(self.queue), queue_capacity=self._queue_size,
                        in_flight=self.running, workers=self._workers,
                        service_time=dict(self.ewma), cpu=cpu)

    def snapshot(self) -> tuple[dict[str, int], int, int, int]:
        """The counters, the queue length, the jobs running and the cached results, read at once."""
        with self.lock:
            return dict(self.counters), len(self.queue), self.running, len(self.cache)

    def drain(self) -> int:
        """Refuse new tasks from now on; returns how many are queued or running."""
        with self.lock:
            self.draining = True
            return len(self.queue) + self.running

    def wait_idle(self, end: float, monotonic: Callable[[], float]) -> list[Job]:
        """Wait until nothing is queued or running, or until ``end`` (monotonic); returns the jobs
        still queued or running and not answered."""
        with self.lock:
            while self.queue or self.running:
                left = end - monotonic()
                if left <= 0:
                    break
                self.idle.wait(min(left, 0.5))
            leftovers = [job for job in self.queue if not job.answered]
            leftovers += [job for job in self.in_progress.values()
                          if job.state == "running" and not job.answered]
        return leftovers


__all__ = ["Job", "JobBoard"]
