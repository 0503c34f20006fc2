"""What runs admitted tasks: the worker loop, the process pool, the watchdog and each job's one answer.

``<id>-worker-<n>`` threads take jobs from the :class:`~cloud_agent.jobs.JobBoard` queue and run
them (process tasks are handed to a process pool from there); ``<id>-watchdog`` answers ``expired``
at a queued or running job's deadline. Whoever answers first answers: every later answer is a no-op.
"""

from __future__ import annotations

import heapq
import itertools
import multiprocessing
import sys
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

from agent_common.badinput import RateLimitedLog
from agent_common.registry import TaskSpec, run_spec
from cloud_agent.jobs import EWMA_ALPHA, SERVICE_HALF_LIFE, Job
from cloud_agent.node import ServerNode
from cloud_agent.replies import Replies, content_type
from topics.codec import EncodeError
from topics.models import Result, Status

_COMPACT_MIN = 1024
"""Deadlines kept before answered jobs are first dropped from the watchdog's heap."""


class Workers:
    """Runs the jobs on one node's job board and publishes their answers through ``replies``.

    ``failures`` logs tasks that raised (by task name), ``overload`` results that came back after
    their job was answered expired; the node's ``stopping`` ends the worker and watchdog loops.
    """

    def __init__(self, node: ServerNode, replies: Replies, *, failures: RateLimitedLog,
                 overload: RateLimitedLog) -> None:
        self._node = node
        self._board = node.board
        self._replies = replies
        self._failures = failures
        self._overload = overload
        self._deadlines: list[tuple[float, int, Job]] = []
        self._compact_at = _COMPACT_MIN
        self._deadline_seq = itertools.count()
        self._watch = threading.Condition(threading.Lock())
        self._process_pool: ProcessPoolExecutor | None = None

    def watch(self, job: Job) -> None:
        """Have the watchdog answer ``job`` expired at its deadline (none: never)."""
        if job.deadline is None:
            return
        with self._watch:
            deadlines = self._deadlines
            if len(deadlines) >= self._compact_at:
                self._compact()
                deadlines = self._deadlines
            heapq.heappush(deadlines, (job.deadline, next(self._deadline_seq), job))
            if deadlines[0][2] is job:  # else the watchdog wakes earlier anyway
                self._watch.notify()

    def _compact(self) -> None:
        """Drop the answered jobs from the deadline heap (caller holds ``_watch``): most are answered
        long before their deadline, and would otherwise stay in memory until it (and be walked by
        every full garbage collection). Linear, once per ``len`` new deadlines at most."""
        self._deadlines = [entry for entry in self._deadlines if not entry[2].answered]
        heapq.heapify(self._deadlines)
        self._compact_at = max(_COMPACT_MIN, 2 * len(self._deadlines))

    def wake(self) -> None:
        """Wake every worker and the watchdog (to see ``stopping``)."""
        with self._board.lock:
            self._board.work_ready.notify_all()
        with self._watch:
            self._watch.notify_all()

    def close(self) -> None:
        """Shut the process pool down (it is started again on the next process task)."""
        if self._process_pool is not None:
            self._process_pool.shutdown(wait=False, cancel_futures=True)
            self._process_pool = None

    # ------------------------------------------------------------------ the worker threads

    def _take(self) -> Job | None:
        board = self._board
        with board.lock:
            while True:
                if self._node.stopping.is_set():
                    return None
                while board.queue:
                    job = board.queue.popleft()
                    if job.answered:  # expired while queued: already answered and uncounted
                        board.idle.notify_all()
                        continue
                    job.state = "running"
                    job.started = self._node.monotonic()
                    board.running += 1
                    return job
                board.idle.notify_all()
                board.work_ready.wait()

    def work_loop(self) -> None:
        """One worker thread: take, run and answer jobs until ``stopping``."""
        board = self._board
        while True:
            job = self._take()
            if job is None:
                return
            try:
                self._run(job)
            finally:
                with board.lock:
                    board.running -= 1
                    job.state = "finished"
                    if board.in_progress.get(job.key) is job:
                        del board.in_progress[job.key]
                    board.idle.notify_all()

    def _run(self, job: Job) -> None:
        task = job.task
        if job.answered:
            return
        if job.deadline is not None and self._node.monotonic() >= job.deadline:
            self.answer(job, Status.EXPIRED, error="deadline passed before the task started")
            return
        try:
            start = job.spec.check_stage(task.stage)
        except ValueError as exc:
            self.answer(job, Status.ERROR, error=f"bad stage: {exc}")
            return
        began = self._node.monotonic()
        try:
            if job.spec.executor == "process":
                value = self._run_in_process(job.spec, task.payload, start)
            else:
                value = run_spec(job.spec, task.payload, start)
        except Exception as exc:  # noqa: BLE001 - the handler's failure is the device's answer
            service = self._node.monotonic() - began
            self._failures.record(task.task, f"task {task.id[:128]!r}: {type(exc).__name__}: "
                                  f"{str(exc)[:300]}", exc_info=True)
            self.answer(job, Status.ERROR, error=f"{type(exc).__name__}: {exc}"[:4096],
                        service_time=service)
            return
        ended = self._node.monotonic()
        service = ended - began
        with self._board.lock:
            self._board.ran(task.task, began, ended)
        if job.answered:
            self._board.count("late_results")
            self._overload.record("late-result", f"task {task.id[:128]!r} returned {service:.3f}s "
                                  "after it was answered expired")
            return
        self.answer(job, Status.OK, payload=value, service_time=service)

    def _run_in_process(self, spec: TaskSpec, payload: Any, start: int) -> Any:
        with self._board.lock:
            if self._process_pool is None:
                method = "forkserver" if sys.platform.startswith("linux") else "spawn"
                self._process_pool = ProcessPoolExecutor(
                    max_workers=self._node.config.process_workers,
                    mp_context=multiprocessing.get_context(method))
            pool = self._process_pool
        future: Future[Any] = pool.submit(run_spec, spec, payload, start)
        return future.result()

    # ------------------------------------------------------------------ answers

    def answer(self, job: Job, status: Status, *, payload: Any = None, error: str | None = None,
               service_time: float = 0.0) -> None:
        """Publish the one answer of a job (and to every duplicate waiting on it); later calls no-op."""
        board = self._board
        now = self._node.monotonic()
        with board.lock:
            if job.answered:
                return
            job.answered = True
            if job.state == "queued":
                if job in board.queue:
                    board.queue.remove(job)
                job.state = "dropped"
                board.idle.notify_all()
            if job.state == "dropped" and board.in_progress.get(job.key) is job:
                del board.in_progress[job.key]
            waiters = list(job.waiters)
        task = job.task
        queue_wait = (job.started or now) - job.accepted
        result = Result(task_id=task.id, status=status, server=self._node.id, task=task.task,
                        payload=payload, error=error, queue_wait=max(0.0, queue_wait),
                        service_time=max(0.0, service_time), attempt=task.attempt,
                        content_type=content_type(job.codec))
        try:
            data = job.codec.encode(result)
        except EncodeError as exc:
            result = result.model_copy(update={"status": Status.ERROR.value, "payload": None,
                                               "error": f"result cannot be sent: {exc}"[:4096]})
            data = job.codec.encode(result)
        with board.lock:
            board.counters[f"completed:{Status(result.status).value}"] += 1
            if result.status != Status.REJECTED_BUSY.value:
                board.cache.put(job.key, result, now, len(data), job.digest)
        self._replies.result(result, task.reply_to, job.codec, data)
        for reply_to, codec, attempt in waiters:
            self._replies.result(result.model_copy(update={"attempt": attempt}), reply_to, codec)

    # ------------------------------------------------------------------ the watchdog thread

    def watchdog_loop(self) -> None:
        """Answer ``expired`` at each task's deadline unless it was answered already."""
        while not self._node.stopping.is_set():
            with self._watch:
                if not self._deadlines:
                    self._watch.wait(1.0)
                    continue
                deadline, _, job = self._deadlines[0]
                left = deadline - self._node.monotonic()
                if left > 0:
                    self._watch.wait(min(left, 1.0))
                    continue
                heapq.heappop(self._deadlines)
            if job.answered:
                continue
            where = "while running (the worker stays busy until it returns)" if (
                job.state == "running") else "while queued"
            self.answer(job, Status.EXPIRED, error=f"deadline passed {where}")


__all__ = ["EWMA_ALPHA", "SERVICE_HALF_LIFE", "Workers"]
