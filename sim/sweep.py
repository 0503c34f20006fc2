"""Sweeps: every scenario x policy x seed in discrete-event mode, summarised over the seeds.

A sweep is a list of :class:`RunSpec` (one scenario, policy and seed each). An executor runs them: in
this process (:class:`InProcess`), on local worker processes (:class:`LocalProcesses`) or on a Dask
cluster (:class:`DaskCluster`); each run is a pure function of its spec (:func:`run_one`), so the
numbers do not depend on where or in which order it ran. :func:`collect` puts the runs back in plan
order and sets each run's p95 ratio to the oracle of the same scenario and seed; :func:`aggregate`
gives per scenario and policy the mean and the 95% confidence interval (Student t over the seeds) of
each metric in :data:`METRICS`.

    specs = plan_runs([("herding", scenario)], policies_of=lambda s: [*s.policies, "oracle"], seeds=5)
    rows = collect(specs, LocalProcesses(workers=2).run(specs))
    print(format_sweep(aggregate(rows)))
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import math
import multiprocessing
import os
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sim.report import PolicySummary, summarize, with_oracle_ratios
from sim.scenario import Scenario

__all__ = [
    "METRICS", "DaskCluster", "Estimate", "Executor", "Finished", "InProcess", "LocalProcesses",
    "PolicyAggregate", "RunRow", "RunSpec", "SweepError", "aggregate", "collect", "default_workers",
    "estimate", "format_sweep", "plan_runs", "run_one", "t_quantile", "write_sweep",
]

DASK_MISSING = "--dask needs dask.distributed: pip install 'mqtt-offload[dask]'"


class SweepError(RuntimeError):
    """A sweep that cannot run or did not finish; the message names the run or the cluster."""


@dataclass(frozen=True, slots=True)
class RunSpec:
    """One run of a sweep: a scenario under one policy with one seed; ``index`` is its plan order."""

    index: int
    label: str
    """The scenario's name in the sweep (its file's stem)."""
    scenario: Scenario
    policy: str
    seed: int

    def __str__(self) -> str:
        return f"{self.label} {self.policy} seed {self.seed}"


@dataclass(frozen=True, slots=True)
class RunRow:
    """What one run measured: its summary (with the oracle ratio once :func:`collect` set it)."""

    scenario: str
    policy: str
    seed: int
    summary: PolicySummary
    events: int

    @property
    def completed_fraction(self) -> float:
        return self.summary.completed / self.summary.tasks if self.summary.tasks else 0.0

    @property
    def missed_fraction(self) -> float:
        """Tasks that missed their deadline (or failed, when they had one), over all tasks."""
        return self.summary.deadline_misses / self.summary.tasks if self.summary.tasks else 0.0


@dataclass(frozen=True, slots=True)
class Finished:
    """A run done: its plan index, its row and the CPU seconds it took (which vary; not in the row)."""

    index: int
    row: RunRow
    cpu_seconds: float


def plan_runs(scenarios: Sequence[tuple[str, Scenario]], policies_of: Callable[[Scenario], Sequence[str]],
              seeds: int) -> list[RunSpec]:
    """Every scenario x policy x seed, the seeds being each scenario's own seed and the ``seeds - 1``
    after it (so one seed is what ``offload-sim run --mode des`` gives)."""
    specs: list[RunSpec] = []
    for label, scenario in scenarios:
        for policy in policies_of(scenario):
            for offset in range(seeds):
                specs.append(RunSpec(len(specs), label, scenario, policy, scenario.seed + offset))
    return specs


def run_one(spec: RunSpec) -> Finished:
    """Simulate one run and summarise it (a module-level function: local processes and Dask workers
    import it by name)."""
    from sim.des import run_des

    result = run_des(spec.scenario, spec.policy, seed=spec.seed)
    summary = summarize(result.records, name=spec.policy, duration=result.duration)
    row = RunRow(spec.label, spec.policy, spec.seed, summary, result.events)
    return Finished(spec.index, row, result.cpu_seconds)


class Executor(Protocol):
    """Runs specs and yields each run as it finishes, in any order."""

    @property
    def where(self) -> str:
        """Where the runs go, for people (``2 local processes``)."""
        ...

    def run(self, specs: Sequence[RunSpec]) -> Iterator[Finished]: ...


class InProcess:
    """One run after the other in this process."""

    where = "this process"

    def run(self, specs: Sequence[RunSpec]) -> Iterator[Finished]:
        for spec in specs:
            yield _guarded(spec, functools.partial(run_one, spec))


class LocalProcesses:
    """Runs spread over ``workers`` local processes, each a fresh interpreter (``spawn``): nothing
    inherited from this one, and string hashing differs in each, so a result that depended on either
    would differ from the in-process one (the sweep tests compare them)."""

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.workers = workers

    @property
    def where(self) -> str:
        return f"{self.workers} local processes"

    def run(self, specs: Sequence[RunSpec]) -> Iterator[Finished]:
        pool = ProcessPoolExecutor(max_workers=min(self.workers, max(len(specs), 1)),
                                   mp_context=multiprocessing.get_context("spawn"))
        try:
            pending: dict[Future[Finished], RunSpec] = {pool.submit(run_one, spec): spec for spec in specs}
            for future in as_completed(pending):
                yield _guarded(pending[future], future.result)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


class DaskCluster:
    """Runs on the workers of a Dask cluster given its scheduler address (``tcp://host:port``). The
    workers must be able to import this package (same version: the runs are pickled by reference)."""

    def __init__(self, address: str, *, connect_timeout: float = 10.0) -> None:
        if "://" not in address:
            raise SweepError(f"--dask {address!r}: give the scheduler address, like tcp://127.0.0.1:8786")
        try:
            import distributed  # noqa: F401  # fail before anything runs when it is missing
        except ImportError:
            raise SweepError(DASK_MISSING) from None
        self.address = address
        self.connect_timeout = connect_timeout

    @property
    def where(self) -> str:
        return f"the Dask cluster at {self.address}"

    def run(self, specs: Sequence[RunSpec]) -> Iterator[Finished]:
        from distributed import Client
        from distributed import as_completed as completed

        try:
            client = Client(self.address, timeout=self.connect_timeout, set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise SweepError(f"--dask {self.address}: cannot reach the scheduler ({exc})") from exc
        try:
            futures = client.map(run_one, list(specs), pure=False)
            pending = {future.key: spec for future, spec in zip(futures, specs, strict=True)}
            for future in completed(futures, loop=client.loop):
                yield _guarded(pending[future.key], future.result)
        finally:
            client.close()


def _guarded(spec: RunSpec, result: Callable[[], Finished]) -> Finished:
    """A run's result, or a :class:`SweepError` naming the run that failed."""
    try:
        return result()
    except (KeyboardInterrupt, SweepError):
        raise
    except Exception as exc:
        raise SweepError(f"{spec}: {type(exc).__name__}: {exc}") from exc


def collect(specs: Sequence[RunSpec], finished: Iterable[Finished],
            progress: Callable[[int, int, Finished], None] | None = None) -> list[RunRow]:
    """The rows in plan order, each with its p95 ratio to the oracle of its scenario and seed (when
    the oracle ran); ``progress(done, total, run)`` after each run."""
    rows: list[RunRow | None] = [None] * len(specs)
    for done, run in enumerate(finished, start=1):
        rows[run.index] = run.row
        if progress is not None:
            progress(done, len(specs), run)
    missing = [str(spec) for spec, row in zip(specs, rows, strict=True) if row is None]
    if missing:
        raise SweepError(f"{len(missing)} runs gave no result, first {missing[0]}")
    ready = [row for row in rows if row is not None]
    by_comparison: dict[tuple[str, int], list[int]] = defaultdict(list)
    for position, row in enumerate(ready):
        by_comparison[(row.scenario, row.seed)].append(position)
    for positions in by_comparison.values():
        summaries = with_oracle_ratios([ready[position].summary for position in positions])
        for position, summary in zip(positions, summaries, strict=True):
            ready[position] = dataclasses.replace(ready[position], summary=summary)
    return ready


# --- the statistics -------------------------------------------------------------------------------

_T975 = (12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157,
         2.228139, 2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922,
         2.093024, 2.085963, 2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831,
         2.048407, 2.045230, 2.042272)
"""The 0.975 quantile of Student's t for 1 .. 30 degrees of freedom."""
_Z975 = 1.959964


def t_quantile(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (two-sided 95%): the table up
    to 30, then the Cornish-Fisher expansion around the normal quantile (error below 1e-6 there)."""
    if df < 1:
        raise ValueError("degrees of freedom must be at least 1")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


@dataclass(frozen=True, slots=True)
class Estimate:
    """The mean of ``n`` values and the half width of its 95% confidence interval (``None`` for one)."""

    mean: float
    half_width: float | None
    n: int

    @property
    def low(self) -> float | None:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.half_width is None else self.mean + self.half_width


def estimate(values: Sequence[float]) -> Estimate | None:
    """Mean and Student-t 95% interval of ``values`` (independent runs); ``None`` for no values."""
    if not values:
        return None
    mean = statistics.fmean(values)
    if len(values) < 2:
        return Estimate(mean, None, 1)
    spread = statistics.stdev(values) / math.sqrt(len(values))
    return Estimate(mean, t_quantile(len(values) - 1) * spread, len(values))


METRICS: dict[str, Callable[[RunRow], float | None]] = {
    "p95": lambda row: row.summary.p95,
    "p50": lambda row: row.summary.p50,
    "mean": lambda row: row.summary.mean,
    "completed": lambda row: row.completed_fraction,
    "missed": lambda row: row.missed_fraction,
    "p95_vs_oracle": lambda row: row.summary.p95_vs_oracle,
}
"""Each metric of a run: latencies in seconds (completed tasks only), fractions of all tasks, and the
p95 over the oracle's in the same scenario and seed. A run without a value (nothing completed, no
oracle) is left out of that metric's estimate."""


@dataclass(frozen=True, slots=True)
class PolicyAggregate:
    """One policy in one scenario over the seeds."""

    scenario: str
    policy: str
    seeds: tuple[int, ...]
    metrics: dict[str, Estimate | None]


def aggregate(rows: Sequence[RunRow]) -> list[PolicyAggregate]:
    """Per scenario and policy (in first-seen order), every metric's estimate over the seeds."""
    groups: dict[tuple[str, str], list[RunRow]] = defaultdict(list)
    for row in rows:
        groups[(row.scenario, row.policy)].append(row)
    return [PolicyAggregate(scenario, policy, tuple(row.seed for row in runs),
                            {name: estimate([value for row in runs if (value := metric(row)) is not None])
                             for name, metric in METRICS.items()})
            for (scenario, policy), runs in groups.items()]


# --- output ---------------------------------------------------------------------------------------

_COLUMNS = (("p95", "p95 ms", 1000.0, ".1f"), ("p50", "p50 ms", 1000.0, ".1f"),
            ("mean", "mean ms", 1000.0, ".1f"), ("completed", "completed %", 100.0, ".1f"),
            ("missed", "missed %", 100.0, ".1f"), ("p95_vs_oracle", "p95/oracle", 1.0, ".2f"))


def _cell(value: Estimate | None, scale: float, form: str) -> str:
    if value is None:
        return "-"
    text = format(value.mean * scale, form)
    return text if value.half_width is None else f"{text} ± {format(value.half_width * scale, form)}"


def format_sweep(aggregates: Sequence[PolicyAggregate]) -> str:
    """One table per scenario: each metric's mean ± the half width of its 95% interval."""
    blocks: list[str] = []
    by_scenario: dict[str, list[PolicyAggregate]] = defaultdict(list)
    for item in aggregates:
        by_scenario[item.scenario].append(item)
    for scenario, items in by_scenario.items():
        seeds = sorted({seed for item in items for seed in item.seeds})
        header = ("policy", "runs", *(title for _, title, _, _ in _COLUMNS))
        table = [header] + [(item.policy, str(len(item.seeds)),
                             *(_cell(item.metrics[name], scale, form) for name, _, scale, form in _COLUMNS))
                            for item in items]
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                           for i, (cell, width) in enumerate(zip(row, widths, strict=True))).rstrip()
                 for row in table]
        lines.insert(1, "-" * len(lines[0]))
        blocks.append(f"{scenario}: {len(seeds)} seeds ({_ranges(seeds)}), mean ± 95% CI half width\n"
                      + "\n".join(lines))
    return "\n\n".join(blocks)


def _ranges(seeds: Sequence[int]) -> str:
    if seeds and seeds == list(range(seeds[0], seeds[-1] + 1)) and len(seeds) > 2:
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(str(seed) for seed in seeds)


RUN_FIELDS = ("scenario", "policy", "seed", "tasks", "completed", "completed_fraction", "deadline_misses",
              "missed_fraction", "p50", "p95", "p99", "mean", "p95_vs_oracle", "throughput", "share_local",
              "retries", "events")


def _run_record(row: RunRow) -> dict[str, Any]:
    summary = row.summary
    return {"scenario": row.scenario, "policy": row.policy, "seed": row.seed, "tasks": summary.tasks,
            "completed": summary.completed, "completed_fraction": row.completed_fraction,
            "deadline_misses": summary.deadline_misses, "missed_fraction": row.missed_fraction,
            "p50": summary.p50, "p95": summary.p95, "p99": summary.p99, "mean": summary.mean,
            "p95_vs_oracle": summary.p95_vs_oracle, "throughput": summary.throughput,
            "share_local": summary.share_local, "retries": summary.retries, "events": row.events}


def _estimate_record(value: Estimate | None) -> dict[str, Any] | None:
    if value is None:
        return None
    return {"mean": value.mean, "ci_low": value.low, "ci_high": value.high, "n": value.n}


def write_sweep(out_dir: Path, rows: Sequence[RunRow], aggregates: Sequence[PolicyAggregate], *,
                meta: dict[str, Any]) -> list[Path]:
    """``sweep.json`` (the plan, every run and the aggregate), ``runs.csv`` (one row per run) and
    ``sweep.csv`` (one row per scenario and policy: each metric's mean and 95% interval)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "sweep.json", out_dir / "runs.csv", out_dir / "sweep.csv"]
    paths[0].write_text(json.dumps({
        **meta, "metrics": list(METRICS), "confidence": 0.95,
        "runs": [{**_run_record(row), "failed": row.summary.failed,
                  "share_by_server": row.summary.share_by_server} for row in rows],
        "aggregate": [{"scenario": item.scenario, "policy": item.policy, "seeds": list(item.seeds),
                       "metrics": {name: _estimate_record(value) for name, value in item.metrics.items()}}
                      for item in aggregates]}, indent=2) + "\n")
    with paths[1].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, RUN_FIELDS)
        writer.writeheader()
        writer.writerows(_run_record(row) for row in rows)
    with paths[2].open("w", newline="") as handle:
        fields = ["scenario", "policy", "runs"] + [f"{name}_{part}" for name in METRICS
                                                    for part in ("mean", "ci_low", "ci_high")]
        writer = csv.DictWriter(handle, fields)
        writer.writeheader()
        for item in aggregates:
            record: dict[str, Any] = {"scenario": item.scenario, "policy": item.policy,
                                      "runs": len(item.seeds)}
            for name, value in item.metrics.items():
                record[f"{name}_mean"] = "" if value is None else value.mean
                record[f"{name}_ci_low"] = "" if value is None or value.low is None else value.low
                record[f"{name}_ci_high"] = "" if value is None or value.high is None else value.high
            writer.writerow(record)
    return paths


def default_workers() -> int:
    """The CPUs this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1
