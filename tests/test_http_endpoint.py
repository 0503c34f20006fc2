"""The device's local HTTP endpoint, driven by a program that is not Python: curl.

A device with no local tasks (everything is offloaded) on Mosquitto, with a server; curl posts
tasks to the device's endpoint, which binds a free port on 127.0.0.1 (``http_port=0``). The last
tests speak raw HTTP from Python for what curl will not send (no Content-Length, chunked bodies).
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from brokers_support import (
    BrokerEndpoint,
    Stack,
    endpoint,
    gate_registry,
    require,
    start_cloud,
    start_edge,
    wait_for,
)

from agent_common.registry import TaskRegistry, load_tasks
from edge_agent.agent import EdgeAgent
from edge_agent.config import EdgeConfig
from edge_agent.http_endpoint import HttpEndpoint
from topics.brokers import MosquittoBroker

MAX_BODY = 4096
SERVER = "srv-h"


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: Any


def curl(*args: str, tmp: Path) -> Answer:
    """Run curl; the status, the headers of the last response (lower-case names), the JSON body."""
    binary = shutil.which("curl")
    assert binary is not None
    headers_file, body_file = tmp / "headers.txt", tmp / "body.json"
    done = subprocess.run([binary, "-sS", "-D", str(headers_file), "-o", str(body_file),
                           "-w", "%{http_code}", "--max-time", "30", *args],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    block = headers_file.read_text().replace("\r\n", "\n").strip().split("\n\n")[-1]
    headers = {}
    for line in block.splitlines()[1:]:
        key, _, item = line.partition(":")
        headers[key.strip().lower()] = item.strip()
    text = body_file.read_text() if body_file.exists() else ""
    return Answer(int(done.stdout), headers, json.loads(text) if text else None)


@dataclass
class Device:
    edge: EdgeAgent
    endpoint: HttpEndpoint
    gate: threading.Event

    def url(self, path: str) -> str:
        return self.endpoint.url + path


@pytest.fixture
def device(mosquitto_broker: MosquittoBroker, stack: Stack, topic_prefix: str) -> Iterator[Device]:
    require(shutil.which("curl") is not None, "curl not installed: apt-get install -y curl")
    target: BrokerEndpoint = endpoint(mosquitto_broker)
    gate = threading.Event()
    start_cloud(target, stack, topic_prefix, SERVER, registry=gate_registry(gate))
    edge = start_edge(target, stack, topic_prefix, registry=TaskRegistry(), http_port=0,
                      http_max_body=MAX_BODY, http_max_pending=1)
    stack.append(gate.set)  # before the agents stop
    wait_for(lambda: any(view.node == SERVER and not view.stale and "gate" in view.tasks
                         for view in edge.servers()), message="the server announced")
    assert edge.http_endpoint is not None and edge.http_endpoint.port > 0
    yield Device(edge, edge.http_endpoint, gate)


def bad_input(device: Device) -> dict[str, int]:
    counts: dict[str, int] = device.endpoint.stats()["bad_input"]
    return counts


def test_curl_offloads_a_task_through_the_device(device: Device, tmp_path: Path) -> None:
    answer = curl("--data-binary", '{"x": 7}', device.url("/tasks/square?deadline=5"), tmp=tmp_path)
    assert answer.status == 200
    assert answer.body == {"y": 49}
    assert answer.headers["x-offload-target"] == SERVER  # the device has no tasks: a server ran it
    assert answer.headers["x-offload-attempts"] == "1"
    assert answer.headers["content-type"] == "application/json"
    health = curl(device.url("/healthz"), tmp=tmp_path)
    assert health.status == 200 and health.body["connected"] is True and health.body["servers"] >= 1
    assert bad_input(device) == {}


def test_curl_gets_a_reason_for_each_bad_request(device: Device, tmp_path: Path) -> None:
    url = device.url("/tasks/square")
    malformed = curl("--data-binary", '{"x": 7', url, tmp=tmp_path)
    assert (malformed.status, malformed.body["error"]) == (400, "json-malformed")
    unknown = curl("--data-binary", "{}", device.url("/tasks/no_such_task"), tmp=tmp_path)
    assert (unknown.status, unknown.body["error"]) == (404, "unknown-task")
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"x": 1, "pad": "a" * (4 * MAX_BODY)}))
    for expect in ("Expect: 100-continue", "Expect:"):  # curl asking first, and sending it at once
        oversized = curl("--data-binary", f"@{big}", "-H", expect, url, tmp=tmp_path)
        assert (oversized.status, oversized.body["error"]) == (413, "too-large"), expect
        assert str(MAX_BODY) in oversized.body["detail"]
    deadline = curl("--data-binary", '{"x": 1}', url + "?deadline=-1", tmp=tmp_path)
    assert (deadline.status, deadline.body["error"]) == (400, "bad-deadline")
    query = curl("--data-binary", '{"x": 1}', url + "?colour=red", tmp=tmp_path)
    assert (query.status, query.body["error"]) == (400, "bad-query")
    method = curl(url, tmp=tmp_path)
    assert (method.status, method.headers["allow"]) == (405, "POST")
    assert bad_input(device) == {"http-json-malformed": 1, "http-unknown-task": 1, "http-too-large": 2,
                                 "http-bad-deadline": 1, "http-bad-query": 1, "http-method": 1}
    # the endpoint still serves after all that
    assert curl("--data-binary", '{"x": 3}', url, tmp=tmp_path).body == {"y": 9}


def test_failures_map_to_5xx(device: Device, tmp_path: Path) -> None:
    raised = curl("--data-binary", '{"x": "seven"}', device.url("/tasks/square"), tmp=tmp_path)
    assert (raised.status, raised.body["error"], raised.body["target"]) == (502, "error", SERVER)
    assert "finite number" in raised.body["detail"]
    late = curl("--data-binary", '{"seconds": 5}', device.url("/tasks/sleep?deadline=0.3"), tmp=tmp_path)
    assert late.status == 504 and late.body["error"] in ("expired", "timeout")
    assert bad_input(device) == {}  # a task's failure is no bad request


def test_requests_beyond_max_pending_get_503_with_retry_after(device: Device, tmp_path: Path) -> None:
    binary = shutil.which("curl")
    assert binary is not None
    held = subprocess.Popen([binary, "-sS", "--max-time", "30", "--data-binary", '{"n": 1}',
                             device.url("/tasks/gate")], stdout=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: device.endpoint.stats()["pending"] == 1, message="the first request waiting")
        (tmp_path / "second").mkdir()
        busy = curl("--data-binary", '{"n": 2}', device.url("/tasks/gate"), tmp=tmp_path / "second")
        assert (busy.status, busy.body["error"], busy.headers["retry-after"]) == (503, "busy", "1")
        device.gate.set()
        out, _ = held.communicate(timeout=30)
        assert json.loads(out) == {"n": 1}
    finally:
        held.kill()
        held.wait()


# ---------------------------------------------------------------------- raw HTTP, no broker


@pytest.fixture
def local_endpoint() -> Iterator[HttpEndpoint]:
    agent = EdgeAgent(EdgeConfig(id="local-http", http_port=0, http_max_body=MAX_BODY), None,
                      load_tasks("agent_common.demo_tasks"))
    agent.start()
    assert agent.http_endpoint is not None
    yield agent.http_endpoint
    agent.stop()


def _raw(endpoint_: HttpEndpoint, request: bytes) -> tuple[int, dict[str, Any]]:
    with socket.create_connection((endpoint_.host, endpoint_.port), timeout=10) as conn:
        conn.sendall(request)
        response = http.client.HTTPResponse(conn)
        response.begin()
        return response.status, json.loads(response.read())


def test_bodies_without_a_length_are_refused(local_endpoint: HttpEndpoint) -> None:
    status, body = _raw(local_endpoint, b"POST /tasks/square HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (status, body["error"]) == (411, "no-length")
    status, body = _raw(local_endpoint, b"POST /tasks/square HTTP/1.1\r\nHost: x\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n8\r\n{\"x\": 2}\r\n0\r\n\r\n")
    assert (status, body["error"]) == (411, "no-length")
    status, body = _raw(local_endpoint, b"POST /elsewhere HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
    assert (status, body["error"]) == (404, "bad-path")
    for name in (b"sq%20uare", b"square%0A"):
        status, body = _raw(local_endpoint, b"POST /tasks/" + name + b" HTTP/1.1\r\nHost: x\r\n"
                            b"Content-Length: 2\r\n\r\n{}")
        assert (status, body["error"]) == (400, "bad-task-name"), name


def test_a_local_task_and_keep_alive(local_endpoint: HttpEndpoint) -> None:
    conn = http.client.HTTPConnection(local_endpoint.host, local_endpoint.port, timeout=10)
    try:
        for x in (2, 3):  # two requests on one connection
            conn.request("POST", "/tasks/square", body=json.dumps({"x": x}))
            response = conn.getresponse()
            assert response.status == 200
            assert json.loads(response.read()) == {"y": x * x}
            assert response.getheader("X-Offload-Target") == "local"
        conn.request("POST", "/tasks/square", body=b"[" * 100 + b"]" * 100)
        response = conn.getresponse()
        assert response.status == 400
        assert json.loads(response.read())["error"] == "json-too-deep"
    finally:
        conn.close()


def test_connections_beyond_the_limit_get_503(stack: Stack) -> None:
    agent = EdgeAgent(EdgeConfig(id="crowded", http_port=0, http_max_pending=1), None,
                      load_tasks("agent_common.demo_tasks"))
    agent.start()
    stack.append(agent.stop)
    endpoint_ = agent.http_endpoint
    assert endpoint_ is not None
    idle = []
    try:
        for _ in range(1 + 16):  # max_pending + 16 connections that send nothing
            idle.append(socket.create_connection((endpoint_.host, endpoint_.port), timeout=10))
        with socket.create_connection((endpoint_.host, endpoint_.port), timeout=10) as extra:
            response = http.client.HTTPResponse(extra)
            response.begin()
            assert response.status == 503 and response.getheader("Retry-After") == "1"
            assert json.loads(response.read())["error"] == "busy"
    finally:
        for conn in idle:
            conn.close()
    # once they are gone, requests are served again
    client = http.client.HTTPConnection(endpoint_.host, endpoint_.port, timeout=10)
    stack.append(client.close)
    wait_for(lambda: _served(client), message="a request served after the crowd left")
    assert endpoint_.stats()["responses"]["503"] >= 1  # more if a request came before the crowd left


def _served(conn: http.client.HTTPConnection) -> bool:
    try:
        conn.request("POST", "/tasks/square", body=b'{"x": 5}')
        response = conn.getresponse()
        return response.status == 200 and json.loads(response.read()) == {"y": 25}
    except (OSError, http.client.HTTPException):
        conn.close()
        return False
