"""Decision time of :func:`edge_agent.policy.decide` with 1, 10 and 100 servers.

Prints microseconds per decision for each policy next to a trivial baseline measured in the same run:
``min()`` over the same server list by round trip, the least any policy could possibly do. The goal
(issue 4) is well under 50 us per ``ect`` decision with 10 servers.

    python bench/decision_bench.py [--repeat 3] [--number 20000]
"""

from __future__ import annotations

import argparse
import random
import statistics
import timeit

from edge_agent.policy import POLICIES, LocalInfo, ServerInfo, TaskInfo, decide

GOAL_US_AT_10 = 50.0


def make_servers(count: int, rng: random.Random) -> list[ServerInfo]:
    """A plausible server table: LAN round trips, mixed load, a few stale or incapable entries."""
    return [ServerInfo(node=f"srv{i}", capable=(i % 17 != 5), stale=(i % 23 == 7),
                       rtt=rng.uniform(0.0005, 0.004), rtt_dev=rng.uniform(0.0, 0.0005),
                       bandwidth=rng.choice((12.5e6, 1.25e8)), queue_length=rng.randrange(0, 8),
                       in_flight=rng.randrange(0, 4), workers=rng.choice((1, 2, 4, 8)),
                       service_time=rng.uniform(0.002, 0.02), sent_since_report=rng.randrange(0, 3))
            for i in range(count)]


def per_call_us(function: object, number: int, repeat: int) -> float:
    """Median over ``repeat`` runs of the time per call, in microseconds."""
    timer = timeit.Timer(function)  # type: ignore[arg-type]
    return statistics.median(timer.repeat(repeat=repeat, number=number)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--number", type=int, default=20_000)
    args = parser.parse_args()

    task = TaskInfo("detect", payload_bytes=20_000, time_left=0.5)
    local = LocalInfo(capable=True, queue_length=2, in_flight=1, workers=2, service_time=0.03, rate=30.0)
    print(f"{'servers':>7} {'policy':>10} {'us/decision':>12} {'baseline us':>12} {'ratio':>7}")
    for count in (1, 10, 100):
        servers = make_servers(count, random.Random(count))
        number = max(args.number // max(count // 10, 1), 1000)

        def baseline(servers: list[ServerInfo] = servers) -> object:
            return min(servers, key=lambda server: server.rtt or 0.0)

        base_us = per_call_us(baseline, number, args.repeat)
        for policy in POLICIES:
            rng = random.Random(1)

            def one(policy: str = policy, servers: list[ServerInfo] = servers,
                    rng: random.Random = rng) -> object:
                return decide(policy, task, local, servers, now=0.0, rng=rng, previous="srv3")

            us = per_call_us(one, number, args.repeat)
            print(f"{count:>7} {policy:>10} {us:>12.2f} {base_us:>12.2f} {us / base_us:>6.1f}x")
            if count == 10 and policy == "ect":
                verdict = "meets" if us < GOAL_US_AT_10 else "MISSES"
                print(f"{'':>7} ect at 10 servers: {us:.2f} us, {us / GOAL_US_AT_10:.2f} of the "
                      f"{GOAL_US_AT_10:.0f} us goal ({verdict})")


if __name__ == "__main__":
    main()
