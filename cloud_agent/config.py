"""Configuration of one cloud agent: a frozen model, every field also a flag and an environment variable.

``cloud-agent run --workers 8`` == ``CLOUD_AGENT_WORKERS=8`` == ``workers = 8`` in the TOML file
(flags win over the environment, which wins over the file). Load it with
:func:`agent_common.settings.load_settings`.
"""

from __future__ import annotations

import os
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from topics.codec import DEFAULT_MAX_PAYLOAD, Format
from topics.names import DEFAULT_PREFIX, TopicTree, validate_filter, validate_node_id, validate_topic_name
from topics.transport import ProtocolVersion, TlsConfig, TransportConfig

ENV_PREFIX = "CLOUD_AGENT_"
LogLevel = Literal["debug", "info", "warning", "error"]


def _default_workers() -> int:
    return max(2, min(32, (os.cpu_count() or 1) * 2))


class CloudConfig(BaseModel):
    """Everything a cloud agent needs; unknown keys are an error."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(description="node id of this server (one topic level: letters, digits, _.:@-)")
    broker: str | None = Field(default=None, description="broker URL mqtt://host:port (mqtts:// for TLS); "
                               "unset: start the embedded broker")
    embedded_port: Annotated[int, Field(ge=0, le=65535)] = Field(
        default=1883, description="port of the embedded broker started when no broker URL is set "
        "(taken: any free port; 0: any free port)")
    protocol: ProtocolVersion = Field(default="3.1.1", description="MQTT protocol version: 3.1.1 or 5")
    username: str | None = Field(default=None, description="broker user name")
    password: SecretStr | None = Field(default=None, description="broker password (environment only: "
                                       "CLOUD_AGENT_PASSWORD, or password_file)")
    password_file: str | None = Field(default=None, description="file holding the broker password")
    tls_ca_file: str | None = Field(default=None, description="CA bundle to verify the broker (mqtts://)")
    tls_cert_file: str | None = Field(default=None, description="client certificate (mutual TLS)")
    tls_key_file: str | None = Field(default=None, description="client key (mutual TLS)")
    tls_insecure: bool = Field(default=False,
                               description="skip broker certificate verification (testing only)")
    keepalive: Annotated[int, Field(ge=1, le=65535)] = Field(
        default=10, description="MQTT keepalive in seconds: the Will fires ~1.5x this after a crash")
    prefix: str = Field(default=DEFAULT_PREFIX, description="topic prefix shared by the fleet")
    tasks: list[str] = Field(default_factory=lambda: ["agent_common.demo_tasks"],
                             description="importable task modules")
    pools: list[str] = Field(default_factory=list,
                             description="pool inboxes to share ($share/<pool>/..., needs MQTT 5 or "
                             "Mosquitto; amqtt never delivers them)")
    workers: Annotated[int, Field(ge=1, le=1024)] = Field(
        default_factory=_default_workers, description="tasks running at once (worker threads)")
    process_workers: Annotated[int, Field(ge=1, le=256)] = Field(
        default_factory=lambda: os.cpu_count() or 1, description="processes for process-pool tasks")
    queue_size: Annotated[int, Field(ge=0, le=1_000_000)] = Field(
        default=64, description="tasks waiting for a worker; beyond it new tasks get rejected-busy")
    heartbeat_interval: Annotated[float, Field(gt=0.0, le=3600.0)] = Field(
        default=1.0, description="seconds between heartbeats (jittered +-10%)")
    format: Format = Field(default="cbor", description="default wire format (results and pongs answer in "
                           "the request's format; heartbeats, state and dead letters are always JSON)")
    max_payload: Annotated[int, Field(ge=1024, le=256 * 1024 * 1024)] = Field(
        default=DEFAULT_MAX_PAYLOAD, description="largest accepted or sent message in bytes")
    grace_period: Annotated[float, Field(ge=0.0, le=3600.0)] = Field(
        default=10.0, description="seconds a shutdown waits for queued and running tasks")
    result_cache_size: Annotated[int, Field(ge=0, le=1_000_000)] = Field(
        default=4096, description="finished results kept to answer duplicate task ids")
    result_cache_ttl: Annotated[float, Field(ge=0.0)] = Field(
        default=300.0, description="seconds a finished result is kept for duplicates")
    result_cache_bytes: Annotated[int, Field(ge=0)] = Field(
        default=64 * 1024 * 1024, description="bytes of encoded results kept for duplicates")
    bad_input_log_interval: Annotated[float, Field(gt=0.0)] = Field(
        default=10.0, description="log each kind of bad input (and of overload, unsent results, "
        "failing tasks) at most once per this many seconds")
    reply_allowlist: list[str] = Field(
        default_factory=list, description="MQTT filters a result or pong may also go to, beyond the "
        "sender's own <prefix>/node/<sender>/... topics; '{sender}' stands for the sender's node id")
    reconnect_max_delay: Annotated[float, Field(gt=0.0, le=3600.0)] = Field(
        default=1.0, description="cap of the reconnect backoff in seconds (full jitter): after a "
        "broker outage the agent is back within about this long of the broker answering")
    publish_wait: Annotated[float, Field(ge=0.0, le=3600.0)] = Field(
        default=5.0, description="seconds a result waits for room in the outgoing queue (backpressure) "
        "before it is counted as not sent")
    http_base_url: str | None = Field(default=None, description="enable the built-in 'http' task, forwarding "
                                      "to this local base URL only")
    http_timeout: Annotated[float, Field(gt=0.0, le=600.0)] = Field(
        default=10.0, description="timeout of one forwarded HTTP request")
    http_max_response: Annotated[int, Field(ge=1, le=256 * 1024 * 1024)] = Field(
        default=512 * 1024, description="largest HTTP response body forwarded, in bytes")
    freeze_startup_heap: bool = Field(
        default=True, description="at start, freeze every object alive in the process (gc.freeze, once "
        "per process) so full collections stay short; off for a host application whose start-up objects "
        "may hold reference cycles it expects the collector to free")
    log_level: LogLevel = Field(default="info", description="log level: debug, info, warning, error")
    home_assistant: bool = Field(default=False, description="publish Home Assistant MQTT discovery "
                                 "(retained) so this server appears there as a device with sensors")
    home_assistant_prefix: str = Field(default="homeassistant",
                                       description="Home Assistant's discovery topic prefix")
    metrics_port: Annotated[int, Field(ge=0, le=65535)] | None = Field(
        default=None, description="serve Prometheus metrics on this port (0: any free port); unset: off "
        "(needs the metrics extra, prometheus-client)")
    metrics_host: str = Field(default="127.0.0.1", description="address the metrics server binds")

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        return validate_node_id(value)

    @field_validator("home_assistant_prefix")
    @classmethod
    def _check_discovery_prefix(cls, value: str) -> str:
        return validate_topic_name(value, what="home_assistant_prefix")

    @field_validator("pools")
    @classmethod
    def _check_pools(cls, value: list[str]) -> list[str]:
        for pool in value:
            validate_node_id(pool, what="pool name")
        return list(dict.fromkeys(value))

    @field_validator("reply_allowlist")
    @classmethod
    def _check_reply_allowlist(cls, value: list[str]) -> list[str]:
        for pattern in value:
            topic_filter = pattern.replace("{sender}", "node")
            validate_filter(topic_filter)
            if topic_filter.startswith("$"):
                raise ValueError(f"reply_allowlist filter {pattern!r} must not start with '$'")
        return list(dict.fromkeys(value))

    @field_validator("prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        TopicTree(value)
        return value

    def transport_config(self, broker: str | None = None) -> TransportConfig:
        """How to reach the broker (``broker`` overrides the configured URL, e.g. an embedded one)."""
        url = broker or self.broker
        if url is None:
            raise ValueError("no broker URL configured")
        overrides: dict[str, object] = {"protocol": self.protocol, "client_id": self.id,
                                        "keepalive": self.keepalive,
                                        "reconnect_max_delay": self.reconnect_max_delay,
                                        "reconnect_min_delay": min(0.1, self.reconnect_max_delay),
                                        "publish_wait": self.publish_wait}
        if self.username is not None:
            overrides["username"] = self.username
        if self.password is not None:
            overrides["password"] = self.password
        config = TransportConfig.from_url(url, **overrides)
        if config.tls is not None or self.tls_ca_file or self.tls_cert_file or self.tls_insecure:
            config = config.model_copy(update={"tls": TlsConfig(
                ca_file=self.tls_ca_file, cert_file=self.tls_cert_file, key_file=self.tls_key_file,
                insecure=self.tls_insecure)})
        return config
