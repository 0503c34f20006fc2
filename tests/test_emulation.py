"""Emulation mode end to end: real agents on a real broker, the same workload as the DES mode."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from sim.cli import main, shipped_scenarios
from sim.des import run_des
from sim.emulate import run_emulation
from sim.linkemu import DelayScheduler, LinkEmulator, LinkParams
from sim.report import TaskRecord, summarize
from sim.scenario import Scenario, generate_arrivals, load_scenario, parse_scenario
from topics.brokers import EmbeddedBroker, MosquittoBroker
from topics.memory import MemoryBroker, MemoryTransport
from topics.names import TopicTree
from topics.transport import Message


def small_scenario(**overrides: object) -> Scenario:
    """Two slow devices, two fast servers: offloading clearly wins; seconds long."""
    data: dict[str, object] = {
        "name": "small", "duration": 2.0, "seed": 3, "heartbeat_interval": 0.25,
        "ping_interval": 0.5, "timeout_min": 0.3, "policies": ["local", "ect"],
        "tasks": {"work": {"service_time": 0.02, "variation": 0.2}},
        "devices": [{"name": "dev", "count": 2, "speed": 0.25, "task": "work",
                     "payload_bytes": 2000, "deadline": 3.0,
                     "workload": {"kind": "poisson", "rate": 8.0}}],
        "servers": [{"name": "srv", "count": 2, "workers": 2, "speed": 2.0, "queue_size": 16}],
        "links": {"default": {"delay": 0.001, "jitter": 0.0002, "bandwidth": 12.5e6}},
    }
    data.update(overrides)
    return parse_scenario(data, "small")


def expected_tasks(scenario: Scenario) -> int:
    return sum(len(generate_arrivals(scenario, node.index)) for node in scenario.device_nodes())


def assert_one_outcome_each(records: list[TaskRecord], scenario: Scenario) -> None:
    ids = Counter((record.device, record.task_id) for record in records)  # ids are per device
    assert all(count == 1 for count in ids.values()), "a task reported more than one outcome"
    assert len(ids) == expected_tasks(scenario), "tasks were lost or invented"


def test_small_fleet_runs_the_same_workload_and_offloading_wins(amqtt_broker: EmbeddedBroker) -> None:
    scenario = small_scenario()
    local = run_emulation(scenario, "local", broker_url=amqtt_broker.url)
    ect = run_emulation(scenario, "ect", broker_url=amqtt_broker.url)
    for result in (local, ect):
        assert_one_outcome_each(result.records, scenario)
        assert all(record.outcome == "ok" for record in result.records), Counter(
            record.outcome for record in result.records)
    assert {record.target for record in local.records} == {None}
    assert any(record.target for record in ect.records), "ect never offloaded to the fast servers"
    local_p50, ect_p50 = summarize(local.records).p50, summarize(ect.records).p50
    assert local_p50 is not None and ect_p50 is not None
    assert ect_p50 < local_p50, (ect_p50, local_p50)
    assert ect.queue_series, "no server heartbeats were observed"


def test_both_modes_rank_the_policies_alike(amqtt_broker: EmbeddedBroker) -> None:
    scenario = small_scenario(policies=["local", "ect", "random"])
    emulated = {policy: summarize(run_emulation(scenario, policy, broker_url=amqtt_broker.url).records)
                for policy in ("local", "ect")}
    simulated = {policy: summarize(run_des(scenario, policy).records) for policy in ("local", "ect")}
    for summaries in (emulated, simulated):
        assert summaries["ect"].p50 is not None and summaries["local"].p50 is not None
        assert summaries["ect"].p50 < summaries["local"].p50
        assert summaries["ect"].completed == summaries["local"].completed == expected_tasks(scenario)


def test_server_crash_loses_no_task(amqtt_broker: EmbeddedBroker) -> None:
    scenario = small_scenario(
        duration=3.0, servers=[{"name": "srv", "count": 2, "workers": 2, "speed": 2.0}],
        events=[{"kind": "crash", "at": 1.0, "server": "srv-0", "will": True}])
    result = run_emulation(scenario, "ect", broker_url=amqtt_broker.url)
    assert_one_outcome_each(result.records, scenario)
    assert result.counters.get("crashes") == 1
    after = [r for r in result.records if r.created > 1.5 and r.outcome == "ok"]
    assert after and all(r.target != "srv-0" for r in after), "the crashed server was still chosen"
    assert sum(r.outcome == "ok" for r in result.records) >= 0.9 * len(result.records)


def test_devices_in_child_processes_run_the_same_workload_and_see_the_crash(
        amqtt_broker: EmbeddedBroker) -> None:
    """Devices spread over two processes, the servers here: each device submits exactly its own
    arrivals, in their order, and notices a crash applied in this process."""
    scenario = small_scenario(
        duration=3.0, devices=[{"name": "dev", "count": 3, "speed": 0.25, "task": "work",
                                "payload_bytes": 2000, "deadline": 3.0,
                                "workload": {"kind": "poisson", "rate": 8.0}}],
        servers=[{"name": "srv", "count": 2, "workers": 2, "speed": 2.0}],
        events=[{"kind": "crash", "at": 1.0, "server": "srv-0", "will": True}])
    result = run_emulation(scenario, "ect", broker_url=amqtt_broker.url, device_processes=2)
    assert_one_outcome_each(result.records, scenario)
    for node in scenario.device_nodes():
        arrivals = generate_arrivals(scenario, node.index)
        mine = sorted((r for r in result.records if r.device == node.node), key=lambda r: r.created)
        assert len(mine) == len(arrivals), node.node
        lateness = [record.created - arrival.time for record, arrival in zip(mine, arrivals, strict=True)]
        assert min(lateness) > -0.05, (node.node, min(lateness))  # none before its arrival time
    assert result.counters.get("crashes") == 1
    assert result.counters.get("unfinished", 0) == 0, result.counters
    after = [r for r in result.records if r.created > 1.5 and r.outcome == "ok"]
    assert after and all(r.target != "srv-0" for r in after), "the crashed server was still chosen"
    assert result.queue_series, "no server heartbeats were observed"
    late = [result.counters[f"wakeup_late_{name}_us"] for name in ("p50", "p95", "max")]
    assert 0 <= late[0] <= late[1] <= late[2], late  # how late this process's timers fired


def test_device_processes_must_not_be_negative(amqtt_broker: EmbeddedBroker) -> None:
    with pytest.raises(ValueError, match="device_processes"):
        run_emulation(small_scenario(), "ect", broker_url=amqtt_broker.url, device_processes=-1)


class RecordingScheduler(DelayScheduler):
    """Keeps what the links schedule, with its due time, and runs it only when asked."""

    def __init__(self) -> None:
        super().__init__("recording-scheduler")
        self.calls: list[tuple[float, Callable[[], None]]] = []

    def call_at(self, due: float, callback: Callable[[], None]) -> None:
        self.calls.append((due, callback))

    def run_all(self) -> None:
        for _, callback in sorted(self.calls, key=lambda call: call[0]):
            callback()


def test_link_emulator_delays_drops_and_paces() -> None:
    broker = MemoryBroker()
    tree = TopicTree("t")
    received: list[Message] = []
    got_one, got_all = threading.Event(), threading.Event()

    def receive(message: Message) -> None:
        received.append(message)
        got_one.set()
        if len(received) == 4:
            got_all.set()

    sink = MemoryTransport(broker, "sink")
    sink.connect()
    sink.subscribe("t/#", receive)
    scheduler = RecordingScheduler()
    links = {"srv": LinkParams(delay=0.05), "lossy": LinkParams(loss=1.0),
             "thin": LinkParams(bandwidth=100_000.0)}
    emulator = LinkEmulator(MemoryTransport(broker, "dev"), node_id="dev", tree=tree,
                            link_to=lambda peer: links.get(peer or "", LinkParams()),
                            scheduler=scheduler, rng=random.Random(1))
    emulator.connect()
    try:
        before = time.monotonic()
        emulator.publish(tree.task_inbox("srv"), b"x")
        emulator.publish(tree.task_inbox("lossy"), b"x")
        emulator.publish(tree.heartbeat("dev"), b"beat")  # broadcast: the default link, no delay
        for _ in range(2):
            emulator.publish(tree.task_inbox("thin"), bytes(5_000))  # 50 ms each on the wire
        spent = time.monotonic() - before  # due times may lie this much later than modelled
        assert got_one.wait(5.0)
        assert [m.topic for m in received] == ["t/node/dev/heartbeat"]  # sent at once, no delay
        due = [at - before for at, _ in scheduler.calls]
        assert len(due) == 3  # srv, and both thin messages; the lossy one never left
        srv, thin_first, thin_second = due
        assert 0.05 <= srv <= 0.05 + spent
        assert 0.05 <= thin_first <= 0.05 + spent  # 5,000 B at 100 kB/s
        assert thin_first + 0.05 - 1e-9 <= thin_second <= 0.10 + spent  # waits for the first
        assert emulator.counters["lost"] == 1 and emulator.counters["delayed"] == 3
        assert len(received) == 1  # the delayed ones are still held by their links
        scheduler.run_all()
        assert got_all.wait(5.0), received
        assert sorted(m.topic for m in received) == [
            "t/node/dev/heartbeat", "t/node/srv/task", "t/node/thin/task", "t/node/thin/task"]
    finally:
        scheduler.stop()
        emulator.close()
        sink.close()


@pytest.mark.parametrize("path", shipped_scenarios(), ids=lambda p: p.stem)
def test_shipped_scenarios_validate(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(path)]) == 0
    assert "ok (" in capsys.readouterr().out
    load_scenario(path)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sim", *args], capture_output=True, text=True,
                          timeout=60, check=False)


def test_cli_help_and_bad_input_get_one_clear_line(tmp_path: Path) -> None:
    assert run_cli("--help").returncode == 0
    bad = tmp_path / "bad.toml"
    bad.write_text('duration = 5\n[tasks.t]\nservice_time = 0.01\n'
                   '[[devices]]\nname = "d"\ntask = "t"\nworkers = 0\nworkload = {kind = "fps", fps = 5}\n')
    cases = [
        (("run", str(bad)), 2, "devices[0].workers"),
        (("run", "no-such-scenario"), 2, "no scenario file"),
        (("run", "heterogeneous", "--policies", "fastest"), 2, "unknown policy 'fastest'"),
        (("run", "heterogeneous", "--broker", "mqtt://127.0.0.1:1", "--duration", "1"), 1,
         "127.0.0.1:1"),
        (("run", "heterogeneous", "--broker", "ftp://x"), 2, "--broker"),
        (("run", "heterogeneous", "--device-processes", "-1"), 2, "--device-processes"),
    ]
    for args, code, needle in cases:
        done = run_cli(*args)
        assert done.returncode == code, (args, done.stderr)
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and needle in lines[0], (args, done.stderr)


def test_cli_des_run_writes_the_results_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = run_cli("run", "herding", "--mode", "des", "--duration", "3", "--out", str(out),
                   "--policies", "min_rtt,ect")
    assert done.returncode == 0, done.stderr
    assert "min_rtt" in done.stdout and "ect" in done.stdout
    for name in ("trace.csv", "summary.txt", "summary.json", "run.json", "latency_cdf.png",
                 "tasks_per_target.png", "local_throughput.png", "server_queues.png"):
        assert (out / name).stat().st_size > 0, name
    header = (out / "trace.csv").read_text().splitlines()[0]
    for column in ("created", "decided", "sent", "started", "finished", "received", "target",
                   "policy", "reason", "outcome", "attempts"):
        assert column in header


@pytest.mark.slow
@pytest.mark.parametrize("path", shipped_scenarios(), ids=lambda p: p.stem)
def test_shipped_scenario_in_emulation_gives_every_task_one_outcome(
        path: Path, mosquitto_broker: MosquittoBroker) -> None:
    """The slow tier: each shipped scenario, every one of its policies, on a spawned Mosquitto."""
    scenario = load_scenario(path)
    scenario = scenario.model_copy(update={"duration": min(scenario.duration, 6.0)})
    url = mosquitto_broker.url
    for policy in scenario.policies:
        result = run_emulation(scenario, policy, broker_url=url)
        assert_one_outcome_each(result.records, scenario)
        assert result.counters.get("unfinished", 0) == 0, (policy, result.counters)
