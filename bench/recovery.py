"""How fast work comes back to a server after a bad period (a slowdown, a slow link), in DES mode.

For each scenario with a degrade-and-recover pair of events (``server_slowdown``, ``link_flap``) and each
policy, over several seeds: the share of tasks (by creation time) sent to the affected server before the
bad period, during it, in the first and the next seconds after it ends, and the time from its end until a
one-second window first gets half of the share it had before (``never``: not within the run). The oracle,
which sees the truth, is the baseline measured in the same run.

    nice -n 10 python bench/recovery.py [--seeds 1-5] [--policies ect,remote,p2c] [--set evidence_half_life=0]
"""

from __future__ import annotations

import argparse
import statistics

from bench.policy_table import parse_overrides, parse_seeds
from sim.cli import resolve_scenario
from sim.des import run_des
from sim.oracle import ORACLE
from sim.report import TaskRecord
from sim.scenario import LinkEvent, Scenario, SlowdownEvent, load_scenario

SCENARIOS = ("server_slowdown", "link_flap")


def bad_period(scenario: Scenario) -> tuple[str, float, float]:
    """(affected server node, when the bad period starts, when it ends) from the scenario's events."""
    events = [event for event in scenario.events if isinstance(event, (SlowdownEvent, LinkEvent))]
    if len(events) < 2:
        raise ValueError(f"scenario {scenario.name!r}: needs a degrade and a recover event")
    first, last = events[0], events[-1]
    node = first.server if isinstance(first, SlowdownEvent) else f"{first.servers}-0"
    return node, first.at, last.at


def share(records: list[TaskRecord], node: str, start: float, end: float) -> float:
    """Share of the tasks created in [start, end) that were sent to ``node`` (completed there)."""
    window = [record for record in records if start <= record.created < end]
    return sum(record.target == node for record in window) / len(window) if window else 0.0


def time_to_half(records: list[TaskRecord], node: str, before: float, recovered: float, end: float
                 ) -> float | None:
    """Seconds from ``recovered`` until a one-second window first has half the ``before`` share."""
    step = 0.1
    t = recovered
    while t + 1.0 <= end:
        if share(records, node, t, t + 1.0) >= before / 2:
            return t - recovered
        t += step
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="1-5")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--policies", default="ect,remote,p2c")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a PolicyConfig override (repeatable)")
    args = parser.parse_args()
    overrides = parse_overrides(args.set)
    seeds = parse_seeds(args.seeds)
    print(f"DES, seeds {seeds[0]}..{seeds[-1]}: share of tasks sent to the affected server (mean over "
          "seeds); half: seconds after recovery until a 1 s window has half the share before (mean, "
          "never counted "
          "as the rest of the run)")
    print(f"{'scenario':<16} {'policy':<8} {'before':>7} {'during':>7} {'+0-1s':>7} {'+1-2s':>7} "
          f"{'+2-4s':>7} {'after':>7} {'half s':>8}")
    for name in args.scenarios.split(","):
        scenario = load_scenario(resolve_scenario(name))
        node, bad, recovered = bad_period(scenario)
        end = scenario.duration
        for policy in [*args.policies.split(","), ORACLE]:
            rows: list[list[float]] = []
            halves: list[float] = []
            never = 0
            for seed in seeds:
                records = run_des(scenario, policy, seed=seed,
                                  config=scenario.policy_config(**overrides)).records
                before = share(records, node, 1.0, bad)
                rows.append([before, share(records, node, bad + 1.0, recovered),
                             share(records, node, recovered, recovered + 1.0),
                             share(records, node, recovered + 1.0, recovered + 2.0),
                             share(records, node, recovered + 2.0, recovered + 4.0),
                             share(records, node, recovered, end)])
                half = time_to_half(records, node, before, recovered, end)
                if half is None:
                    never += 1
                    half = end - recovered
                halves.append(half)
            means = [statistics.fmean(column) for column in zip(*rows, strict=True)]
            cells = " ".join(f"{value:>7.0%}" for value in means)
            half_text = f"{statistics.fmean(halves):.1f}" + (f" ({never} never)" if never else "")
            print(f"{name:<16} {policy:<8} {cells} {half_text:>8}")


if __name__ == "__main__":
    main()
