"""Discrete-event simulator speed: simulated tasks per CPU second on one core.

Runs the ``ect`` policy (or ``--policy a,b,...``, ``oracle`` among them) on a synthetic fleet (100
servers, Poisson devices) at 1,000 and 10,000 devices and prints tasks/s, the ratio to the 100,000
tasks/s goal (issue 11: 10,000 devices each seeing all 100 servers, ``--known 0``) and to PureEdgeSim
5.3 built and run on this project's machine: about 3,950 tasks/s with 10,000 devices offloading to
edge and cloud (what this fleet does), about 49,000 with every task run on the device itself (measured
once, for the issue; not re-run here). Rates are per CPU second of the run
(``time.process_time``), so other processes on a shared machine inflate them less than wall time
would. Each device sees ``--known`` servers (its neighbourhood); ``--known 0`` gives every device all
100. Last, the device core alone (:func:`core_alone`): the DES's work per task without any events,
the ceiling of any DES that drives the agent's own device code.
Each run is bounded by its task count (about ``--tasks`` tasks), well under 20 s on a 2-core machine.

    python bench/des_bench.py [--tasks 150000] [--known 10] [--rate 1.0] [--policy ect] [--spread-k K]
    python bench/des_bench.py --known 0 --policy ect,oracle      # the cost of the oracle, and its p95

``--known 0 --spread-k K`` shows herding: every device sees the same (stale) loads of all 100 servers.
With ``oracle`` in ``--policy``, each row also gives its p95 over the oracle's at that size.
"""

from __future__ import annotations

import argparse
import random
import time
from typing import Any

from edge_agent.core import Complete, DeviceCore, Send
from edge_agent.servers import ServerReport
from sim.des import run_des
from sim.report import PolicySummary, summarize, with_oracle_ratios
from sim.scenario import Scenario, parse_scenario

GOAL = 100_000.0
"""Tasks per CPU second at 10,000 devices each seeing all 100 servers (issue 11)."""
PUREEDGESIM_OFFLOADING = 3_950.0
"""PureEdgeSim 5.3 on this machine, 10,000 devices offloading to edge and cloud (tasks/s)."""
PUREEDGESIM_LOCAL = 49_000.0
"""... and with every task run on the device itself."""


def fleet(devices: int, servers: int, tasks: int, known: int | None, rate: float = 1.0,
          policy: dict[str, Any] | None = None) -> Scenario:
    """A fleet where each device creates about ``tasks / devices`` tasks (Poisson, ``rate``/s).

    ``policy``: PolicyConfig overrides, as in a scenario file's ``policy`` table.
    """
    duration = max(tasks / (devices * rate), 1.0)
    data: dict[str, Any] = {
        "name": f"bench-{devices}x{servers}", "duration": duration, "seed": 3, "heartbeat_interval": 1.0,
        "tasks": {"detect": {"service_time": 0.010, "variation": 0.3, "result_bytes": 200}},
        "devices": [{"name": "dev", "count": devices, "speed": 0.2, "task": "detect",
                     "payload_bytes": 5_000, "deadline": 1.0, "known_servers": known,
                     "workload": {"kind": "poisson", "rate": rate}}],
        # Capacity: 100 servers x 4 workers x 100 tasks/s = 40,000 tasks/s; 10,000 devices at 1/s offer
        # a quarter of it (at 2/s and more, stale heartbeats make devices herd: see herding.toml).
        "servers": [{"name": "edge", "count": servers, "workers": 4, "speed": 1.0, "queue_size": 64}],
        "links": {"default": {"delay": 0.002, "jitter": 0.0005, "bandwidth": 12.5e6}},
    }
    if policy:
        data["policy"] = policy
    return parse_scenario(data, "<bench>")


def core_alone(servers: int, tasks: int, devices: int = 100) -> float:
    """Tasks per CPU second of the device core alone, as the DES drives it for one offloaded task
    (submit, decide, send, result, outcome), with nothing simulated around it: every device sees all
    ``servers`` (reports that never turn stale), each submits a task a second, and every answer
    comes back ``ok`` 12 ms later. No DES that drives this core can be faster on this interpreter."""
    cores = []
    for index in range(devices):
        core = DeviceCore(f"dev{index}", local_tasks=frozenset(), rng=random.Random(index), probes=False,
                          watchdog=False)
        core.link_up(0.0)
        for server in range(servers):
            core.heartbeat(ServerReport(f"s{server}", 1, 1, 1e9, frozenset({"detect"}), workers=4,
                                        queue_capacity=64, service_time={"detect": 0.010}), 0.0)
        cores.append(core)
    completed = 0
    started = time.process_time()
    for number in range(tasks):
        core = cores[number % devices]
        now = 1.0 * (number // devices)  # each device's own clock: a task a second, as in fleet()
        for action in core.submit(f"t{number}", "detect", 5_000, now, deadline=1.0):
            if isinstance(action, Send):
                answer = core.result(action.task.task_id, action.server, action.attempt, "ok", now + 0.012,
                                     queue_wait=0.0, service_time=0.010)
                completed += sum(isinstance(outcome, Complete) for outcome in answer)
    cpu = time.process_time() - started
    if completed != tasks:
        raise RuntimeError(f"the core completed {completed} of {tasks} tasks")
    return tasks / cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=150_000, help="approximate tasks per run")
    parser.add_argument("--servers", type=int, default=100)
    parser.add_argument("--known", type=int, default=10, help="servers each device sees (0 = all)")
    parser.add_argument("--policy", default="ect", help="a policy, or several separated by commas")
    parser.add_argument("--rate", type=float, default=1.0, help="tasks per second per device")
    parser.add_argument("--repeat", type=int, default=2, help="runs per size; the fastest is shown")
    parser.add_argument("--spread-k", type=int, default=None,
                        help="PolicyConfig.spread_k (default: the policy's own, 2)")
    args = parser.parse_args()
    known = args.known or None
    policies = [name.strip() for name in args.policy.split(",") if name.strip()]
    spread = "" if args.spread_k is None else f", spread_k {args.spread_k}"
    print(f"policy {', '.join(policies)}{spread}, {args.servers} servers, each device sees "
          f"{known or args.servers} of them, {args.rate:g} tasks/s per device; one core")
    print(f"{'policy':<8} {'devices':>8} {'tasks':>8} {'ok %':>6} {'p95 ms':>7} {'/oracle':>7} "
          f"{'retries':>8} {'events':>9} {'cpu s':>7} {'tasks/s':>9} {'vs goal':>8} "
          f"{'vs PureEdgeSim offloading':>26}")
    for devices in (1_000, 10_000):
        overrides = {} if args.spread_k is None else {"spread_k": args.spread_k}
        scenario = fleet(devices, args.servers, args.tasks, known, args.rate, overrides)
        rows: list[tuple[str, float, int, float, int]] = []
        summaries: list[PolicySummary] = []
        for policy in policies:
            result = min((run_des(scenario, policy) for _ in range(max(args.repeat, 1))),
                         key=lambda run: run.cpu_seconds)
            rows.append((policy, result.tasks_per_second, result.events, result.cpu_seconds,
                         len(result.records)))
            summaries.append(summarize(result.records, name=policy))
        for (policy, rate, events, cpu, tasks), summary in zip(rows, with_oracle_ratios(summaries),
                                                                strict=True):
            ok = summary.completed / max(summary.tasks, 1)
            p95 = f"{summary.p95 * 1000:.1f}" if summary.p95 is not None else "-"
            ratio = "-" if summary.p95_vs_oracle is None else f"{summary.p95_vs_oracle:.2f}x"
            print(f"{policy:<8} {devices:>8} {tasks:>8} {ok * 100:>6.1f} {p95:>7} {ratio:>7} "
                  f"{summary.retries:>8} {events:>9} {cpu:>7.2f} {rate:>9.0f} {rate / GOAL:>7.2f}x "
                  f"{rate / PUREEDGESIM_OFFLOADING:>25.2f}x")
    ceiling = max(core_alone(args.servers, 50_000) for _ in range(max(args.repeat, 1)))
    print(f"the device core alone (submit, decide, send, result; no events, no network), 100 devices x "
          f"{args.servers} servers: {ceiling:,.0f} tasks/s = {ceiling / GOAL:.2f}x the goal: the ceiling of "
          "any DES that drives it")
    print(f"goal {GOAL:,.0f} tasks/s at 10,000 devices seeing all {args.servers} servers (issue 11; "
          f"--known 0); PureEdgeSim 5.3 on this machine: {PUREEDGESIM_OFFLOADING:,.0f} tasks/s with "
          f"10,000 devices offloading, {PUREEDGESIM_LOCAL:,.0f} all-local (measured for the issue, not "
          "here)")


if __name__ == "__main__":
    main()
