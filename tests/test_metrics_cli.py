"""The command lines as a device and a server run them: ``--metrics-port`` and ``--http-port``, then
curl posts a task to the device and reads both agents' metrics, which move between two scrapes."""

from __future__ import annotations

import json
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from brokers_support import Stack, require, wait_for

from topics.brokers import MosquittoBroker

REPO = Path(__file__).resolve().parent.parent


class Process:
    """A command line started in the background; its stderr lines are collected as they come."""

    def __init__(self, *args: str) -> None:
        self.popen = subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            self.lines.put(line)

    def wait_for_line(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        """The first stderr line (from the start) matching ``pattern``."""
        compiled = re.compile(pattern)
        for line in self.seen:
            if found := compiled.search(line):
                return found
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            self.seen.append(line)
            if found := compiled.search(line):
                return found
        pytest.fail(f"no line matching {pattern!r} within {timeout}s; got: {''.join(self.seen)[-2000:]}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


@pytest.fixture
def curl() -> Iterator[str]:
    binary = shutil.which("curl")
    require(binary is not None, "curl not installed: apt-get install -y curl")
    assert binary is not None
    yield binary


def _get(curl: str, url: str) -> str:
    return subprocess.run([curl, "-sS", "--max-time", "10", url], capture_output=True, text=True, check=True,
                          timeout=30).stdout


def _sample(text: str, line_start: str) -> float:
    """The value of the first sample line starting with ``line_start`` (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_counters_move_while_the_command_lines_run(mosquitto_broker: MosquittoBroker, stack: Stack,
                                                   topic_prefix: str, curl: str) -> None:
    common = ["--broker", mosquitto_broker.url, "--prefix", topic_prefix]
    server = Process("cloud_agent", "run", "--id", "srv-cli", *common, "--tasks", "agent_common.demo_tasks",
                     "--metrics-port", "0", "--heartbeat-interval", "0.2", "--grace-period", "0")
    stack.append(server.stop)
    device = Process("edge_agent", "run", "--id", "dev-cli", *common, "--metrics-port", "0",
                     "--http-port", "0", "--heartbeat-interval", "0.2")
    stack.append(device.stop)
    server_metrics = server.wait_for_line(r"metrics on (http://[0-9.]+:\d+/metrics)").group(1)
    device_metrics = device.wait_for_line(r"metrics on (http://[0-9.]+:\d+/metrics)").group(1)
    tasks = device.wait_for_line(r"HTTP endpoint on (http://[0-9.]+:\d+)").group(1)
    assert "127.0.0.1" in server_metrics and "127.0.0.1" in device_metrics and "127.0.0.1" in tasks

    ok = 'offload_edge_tasks_total{kind="remote",outcome="ok",server="srv-cli"}'
    completed = 'offload_server_tasks_completed_total{status="ok"}'
    before = _sample(_get(curl, device_metrics), ok), _sample(_get(curl, server_metrics), completed)
    wait_for(lambda: json.loads(_get(curl, f"{tasks}/healthz"))["servers"] >= 1,
             message="the device hearing the server")
    results = []
    for x in range(1, 4):  # the device has no tasks of its own: each is offloaded
        done = subprocess.run([curl, "-sS", "--max-time", "30", "-w", "\n%{http_code}", "--data-binary",
                               json.dumps({"x": x}), f"{tasks}/tasks/square"], capture_output=True,
                              text=True, check=True, timeout=60)
        body, _, code = done.stdout.rpartition("\n")
        assert code == "200", done.stdout
        results.append(json.loads(body))
    assert results == [{"y": 1}, {"y": 4}, {"y": 9}]
    after = _sample(_get(curl, device_metrics), ok), _sample(_get(curl, server_metrics), completed)
    assert after[0] - before[0] == 3
    assert after[1] - before[1] == 3
