"""``offload-sim sweep``: every scenario x policy x seed, the same numbers wherever they run, means and
95% intervals that a hand computation from the per-run rows gives, and nothing run for a broken plan."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import pytest
from brokers_support import require

from sim import sweep as sweeps
from sim.cli import main
from sim.des import run_des
from sim.report import summarize
from sim.scenario import load_scenario

SMALL = """\
name = "tiny"
duration = 3.0
seed = 1
heartbeat_interval = 0.5

[tasks.detect]
service_time = 0.02
variation = 0.3

[[devices]]
name = "cam"
count = 3
speed = 0.3
task = "detect"
payload_bytes = 5_000
deadline = 0.5
workload = { kind = "poisson", rate = 12.0 }

[[servers]]
name = "edge"
workers = 2
[[servers]]
name = "slow"
speed = 0.2

[links.default]
delay = 0.002
jitter = 0.001
"""

POLICIES = ["random", "ect"]
SEEDS = 3
T_2 = 4.302653  # Student t, 0.975 quantile, 2 degrees of freedom (three seeds)


@pytest.fixture()
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(SMALL)
    return path


def sweep(path: Path, out: Path, *extra: str) -> list[str]:
    return ["sweep", str(path), "--seeds", str(SEEDS), "--policies", ",".join(POLICIES), "--out", str(out),
            *extra]


def runs_of(out: Path) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = json.loads((out / "sweep.json").read_text())["runs"]
    return runs


def test_a_sweep_reports_each_run_and_mean_and_interval_per_metric(
        tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(sweep(tiny, out, "--workers", "1")) == 0
    captured = capsys.readouterr()
    progress = [line for line in captured.err.splitlines() if line.startswith("[")]
    assert len(progress) == 9 and progress[-1].startswith("[9/9] tiny oracle seed 3: p95 ")

    with (out / "runs.csv").open() as handle:
        runs = list(csv.DictReader(handle))
    assert [(row["policy"], int(row["seed"])) for row in runs] == [
        (policy, seed) for policy in [*POLICIES, "oracle"] for seed in (1, 2, 3)]
    # Each run is what `run_des` gives for its seed, and its ratio is over the oracle of the same seed.
    scenario = load_scenario(tiny)
    alone = summarize(run_des(scenario, "ect", seed=2).records, name="ect", duration=scenario.duration)
    ect_2 = next(row for row in runs if row["policy"] == "ect" and row["seed"] == "2")
    assert float(ect_2["p95"]) == alone.p95 and int(ect_2["tasks"]) == alone.tasks
    oracle_p95 = {row["seed"]: float(row["p95"]) for row in runs if row["policy"] == "oracle"}
    for row in runs:
        assert float(row["p95_vs_oracle"]) == pytest.approx(float(row["p95"]) / oracle_p95[row["seed"]])
        assert float(row["completed_fraction"]) == int(row["completed"]) / int(row["tasks"])
        assert float(row["missed_fraction"]) == int(row["deadline_misses"]) / int(row["tasks"])

    # The aggregate, by hand: mean, and t(0.975, 2) * s / sqrt(3) either side.
    with (out / "sweep.csv").open() as handle:
        aggregate = {row["policy"]: row for row in csv.DictReader(handle)}
    assert list(aggregate) == [*POLICIES, "oracle"]
    columns = {"p95": "p95", "p50": "p50", "mean": "mean", "completed": "completed_fraction",
               "missed": "missed_fraction", "p95_vs_oracle": "p95_vs_oracle"}
    table = captured.out.splitlines()
    for policy, row in aggregate.items():
        assert row["runs"] == "3"
        for metric, column in columns.items():
            values = [float(run[column]) for run in runs if run["policy"] == policy]
            mean = sum(values) / 3
            half = T_2 * math.sqrt(sum((value - mean) ** 2 for value in values) / 2) / math.sqrt(3)
            assert float(row[f"{metric}_mean"]) == pytest.approx(mean, rel=1e-12)
            assert float(row[f"{metric}_ci_low"]) == pytest.approx(mean - half, rel=1e-9, abs=1e-12)
            assert float(row[f"{metric}_ci_high"]) == pytest.approx(mean + half, rel=1e-9, abs=1e-12)
        p95 = [float(run["p95"]) * 1000 for run in runs if run["policy"] == policy]
        spread = T_2 * statistics.stdev(p95) / math.sqrt(3)
        line = next(line for line in table if line.startswith(f"{policy} "))
        assert f"{statistics.fmean(p95):.1f} ± {spread:.1f}" in line
    assert table[0] == "tiny: 3 seeds (1-3), mean ± 95% CI half width"
    oracle_line = next(line for line in table if line.startswith("oracle "))
    assert "1.00 ± 0.00" in oracle_line

    document = json.loads((out / "sweep.json").read_text())
    assert document["seeds"] == 3 and document["scenarios"] == {"tiny": str(tiny)}
    ect = next(item for item in document["aggregate"] if item["policy"] == "ect")
    assert ect["seeds"] == [1, 2, 3] and ect["metrics"]["p95"]["n"] == 3
    assert ect["metrics"]["p95"]["mean"] == pytest.approx(float(aggregate["ect"]["p95_mean"]))


def test_the_worker_count_changes_no_number(tiny: Path, tmp_path: Path) -> None:
    """One run after the other in this process, or spread over two fresh interpreters (other string
    hashing, nothing inherited): the same runs, to the last bit."""
    assert main(sweep(tiny, tmp_path / "one", "--workers", "1", "--quiet")) == 0
    assert main(sweep(tiny, tmp_path / "two", "--workers", "2", "--quiet")) == 0
    one, two = runs_of(tmp_path / "one"), runs_of(tmp_path / "two")
    assert len(one) == 9 and one == two
    assert len({run["p95"] for run in one}) > 1, "the seeds and policies differ"


def test_no_oracle_and_each_scenarios_own_policies(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["sweep", "near_overloaded", "--seeds", "1", "--no-oracle", "--workers", "1", "--quiet",
                 "--out", str(out)]) == 0
    runs = runs_of(out)
    shipped = load_scenario(Path(sweeps.__file__).parent / "scenarios" / "near_overloaded.toml")
    assert [run["policy"] for run in runs] == list(shipped.policies)
    assert {run["seed"] for run in runs} == {shipped.seed}
    assert all(run["p95_vs_oracle"] is None for run in runs)
    assert "p95/oracle" in capsys.readouterr().out  # the column is there, empty: "-"


BROKEN = [
    ("no-such-scenario", "no scenario file 'no-such-scenario'"),
    ("bad_field", "bad_field.toml: servers[0].workers: Input should be greater than or equal to 1"),
    ("bad_toml", "bad_toml.toml: not valid TOML"),
    ("too_tight", "too_tight.toml: devices[0].deadline: 1 ms can never be met"),
]


@pytest.mark.parametrize(("name", "message"), BROKEN, ids=[name for name, _ in BROKEN])
def test_a_broken_scenario_fails_the_sweep_before_anything_runs(
        name: str, message: str, tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad_field.toml").write_text(SMALL.replace("workers = 2", "workers = 0"))
    (tmp_path / "bad_toml.toml").write_text(SMALL + "[[servers\n")
    (tmp_path / "too_tight.toml").write_text(SMALL.replace("deadline = 0.5", "deadline = 0.001")
                                             .replace('task = "detect"', 'task = "detect"\ncapable = false'))
    ran: list[sweeps.RunSpec] = []
    monkeypatch.setattr(sweeps, "run_one", ran.append)
    target = str(tmp_path / f"{name}.toml") if name != "no-such-scenario" else name
    out = tmp_path / "out"
    assert main(["sweep", str(tiny), target, "--workers", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("offload-sim: error: ") and message in err
    assert ran == [] and not out.exists()


@pytest.mark.parametrize(("policies", "message"), [
    ("ect,randm", "unknown policy 'randm' (did you mean 'random'?); valid: local, "),
    ("ect,p2", "unknown policy 'p2' (did you mean 'p2c'?)"),
    ("oracel", "unknown policy 'oracel' (did you mean 'oracle'?)"),
    ("xyzzy", "unknown policy 'xyzzy'; valid: "),
    (",", "--policies is empty"),
])
def test_an_unknown_policy_fails_first_naming_the_closest(
        policies: str, message: str, tiny: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    ran: list[sweeps.RunSpec] = []
    monkeypatch.setattr(sweeps, "run_one", ran.append)
    assert main(["sweep", str(tiny), "--policies", policies, "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and ran == []


@pytest.mark.parametrize(("args", "message"), [
    (["--seeds", "0"], "--seeds must be between 1 and 10000"),
    (["--workers", "0"], "--workers must be at least 1"),
    (["--workers", "2", "--dask", "tcp://127.0.0.1:1"], "--workers is for local processes"),
    (["--dask", "127.0.0.1:8786"], "give the scheduler address, like tcp://127.0.0.1:8786"),
])
def test_bad_options_are_one_line(args: list[str], message: str, tiny: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sweep", str(tiny), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_dask_without_the_package_names_the_extra(tiny: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)  # what an environment without it gives
    assert main(["sweep", str(tiny), "--dask", "tcp://127.0.0.1:8786"]) == 2
    err = capsys.readouterr().err
    assert err == "offload-sim: error: --dask needs dask.distributed: pip install 'mqtt-offload[dask]'\n"


def test_a_run_that_fails_is_named(tiny: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    def broken(spec: sweeps.RunSpec) -> sweeps.Finished:
        raise ZeroDivisionError("float division by zero")

    monkeypatch.setattr(sweeps, "run_one", broken)
    assert main(["sweep", str(tiny), "--policies", "ect", "--workers", "1", "--quiet"]) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert err == "offload-sim: error: tiny ect seed 1: ZeroDivisionError: float division by zero"


def test_on_a_dask_cluster_the_runs_are_the_same(tiny: Path, tmp_path: Path) -> None:
    """A real scheduler and two worker processes on loopback, started here: the same runs as in this
    process."""
    require(importlib.util.find_spec("distributed") is not None,
            "dask.distributed is not installed (pip install 'mqtt-offload[dask]')")
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      scheduler_port=0, dashboard_address=None) as cluster:
        address = cluster.scheduler_address
        assert address.startswith("tcp://127.0.0.1:")
        assert main(sweep(tiny, tmp_path / "dask", "--dask", address, "--quiet")) == 0
    assert main(sweep(tiny, tmp_path / "here", "--workers", "1", "--quiet")) == 0
    assert runs_of(tmp_path / "dask") == runs_of(tmp_path / "here")
    assert json.loads((tmp_path / "dask" / "sweep.json").read_text())["executor"] == \
        f"the Dask cluster at {address}"


def _t_cdf(t: float, df: int, steps: int = 20_000) -> float:
    """Student's t distribution function at ``t`` > 0, by Simpson's rule over its density."""
    scale = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def density(x: float) -> float:
        return scale * math.pow(1 + x * x / df, -(df + 1) / 2)

    width = t / steps
    total = density(0.0) + density(t) + sum((4 if i % 2 else 2) * density(i * width) for i in range(1, steps))
    return 0.5 + total * width / 3


@pytest.mark.parametrize("df", [*range(1, 31), 31, 40, 60, 120, 1000])
def test_the_t_quantiles_leave_two_and_a_half_percent_above(df: int) -> None:
    assert _t_cdf(sweeps.t_quantile(df), df) == pytest.approx(0.975, abs=1e-6)


def test_estimates() -> None:
    assert sweeps.estimate([]) is None
    one = sweeps.estimate([2.0])
    assert one is not None and one.mean == 2.0 and one.half_width is None and one.low is None
    three = sweeps.estimate([1.0, 2.0, 3.0])
    assert three is not None and three.mean == 2.0 and three.n == 3
    assert three.half_width == pytest.approx(T_2 * 1.0 / math.sqrt(3), rel=1e-9)
    with pytest.raises(ValueError, match="degrees of freedom"):
        sweeps.t_quantile(0)
