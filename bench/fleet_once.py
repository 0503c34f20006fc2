"""One fleet-scale run of bench/des_bench.py's fleet at one size: completion and p95 per policy.

    nice -n 10 python bench/fleet_once.py [--devices 10000] [--known 0] [--policy ect,oracle]
"""

from __future__ import annotations

import argparse

from bench.des_bench import fleet
from sim.des import run_des
from sim.report import summarize, with_oracle_ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--servers", type=int, default=100)
    parser.add_argument("--tasks", type=int, default=150_000)
    parser.add_argument("--known", type=int, default=0, help="servers each device sees (0 = all)")
    parser.add_argument("--rate", type=float, default=1.0)
    parser.add_argument("--policy", default="ect,oracle")
    args = parser.parse_args()
    scenario = fleet(args.devices, args.servers, args.tasks, args.known or None, args.rate)
    runs = [(policy, run_des(scenario, policy)) for policy in args.policy.split(",") if policy]
    summaries = with_oracle_ratios([summarize(run.records, name=policy) for policy, run in runs])
    for (policy, run), summary in zip(runs, summaries, strict=True):
        ratio = "-" if summary.p95_vs_oracle is None else f"{summary.p95_vs_oracle:.2f}x"
        p95 = "-" if summary.p95 is None else f"{summary.p95 * 1000:.1f}"
        print(f"{policy:<8} {args.devices:>6} devices: {summary.completed / max(summary.tasks, 1):6.1%} "
              f"completed, p95 {p95} ms ({ratio} oracle), local {summary.share_local:.1%}, "
              f"retries {summary.retries}, cpu {run.cpu_seconds:.1f} s")


if __name__ == "__main__":
    main()
