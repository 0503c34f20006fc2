"""Throughput of :class:`edge_agent.spool.Spool` on this machine's disk.

Per operation: ``put`` (one fsync'd transaction each), ``take_ready`` one at a time and in batches,
``peek`` + ``remove`` (the at-least-once pattern), ``expire`` of a full spool, and opening a full
spool (``quick_check`` reads every page). Each with ``synchronous=FULL`` (what the spool uses) and
``NORMAL`` (for comparison: safe against a crash of the process, not against a power cut).

    python bench/spool_bench.py [--tasks 2000] [--size 1024] [--dir /var/lib/offload] [--repeat 3]

Run it on the device's own storage (``--dir``): an SD card fsyncs far slower than a laptop's SSD.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from edge_agent.spool import Spool, SpooledTask

NOW = 1_700_000_000.0


def _spool(path: Path, tasks: int, synchronous: str) -> Spool:
    spool = Spool(path, max_tasks=tasks, max_bytes=2**40)
    # The spool always runs FULL; the bench lowers it on the open connection to show the difference.
    db = spool._db
    assert db is not None
    db.execute(f"PRAGMA synchronous={synchronous}")
    return spool


def _entries(tasks: int, size: int) -> list[SpooledTask]:
    payload = b"\x5a" * size
    return [SpooledTask(task_id=f"task-{n:08d}", name="detect", payload=payload, created=NOW,
                        deadline=NOW + 60 + n, stage=None, policy="ect") for n in range(tasks)]


def _rate(count: int, seconds: float) -> str:
    return f"{count / seconds:>10,.0f}/s" if seconds > 0 else "       inf/s"


def measure(directory: Path, tasks: int, size: int, synchronous: str) -> dict[str, float]:
    """Seconds per phase for one run in a fresh file."""
    path = directory / f"bench-{synchronous.lower()}-{time.monotonic_ns()}.db"
    entries = _entries(tasks, size)
    timings: dict[str, float] = {}

    def timed(label: str, action: Callable[[], object]) -> None:
        start = time.perf_counter()
        action()
        timings[label] = time.perf_counter() - start

    spool = _spool(path, tasks, synchronous)

    def put_all() -> None:
        for entry in entries:
            spool.put(entry)

    timed("put", put_all)
    half = tasks // 2
    timed("take_ready(1)", lambda: [spool.take_ready(NOW, 1) for _ in range(half)])

    def peek_remove() -> None:
        while batch := spool.peek(NOW, 1):
            spool.remove(batch[0].task_id)

    timed("peek+remove", peek_remove)
    put_all()
    timed("take_ready(100)", lambda: [spool.take_ready(NOW, 100) for _ in range(tasks // 100 + 1)])
    put_all()
    spool.close()
    timed("open (full)", lambda: _spool(path, tasks, synchronous).close())
    spool = _spool(path, tasks, synchronous)
    timed("expire (all)", lambda: spool.expire(NOW + 1e6))
    spool.close()
    for leftover in directory.glob(path.name + "*"):
        leftover.unlink()
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--size", type=int, default=1024, help="payload bytes per task")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where the spool file goes (default: a temp dir)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    half = args.tasks // 2
    counts = {"put": args.tasks, "take_ready(1)": half, "peek+remove": args.tasks - half,
              "take_ready(100)": args.tasks, "open (full)": 1, "expire (all)": args.tasks}
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        print(f"{args.tasks} tasks of {args.size} B in {directory}; median of {args.repeat} runs")
        print(f"{'operation':<16} {'FULL':>14} {'NORMAL':>14}   (tasks per second; open: ms)")
        results = {mode: [measure(Path(directory), args.tasks, args.size, mode) for _ in range(args.repeat)]
                   for mode in ("FULL", "NORMAL")}
        for label, count in counts.items():
            cells = []
            for mode in ("FULL", "NORMAL"):
                seconds = statistics.median(run[label] for run in results[mode])
                opening = label.startswith("open")
                cells.append(f"{seconds * 1e3:>11.1f} ms" if opening else _rate(count, seconds))
            print(f"{label:<16} {cells[0]:>14} {cells[1]:>14}")


if __name__ == "__main__":
    main()
