"""Do emulation and the discrete-event mode agree? Every shipped scenario, both modes, same seeds.

For each scenario and each policy it lists: p95 in discrete-event mode and in emulation (real agents
on a Mosquitto this script starts; in fleets of ``--spread-from`` devices or more, the devices spread
over ``--device-processes`` processes), their
ratio, the discrete-event p95's range over ``--spread-seeds`` other seeds (how far one run of that
policy moves with its random draws alone), the policy's DES p95 over the oracle's, completed tasks,
and how late a 2 ms timer fired in the emulation's servers' process (p95: the machine's share). Then
per scenario the two rankings by p95, the oracle's p95 (DES only) and whether the rankings agree.
Two policies whose p95 differ by less than ``--tie`` (relative, default 10%) in a mode are a tie
there: a ranking only disagrees when one mode orders a pair clearly one way and the other clearly
the other way (within the noise of one run, an order means nothing). With several seeds
(``--seeds`` or ``--seed-count``) each cell is the median over them in both modes; with
``--repeats n`` each emulated cell is the median of n runs per seed, its range in brackets (on a
shared machine one run can be off by a factor of two). One seed does not give both modes the same
draws (an emulated device's probe intervals come from its decision generator; the discrete-event
devices share one prober per group), so a policy whose p95 swings with its draws is compared over
several seeds.

    python -m bench.modes_table [--scenarios herding,old_proxy] [--seeds 1 | --seed-count 5] [--tie 0.10]
                                [--device-processes 2] [--spread-seeds 10] [--repeats 3]

Bounded: each emulated run lasts its scenario's duration plus the drain; the script ends by itself.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sim.cli import resolve_scenario, shipped_scenarios
from sim.des import run_des
from sim.emulate import run_emulation
from sim.oracle import ORACLE
from sim.report import RunResult, summarize
from sim.scenario import Scenario, load_scenario
from topics.brokers import MosquittoBroker


@dataclass(frozen=True)
class Cell:
    p95_ms: float
    completed: int
    created: int
    late_ms: float = 0.0
    """Emulation: p95 of how late a 2 ms timer fired in the servers' process (the machine's share)."""


def run_mode(scenario: Scenario, policy: str, seed: int, mode: str, url: str, processes: int) -> Cell:
    result: RunResult
    if mode == "des":
        result = run_des(scenario, policy, seed=seed)
    else:
        result = run_emulation(scenario, policy, broker_url=url, seed=seed, device_processes=processes)
    summary = summarize(result.records, name=policy, duration=result.duration)
    late = result.counters.get("wakeup_late_p95_us", 0) / 1000.0
    return Cell(1000.0 * (summary.p95 or 0.0), summary.completed, len(result.records), late)


def ordered_pairs(p95: Mapping[str, float], tie: float) -> set[tuple[str, str]]:
    """Pairs (a, b) where a is clearly faster than b (by more than ``tie``, relative)."""
    return {(a, b) for a, b in itertools.permutations(p95, 2)
            if p95[a] * (1.0 + tie) < p95[b]}


def ranking(p95: Mapping[str, float]) -> str:
    return " < ".join(sorted(p95, key=p95.__getitem__))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--scenarios", default=",".join(p.stem for p in shipped_scenarios(adversarial=False)),
                        help="shipped names or paths (default: the examples, not the adversarial ones)")
    parser.add_argument("--seeds", default="", help="comma-separated seeds (default: each scenario's own)")
    parser.add_argument("--seed-count", type=int, default=1,
                        help="without --seeds: this many seeds from each scenario's own (its seed, +1, ...)")
    parser.add_argument("--tie", type=float, default=0.10)
    parser.add_argument("--device-processes", type=int, default=2,
                        help="processes the emulated devices are spread over (0: all in this one)")
    parser.add_argument("--spread-from", type=int, default=10,
                        help="spread the devices only in scenarios with at least this many devices")
    parser.add_argument("--repeats", type=int, default=1,
                        help="emulated runs per policy and seed: the table shows their median and range")
    parser.add_argument("--spread-seeds", type=int, default=10,
                        help="DES runs at other seeds for the p95 range column")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.seed_count < 1:
        parser.error("--repeats and --seed-count must be 1 or more")
    broker = MosquittoBroker().start()
    summary_rows = []
    try:
        print("| scenario | policy | DES p95 ms | emulation p95 ms | emulation/DES | DES p95 ms at "
              f"{args.spread_seeds} other seeds | DES/oracle | DES completed | emulation completed "
              "| emulation timer lateness p95 ms |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for name in args.scenarios.split(","):
            scenario = load_scenario(resolve_scenario(name))
            seeds = ([int(s) for s in args.seeds.split(",") if s]
                     or list(range(scenario.seed, scenario.seed + args.seed_count)))
            # Measured: 40 devices gain from their own processes (herding p95 44-60 -> 21-24 ms);
            # one device loses ~1.5 ms p95 to the extra hop (old_proxy/min_rtt 8.9-9.8 -> 10.2-12.1 ms).
            processes = args.device_processes if len(scenario.device_nodes()) >= args.spread_from else 0
            p95: dict[str, dict[str, float]] = {"des": {}, "emulate": {}}
            oracle = statistics.median(run_mode(scenario, ORACLE, seed, "des", broker.url, 0).p95_ms
                                     for seed in seeds)
            others = range(max(seeds) + 1, max(seeds) + 1 + args.spread_seeds)
            for policy in scenario.policies:
                cells: dict[str, list[Cell]] = {"des": [], "emulate": []}
                for seed in seeds:
                    cells["des"].append(run_mode(scenario, policy, seed, "des", broker.url, 0))
                    for _ in range(args.repeats):
                        cells["emulate"].append(run_mode(scenario, policy, seed, "emulate", broker.url,
                                                         processes))
                p95["des"][policy] = statistics.median(c.p95_ms for c in cells["des"])
                p95["emulate"][policy] = statistics.median(c.p95_ms for c in cells["emulate"])
                des, emu = p95["des"][policy], p95["emulate"][policy]
                done = {mode: f"{sum(c.completed for c in cs)}/{sum(c.created for c in cs)}"
                        for mode, cs in cells.items()}
                spread = [run_mode(scenario, policy, seed, "des", broker.url, 0).p95_ms for seed in others]
                ranged = f"{min(spread):.1f}-{max(spread):.1f}" if spread else "-"
                runs = [c.p95_ms for c in cells["emulate"]]
                emulated = f"{emu:.1f}" + (f" ({min(runs):.1f}-{max(runs):.1f})" if len(runs) > 1 else "")
                print(f"| `{name}` | {policy} | {des:.1f} | {emulated} | {emu / des:.2f} | {ranged} | "
                      f"{des / oracle:.2f} | {done['des']} | {done['emulate']} | "
                      f"{statistics.mean(c.late_ms for c in cells['emulate']):.2f} |", flush=True)
            clash = {(a, b) for a, b in ordered_pairs(p95["des"], args.tie)
                     if (b, a) in ordered_pairs(p95["emulate"], args.tie)}
            within = sum(abs(p95["emulate"][p] / p95["des"][p] - 1.0) <= 0.30
                         for p in scenario.policies)
            summary_rows.append((name, ranking(p95["des"]), ranking(p95["emulate"]),
                                 "yes" if not clash else "no: " + ", ".join(f"{a}<{b}" for a, b in
                                                                              sorted(clash)),
                                 f"{within}/{len(scenario.policies)}", oracle))
    finally:
        broker.close()
    print()
    print(f"| scenario | DES ranking by p95 | emulation ranking by p95 | oracle p95 ms (DES) | rankings "
          f"agree (ties within {args.tie:.0%}) | p95 within 30% |")
    print("|---|---|---|---|---|---|")
    for name, des_rank, emu_rank, agree, close, oracle_p95 in summary_rows:
        print(f"| `{name}` | {des_rank} | {emu_rank} | {oracle_p95:.1f} | {agree} | {close} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
