"""``offload-sim``: run a scenario under several policies and compare them; the demo.

    offload-sim run sim/scenarios/heterogeneous.toml            # emulation on the embedded broker
    offload-sim run herding --mode des                           # discrete-event mode, with the oracle
    offload-sim run server_crash --broker mosquitto              # spawn a Mosquitto for the run
    offload-sim run near_overloaded --broker mqtt://10.0.0.5     # a broker you run
    offload-sim sweep herding server_crash --seeds 5             # every policy x seed, mean and 95% CI
    offload-sim sweep my.toml --seeds 20 --dask tcp://10.0.0.7:8786
    offload-sim validate my.toml
    offload-sim scenarios
    offload-sim demo
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import json
import logging
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from agent_common.cli import OneLineParser, run_command, setup_logging
from edge_agent.policy import POLICIES
from sim.oracle import ORACLE
from sim.report import (
    RunResult,
    format_table,
    summaries_of,
    write_plots,
    write_queue_csv,
    write_trace_csv,
)
from sim.scenario import Scenario, ScenarioError, load_scenario

log = logging.getLogger("offload-sim")

SCENARIO_DIR = Path(__file__).parent / "scenarios"
"""The shipped example scenarios (the old prototypes' experiments and the classic traps)."""
ADVERSARIAL_DIR = SCENARIO_DIR / "adversarial"
"""Shipped scenarios written to break a policy (stale crowds, bursts, flapping links, loss, ...)."""
EXIT_USAGE = 2
EXIT_RUNTIME = 1
EXIT_INTERRUPTED = 130
MAX_SEEDS = 10_000


class CliError(Exception):
    """One line for the user, and the exit code."""

    def __init__(self, message: str, code: int = EXIT_RUNTIME) -> None:
        super().__init__(message)
        self.code = code


def shipped_scenarios(*, adversarial: bool = True) -> list[Path]:
    """The shipped scenario files: the examples, then (unless ``adversarial=False``) the adversarial ones."""
    paths = sorted(SCENARIO_DIR.glob("*.toml"))
    return [*paths, *sorted(ADVERSARIAL_DIR.glob("*.toml"))] if adversarial else paths


def resolve_scenario(name: str) -> Path:
    """A path as given, or the name of a shipped scenario (``herding`` -> sim/scenarios/herding.toml,
    ``stale_crowd`` -> sim/scenarios/adversarial/stale_crowd.toml)."""
    path = Path(name)
    if path.exists():
        return path
    file_name = name if name.endswith(".toml") else f"{name}.toml"
    for folder in (SCENARIO_DIR, ADVERSARIAL_DIR):
        if (folder / file_name).exists():
            return folder / file_name
    names = ", ".join(p.stem for p in shipped_scenarios())
    raise CliError(f"no scenario file {name!r} (shipped scenarios: {names})", EXIT_USAGE)


def _policies(text: str | None, scenario: Scenario) -> list[str]:
    if not text:
        return list(scenario.policies)
    return _named_policies(text)


def _named_policies(text: str) -> list[str]:
    """The comma-separated policies of ``--policies``; an unknown one is a usage error naming the
    closest valid name."""
    chosen = [name.strip() for name in text.split(",") if name.strip()]
    valid = [*POLICIES, ORACLE]
    for name in chosen:
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise CliError(f"unknown policy {name!r}{hint}; valid: {', '.join(POLICIES)}, "
                           f"{ORACLE} (discrete-event mode)", EXIT_USAGE)
    if not chosen:
        raise CliError("--policies is empty", EXIT_USAGE)
    return chosen


def with_oracle(policies: Sequence[str], mode: str, oracle: bool) -> list[str]:
    """The policies to run: in discrete-event mode the oracle last, as the limit (unless ``oracle`` is
    false); in emulation never the oracle, and one line says so."""
    others = [name for name in policies if name != ORACLE]
    if mode == "des":
        return [*others, ORACLE] if oracle else others
    if oracle:
        print(f"{ORACLE}: only available in discrete-event mode (--mode des); left out of this emulation")
    if not others:
        raise CliError(f"no policy left to emulate without the {ORACLE}", EXIT_USAGE)
    return others


@contextlib.contextmanager
def broker_for(choice: str) -> Iterator[tuple[str, str]]:
    """Yield ``(url, description)`` for ``embedded``, ``mosquitto`` or an ``mqtt://`` URL."""
    from topics.brokers import EmbeddedBroker, MosquittoBroker, mosquitto_binary

    if choice == "embedded":
        with EmbeddedBroker() as broker:
            yield broker.url, f"embedded amqtt at {broker.url}"
    elif choice == "mosquitto":
        if mosquitto_binary() is None:
            raise CliError("--broker mosquitto: mosquitto is not installed "
                           "(apt-get install mosquitto)", EXIT_USAGE)
        with MosquittoBroker() as broker:
            yield broker.url, f"Mosquitto at {broker.url}"
    elif choice.startswith(("mqtt://", "mqtts://")):
        yield choice, choice
    else:
        raise CliError(f"--broker {choice!r}: use embedded, mosquitto or mqtt://host:port", EXIT_USAGE)


class _Progress:
    """A tqdm bar over simulated seconds when tqdm is installed and stderr is a terminal."""

    def __init__(self, total: float, enabled: bool) -> None:
        self._bar: Any = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self._bar = tqdm(total=round(total, 1), unit="s", file=sys.stderr, leave=False,
                             bar_format="{desc} {bar} {n:.1f}/{total:.1f} s")
        self._offset = 0.0

    def begin(self, label: str, offset: float) -> None:
        self._offset = offset
        if self._bar is not None:
            self._bar.set_description_str(label)

    def update(self, seconds: float) -> None:
        if self._bar is not None:
            self._bar.n = round(self._offset + seconds, 1)
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def write_outputs(results: Sequence[RunResult], out_dir: Path, *, meta: dict[str, Any],
                  plots: bool) -> list[Path]:
    """The results folder: trace.csv, summary.txt/json, run.json and the PNG plots."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "trace.csv", out_dir / "summary.txt", out_dir / "summary.json",
               out_dir / "run.json", out_dir / "server_queues.csv"]
    write_trace_csv([record for result in results for record in result.records], written[0])
    write_queue_csv(results, written[4])
    summaries = summaries_of(results)
    written[1].write_text(format_table(summaries) + "\n")
    written[2].write_text(json.dumps([dataclasses.asdict(s) for s in summaries], indent=2) + "\n")
    counters = {result.name: result.counters for result in results}
    written[3].write_text(json.dumps({**meta, "counters": counters}, indent=2, default=str) + "\n")
    if plots:
        try:
            written.extend(write_plots(results, out_dir))
        except ImportError:
            print("plots skipped: matplotlib is not installed (pip install 'mqtt-offload[sim]')",
                  file=sys.stderr)
    return written


def _load(name: str) -> tuple[Path, Scenario]:
    """Resolve and validate a scenario; a bad one is a usage error with the file and field."""
    path = resolve_scenario(name)
    try:
        return path, load_scenario(path)
    except ScenarioError as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc


def run_scenario(args: argparse.Namespace) -> int:
    path, scenario = _load(args.scenario)
    if args.duration is not None:
        if args.duration <= 0:
            raise CliError("--duration must be positive", EXIT_USAGE)
        scenario = scenario.model_copy(update={"duration": args.duration})
    if args.seed is not None:
        scenario = scenario.model_copy(update={"seed": args.seed})
    if args.device_processes < 0:
        raise CliError("--device-processes must be 0 or more", EXIT_USAGE)
    policies = with_oracle(_policies(args.policies, scenario), args.mode, not args.no_oracle)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = Path(args.out) if args.out else Path("results") / f"{scenario.name}-{args.mode}-{stamp}"
    results: list[RunResult] = []
    meta: dict[str, Any] = {"scenario": str(path), "name": scenario.name, "mode": args.mode,
                            "seed": scenario.seed, "duration": scenario.duration,
                            "policies": policies}
    progress = _Progress(scenario.duration * len(policies),
                         enabled=not args.quiet and sys.stderr.isatty())
    interrupted = False
    try:
        if args.mode == "des":
            from sim.des import run_des

            for index, policy in enumerate(policies):
                progress.begin(policy, index * scenario.duration)
                result = run_des(scenario, policy)
                progress.update(scenario.duration)
                results.append(result)
                meta.setdefault("des", {})[policy] = {
                    "events": result.events, "cpu_seconds": round(result.cpu_seconds, 3),
                    "tasks_per_second": round(result.tasks_per_second)}
                print(f"{policy}: {result.events} events in {result.cpu_seconds:.2f} s CPU "
                      f"({result.tasks_per_second:,.0f} simulated tasks/s)", file=sys.stderr)
        else:
            from sim.emulate import EmulationError, run_emulation
            from topics.transport import ConnectError

            stop = threading.Event()
            with broker_for(args.broker) as (url, described):
                meta["broker"] = described
                print(f"{scenario.name}: {len(scenario.device_nodes())} devices, "
                      f"{len(scenario.server_nodes())} servers, {scenario.duration:g} s per policy, "
                      f"on {described}")
                for index, policy in enumerate(policies):
                    progress.begin(policy, index * scenario.duration)
                    try:
                        results.append(run_emulation(scenario, policy, broker_url=url,
                                                     protocol=args.protocol,
                                                     progress=progress.update, stop=stop,
                                                     device_processes=args.device_processes))
                    except KeyboardInterrupt:
                        stop.set()
                        raise
                    except (ConnectError, EmulationError) as exc:
                        raise CliError(f"{policy}: {exc}") from exc
    except KeyboardInterrupt:
        interrupted = True
        meta["interrupted"] = True
    finally:
        progress.close()
    if results:
        print(format_table(summaries_of(results)))
        written = write_outputs(results, out_dir, meta=meta, plots=not args.no_plots)
        print(f"results: {out_dir}/ ({', '.join(p.name for p in written)})")
    if interrupted:
        print("interrupted: wrote what was collected so far", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def sweep(args: argparse.Namespace) -> int:
    """Every scenario x policy x seed in discrete-event mode; everything is checked before a run starts."""
    from sim import sweep as sweeps

    if not 1 <= args.seeds <= MAX_SEEDS:
        raise CliError(f"--seeds must be between 1 and {MAX_SEEDS}", EXIT_USAGE)
    if args.workers is not None and args.workers < 1:
        raise CliError("--workers must be at least 1", EXIT_USAGE)
    if args.workers is not None and args.dask:
        raise CliError("--workers is for local processes; a Dask cluster has its own workers", EXIT_USAGE)
    named = _named_policies(args.policies) if args.policies is not None else None
    scenarios: list[tuple[str, Scenario]] = []
    sources: dict[str, str] = {}
    for name in args.scenarios:
        path, scenario = _load(name)
        if path.stem in sources:
            raise CliError(f"{path}: a scenario named {path.stem!r} is already in this sweep "
                           f"({sources[path.stem]})", EXIT_USAGE)
        sources[path.stem] = str(path)
        scenarios.append((path.stem, scenario))

    def policies_of(scenario: Scenario) -> list[str]:
        return with_oracle(named or scenario.policies, "des", not args.no_oracle)

    specs = sweeps.plan_runs(scenarios, policies_of, args.seeds)
    workers = args.workers or sweeps.default_workers()
    executor: sweeps.Executor = sweeps.InProcess() if workers == 1 else sweeps.LocalProcesses(workers)
    if args.dask:
        try:
            executor = sweeps.DaskCluster(args.dask)
        except sweeps.SweepError as exc:
            raise CliError(str(exc), EXIT_USAGE) from exc
    if not args.quiet:
        print(f"sweep: {len(specs)} runs ({len(scenarios)} scenarios, {args.seeds} seeds) in "
              f"{executor.where}", file=sys.stderr)

    def progress(done: int, total: int, run: sweeps.Finished) -> None:
        if not args.quiet:
            summary = run.row.summary
            p95 = "-" if summary.p95 is None else f"{summary.p95 * 1000:.1f} ms"
            print(f"[{done}/{total}] {run.row.scenario} {run.row.policy} seed {run.row.seed}: p95 {p95}, "
                  f"{summary.completed}/{summary.tasks} ok ({run.cpu_seconds:.2f} s CPU)", file=sys.stderr)

    try:
        rows = sweeps.collect(specs, executor.run(specs), progress)
    except sweeps.SweepError as exc:
        raise CliError(str(exc)) from exc
    aggregates = sweeps.aggregate(rows)
    print(sweeps.format_sweep(aggregates))
    if args.out:
        meta = {"scenarios": sources, "seeds": args.seeds, "policies": args.policies,
                "oracle": not args.no_oracle, "executor": executor.where}
        written = sweeps.write_sweep(Path(args.out), rows, aggregates, meta=meta)
        print(f"results: {args.out}/ ({', '.join(p.name for p in written)})")
    return 0


def validate(args: argparse.Namespace) -> int:
    path, scenario = _load(args.scenario)
    print(f"{path}: ok ({len(scenario.device_nodes())} devices, {len(scenario.server_nodes())} "
          f"servers, {scenario.duration:g} s, policies {', '.join(scenario.policies)})")
    return 0


def list_scenarios(_: argparse.Namespace) -> int:
    heading_printed = False
    for path in shipped_scenarios():
        if path.parent == ADVERSARIAL_DIR and not heading_printed:
            print("adversarial (written to break a policy):")
            heading_printed = True
        try:
            scenario = load_scenario(path)
            print(f"{path.stem:18} {scenario.description.splitlines()[0] if scenario.description else ''}")
        except ScenarioError as exc:
            print(f"{path.stem:18} INVALID: {exc}")
    return 0


def demo(args: argparse.Namespace) -> int:
    from sim.demo import run_demo

    return run_demo(tasks=args.tasks, scenario=resolve_scenario(args.scenario),
                    duration=args.duration, out=Path(args.out) if args.out else None,
                    plots=not args.no_plots)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="offload-sim", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default="WARNING",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log level (stderr)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=OneLineParser)

    run = commands.add_parser("run", help="run a scenario under its policies and compare them")
    run.add_argument("scenario", help="a scenario TOML file, or the name of a shipped one")
    run.add_argument("--mode", choices=["emulate", "des"], default="emulate",
                     help="emulate: real agents on a real broker (default); des: discrete events")
    run.add_argument("--broker", default="embedded",
                     help="embedded (amqtt, default), mosquitto (spawn one) or mqtt://host:port")
    run.add_argument("--protocol", choices=["3.1.1", "5"], default="3.1.1", help="MQTT version")
    run.add_argument("--policies", help=f"comma-separated subset of {', '.join(POLICIES)}, {ORACLE}")
    run.add_argument("--no-oracle", action="store_true",
                     help=f"leave out the {ORACLE}, which --mode des adds to every comparison as the limit")
    run.add_argument("--seed", type=int, help="replace the scenario's seed")
    run.add_argument("--device-processes", type=int, default=0, metavar="N",
                     help="emulation: spread the devices over N child processes (default 0: all in this one)")
    run.add_argument("--duration", type=float, help="replace the scenario's duration (s)")
    run.add_argument("--out", help="results folder (default results/<scenario>-<mode>-<time>)")
    run.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.set_defaults(handler=run_scenario)

    many = commands.add_parser("sweep", help="every scenario x policy x seed in discrete-event mode: "
                                             "mean and 95%% confidence interval per metric")
    many.add_argument("scenarios", nargs="+", metavar="SCENARIO",
                      help="scenario TOML files, or names of shipped ones")
    many.add_argument("--seeds", type=int, default=5,
                      help="seeds per combination: the scenario's seed and the ones after it (default 5)")
    many.add_argument("--policies", help="comma-separated policies for every scenario "
                                         "(default: each scenario's own)")
    many.add_argument("--no-oracle", action="store_true",
                      help=f"leave out the {ORACLE}, added to every comparison as the limit")
    many.add_argument("--workers", type=int,
                      help="local worker processes (default: the CPUs this process may use)")
    many.add_argument("--dask", metavar="ADDRESS",
                      help="run on the Dask cluster whose scheduler is at ADDRESS (tcp://host:port)")
    many.add_argument("--out", help="folder for sweep.json, sweep.csv (per policy) and runs.csv (per run)")
    many.add_argument("--quiet", action="store_true", help="no progress line per run")
    many.set_defaults(handler=sweep)

    check = commands.add_parser("validate", help="check a scenario file and say what it describes")
    check.add_argument("scenario")
    check.set_defaults(handler=validate)

    shipped = commands.add_parser("scenarios", help="list the shipped scenarios")
    shipped.set_defaults(handler=list_scenarios)

    show = commands.add_parser("demo", help="embedded broker, servers and devices: offload a few "
                                            "tasks, then compare policies on a small fleet")
    show.add_argument("--tasks", type=int, default=8, help="tasks in the first part (default 8)")
    show.add_argument("--scenario", default="heterogeneous", help="fleet scenario for the second part")
    show.add_argument("--duration", type=float, default=6.0, help="seconds per policy (default 6)")
    show.add_argument("--out", help="results folder")
    show.add_argument("--no-plots", action="store_true")
    show.set_defaults(handler=demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()

    def body() -> int:
        args = parser.parse_args(argv)
        setup_logging(args.log_level, "sim")
        try:
            code: int = args.handler(args)
        except CliError as exc:
            print(f"offload-sim: error: {exc}", file=sys.stderr)
            return exc.code
        return code

    return run_command("offload-sim", body)


if __name__ == "__main__":
    sys.exit(main())
