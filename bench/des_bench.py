"""Discrete-event simulator speed: simulated tasks per wall-clock second on one core.

Runs the ``ect`` policy on a synthetic fleet (100 servers, Poisson devices) at 1,000 and 10,000 devices
and prints tasks/s, the ratio to the 40,000 tasks/s goal (issue 5) and to PureEdgeSim's *reported*
19,500 tasks/s (1.13 million tasks for 10,000 devices in 58 s, from its paper; not measured here).
Rates are per CPU second of the run (``time.process_time``), so other processes on a shared machine
inflate them less than wall time would. Each device sees ``--known`` servers (its neighbourhood);
``--known 0`` gives every device all 100.
Each run is bounded by its task count (about ``--tasks`` tasks), well under 20 s on a 2-core machine.

    python bench/des_bench.py [--tasks 200000] [--known 10] [--policy ect]
"""

from __future__ import annotations

import argparse
from typing import Any

from sim.des import run_des
from sim.report import OK
from sim.scenario import Scenario, parse_scenario

GOAL = 40_000.0
PUREEDGESIM_REPORTED = 19_500.0


def fleet(devices: int, servers: int, tasks: int, known: int | None) -> Scenario:
    """A fleet where each device creates about ``tasks / devices`` tasks over the run."""
    rate = 2.0
    duration = max(tasks / (devices * rate), 1.0)
    data: dict[str, Any] = {
        "name": f"bench-{devices}x{servers}", "duration": duration, "seed": 3, "heartbeat_interval": 1.0,
        "tasks": {"detect": {"service_time": 0.010, "variation": 0.3, "result_bytes": 200}},
        "devices": [{"name": "dev", "count": devices, "speed": 0.2, "task": "detect",
                     "payload_bytes": 5_000, "deadline": 1.0, "known_servers": known,
                     "workload": {"kind": "poisson", "rate": rate}}],
        # Capacity: 100 servers x 4 workers x 100 tasks/s = 40,000 tasks/s, about twice the offered load
        # at 10,000 devices, so queues form but do not explode.
        "servers": [{"name": "edge", "count": servers, "workers": 4, "speed": 1.0, "queue_size": 64}],
        "links": {"default": {"delay": 0.002, "jitter": 0.0005, "bandwidth": 12.5e6}},
    }
    return parse_scenario(data, "<bench>")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200_000, help="approximate tasks per run")
    parser.add_argument("--servers", type=int, default=100)
    parser.add_argument("--known", type=int, default=10, help="servers each device sees (0 = all)")
    parser.add_argument("--policy", default="ect")
    args = parser.parse_args()
    known = args.known or None
    print(f"policy {args.policy}, {args.servers} servers, each device sees "
          f"{known or args.servers} of them; one core")
    print(f"{'devices':>8} {'tasks':>8} {'ok %':>6} {'events':>9} {'cpu s':>7} {'tasks/s':>9} "
          f"{'vs goal':>8} {'vs PureEdgeSim (reported)':>26}")
    for devices in (1_000, 10_000):
        scenario = fleet(devices, args.servers, args.tasks, known)
        result = run_des(scenario, args.policy)
        rate = result.tasks_per_second
        ok = sum(record.outcome == OK for record in result.records) / max(len(result.records), 1)
        print(f"{devices:>8} {len(result.records):>8} {ok * 100:>6.1f} {result.events:>9} "
              f"{result.cpu_seconds:>7.2f} {rate:>9.0f} {rate / GOAL:>7.2f}x "
              f"{rate / PUREEDGESIM_REPORTED:>25.2f}x")
    print(f"goal {GOAL:.0f} tasks/s (issue 5); PureEdgeSim {PUREEDGESIM_REPORTED:.0f} tasks/s is its "
          "published figure, not measured here")


if __name__ == "__main__":
    main()
