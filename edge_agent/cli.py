"""``edge-agent``: run a device, or submit one task from the shell.

    edge-agent run --config /etc/offload/device.toml
    edge-agent run --broker mqtt://127.0.0.1:1883 --id cam1 --tasks agent_common.demo_tasks --policy ect
    edge-agent submit --broker mqtt://127.0.0.1:1883 square '{"x": 7}'
    edge-agent submit --broker mqtt://127.0.0.1:1883 --target srv1 square '{"x": 7}'   # or --pool gpu
    edge-agent servers --broker mqtt://127.0.0.1:1883 [--watch | --json]

Settings come from the TOML file, then ``EDGE_AGENT_<FIELD>`` variables, then flags. Logs go to
stderr as ``key=value`` lines. Exit codes: 0 ok, 1 the submitted task failed or the agent hit a
runtime error, 2 bad arguments or configuration (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict
from types import FrameType
from typing import Any, get_args

from agent_common.cli import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    LOG_LEVELS,
    OneLineParser,
    UsageError,
    run_command,
    setup_logging,
)
from agent_common.registry import RegistryError, TaskRegistry, UnknownTaskError, load_tasks
from agent_common.settings import SettingsError
from edge_agent.config import ENV_PREFIX, EdgeConfig, load_edge_config
from edge_agent.pinning import PinError
from edge_agent.policy import POLICIES, UnknownPolicyError
from edge_agent.records import TaskFailed
from topics.codec import to_wire
from topics.transport import ProtocolVersion

log = logging.getLogger("edge_agent.cli")

# flag name -> (config field, type, help)
_FLAGS: dict[str, tuple[str, Any, str]] = {
    "--broker": ("broker", str, "broker URL mqtt://host:port (mqtts:// for TLS); unset: local only"),
    "--id": ("id", str, "node id of this device (letters, digits, _.:@-)"),
    "--protocol": ("protocol", str, "MQTT protocol version: 3.1.1 or 5"),
    "--username": ("username", str, "broker user name (password: EDGE_AGENT_PASSWORD)"),
    "--prefix": ("prefix", str, "topic prefix shared by the fleet"),
    "--policy": ("policy", str, f"decision policy: {', '.join(POLICIES)}"),
    "--format": ("format", str, "wire format: cbor or json"),
    "--local-workers": ("local_workers", int, "threads running local tasks"),
    "--local-queue-size": ("local_queue_size", int, "local tasks that may wait for a worker"),
    "--max-attempts": ("max_attempts", int, "options tried per task before giving up"),
    "--stale-after": ("stale_after", int, "missed heartbeats before a server is stale"),
    "--probe-interval": ("probe_interval", float, "mean seconds between round-trip probes"),
    "--default-timeout": ("default_timeout", float, "floor of an offloaded attempt's timeout (s)"),
    "--heartbeat-interval": ("heartbeat_interval", float, "seconds between this device's heartbeats"),
    "--serve-workers": ("serve_workers", int, "workers of the peer server (--serve)"),
    "--peer-username": ("peer_username", str, "broker user of the peer server (password: "
                        "EDGE_AGENT_PEER_PASSWORD); default --username"),
    "--reconnect-max-delay": ("reconnect_max_delay", float, "cap of the reconnect backoff (s)"),
    "--metrics-port": ("metrics_port", int, "serve Prometheus metrics on this port (127.0.0.1; 0: any)"),
    "--http-port": ("http_port", int, "serve POST /tasks/<name> on this port (127.0.0.1; 0: any)"),
}


_NO_ENDPOINTS = {"metrics_port": None, "http_port": None}
"""One-shot commands (submit, servers) never open the ports a running device's settings name."""

_CHOICES: dict[str, tuple[str, ...]] = {"protocol": get_args(ProtocolVersion),
                                        "format": get_args(EdgeConfig.model_fields["format"].annotation)}


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", metavar="FILE", help="TOML config file (see examples/device.toml)")
    for flag, (field, kind, help_text) in _FLAGS.items():
        choices = _CHOICES.get(field)
        if choices:
            parser.add_argument(flag, dest=field, choices=choices, help=help_text)
        else:
            parser.add_argument(flag, dest=field, type=kind, metavar=field.upper(), help=help_text)
    # no secrets on the command line (ps, shell history): refused with a pointer to the environment
    parser.add_argument("--password", dest="password", help=argparse.SUPPRESS)
    parser.add_argument("--tasks", dest="tasks", action="append", metavar="MODULE",
                        help="importable module registering local tasks (repeat or comma-separate)")
    parser.add_argument("--serve", dest="serve", action=argparse.BooleanOptionalAction, default=None,
                        help="also serve peers' tasks from this process (node id <id>-peer)")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default=None,
                        help="log level (default info for run, warning for submit)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="edge-agent", description="Decide per task whether to run it here or "
                           "offload it over MQTT to the server that finishes it soonest.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    run = commands.add_parser("run", help="run the device agent until SIGTERM/SIGINT",
                              description=f"Run the device agent. Every setting is also {ENV_PREFIX}<FIELD> "
                              "in the environment and <field> in the TOML file; flags win.")
    _add_common(run)
    submit = commands.add_parser("submit", help="submit one task and print its result as JSON")
    _add_common(submit)
    submit.add_argument("task", metavar="TASK", help="task name")
    submit.add_argument("payload", metavar="JSON_PAYLOAD", help="task payload as JSON")
    submit.add_argument("--deadline", type=float, default=None, help="seconds the task may take")
    submit.add_argument("--discover", type=float, default=3.0,
                        help="seconds to wait for a server announcing the task (default 3)")
    submit.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the outcome")
    pinned = submit.add_mutually_exclusive_group()
    pinned.add_argument("--target", metavar="NODE", default=None,
                        help="run it on this server only (every attempt; never locally)")
    pinned.add_argument("--pool", metavar="POOL", default=None,
                        help="publish it to this pool's shared inbox (Mosquitto; never locally)")
    servers = commands.add_parser("servers", help="list the fleet's nodes: liveness, load, round trip",
                                  description="Listen to the fleet's heartbeats, states and dead letters "
                                  "and print every node once each has been heard (or --listen passes).")
    _add_common(servers)
    servers.add_argument("--listen", type=float, default=5.0,
                         help="seconds to listen at most before printing (default 5)")
    shown = servers.add_mutually_exclusive_group()
    shown.add_argument("--watch", action="store_true",
                       help="a live view, refreshed until Ctrl-C (needs rich: the 'fleet' extra)")
    shown.add_argument("--json", action="store_true", help="print the rows as JSON")
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = {field: getattr(args, field, None) for field, _, _ in _FLAGS.values()}
    values["password"] = getattr(args, "password", None)
    if args.tasks:
        values["tasks"] = [item.strip() for chunk in args.tasks for item in chunk.split(",") if item.strip()]
    values["serve"] = args.serve
    return values


def load_config(args: argparse.Namespace, *, default_id: str | None = None) -> EdgeConfig:
    overrides = _overrides(args)
    if overrides["id"] is None and default_id is not None and not args.config \
            and f"{ENV_PREFIX}ID" not in os.environ:
        overrides["id"] = default_id
    try:
        return load_edge_config(args.config, overrides=overrides)
    except (SettingsError, ValueError) as exc:
        raise UsageError(str(exc).splitlines()[0]) from exc


def load_registry(config: EdgeConfig) -> TaskRegistry:
    if not config.tasks:
        return TaskRegistry()
    try:
        return load_tasks(*config.tasks)
    except RegistryError as exc:
        raise UsageError(str(exc)) from exc


class Device:
    """An edge agent on a real broker, plus the optional peer server: what ``run`` starts."""

    def __init__(self, config: EdgeConfig, registry: TaskRegistry) -> None:
        from edge_agent.agent import EdgeAgent

        self.config = config
        transport = None
        if config.broker:
            from topics.mqtt import MqttTransport

            transport = MqttTransport(config.transport_config(), name=config.id)
        self.agent = EdgeAgent(config, transport, registry)
        self.peer: Any = None
        if config.serve:
            self.peer = build_peer(config, registry)

    def start(self) -> None:
        self.agent.start()
        if self.peer is not None:
            self.peer.start()

    def stop(self) -> None:
        if self.peer is not None:
            self.peer.stop(grace=2.0)
        self.agent.stop()


def build_peer(config: EdgeConfig, registry: TaskRegistry) -> Any:
    """A :class:`cloud_agent.server.CloudAgent` named ``<id>-peer`` with its own connection."""
    if not config.broker:
        raise UsageError("--serve needs a broker (--broker)")
    if not len(registry):
        raise UsageError("--serve needs local tasks (--tasks)")
    from cloud_agent.config import CloudConfig
    from cloud_agent.server import CloudAgent
    from topics.mqtt import MqttTransport

    try:
        peer_config = CloudConfig.model_validate({
            "id": config.peer_id, "broker": config.broker, "protocol": config.protocol,
            "username": config.peer_username or config.username,
            "password": config.peer_password or config.password, "prefix": config.prefix,
            "tasks": config.tasks, "workers": config.serve_workers, "queue_size": config.local_queue_size,
            "format": config.format, "max_payload": config.max_payload,
            "heartbeat_interval": config.heartbeat_interval,
            "tls_ca_file": config.tls.ca_file if config.tls else None,
            "tls_cert_file": config.tls.cert_file if config.tls else None,
            "tls_key_file": config.tls.key_file if config.tls else None,
            "tls_insecure": config.tls.insecure if config.tls else False})
    except ValueError as exc:
        raise UsageError(f"peer server: {str(exc).splitlines()[0]}") from exc
    return CloudAgent(peer_config, MqttTransport(peer_config.transport_config(), name=config.peer_id),
                      registry)


def run(args: argparse.Namespace) -> int:
    config = load_config(args)
    setup_logging(args.log_level or "info", config.id)
    device = Device(config, load_registry(config))
    stop_requested = threading.Event()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        log.info("%s received: stopping", signal.Signals(signum).name)
        stop_requested.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        device.start()
        log.info("edge agent %s running: broker=%s policy=%s local_tasks=%s routes=%d serve=%s", config.id,
                 config.broker or "none", config.policy, ",".join(device.agent.registry.names()) or "none",
                 len(config.routes), config.serve)
        next_report = time.monotonic() + 60.0
        while not stop_requested.wait(0.2):
            if device.agent.fatal_error is not None:
                device.stop()
                raise device.agent.fatal_error  # one line, exit 1: systemd sees the failure
            if time.monotonic() >= next_report:
                next_report += 60.0
                log.info("stats %s", summary(device.agent.stats()))
        device.stop()
        log.info("stopped cleanly: %s", summary(device.agent.stats()))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return EXIT_OK


def summary(stats: dict[str, Any]) -> str:
    outcomes = " ".join(f"{key}={value}" for key, value in sorted(stats.items())
                        if key.startswith("outcome_"))
    return (f"submitted={stats.get('submitted', 0)} local_runs={stats.get('local_runs', 0)} "
            f"offloaded={stats.get('offloaded', 0)} retries={stats.get('retries', 0)} {outcomes} "
            f"bad_input={sum(stats.get('bad_input', {}).values())} connected={stats.get('connected')}")


def submit(args: argparse.Namespace) -> int:
    config = load_config(args, default_id=f"cli-{uuid.uuid4().hex[:8]}")
    setup_logging(args.log_level or "warning", config.id)
    try:
        payload = json.loads(args.payload)
    except json.JSONDecodeError as exc:
        raise UsageError(f"JSON_PAYLOAD is not valid JSON: {exc}") from exc
    device = Device(config.model_copy(update={"serve": False, "announce": False, **_NO_ENDPOINTS}),
                    load_registry(config))
    agent = device.agent
    try:
        device.start()
        if config.broker:
            end = time.monotonic() + max(0.0, args.discover)
            while time.monotonic() < end and not any(
                    args.task in view.tasks and not view.stale and args.target in (None, view.node)
                    and (args.pool is None or args.pool in view.pools) for view in agent.servers()):
                time.sleep(0.02)
        records: list[Any] = []
        agent.add_record_listener(records.append)
        try:
            future = agent.submit(args.task, payload, deadline=args.deadline, target=args.target,
                                  pool=args.pool)
        except (UnknownTaskError, PinError) as exc:
            if config.broker and not agent.connected:  # the real cause, not "no server knows it"
                print(f"edge-agent: error: {agent.connect_problem or 'not connected to the broker'}",
                      file=sys.stderr)
                return EXIT_FAILED
            raise UsageError(str(exc)) from exc
        except (UnknownPolicyError, ValueError) as exc:
            raise UsageError(str(exc)) from exc
        try:
            result = future.result(timeout=args.timeout)
        except TaskFailed as exc:
            print(f"edge-agent: task failed: {exc}", file=sys.stderr)
            return EXIT_FAILED
        except TimeoutError:
            print(f"edge-agent: no outcome within {args.timeout:.0f}s", file=sys.stderr)
            return EXIT_FAILED
        print(json.dumps(to_wire(result, binary=False)))
        if records:
            log.info("ran on %s (%s) attempts=%d", records[0].target, records[0].reason, records[0].attempts)
        return EXIT_OK
    finally:
        device.stop()


def servers(args: argparse.Namespace) -> int:
    from edge_agent.fleet import FleetWatch, render_table

    config = load_config(args, default_id=f"cli-{uuid.uuid4().hex[:8]}")
    setup_logging(args.log_level or "warning", config.id)
    if not config.broker:
        raise UsageError("servers needs a broker (--broker)")
    if args.listen <= 0:
        raise UsageError(f"--listen must be positive, got {args.listen}")
    live = _rich_live() if args.watch else None
    device = Device(config.model_copy(update={"serve": False, "announce": False, "tasks": [],
                                              **_NO_ENDPOINTS}), TaskRegistry())
    watch = FleetWatch(device.agent)
    try:
        device.start()
        if live is not None:
            return _watch(watch, live)
        end = time.monotonic() + args.listen
        while time.monotonic() < end and not _all_heard(watch):
            time.sleep(0.05)
        rows = watch.rows()
        if args.json:
            print(json.dumps([asdict(row) for row in rows], indent=2))
        else:
            print(render_table(rows) if rows else "no node heard")
        return EXIT_OK
    finally:
        device.stop()


def _all_heard(watch: Any) -> bool:
    """Every node heard has a heartbeat (servers also a round trip), or is known to be offline."""
    rows = watch.rows()
    return bool(rows) and all(row.status == "offline" or (
        row.heartbeat_age is not None and (row.role != "server" or row.rtt is not None)) for row in rows)


def _rich_live() -> Any:
    try:
        from rich.live import Live
    except ImportError:
        raise UsageError("--watch needs rich: pip install 'mqtt-offload[fleet]'") from None
    return Live


def _watch(watch: Any, live_class: Any) -> int:
    from rich.table import Table

    from edge_agent.fleet import columns, row_cells

    stop_requested = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop_requested.set())
                for sig in (signal.SIGTERM, signal.SIGINT)}

    def table() -> Table:
        shown = Table(*columns(), title="fleet")
        for row in watch.rows():
            shown.add_row(*row_cells(row), style={"offline": "red", "stale": "yellow",
                                                  "unreadable": "magenta"}.get(row.status))
        return shown

    try:
        with live_class(table(), refresh_per_second=2) as live:
            while not stop_requested.wait(0.5):
                live.update(table())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``edge-agent``; returns the exit code."""
    parser = build_parser()

    def body() -> int:
        args = parser.parse_args(argv)
        if args.command == "run":
            return run(args)
        if args.command == "submit":
            return submit(args)
        if args.command == "servers":
            return servers(args)
        parser.print_help(sys.stderr)
        return EXIT_USAGE

    return run_command("edge-agent", body)


__all__ = ["build_parser", "main"]
