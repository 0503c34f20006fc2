"""``cloud-agent``: run a server node from a TOML file, environment variables and flags.

    cloud-agent run --config server.toml
    cloud-agent run --broker mqtt://127.0.0.1:1883 --id srv1 --tasks agent_common.demo_tasks

Without a broker URL the embedded broker (amqtt, MQTT 3.1.1) is started: on 1883 when free, else on
a free port, and its URL is logged. SIGTERM/SIGINT drain the agent (new tasks get rejected-busy,
queued ones are finished or answered within the grace period), publish offline and exit 0.
Errors are one line on stderr: exit 2 for bad usage or configuration, 1 for runtime failures.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any, Literal, get_args, get_origin

from pydantic import SecretStr

from agent_common.cli import EXIT_USAGE, OneLineParser, UsageError, run_command, setup_logging
from agent_common.registry import RegistryError, load_tasks
from agent_common.settings import SettingsError, load_settings
from cloud_agent.config import ENV_PREFIX, CloudConfig

log = logging.getLogger("cloud_agent")

_LIST_FIELDS = ("tasks", "pools", "reply_allowlist")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _choices(annotation: Any) -> list[str] | None:
    """The values of a ``Literal`` setting (``--protocol``, ``--format``, ``--log-level``), or None."""
    if get_origin(annotation) is Literal:
        return [str(value) for value in get_args(annotation)]
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="cloud-agent", description="Run offloaded tasks for edge devices over MQTT.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    run = commands.add_parser(
        "run", help="start a server node",
        description="Start a server node. Every setting is also CLOUD_AGENT_<NAME> in the environment "
        "and <name> in the TOML config; flags win over the environment, which wins over the file.")
    run.add_argument("--config", "-c", metavar="FILE", help="TOML config file (see examples/server.toml)")
    for name, info in CloudConfig.model_fields.items():
        help_text = (info.description or name).replace("%", "%%")
        choices = _choices(info.annotation)
        if SecretStr in (info.annotation, *get_args(info.annotation)):
            # refused by load_settings with a pointer to the environment: a flag shows in ps
            run.add_argument(_flag(name), dest=name, help=argparse.SUPPRESS)
        elif choices:
            listed = all(choice in help_text for choice in choices)
            run.add_argument(_flag(name), dest=name, choices=choices,
                             help=help_text if listed else f"{help_text} ({', '.join(choices)})")
        elif name in _LIST_FIELDS:
            run.add_argument(_flag(name), dest=name, action="append", metavar="NAME",
                             help=f"{help_text} (repeat or comma-separate)")
        elif info.annotation is bool:
            run.add_argument(_flag(name), dest=name, action=argparse.BooleanOptionalAction,
                             default=None, help=help_text)
        else:
            run.add_argument(_flag(name), dest=name, metavar=name.upper(), help=help_text)
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in CloudConfig.model_fields:
        value = getattr(args, name, None)
        if value is not None and name in _LIST_FIELDS:
            value = [item.strip() for chunk in value for item in chunk.split(",") if item.strip()]
        values[name] = value
    return values


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def run(args: argparse.Namespace) -> int:
    try:
        config = load_settings(CloudConfig, config_file=args.config, env_prefix=ENV_PREFIX,
                               overrides=_overrides(args))
    except (SettingsError, ValueError) as exc:
        raise UsageError(str(exc).splitlines()[0]) from exc
    setup_logging(config.log_level, config.id)
    if not config.tasks:
        raise UsageError("setting tasks: at least one tasks module is needed "
                         "(--tasks agent_common.demo_tasks)")
    try:
        registry = load_tasks(*config.tasks)
    except RegistryError as exc:
        raise UsageError(str(exc)) from exc

    from cloud_agent.server import CloudAgent
    from topics.brokers import EmbeddedBroker
    from topics.mqtt import MqttTransport

    broker: EmbeddedBroker | None = None
    url = config.broker
    if url is None:
        if config.protocol == "5":
            raise UsageError("the embedded broker (amqtt) speaks MQTT 3.1.1 only: use --protocol 3.1.1 "
                             "or --broker with an MQTT 5 broker")
        port = config.embedded_port
        broker = EmbeddedBroker(port=port if port and _port_free("127.0.0.1", port) else 0).start()
        url = broker.url
        log.info("no broker configured: started the embedded broker on %s", url)
    try:
        transport_config = config.transport_config(url)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc

    stop_requested = threading.Event()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        log.info("%s received: draining", signal.Signals(signum).name)
        stop_requested.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    agent = CloudAgent(config, MqttTransport(transport_config), registry)
    try:
        agent.start()
        log.info("serving on %s as %s (prefix %s)", transport_config.url, config.id, config.prefix)
        while not stop_requested.wait(0.1):
            pass
        agent.stop(config.grace_period)
        log.info("stopped cleanly: %s", _summary(agent.stats()))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if broker is not None:
            broker.stop()
    return 0


def _summary(stats: dict[str, Any]) -> str:
    completed = ", ".join(f"{k} {v}" for k, v in sorted(stats.get("completed", {}).items())) or "none"
    bad = sum(stats.get("bad_input", {}).values())
    return f"received {stats.get('received', 0)}, completed: {completed}; bad input {bad}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cloud-agent``; returns the exit code."""
    parser = build_parser()

    def body() -> int:
        args = parser.parse_args(argv)
        if args.command != "run":
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        return run(args)

    return run_command("cloud-agent", body)


__all__ = ["build_parser", "main"]
