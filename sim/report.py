"""Results of a simulated run, shared by the emulation and the discrete-event modes.

Both modes produce :class:`TaskRecord` rows (one per task, with exactly one outcome) and a
:class:`RunResult` per policy; this module turns them into a CSV trace, a summary per policy, a plain
text comparison table and PNG plots. When the runs include the discrete-event mode's oracle
(:mod:`sim.oracle`), it is the limit: every summary gives its p95 as a ratio to the oracle's.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeAlias

import numpy as np

from sim.oracle import ORACLE

__all__ = [
    "OUTCOMES", "PolicySummary", "RunResult", "TaskRecord", "format_table", "summarize", "with_oracle_ratios",
    "write_plots", "write_queue_csv", "write_trace_csv",
]

OK = "ok"
ERROR = "error"
EXPIRED = "expired"
REJECTED = "rejected-busy"
TIMEOUT = "timeout"
NO_OPTION = "no-option"
UNFINISHED = "unfinished"
OUTCOMES: tuple[str, ...] = (OK, ERROR, EXPIRED, REJECTED, TIMEOUT, NO_OPTION, UNFINISHED)
"""Every outcome a task can end with; ``unfinished`` only when a run is cut short."""

LOCAL_TARGET = "local"

Instant: TypeAlias = float | None
"""A time on the run's clock, or None while that step has not happened."""


@dataclass(slots=True)
class TaskRecord:
    """One task from creation to its single outcome. Times are seconds on the run's clock.

    ``target`` is the node that produced the outcome (``None`` = the device itself); ``decided`` and
    ``sent`` are those of the last attempt; ``started``/``finished`` are when the work ran.
    """

    task_id: str
    device: str
    task: str
    created: float
    policy: str
    deadline: Instant = None
    decided: Instant = None
    sent: Instant = None
    started: Instant = None
    finished: Instant = None
    received: Instant = None
    target: str | None = None
    reason: str = ""
    outcome: str = UNFINISHED
    attempts: int = 0
    estimate: float | None = None
    """The expected completion time (s) the policy computed for the chosen option."""

    @property
    def latency(self) -> float | None:
        """Creation to result, for completed tasks."""
        if self.outcome != OK or self.received is None:
            return None
        return self.received - self.created

    @property
    def missed_deadline(self) -> bool:
        if self.deadline is None:
            return False
        return self.outcome != OK or self.received is None or self.received > self.deadline


CSV_FIELDS: tuple[str, ...] = (
    "task_id", "device", "task", "policy", "created", "decided", "sent", "started", "finished", "received",
    "target", "reason", "outcome", "attempts", "deadline", "estimate", "latency")


@dataclass(slots=True)
class RunResult:
    """Everything one policy produced in one run."""

    policy: str
    records: list[TaskRecord]
    duration: float
    """Seconds during which tasks were created (the scenario duration)."""
    queue_series: list[tuple[float, str, int, int]] = field(default_factory=list)
    """``(time, server, queue length, in flight)`` samples, taken at each heartbeat."""
    counters: dict[str, int] = field(default_factory=dict)
    label: str = ""
    """Name shown in tables and plots when it differs from the policy (e.g. ``ect k=1``)."""

    @property
    def name(self) -> str:
        return self.label or self.policy


def write_trace_csv(records: Iterable[TaskRecord], path: str | Path) -> int:
    """Write one CSV row per task (``target`` is ``local`` for the device); returns the row count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = 0
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_FIELDS)
        for record in records:
            latency = record.latency
            writer.writerow((
                record.task_id, record.device, record.task, record.policy, _time(record.created),
                _time(record.decided), _time(record.sent), _time(record.started), _time(record.finished),
                _time(record.received), record.target or LOCAL_TARGET, record.reason, record.outcome,
                record.attempts, _time(record.deadline), _time(record.estimate), _time(latency)))
            rows += 1
    return rows


def _time(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


@dataclass(frozen=True, slots=True)
class PolicySummary:
    """The numbers that compare policies."""

    name: str
    tasks: int
    completed: int
    failed: dict[str, int]
    """Outcome -> count for every outcome other than ``ok``."""
    deadline_misses: int
    p50: float | None
    p95: float | None
    p99: float | None
    mean: float | None
    throughput: float
    """Completed tasks per second of the run's duration."""
    share_local: float
    """Fraction of completed tasks that ran on their device."""
    share_by_server: dict[str, float]
    switch_rate: float
    """Fraction of consecutive decisions of one device that changed target."""
    retries: int
    """Attempts beyond the first, over all tasks."""
    p95_vs_oracle: float | None = None
    """This p95 over the oracle's p95 in the same comparison (``None`` without an oracle there)."""


def _percentile(ordered: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (numpy's ``inverted_cdf``: a latency some task really had)."""
    if not ordered:
        return None
    return float(np.percentile(ordered, q, method="inverted_cdf"))


def summarize(records: Sequence[TaskRecord], *, name: str | None = None, duration: float | None = None
              ) -> PolicySummary:
    """Summarise one policy's records; ``duration`` defaults to first creation .. last result."""
    outcomes = Counter(record.outcome for record in records)
    latencies = sorted(latency for record in records if (latency := record.latency) is not None)
    completed = outcomes.get(OK, 0)
    if duration is None:
        ends = [record.received for record in records if record.received is not None]
        start = min((record.created for record in records), default=0.0)
        duration = (max(ends) - start) if ends else 0.0
    targets = Counter(record.target or LOCAL_TARGET for record in records if record.outcome == OK)
    by_server = {target: count / completed for target, count in sorted(targets.items())
                 if target != LOCAL_TARGET} if completed else {}
    last: dict[str, str] = {}
    decisions = switches = 0
    for record in sorted(records, key=lambda r: (r.device, r.created)):
        if record.decided is None:
            continue
        target = record.target or LOCAL_TARGET
        previous = last.get(record.device)
        if previous is not None:
            decisions += 1
            switches += previous != target
        last[record.device] = target
    return PolicySummary(
        name=name or (records[0].policy if records else "?"),
        tasks=len(records), completed=completed,
        failed={outcome: count for outcome, count in sorted(outcomes.items()) if outcome != OK},
        deadline_misses=sum(record.missed_deadline for record in records),
        p50=_percentile(latencies, 50), p95=_percentile(latencies, 95), p99=_percentile(latencies, 99),
        mean=sum(latencies) / len(latencies) if latencies else None,
        throughput=completed / duration if duration > 0 else 0.0,
        share_local=targets.get(LOCAL_TARGET, 0) / completed if completed else 0.0,
        share_by_server=by_server,
        switch_rate=switches / decisions if decisions else 0.0,
        retries=sum(max(record.attempts - 1, 0) for record in records),
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def with_oracle_ratios(summaries: Sequence[PolicySummary]) -> list[PolicySummary]:
    """``summaries`` with :attr:`PolicySummary.p95_vs_oracle` set when one of them is the oracle."""
    oracle = next((summary for summary in summaries if summary.name == ORACLE), None)
    if oracle is None:
        return list(summaries)
    limit = oracle.p95
    return [dataclasses.replace(summary, p95_vs_oracle=None if summary.p95 is None or not limit
                                else summary.p95 / limit) for summary in summaries]


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def format_table(summaries: Sequence[PolicySummary]) -> str:
    """A plain-text table comparing policies, then the failures by outcome and the busiest server.

    With the oracle among them, a ``p95/oracle`` column gives each p95 as a ratio to the oracle's.
    """
    summaries = with_oracle_ratios(summaries)
    limit = any(summary.name == ORACLE for summary in summaries)
    header = ("policy", "tasks", "ok", "failed", "missed", "p50 ms", "p95 ms",
              *(("p95/oracle",) if limit else ()), "p99 ms", "tasks/s", "local %", "top server %",
              "switch %", "retries")
    rows = [header]
    for summary in summaries:
        top = max(summary.share_by_server.items(), key=lambda item: item[1], default=None)
        rows.append((
            summary.name, str(summary.tasks), str(summary.completed), str(sum(summary.failed.values())),
            str(summary.deadline_misses), _ms(summary.p50), _ms(summary.p95),
            *((_ratio(summary.p95_vs_oracle),) if limit else ()), _ms(summary.p99),
            f"{summary.throughput:.1f}", f"{summary.share_local * 100:.1f}",
            f"{top[1] * 100:.1f} {top[0]}" if top else "-", f"{summary.switch_rate * 100:.1f}",
            str(summary.retries)))
    left = {0, header.index("top server %")}
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) if i in left else cell.rjust(width)
                       for i, (cell, width) in enumerate(zip(row, widths, strict=True))).rstrip()
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    for summary in summaries:
        if summary.failed:
            detail = ", ".join(f"{outcome} {count}" for outcome, count in summary.failed.items())
            lines.append(f"{summary.name} failed: {detail}")
    if limit:
        lines.append(f"{ORACLE}: the limit, decides on the true state (discrete-event mode only); "
                     "p95/oracle: each p95 over the oracle's")
    return "\n".join(lines)


def _bins(times: Iterable[float], width: float, count: int) -> list[int]:
    counts = [0] * count
    for time in times:
        index = int(time / width)
        if 0 <= index < count:
            counts[index] += 1
    return counts


def write_plots(results: Sequence[RunResult], out_dir: str | Path, *, max_lines: int = 8) -> list[Path]:
    """Draw the four comparison plots as PNG files in ``out_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not results:
        return []
    horizon = max(max((r.finished or r.created for r in result.records), default=result.duration)
                  for result in results)
    horizon = max(horizon, max(result.duration for result in results))
    width = max(horizon / 60.0, 0.05)
    count = int(horizon / width) + 1
    axis = [i * width for i in range(count)]
    paths: list[Path] = []
    columns = min(len(results), 3)
    rows = math.ceil(len(results) / columns)

    # Tasks per target over time, one panel per policy.
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.2 * rows), squeeze=False,
                                sharey=True)
    for panel, result in zip(axes.flat, results, strict=False):
        per_target: dict[str, list[float]] = defaultdict(list)
        for record in result.records:
            if record.outcome == OK and record.finished is not None:
                per_target[record.target or LOCAL_TARGET].append(record.finished)
        ranked = sorted(per_target, key=lambda target: -len(per_target[target]))
        shown, rest = ranked[:max_lines - 1], ranked[max_lines - 1:]
        for target in shown:
            panel.plot(axis, [c / width for c in _bins(per_target[target], width, count)], label=target)
        if rest:
            other = [time for target in rest for time in per_target[target]]
            panel.plot(axis, [c / width for c in _bins(other, width, count)], label=f"{len(rest)} others")
        panel.set_title(result.name)
        panel.set_xlabel("time (s)")
        panel.set_ylabel("completed tasks/s")
        panel.legend(fontsize="x-small")
    for panel in list(axes.flat)[len(results):]:
        panel.set_visible(False)
    figure.suptitle("Tasks per target over time")
    figure.tight_layout()
    paths.append(_save(figure, out / "tasks_per_target.png", plt))

    # Local throughput over time, one line per policy.
    figure, panel = plt.subplots(figsize=(7, 4))
    for result in results:
        local = [r.finished for r in result.records
                 if r.outcome == OK and r.target is None and r.finished is not None]
        panel.plot(axis, [c / width for c in _bins(local, width, count)], label=result.name)
    panel.set_xlabel("time (s)")
    panel.set_ylabel("tasks/s completed locally")
    panel.set_title("Local throughput over time")
    panel.legend(fontsize="small")
    paths.append(_save(figure, out / "local_throughput.png", plt))

    # Latency CDF per policy; the oracle, the limit, dashed black.
    figure, panel = plt.subplots(figsize=(7, 4))
    for result in results:
        latencies = sorted(latency * 1000 for r in result.records if (latency := r.latency) is not None)
        if not latencies:
            continue
        fractions = [(i + 1) / len(latencies) for i in range(len(latencies))]
        if result.name == ORACLE:
            panel.plot(latencies, fractions, color="black", linestyle="--", label=f"{result.name} (limit)")
        else:
            panel.plot(latencies, fractions, label=result.name)
    panel.set_xscale("log")
    panel.set_xlabel("latency (ms, log)")
    panel.set_ylabel("fraction of completed tasks")
    panel.set_title("Latency CDF")
    panel.grid(True, alpha=0.3)
    panel.legend(fontsize="small")
    paths.append(_save(figure, out / "latency_cdf.png", plt))

    # Server queue length over time, one panel per policy.
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.2 * rows), squeeze=False,
                                sharey=True)
    for panel, result in zip(axes.flat, results, strict=False):
        series: dict[str, tuple[list[float], list[int]]] = defaultdict(lambda: ([], []))
        for time, server, queued, _ in result.queue_series:
            series[server][0].append(time)
            series[server][1].append(queued)
        names = sorted(series)
        if len(names) <= max_lines:
            for server in names:
                panel.step(*series[server], where="post", label=server)
        else:  # too many servers for one line each: the mean and the maximum at each sample time
            by_time: dict[float, list[int]] = defaultdict(list)
            for time, _, queued, _ in result.queue_series:
                by_time[round(time, 3)].append(queued)
            times = sorted(by_time)
            panel.step(times, [sum(by_time[t]) / len(by_time[t]) for t in times], where="post",
                       label=f"mean of {len(names)}")
            panel.step(times, [max(by_time[t]) for t in times], where="post", label="max")
        panel.set_title(result.name)
        panel.set_xlabel("time (s)")
        panel.set_ylabel("queued tasks")
        if names:
            panel.legend(fontsize="x-small")
    for panel in list(axes.flat)[len(results):]:
        panel.set_visible(False)
    figure.suptitle("Server queue length over time (at heartbeats)")
    figure.tight_layout()
    paths.append(_save(figure, out / "server_queues.png", plt))
    return paths


def _save(figure: object, path: Path, plt: object) -> Path:
    figure.savefig(path, dpi=100)  # type: ignore[attr-defined]
    plt.close(figure)  # type: ignore[attr-defined]
    return path


def summaries_of(results: Sequence[RunResult]) -> list[PolicySummary]:
    """One summary per result, named by its label; with the oracle's ratios when it is there."""
    return with_oracle_ratios([summarize(result.records, name=result.name, duration=result.duration)
                               for result in results])


def counters_line(results: Mapping[str, Mapping[str, int]]) -> str:
    """``name: key=value ...`` per run, for the counters a mode keeps (late results, lost messages)."""
    return "\n".join(f"{name}: " + " ".join(f"{key}={value}" for key, value in sorted(counters.items()))
                     for name, counters in results.items() if counters)


def write_queue_csv(results: Sequence[RunResult], path: str | Path) -> None:
    """The server queue-length samples of every run as CSV."""
    with Path(path).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("policy", "time", "server", "queue_length", "in_flight"))
        for result in results:
            for time, server, queued, running in result.queue_series:
                writer.writerow((result.name, f"{time:.6f}", server, queued, running))
