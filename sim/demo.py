"""The demo behind ``make demo``: one process, the embedded broker, real agents, real MQTT.

Part 1 starts a server and a device, offloads a handful of tasks and shows where each ran and why,
then shows that bad input is refused and counted. Part 2 runs a small fleet scenario under each of
its policies and prints the comparison table (the results folder has the trace and plots).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from agent_common.registry import UnknownTaskError, load_tasks
from cloud_agent.config import CloudConfig
from cloud_agent.server import CloudAgent
from edge_agent.agent import EdgeAgent
from edge_agent.config import EdgeConfig
from edge_agent.records import TaskFailed, TaskRecord
from sim.report import RunResult, format_table, summaries_of
from sim.scenario import load_scenario
from topics.brokers import EmbeddedBroker
from topics.mqtt import MqttTransport
from topics.names import TopicTree
from topics.transport import TransportConfig


def _say(text: str = "") -> None:
    print(text, flush=True)


def _offload_a_few(url: str, tasks: int) -> None:
    registry = load_tasks("agent_common.demo_tasks")
    config = TransportConfig.from_url(url)
    server = CloudAgent(CloudConfig(id="srv1", broker=url, workers=2, heartbeat_interval=0.5),
                        MqttTransport(config.model_copy(update={"client_id": "demo-srv1"})), registry)
    device = EdgeAgent(EdgeConfig(id="cam1", broker=url, policy="ect", local_workers=1,
                                  heartbeat_interval=0.5, probe_interval=0.5),
                       MqttTransport(config.model_copy(update={"client_id": "demo-cam1"})), registry)
    finished: list[TaskRecord] = []
    device.add_record_listener(finished.append)
    server.start()
    device.start()
    try:
        end = time.monotonic() + 5.0
        while not any(not view.stale for view in device.servers()) and time.monotonic() < end:
            time.sleep(0.05)
        _say(f"device cam1 sees servers: {', '.join(v.node for v in device.servers()) or 'none'}")
        futures = [device.submit("square", {"x": x, "cost": 0.05}, deadline=5.0)
                   for x in range(1, tasks + 1)]
        for x, future in enumerate(futures, start=1):
            try:
                _say(f"  square({x}) = {future.result(timeout=20)['y']:g}")
            except TaskFailed as exc:
                _say(f"  square({x}) failed: {exc}")
        time.sleep(0.1)
        for record in sorted(finished, key=lambda r: r.created):
            latency = f"{record.latency * 1000:.1f} ms" if record.latency is not None else "-"
            _say(f"  task {record.task_id} ran on {record.target:6} ({record.reason}, {latency}, "
                 f"attempts {record.attempts})")
        _say("bad input is refused, counted and logged, and nothing else is lost:")
        try:
            device.submit("no_such_task", {})
        except UnknownTaskError as exc:
            _say(f"  submit('no_such_task') -> UnknownTaskError: {exc}")
        garbage = MqttTransport(config.model_copy(update={"client_id": "demo-garbage"}))
        garbage.connect()
        garbage.publish(TopicTree().task_inbox("srv1"), b"\x00 not a task", qos=1)
        garbage.close()
        ok = device.submit("square", {"x": 12}).result(timeout=10)
        time.sleep(0.2)
        bad = server.stats().get("bad_input", {})
        _say(f"  server bad input so far: {bad}; square(12) still = {ok['y']:g}")
    finally:
        device.stop()
        server.stop(grace=1.0)


def run_demo(*, tasks: int = 8, scenario: Path, duration: float = 6.0, out: Path | None = None,
             plots: bool = True) -> int:
    """Run both parts of the demo; returns the exit code."""
    from sim.cli import write_outputs
    from sim.emulate import run_emulation

    fleet = load_scenario(scenario).model_copy(update={"duration": duration})
    with EmbeddedBroker() as broker:
        _say(f"== embedded broker (amqtt) at {broker.url}")
        _say(f"== part 1: one device, one server, {tasks} tasks")
        _offload_a_few(broker.url, tasks)
        _say(f"\n== part 2: fleet scenario {fleet.name!r}: {len(fleet.device_nodes())} devices, "
             f"{len(fleet.server_nodes())} servers, {duration:g} s per policy")
        results: list[RunResult] = []
        for policy in fleet.policies:
            _say(f"  running policy {policy} ...")
            results.append(run_emulation(fleet, policy, broker_url=broker.url))
    _say(format_table(summaries_of(results)))
    folder = out or Path("results") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    written = write_outputs(results, folder, meta={"scenario": str(scenario), "mode": "emulate",
                                                   "broker": "embedded amqtt"}, plots=plots)
    _say(f"results: {folder}/ ({', '.join(p.name for p in written)})")
    return 0


if __name__ == "__main__":
    sys.exit(run_demo(scenario=Path(__file__).parent / "scenarios" / "heterogeneous.toml"))
