"""A real Node-RED running examples/node-red/flow.json, and its round trip per broker configuration.

The launcher (:class:`NodeRed`) serves tests/test_node_red.py too: Node-RED from the cache directory
``scripts/ensure-node-red.sh`` installs into, headless (no editor), on a loopback port, with a
temporary user directory and the example flow rewritten for a broker, a topic prefix and a target.

    python -m bench.node_red [--n 100]

measures ``square`` round trips as the flow itself sees them (its ``round_trip_ms``: from publishing
the task to the Result arriving, HTTP not included) against Mosquitto with and without
``set_tcp_nodelay``, over mqtt:// and ws://, with results subscribed at QoS 1 and 0, and with
TCP_NODELAY forced on Node-RED's sockets from settings.js. (Mosquitto 2.0.11 opens its WebSocket
listener on every interface whatever address it is given: anonymous, for the seconds a run takes.)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent_common.registry import load_tasks
from bench.common import percentile
from cloud_agent.config import CloudConfig
from cloud_agent.server import CloudAgent
from topics.brokers import MosquittoBroker, free_port
from topics.mqtt import MqttTransport
from topics.transport import TransportConfig

NODE_RED_VERSION = "4.1.8"  # the version scripts/ensure-node-red.sh installs
ROOT = Path(__file__).resolve().parent.parent
FLOW_FILE = ROOT / "examples" / "node-red" / "flow.json"

# settings.js, and the optional TCP_NODELAY workaround: every TCP socket Node-RED opens (MQTT.js
# opens its broker connection with net.createConnection, which cannot be told) gets setNoDelay
# before it connects.
_SETTINGS = """module.exports = {{
    uiHost: "127.0.0.1",
    uiPort: {port},
    flowFile: "flows.json",
    credentialSecret: false,
    httpAdminRoot: false,
    logging: {{ console: {{ level: "info", metrics: false, audit: false }} }},
}};
"""
NODELAY_PATCH = """// TCP_NODELAY on every socket this Node-RED opens (the MQTT node never sets it).
const net = require("net");
const connect = net.Socket.prototype.connect;
net.Socket.prototype.connect = function (...args) {
    this.setNoDelay(true);
    return connect.apply(this, args);
};
"""


def node_red_home() -> Path:
    """Where scripts/ensure-node-red.sh installs Node-RED (same rules as the script)."""
    if os.environ.get("NODE_RED_HOME"):
        return Path(os.environ["NODE_RED_HOME"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "mqtt-offload" / f"node-red-{NODE_RED_VERSION}"


def red_js(home: Path | None = None) -> Path | None:
    """Node-RED's entry script when it is installed (and node is on PATH), else None."""
    home = node_red_home() if home is None else home
    script = home / "node_modules" / "node-red" / "red.js"
    if shutil.which("node") is None or not script.is_file() or not (home / ".installed").exists():
        return None
    return script


def ensure_installed() -> Path | None:
    """Run scripts/ensure-node-red.sh (installs once; quiet when installed); the entry script or None."""
    if shutil.which("npm") is not None and red_js() is None:
        subprocess.run(["bash", str(ROOT / "scripts" / "ensure-node-red.sh")], check=False, timeout=960)
    return red_js()


@dataclass(frozen=True)
class FlowSettings:
    """What the example flow is rewritten for: broker (``mqtt://host:port`` or ``ws://host:port``),
    topic prefix, this client's node id, the default target, ttl and result QoS."""

    broker: str
    prefix: str = "offload/v1"
    sender: str = "nodered"
    target: str = "pool/demo"
    ttl: float = 5.0
    grace: float = 1.0
    result_qos: int = 1


def load_flow() -> list[dict[str, Any]]:
    flow: list[dict[str, Any]] = json.loads(FLOW_FILE.read_text(encoding="utf-8"))
    return flow


def flow_for(settings: FlowSettings, flow: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The example flow with its broker node and its tab's environment set from ``settings``."""
    nodes = copy.deepcopy(load_flow() if flow is None else flow)
    url = urllib.parse.urlsplit(settings.broker)
    env = {"OFFLOAD_PREFIX": settings.prefix, "OFFLOAD_SENDER": settings.sender,
           "OFFLOAD_TARGET": settings.target, "OFFLOAD_TTL": f"{settings.ttl:g}",
           "OFFLOAD_GRACE": f"{settings.grace:g}", "OFFLOAD_RESULT_QOS": str(settings.result_qos)}
    for node in nodes:
        if node["type"] == "mqtt-broker":
            if url.scheme in ("ws", "wss"):  # Node-RED takes a full URL for WebSockets
                node["broker"], node["port"] = settings.broker, ""
            else:
                node["broker"], node["port"] = url.hostname or "127.0.0.1", str(url.port or 1883)
        elif node["type"] == "tab":
            for variable in node["env"]:
                variable["value"] = env[variable["name"]]
    return nodes


class NodeRedError(RuntimeError):
    """Node-RED did not start, or did not answer; the message ends with its log's last lines."""


class NodeRed:
    """One headless Node-RED subprocess (its own process group) running ``flow`` on a loopback port."""

    def __init__(self, script: Path, flow: list[dict[str, Any]], *, port: int,
                 tcp_nodelay: bool = False, workdir: Path | None = None) -> None:
        self.script = script
        self.port = port
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="node-red-")) if workdir is None else workdir
        self.log_file = self.workdir / "node-red.log"
        settings = (NODELAY_PATCH if tcp_nodelay else "") + _SETTINGS.format(port=port)
        (self.workdir / "settings.js").write_text(settings, encoding="utf-8")
        (self.workdir / "flows.json").write_text(json.dumps(flow, indent=2), encoding="utf-8")
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self, timeout: float = 60.0) -> NodeRed:
        """Start Node-RED; return once its HTTP endpoints answer (the flow has started)."""
        with self.log_file.open("wb") as log:
            self._process = subprocess.Popen(
                ["node", str(self.script), "--userDir", str(self.workdir),
                 "--settings", str(self.workdir / "settings.js")],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.workdir, start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise NodeRedError(f"node-red exited ({self._process.returncode}): {self.tail()}")
            try:
                self.get("/fleet", timeout=1.0)
                return self
            except (OSError, NodeRedError):
                time.sleep(0.1)
        self.stop()
        raise NodeRedError(f"node-red did not answer on port {self.port} in {timeout:.0f}s: {self.tail()}")

    def get(self, path: str, timeout: float = 30.0, **query: object) -> Any:
        """GET ``path`` with ``query``; the decoded JSON body (``null`` for an empty table)."""
        url = f"http://127.0.0.1:{self.port}{path}"
        if query:
            url += "?" + urllib.parse.urlencode({k: str(v) for k, v in query.items()})
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as exc:
            raise NodeRedError(f"GET {url}: HTTP {exc.code}") from exc
        return json.loads(body) if body.strip() else None

    def tail(self, lines: int = 15) -> str:
        text = self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to its process group, then SIGKILL if it lingers; idempotent."""
        process = self._process
        if process is None:
            return
        self._process = None
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


# The measurement ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Configuration:
    label: str
    broker_nodelay: bool
    websockets: bool
    result_qos: int
    client_nodelay: bool = False
    pause: float = 0.0  # seconds between a task's outcome and the next request


CONFIGURATIONS = (
    Configuration("mqtt://, results QoS 1 (stock)", True, False, 1),
    Configuration("mqtt://, results QoS 1, broker without set_tcp_nodelay", False, False, 1),
    Configuration("mqtt://, results QoS 0", True, False, 0),
    Configuration("ws://, results QoS 1", True, True, 1),
    Configuration("ws://, results QoS 1, broker without set_tcp_nodelay", False, True, 1),
    Configuration("mqtt://, results QoS 1, TCP_NODELAY from settings.js", True, False, 1, True),
    Configuration("mqtt://, results QoS 1, one task every 100 ms", True, False, 1, pause=0.1),
)


def _measure(script: Path, config: Configuration, n: int, warmup: int) -> tuple[list[float], list[float]]:
    """(round trips the flow saw, in ms; HTTP request to its answer, in ms) for ``config``."""
    ws_port = free_port()

    class Broker(MosquittoBroker):
        def _write_files(self) -> None:
            super()._write_files()
            text = self.config_file.read_text(encoding="utf-8")
            if not config.broker_nodelay:
                text = text.replace("set_tcp_nodelay true", "set_tcp_nodelay false")
            text += f"listener {ws_port} 127.0.0.1\nprotocol websockets\n"
            self.config_file.write_text(text, encoding="utf-8")

    broker = Broker().start()
    prefix = f"bench/{uuid.uuid4().hex[:8]}"
    transport = MqttTransport(TransportConfig.from_url(broker.url, client_id="srv-bench"), name="srv-bench")
    agent = CloudAgent(CloudConfig.model_validate({"id": "srv-bench", "broker": broker.url, "prefix": prefix,
                                                   "pools": ["demo"], "workers": 2}),
                       transport, load_tasks("agent_common.demo_tasks"))
    red: NodeRed | None = None
    try:
        agent.start()
        url = f"ws://127.0.0.1:{ws_port}" if config.websockets else broker.url
        flow = flow_for(FlowSettings(broker=url, prefix=prefix, result_qos=config.result_qos))
        red = NodeRed(script, flow, port=free_port(), tcp_nodelay=config.client_nodelay).start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            table = red.get("/fleet") or {}
            if table.get("srv-bench", {}).get("status") == "online":
                break
            time.sleep(0.1)
        times: list[float] = []
        walls: list[float] = []
        for i in range(warmup + n):
            start = time.perf_counter()
            outcome = red.get("/offload", x=i)
            wall = (time.perf_counter() - start) * 1e3
            if outcome["status"] != "ok" or outcome["output"] != {"y": i * i}:
                raise NodeRedError(f"unexpected outcome {outcome}")
            if i >= warmup:
                times.append(float(outcome["round_trip_ms"]))
                walls.append(wall)
            time.sleep(config.pause)
        return times, walls
    finally:
        if red is not None:
            red.stop()
        agent.stop(grace=0.0)
        broker.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100, help="round trips per configuration")
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args(argv)
    script = ensure_installed()
    if script is None:
        print("Node-RED is not installed (node/npm missing?): bash scripts/ensure-node-red.sh",
              file=sys.stderr)
        return 1
    print(f"Node-RED {NODE_RED_VERSION}, Mosquitto, one server: square round trips in ms, n={args.n} each;")
    print("'flow': publish to Result as the flow sees it (1 ms steps); 'http': request to answer")
    print(f"  {'configuration':58} {'flow p50':>8} {'p90':>6} {'p99':>6} {'http p50':>8} {'p99':>6}")
    for config in CONFIGURATIONS:
        times, walls = _measure(script, config, args.n, args.warmup)
        p50, p90, p99 = (percentile(times, q) for q in (0.5, 0.9, 0.99))
        flow = f"{p50:>8.1f} {p90:>6.1f} {p99:>6.1f}"
        http = f"{percentile(walls, 0.5):>8.2f} {percentile(walls, 0.99):>6.1f}"
        print(f"  {config.label:58} {flow} {http}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
