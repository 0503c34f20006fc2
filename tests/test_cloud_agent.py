"""CloudAgent on the in-memory transport: every status path, load honesty, pings, bad input."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from brokers_support import wait_for

from agent_common.registry import Done, TaskRegistry
from cloud_agent.cache import ResultCache
from cloud_agent.config import CloudConfig
from cloud_agent.http_adapter import HttpAdapterError, HttpForwarder
from cloud_agent.jobs import EWMA_ALPHA, JobBoard
from cloud_agent.server import CloudAgent
from topics.codec import Codec
from topics.memory import MemoryBroker, MemoryTransport
from topics.models import DeadLetter, Heartbeat, NodeState, Ping, Pong, Result, Status, Task
from topics.names import TopicTree
from topics.transport import Message, TransportError

PREFIX = "t/cloud"
TREE = TopicTree(PREFIX)
CBOR = Codec("cbor")
JSON = Codec("json")


class Blocker:
    """Task functions that block until released, counting how often they ran."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Semaphore(0)
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, payload: Any) -> Any:
        with self._lock:
            self.calls += 1
        self.started.release()
        self.release.wait(10.0)
        return payload


def make_registry(blocker: Blocker) -> TaskRegistry:
    registry = TaskRegistry()

    @registry.task("echo")
    def echo(payload: Any) -> Any:
        return payload

    @registry.task("boom")
    def boom(payload: Any) -> Any:
        raise RuntimeError(f"exploded on {payload}")

    registry.add(type(registry.get("echo"))("block", (blocker,)))
    registry.pipeline("pipe", [lambda x: x + 1, lambda x: Done(x * 10) if x > 5 else x * 2,
                               lambda x: x - 1])
    registry.task("bytes_out")(lambda payload: object())
    return registry


class Device:
    """A test device: publishes tasks and pings, collects results, pongs and everything else."""

    def __init__(self, broker: MemoryBroker, name: str = "dev1") -> None:
        self.name = name
        self.transport = MemoryTransport(broker, name)
        self.messages: list[Message] = []
        self.transport.subscribe(f"{PREFIX}/#", self.messages.append)
        self.transport.connect()
        self._ids = 0

    def on(self, topic: str) -> list[Message]:
        return [m for m in list(self.messages) if m.topic == topic]

    def results(self) -> list[Result]:
        return [CBOR.decode(m.payload, Result) for m in self.on(TREE.result_inbox(self.name))]

    def result_of(self, task_id: str, timeout: float = 5.0) -> Result:
        wait_for(lambda: any(r.task_id == task_id for r in self.results()), timeout,
                 message=f"result of {task_id}")
        return next(r for r in self.results() if r.task_id == task_id)

    def send(self, name: str, payload: Any = None, *, node: str = "srv1", codec: Codec = CBOR,
             task_id: str | None = None, deadline: float | None = None, stage: int | None = None,
             topic: str | None = None, attempt: int = 1) -> str:
        self._ids += 1
        task_id = task_id or f"{self.name}-{self._ids}"
        task = Task(id=task_id, task=name, sender=self.name, reply_to=TREE.result_inbox(self.name),
                    created=time.time(), deadline=deadline, payload=payload, stage=stage,
                    attempt=attempt)
        self.transport.publish(topic or TREE.task_inbox(node), codec.encode(task), qos=1)
        return task_id

    def heartbeats(self, node: str = "srv1") -> list[Heartbeat]:
        return [CBOR.decode(m.payload, Heartbeat) for m in self.on(TREE.heartbeat(node))]

    def dead_letters(self, node: str = "srv1") -> list[DeadLetter]:
        return [CBOR.decode(m.payload, DeadLetter) for m in self.on(TREE.dead_letter(node))]


def config(**overrides: Any) -> CloudConfig:
    values: dict[str, Any] = {"id": "srv1", "prefix": PREFIX, "workers": 2, "queue_size": 4,
                              "heartbeat_interval": 0.05, "grace_period": 2.0}
    values.update(overrides)
    return CloudConfig(**values)


@pytest.fixture
def blocker() -> Iterator[Blocker]:
    gate = Blocker()
    yield gate
    gate.release.set()


@pytest.fixture
def device(memory_broker: MemoryBroker) -> Iterator[Device]:
    dev = Device(memory_broker)
    yield dev
    dev.transport.close()


def start_agent(broker: MemoryBroker, blocker: Blocker, **overrides: Any) -> CloudAgent:
    cfg = config(**overrides)
    agent = CloudAgent(cfg, MemoryTransport(broker, cfg.id), make_registry(blocker))
    agent.start()
    return agent


@pytest.fixture
def agent(memory_broker: MemoryBroker, blocker: Blocker) -> Iterator[CloudAgent]:
    server = start_agent(memory_broker, blocker)
    yield server
    blocker.release.set()
    server.stop(grace=1.0)


def test_ok_result_with_timings(agent: CloudAgent, device: Device) -> None:
    task_id = device.send("echo", {"x": [1, 2], "raw": b"\x00\x01"})
    result = device.result_of(task_id)
    assert result.status == "ok" and result.server == "srv1" and result.task == "echo"
    assert result.payload == {"x": [1, 2], "raw": b"\x00\x01"}
    assert result.service_time >= 0 and result.queue_wait >= 0
    assert agent.stats()["completed"] == {"ok": 1}


def test_numpy_payload_round_trips(agent: CloudAgent, device: Device) -> None:
    image = np.arange(12, dtype=np.uint8).reshape(3, 4)
    result = device.result_of(device.send("echo", image))
    assert isinstance(result.payload, np.ndarray) and (result.payload == image).all()


def test_unknown_task(agent: CloudAgent, device: Device) -> None:
    result = device.result_of(device.send("nope"))
    assert result.status == "unknown-task" and "echo" in (result.error or "")


def test_raising_handler_gives_error_and_worker_lives_on(agent: CloudAgent, device: Device) -> None:
    failed = device.result_of(device.send("boom", 7))
    assert failed.status == "error" and failed.error == "RuntimeError: exploded on 7"
    assert [device.result_of(device.send("echo", n)).payload for n in range(4)] == [0, 1, 2, 3]


def test_unencodable_result_is_an_error(agent: CloudAgent, device: Device) -> None:
    result = device.result_of(device.send("bytes_out"))
    assert result.status == "error" and "cannot" in (result.error or "")


def test_expired_before_start_never_runs(agent: CloudAgent, device: Device, blocker: Blocker) -> None:
    result = device.result_of(device.send("block", deadline=time.time() - 1))
    assert result.status == "expired" and blocker.calls == 0


def test_pipeline_stages(agent: CloudAgent, device: Device) -> None:
    assert device.result_of(device.send("pipe", 1)).payload == 3       # (1+1)*2-1
    assert device.result_of(device.send("pipe", 1, stage=1)).payload == 1  # 1*2-1
    assert device.result_of(device.send("pipe", 9)).payload == 100     # Done(10*10) ends early
    bad = device.result_of(device.send("pipe", 1, stage=7))
    assert bad.status == "error" and "no stage 7" in (bad.error or "")
    plain = device.result_of(device.send("echo", 1, stage=1))
    assert plain.status == "error" and "bad stage" in (plain.error or "")


def test_json_request_gets_json_answer(agent: CloudAgent, device: Device) -> None:
    task_id = device.send("echo", {"a": 1}, codec=JSON)
    wait_for(lambda: device.on(TREE.result_inbox("dev1")), 5.0)
    raw = device.on(TREE.result_inbox("dev1"))[0].payload
    answer = json.loads(raw)
    assert answer["task_id"] == task_id and answer["status"] == "ok" and answer["payload"] == {"a": 1}
    assert answer["content_type"] == "application/json"


def test_queue_full_rejects_busy_and_load_is_honest(
        agent: CloudAgent, device: Device, blocker: Blocker) -> None:
    ids = [device.send("block", n) for n in range(2)]  # occupy both workers
    for _ in range(2):
        assert blocker.started.acquire(timeout=5.0)
    ids += [device.send("block", n) for n in range(4)]  # fill the 4 queue slots
    wait_for(lambda: agent.load().queue_length == 4, 5.0)
    load = agent.load()
    assert (load.queue_length, load.in_flight, load.workers, load.queue_capacity) == (4, 2, 2, 4)
    wait_for(lambda: any(h.load.queue_length == 4 and h.load.in_flight == 2
                         for h in device.heartbeats()), 5.0, message="a heartbeat with the real load")
    busy = device.result_of(device.send("block", "extra"))
    assert busy.status == "rejected-busy" and "queue full" in (busy.error or "")
    blocker.release.set()
    assert all(device.result_of(i).status == "ok" for i in ids)
    wait_for(lambda: agent.load().in_flight == 0 and agent.load().queue_length == 0, 5.0)
    assert blocker.calls == 6
    assert agent.stats()["completed"] == {"ok": 6, "rejected-busy": 1}


def test_heartbeat_contents(agent: CloudAgent, device: Device) -> None:
    device.result_of(device.send("echo", 1))
    wait_for(lambda: len(device.heartbeats()) >= 3, 5.0)
    beats = device.heartbeats()
    assert [b.seq for b in beats] == list(range(beats[0].seq, beats[0].seq + len(beats)))
    last = beats[-1]
    assert last.session == agent.session and last.role == "server" and last.interval == 0.05
    assert set(last.capabilities) >= {"echo", "block", "pipe"}
    assert last.capabilities["pipe"].stages == 3
    wait_for(lambda: "echo" in device.heartbeats()[-1].load.service_time, 5.0)
    assert 0.0 <= device.heartbeats()[-1].load.cpu <= 1.0


def test_birth_will_and_clean_offline(memory_broker: MemoryBroker, blocker: Blocker,
                                      device: Device) -> None:
    state_topic = TREE.state("srv1")
    agent = start_agent(memory_broker, blocker)
    wait_for(lambda: device.on(state_topic), 5.0)
    birth = CBOR.decode(device.on(state_topic)[0].payload, NodeState)
    assert birth.status == "online" and birth.session == agent.session
    assert memory_broker.retained[state_topic].payload == device.on(state_topic)[0].payload
    agent.stop(grace=0.5)
    offline = CBOR.decode(memory_broker.retained[state_topic].payload, NodeState)
    assert offline.status == "offline" and offline.session == agent.session

    link = MemoryTransport(memory_broker, "srv1")
    crashed = CloudAgent(config(), link, make_registry(blocker))
    crashed.start()
    wait_for(lambda: CBOR.decode(memory_broker.retained[state_topic].payload, NodeState).status
             == "online", 5.0)
    link.abort()  # what a crash looks like to the broker: the Will
    will = CBOR.decode(memory_broker.retained[state_topic].payload, NodeState)
    assert will.status == "offline" and will.session == crashed.session
    crashed.stop(grace=0.1)


def test_duplicates_run_once(agent: CloudAgent, device: Device, blocker: Blocker) -> None:
    first = device.send("block", "p", task_id="dup-1")
    assert blocker.started.acquire(timeout=5.0)
    device.send("block", "p", task_id="dup-1", attempt=2)  # retry while running: waits for it
    wait_for(lambda: agent.stats().get("duplicates") == 1, 5.0)
    assert device.results() == []
    blocker.release.set()
    wait_for(lambda: len(device.results()) == 2, 5.0)
    a, b = device.results()
    assert a.task_id == b.task_id == first and a.payload == b.payload == "p"
    assert {a.attempt, b.attempt} == {1, 2}
    device.send("block", "p", task_id="dup-1", attempt=3)  # retry after it finished: cached
    wait_for(lambda: len(device.results()) == 3, 5.0)
    assert device.results()[2].payload == "p" and device.results()[2].attempt == 3
    assert blocker.calls == 1 and agent.stats()["duplicates"] == 2


def test_busy_answers_are_not_cached(memory_broker: MemoryBroker, blocker: Blocker,
                                     device: Device) -> None:
    agent = start_agent(memory_broker, blocker, workers=1, queue_size=0)
    try:
        device.send("block", task_id="hold")
        assert blocker.started.acquire(timeout=5.0)
        assert device.result_of(device.send("echo", 1, task_id="r")).status == "rejected-busy"
        blocker.release.set()
        device.result_of("hold")
        device.send("echo", 1, task_id="r", attempt=2)
        wait_for(lambda: [r.status for r in device.results() if r.task_id == "r"]
                 == ["rejected-busy", "ok"], 5.0)
    finally:
        agent.stop(grace=1.0)


def test_hung_handler_expires_at_deadline_and_stays_in_flight(
        agent: CloudAgent, device: Device, blocker: Blocker) -> None:
    task_id = device.send("block", "h", deadline=time.time() + 0.3)
    assert blocker.started.acquire(timeout=5.0)
    result = device.result_of(task_id)
    assert result.status == "expired" and "running" in (result.error or "")
    assert agent.load().in_flight == 1  # the thread is still busy
    wait_for(lambda: any(h.load.in_flight == 1 for h in device.heartbeats()[-3:]), 5.0)
    blocker.release.set()
    wait_for(lambda: agent.load().in_flight == 0, 5.0)
    wait_for(lambda: agent.stats().get("late_results") == 1, 5.0)
    assert [r.status for r in device.results()] == ["expired"]  # no second answer


def test_queued_task_expires_at_deadline_without_running(
        memory_broker: MemoryBroker, blocker: Blocker, device: Device) -> None:
    agent = start_agent(memory_broker, blocker, workers=1)
    try:
        device.send("block", task_id="hold")
        assert blocker.started.acquire(timeout=5.0)
        device.send("block", task_id="late", deadline=time.time() + 0.2)
        result = device.result_of("late")
        assert result.status == "expired" and "queued" in (result.error or "")
        assert agent.load().queue_length == 0
        blocker.release.set()
        assert device.result_of("hold").status == "ok"
        assert blocker.calls == 1
    finally:
        agent.stop(grace=1.0)


def test_ping_answered_ahead_of_full_queue(agent: CloudAgent, device: Device, blocker: Blocker) -> None:
    for n in range(2):
        device.send("block", n)
    for _ in range(2):
        assert blocker.started.acquire(timeout=5.0)
    for n in range(4):
        device.send("block", n)
    wait_for(lambda: agent.load().queue_length == 4, 5.0)
    ping = Ping(nonce=42, sender="dev1", reply_to=TREE.pong("dev1"), sent=123.5)
    device.transport.publish(TREE.ping("srv1"), CBOR.encode(ping))
    wait_for(lambda: device.on(TREE.pong("dev1")), 5.0)
    pong = CBOR.decode(device.on(TREE.pong("dev1"))[0].payload, Pong)
    assert (pong.nonce, pong.responder, pong.sent) == (42, "srv1", 123.5)
    assert device.results() == []  # the queue is still blocked


@pytest.mark.parametrize(("payload", "reason"), [
    (b"", "empty"),
    (b"\xff\x00garbage", "malformed"),
    (b'{"v": 1, "id": "x"}', "schema"),
    (b'{"v": 2, "id": "x"}', "version"),
    (b"{" + b" " * 70_000 + b"}", "oversized"),
])
def test_bad_input_counted_dead_lettered_and_agent_serves(
        memory_broker: MemoryBroker, blocker: Blocker, device: Device, payload: bytes,
        reason: str) -> None:
    agent = start_agent(memory_broker, blocker, max_payload=65536)
    try:
        for _ in range(3):
            device.transport.publish(TREE.task_inbox("srv1"), payload, qos=1)
        wait_for(lambda: len(device.dead_letters()) == 3, 5.0)
        letter = device.dead_letters()[0]
        assert letter.reason == reason and letter.size == len(payload)
        assert letter.payload == payload[:4096] and letter.topic == TREE.task_inbox("srv1")
        assert agent.stats()["bad_input"] == {reason: 3}
        assert device.result_of(device.send("echo", "still here")).status == "ok"
    finally:
        agent.stop(grace=1.0)


def test_wrong_node_wrong_pool_and_bad_reply_to(agent: CloudAgent, device: Device) -> None:
    other = Task(id="w1", task="echo", sender="dev1", reply_to=TREE.result_inbox("dev1"), created=1.0)
    agent.handle(Message(TREE.task_inbox("srv2"), CBOR.encode(other), 1))
    agent.handle(Message(TREE.pool_inbox("gpu"), CBOR.encode(other), 1))
    looping = other.model_copy(update={"reply_to": TREE.task_inbox("srv1")})
    device.transport.publish(TREE.task_inbox("srv1"), CBOR.encode(looping), qos=1)
    wildcard = other.model_copy(update={"reply_to": "a/+/b"})
    device.transport.publish(TREE.task_inbox("srv1"), CBOR.encode(wildcard), qos=1)
    wait_for(lambda: sum(agent.stats()["bad_input"].values()) == 4, 5.0)
    assert agent.stats()["bad_input"] == {"wrong-node": 1, "wrong-pool": 1, "bad-reply-to": 2}
    wait_for(lambda: len(device.dead_letters()) == 4, 5.0)
    assert device.results() == []


def test_bad_input_logged_once_per_interval(agent: CloudAgent, device: Device,
                                            caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="cloud_agent.server"):
        for _ in range(50):
            device.transport.publish(TREE.task_inbox("srv1"), b"junk", qos=1)
        wait_for(lambda: agent.stats()["bad_input"].get("malformed") == 50, 5.0)
    assert len([r for r in caplog.records if "bad input [malformed]" in r.getMessage()]) == 1


def test_shared_pool_split_on_memory_broker(memory_broker: MemoryBroker, blocker: Blocker,
                                            device: Device) -> None:
    agents = [CloudAgent(config(id=name, pools=["gpu"]), MemoryTransport(memory_broker, name),
                         make_registry(blocker)) for name in ("srvA", "srvB")]
    for one in agents:
        one.start()
    try:
        ids = [device.send("echo", n, topic=TREE.pool_inbox("gpu")) for n in range(10)]
        servers = [device.result_of(i).server for i in ids]
        assert servers.count("srvA") == 5 and servers.count("srvB") == 5
    finally:
        for one in agents:
            one.stop(grace=0.5)


def test_stop_drains_queue_and_rejects_new(memory_broker: MemoryBroker, device: Device) -> None:
    slow = Blocker()
    agent = start_agent(memory_broker, slow, workers=1, queue_size=10)
    ids = [device.send("block", n) for n in range(4)]
    assert slow.started.acquire(timeout=5.0)
    stopper = threading.Thread(target=agent.stop, kwargs={"grace": 5.0})
    stopper.start()
    wait_for(lambda: agent.draining, 5.0)
    late = device.send("echo", "late")
    assert device.result_of(late).status == "rejected-busy"
    slow.release.set()
    stopper.join(10.0)
    assert [device.result_of(i).status for i in ids] == ["ok"] * 4
    offline = CBOR.decode(memory_broker.retained[TREE.state("srv1")].payload, NodeState)
    assert offline.status == "offline"


def test_stop_after_grace_answers_the_rest(memory_broker: MemoryBroker, device: Device) -> None:
    stuck = Blocker()
    agent = start_agent(memory_broker, stuck, workers=1, queue_size=10)
    ids = [device.send("block", n) for n in range(3)]
    assert stuck.started.acquire(timeout=5.0)
    agent.stop(grace=0.2)
    statuses = [device.result_of(i).status for i in ids]
    assert statuses == ["rejected-busy"] * 3
    stuck.release.set()


def test_process_task(memory_broker: MemoryBroker, device: Device) -> None:
    from agent_common.registry import load_tasks

    cfg = config(process_workers=1)
    agent = CloudAgent(cfg, MemoryTransport(memory_broker, "srv1"), load_tasks("agent_common.demo_tasks"))
    agent.start()
    try:
        result = device.result_of(device.send("cpu_burn", {"n": 1000}), timeout=30.0)
        assert result.status == "ok" and result.payload["n"] == 1000
        bad = device.result_of(device.send("cpu_burn", {"n": -1}), timeout=30.0)
        assert bad.status == "error" and "between 0" in (bad.error or "")
        assert device.result_of(device.send("square", {"x": 3})).payload == {"y": 9}
    finally:
        agent.stop(grace=1.0)


class _Service(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.startswith("/api/redirect"):
            self.send_response(302)
            self.send_header("Location", "http://example.com/")
            self.end_headers()
            return
        body = b"x" * 5000 if self.path.startswith("/api/big") else json.dumps(
            {"path": self.path, "ua": self.headers.get("user-agent")}).encode()
        self.send_response(404 if self.path.startswith("/api/missing") else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Secret", "no")
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        data = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(201)
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        self.wfile.write(data[::-1])

    def log_message(self, format: str, *args: Any) -> None:
        return


@pytest.fixture
def http_service() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Service)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/api"
    server.shutdown()
    server.server_close()


def test_http_forwarder(http_service: str) -> None:
    forward = HttpForwarder(http_service, timeout=5.0, max_response=1000)
    got = forward({"path": "/items/1", "query": {"q": "a b"}, "headers": {"user-agent": "t"}})
    assert got["status"] == 200 and json.loads(got["body"]) == {"path": "/api/items/1?q=a+b", "ua": "t"}
    assert got["headers"]["content-type"] == "application/json" and "x-secret" not in got["headers"]
    assert forward({"path": "/missing"})["status"] == 404
    assert forward({"path": "/redirect"})["status"] == 302  # returned, not followed
    posted = forward({"method": "POST", "path": "/p", "body": b"abc"})
    assert posted == {"status": 201, "headers": {"content-type": "application/octet-stream"},
                      "body": b"cba"}
    with pytest.raises(HttpAdapterError, match="over the limit"):
        forward({"path": "/big"})
    for bad in ({"path": "http://evil/"}, {"path": "//evil/x"}, {"path": "/a/../b"},
                {"path": "/a/%2e%2e/b"}, {"path": "/a?x=1"}, {"path": "relative"},
                {"path": "/x", "method": "TRACE"}, {"path": "/x", "headers": {"host": "evil"}},
                {"path": "/x", "headers": {"accept": "a\r\nb: c"}}, {"path": "/x", "url": "y"}):
        with pytest.raises(HttpAdapterError):
            forward.build_request(bad)
    with pytest.raises(HttpAdapterError):
        HttpForwarder("file:///etc/passwd")
    with pytest.raises(HttpAdapterError, match="failed"):
        HttpForwarder("http://127.0.0.1:9", timeout=1.0)({"path": "/"})


def test_http_task_through_agent(memory_broker: MemoryBroker, blocker: Blocker, device: Device,
                                 http_service: str) -> None:
    agent = start_agent(memory_broker, blocker, http_base_url=http_service)
    try:
        ok = device.result_of(device.send("http", {"path": "/x"}))
        assert ok.status == "ok" and ok.payload["status"] == 200
        refused = device.result_of(device.send("http", {"path": "/../etc"}))
        assert refused.status == "error" and "HttpAdapterError" in (refused.error or "")
        assert "http" in agent.registry.capabilities()
    finally:
        agent.stop(grace=1.0)


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        config(id="bad/id")
    with pytest.raises(ValueError):
        config(pools=["a+b"])
    with pytest.raises(ValueError):
        config(workers=0)
    with pytest.raises(ValueError):
        config(unknown=1)
    cfg = config(broker="mqtt://u:p@127.0.0.1:1999", protocol="5", keepalive=3)
    transport = cfg.transport_config()
    assert (transport.port, transport.protocol, transport.client_id, transport.keepalive,
            transport.username) == (1999, "5", "srv1", 3, "u")


def test_result_cache_bounds() -> None:
    from cloud_agent.server import _ResultCache

    result = Result(task_id="a", status=Status.OK, server="s", payload="x")
    cache = _ResultCache(capacity=2, ttl=10.0, max_bytes=100)
    cache.put(("d", "1"), result, 0.0, 40)
    cache.put(("d", "2"), result, 0.0, 40)
    cache.put(("d", "3"), result, 0.0, 40)  # over count and bytes: the oldest goes
    assert cache.get(("d", "1"), 1.0) is None and cache.get(("d", "3"), 1.0) == result
    assert cache.get(("d", "2"), 11.0) is None  # expired
    cache.put(("d", "big"), result, 0.0, 1000)  # too large: kept without the payload
    kept = cache.get(("d", "big"), 1.0)
    assert kept is not None and kept.payload is None and kept.status == "error"


def test_results_only_to_the_senders_own_topics(agent: CloudAgent, device: Device,
                                                memory_broker: MemoryBroker) -> None:
    outside = MemoryTransport(memory_broker, "watcher")
    seen: list[Message] = []
    outside.subscribe("#", seen.append)
    outside.connect()
    try:
        base = Task(id="r1", task="echo", sender="dev1", reply_to="homeassistant/switch/pump/set",
                    created=1.0, payload="on")
        for reply_to in ("homeassistant/switch/pump/set", TREE.result_inbox("dev2"), "t/cloudy/x"):
            task = base.model_copy(update={"reply_to": reply_to, "id": f"r-{len(reply_to)}"})
            device.transport.publish(TREE.task_inbox("srv1"), CBOR.encode(task), qos=1)
        ping = Ping(nonce=1, sender="dev1", reply_to=TREE.pong("dev2"), sent=1.0)
        device.transport.publish(TREE.ping("srv1"), CBOR.encode(ping))
        wait_for(lambda: agent.stats()["bad_input"].get("reply-to-not-allowed") == 4, 5.0)
        own = device.send("echo", "mine")
        assert device.result_of(own).payload == "mine"
        letters = [d for d in device.dead_letters() if d.reason == "reply-to-not-allowed"]
        assert len(letters) == 4 and "dev1" in letters[0].detail
        published = {m.topic for m in seen}
        assert "homeassistant/switch/pump/set" not in published
        assert TREE.result_inbox("dev2") not in published and TREE.pong("dev2") not in published
        assert agent.stats()["completed"] == {"ok": 1}
    finally:
        outside.close()


def test_reply_allowlist_with_sender_placeholder(memory_broker: MemoryBroker, blocker: Blocker,
                                                 device: Device) -> None:
    agent = start_agent(memory_broker, blocker, reply_allowlist=["apps/{sender}/#"])
    extra: list[Message] = []
    device.transport.subscribe("apps/#", extra.append)
    try:
        task = Task(id="a1", task="echo", sender="dev1", reply_to="apps/dev1/answers", created=1.0,
                    payload=5)
        device.transport.publish(TREE.task_inbox("srv1"), CBOR.encode(task), qos=1)
        wait_for(lambda: extra, 5.0, message="the result on the allowed topic")
        assert CBOR.decode(extra[0].payload, Result).payload == 5
        other = task.model_copy(update={"id": "a2", "reply_to": "apps/dev2/answers"})
        device.transport.publish(TREE.task_inbox("srv1"), CBOR.encode(other), qos=1)
        wait_for(lambda: agent.stats()["bad_input"] == {"reply-to-not-allowed": 1}, 5.0)
        inbox = task.model_copy(update={"id": "a3", "reply_to": TREE.task_inbox("srv2")})
        device.transport.publish(TREE.task_inbox("srv1"), CBOR.encode(inbox), qos=1)
        wait_for(lambda: agent.stats()["bad_input"].get("bad-reply-to") == 1, 5.0)
        assert len(extra) == 1
    finally:
        agent.stop(grace=1.0)
    with pytest.raises(ValueError):
        config(reply_allowlist=["a/#/b"])
    with pytest.raises(ValueError):
        config(reply_allowlist=["$SYS/#"])


def test_an_id_reused_for_other_work_gets_an_error_never_the_first_result(
        agent: CloudAgent, device: Device, blocker: Blocker) -> None:
    assert device.result_of(device.send("echo", {"x": 3}, task_id="same")).payload == {"x": 3}
    device.send("echo", {"x": 5}, task_id="same")
    wait_for(lambda: len([r for r in device.results() if r.task_id == "same"]) == 2, 5.0)
    second = [r for r in device.results() if r.task_id == "same"][1]
    assert second.status == "error" and second.payload is None
    assert "already used" in (second.error or "")
    device.send("echo", {"x": 3}, task_id="same", attempt=2)  # a true retry still gets the result
    wait_for(lambda: len([r for r in device.results() if r.task_id == "same"]) == 3, 5.0)
    third = [r for r in device.results() if r.task_id == "same"][2]
    assert (third.status, third.payload, third.attempt) == ("ok", {"x": 3}, 2)
    device.send("block", "first", task_id="running")  # reused while the first still runs
    assert blocker.started.acquire(timeout=5.0)
    device.send("block", "other", task_id="running")
    wait_for(lambda: any(r.task_id == "running" for r in device.results()), 5.0)
    assert [r.status for r in device.results() if r.task_id == "running"] == ["error"]
    blocker.release.set()
    wait_for(lambda: len([r for r in device.results() if r.task_id == "running"]) == 2, 5.0)
    assert [r.payload for r in device.results() if r.task_id == "running"] == [None, "first"]
    assert agent.stats()["id_reused"] == 2 and agent.stats()["duplicates"] == 1


def test_another_device_cannot_read_or_forge_a_result(agent: CloudAgent, device: Device,
                                                      memory_broker: MemoryBroker) -> None:
    thief = Device(memory_broker, "dev2")
    try:
        victim_id = device.send("echo", {"secret": 1}, task_id="dev1-000007")
        assert device.result_of(victim_id).payload == {"secret": 1}
        # Claiming to be dev1 does not let the answer go to dev2's topics...
        stolen = Task(id=victim_id, task="echo", sender="dev1", reply_to=TREE.result_inbox("dev2"),
                      created=1.0, payload={"secret": 1})
        thief.transport.publish(TREE.task_inbox("srv1"), CBOR.encode(stolen), qos=1)
        # ... and dev2's own task under the same id is dev2's, run afresh.
        mine = stolen.model_copy(update={"sender": "dev2", "payload": {"other": 2}})
        thief.transport.publish(TREE.task_inbox("srv1"), CBOR.encode(mine), qos=1)
        assert thief.result_of(victim_id).payload == {"other": 2}
        # A forgery planted under the victim's next id is never given to the victim.
        planted = Task(id="dev1-000008", task="echo", sender="dev1",
                       reply_to=TREE.result_inbox("dev1"), created=1.0, payload={"forged": True})
        thief.transport.publish(TREE.task_inbox("srv1"), CBOR.encode(planted), qos=1)
        wait_for(lambda: any(r.task_id == "dev1-000008" for r in device.results()), 5.0)
        device.send("echo", {"real": 8}, task_id="dev1-000008")
        wait_for(lambda: len([r for r in device.results() if r.task_id == "dev1-000008"]) == 2, 5.0)
        real = [r for r in device.results() if r.task_id == "dev1-000008"][1]
        assert real.status == "error" and real.payload is None
        assert agent.stats()["bad_input"] == {"reply-to-not-allowed": 1}
        assert [r.task_id for r in thief.results()] == [victim_id]
    finally:
        thief.transport.close()


@pytest.mark.parametrize(("fields", "named"), [
    ({"colour": "red"}, "colour"),
    ({"created": None}, "created"),
    ({"attempt": 0}, "attempt"),
    ({"v": 2}, "version"),
])
def test_an_invalid_task_with_a_usable_id_and_reply_to_gets_an_error_result(
        agent: CloudAgent, device: Device, fields: dict[str, Any], named: str) -> None:
    task: dict[str, Any] = {"v": 1, "id": "bad-1", "task": "echo", "sender": "dev1",
                            "reply_to": TREE.result_inbox("dev1"), "created": 1.0, "payload": 1}
    task.update(fields)
    task = {key: value for key, value in task.items() if value is not None}
    device.transport.publish(TREE.task_inbox("srv1"), json.dumps(task).encode(), qos=1)
    wait_for(lambda: device.on(TREE.result_inbox("dev1")), 5.0, message="the error result")
    answer = JSON.decode(device.on(TREE.result_inbox("dev1"))[0].payload, Result)
    assert (answer.task_id, answer.status, answer.server, answer.task) == ("bad-1", "error", "srv1",
                                                                           "echo")
    assert named in (answer.error or "") and answer.content_type == "application/json"
    wait_for(lambda: len(device.dead_letters()) == 1, 5.0)
    reason = "version" if named == "version" else "schema"
    assert device.dead_letters()[0].reason == reason
    assert agent.stats()["bad_input"] == {reason: 1} and agent.stats()["invalid_answered"] == 1
    assert agent.stats()["completed"] == {}


@pytest.mark.parametrize("fields", [
    {"reply_to": "homeassistant/switch/pump/set"},   # not the sender's: never published there
    {"reply_to": "a/+/b"},
    {"sender": "not a node"},
    {"id": ""},
    {"id": 7},
])
def test_an_invalid_task_without_a_usable_reply_gets_only_a_dead_letter(
        agent: CloudAgent, device: Device, memory_broker: MemoryBroker, fields: dict[str, Any]) -> None:
    outside = MemoryTransport(memory_broker, "watcher")
    seen: list[Message] = []
    outside.subscribe("homeassistant/#", seen.append)
    outside.connect()
    try:
        task: dict[str, Any] = {"v": 1, "id": "bad-2", "task": "echo", "sender": "dev1",
                                "reply_to": TREE.result_inbox("dev1"), "colour": "red"}
        task.update(fields)
        device.transport.publish(TREE.task_inbox("srv1"), json.dumps(task).encode(), qos=1)
        wait_for(lambda: len(device.dead_letters()) == 1, 5.0)
        assert device.result_of(device.send("echo", "next")).payload == "next"
        assert [r.task_id for r in device.results()] == ["dev1-1"]
        assert agent.stats().get("invalid_answered", 0) == 0 and seen == []
    finally:
        outside.close()


def test_failing_tasks_and_busy_rejections_are_logged_once_per_interval(
        memory_broker: MemoryBroker, blocker: Blocker, device: Device,
        caplog: pytest.LogCaptureFixture) -> None:
    agent = start_agent(memory_broker, blocker, workers=1, queue_size=0)
    try:
        with caplog.at_level("INFO", logger="cloud_agent.server"):
            ids = [device.send("boom", n) for n in range(20)]
            assert all(device.result_of(i).status in ("error", "rejected-busy") for i in ids)
            device.send("block", task_id="hold")
            assert blocker.started.acquire(timeout=5.0)
            busy = [device.send("echo", n) for n in range(20)]
            assert all(device.result_of(i).status == "rejected-busy" for i in busy)
        raised = [r for r in caplog.records if "task raised [boom]" in r.getMessage()]
        assert len(raised) == 1 and raised[0].exc_info is not None
        assert len([r for r in caplog.records if "load [rejected-busy]" in r.getMessage()]) == 1
        assert agent.stats()["task_errors"]["boom"] == agent.stats()["completed"]["error"]
    finally:
        blocker.release.set()
        agent.stop(grace=1.0)


class _RefusingTransport(MemoryTransport):
    """Refuses every publish to a result topic, as a full outgoing queue would."""

    def publish(self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False) -> None:
        if topic.endswith("/result"):
            raise TransportError("outgoing queue full (3 messages)", topic=topic)
        super().publish(topic, payload, qos=qos, retain=retain)


def test_results_that_cannot_be_sent_are_counted_and_logged_once_per_interval(
        memory_broker: MemoryBroker, blocker: Blocker, device: Device,
        caplog: pytest.LogCaptureFixture) -> None:
    cfg = config()
    agent = CloudAgent(cfg, _RefusingTransport(memory_broker, cfg.id), make_registry(blocker))
    agent.start()
    try:
        with caplog.at_level("WARNING", logger="cloud_agent.server"):
            for n in range(30):
                device.send("echo", n)
            wait_for(lambda: agent.stats().get("results_not_sent") == 30, 5.0)
        assert agent.stats()["unsent"] == {"transport": 30}
        assert len([r for r in caplog.records if "result not sent" in r.getMessage()]) == 1
    finally:
        agent.stop(grace=1.0)


def test_rate_limited_log_flushes_a_burst_that_stopped(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from agent_common.badinput import RateLimitedLog

    now = [0.0]
    summary = RateLimitedLog(logging.getLogger("t.flush"), label="x", interval=10.0,
                             clock=lambda: now[0])
    with caplog.at_level("WARNING", logger="t.flush"):
        for _ in range(5):
            summary.record("k", "detail")
        summary.flush()  # within the interval: nothing yet
        now[0] = 11.0
        summary.flush()
        summary.flush()  # nothing new: silent
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["x [k] detail", "x [k] 4 more in the last 10s (5 in all)"]
    assert summary.snapshot() == {"k": 5}


def test_the_reported_service_time_follows_the_first_run_after_a_pause() -> None:
    board = JobBoard(config(), ResultCache(8, 60.0, 1 << 20))
    for step in range(10):                                    # a slow period, runs back to back
        board.ran("detect", 0.075 * step, 0.075 * (step + 1))
    assert board.ewma["detect"] == pytest.approx(0.075)
    board.ran("detect", 0.75, 0.758)                          # right after: the plain gain moves it
    assert board.ewma["detect"] == pytest.approx(0.075 + EWMA_ALPHA * (0.008 - 0.075))
    board.ran("detect", 20.0, 20.008)                         # after 19 s without a run: nearly all of it
    assert board.ewma["detect"] < 0.009
