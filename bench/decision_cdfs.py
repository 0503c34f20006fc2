"""Latency CDFs of every policy against the oracle, one PNG per shipped scenario, for docs/decisions.md.

Runs each scenario in discrete-event mode, at one seed, under its own policies plus ``p2c``, the
default and the oracle, and draws their latency CDFs with :func:`sim.report.write_plots` (the oracle
dashed black); the CDF is kept as ``<out>/<scenario>-cdf.png``.

    nice -n 10 python bench/decision_cdfs.py [--seed 1] [--scenarios herding,link_flap] [--out docs/img]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from edge_agent.policy import DEFAULT_POLICY
from sim.cli import resolve_scenario, shipped_scenarios
from sim.des import run_des
from sim.oracle import ORACLE
from sim.report import RunResult, write_plots
from sim.scenario import load_scenario

SCENARIOS = tuple(path.stem for path in shipped_scenarios())


def scenario_cdf(name: str, seed: int, out: Path) -> Path:
    """Run ``name`` under its policies, p2c, the default and the oracle; write and return its CDF plot."""
    scenario = load_scenario(resolve_scenario(name))
    policies = list(dict.fromkeys([*scenario.policies, "p2c", DEFAULT_POLICY, ORACLE]))
    results: list[RunResult] = [run_des(scenario, policy, seed=seed) for policy in policies]
    with tempfile.TemporaryDirectory() as scratch:
        plots = {path.name: path for path in write_plots(results, scratch)}
        target = out / f"{name}-cdf.png"
        shutil.copyfile(plots["latency_cdf.png"], target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.scenarios.split(","):
        print(scenario_cdf(name, args.seed, args.out))


if __name__ == "__main__":
    main()
