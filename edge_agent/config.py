"""Configuration of the edge agent: one frozen model, read from TOML, ``EDGE_AGENT_*`` and flags.

    id = "cam1"
    broker = "mqtt://127.0.0.1:1883"
    tasks = ["agent_common.demo_tasks"]
    policy = "ect"

    [policy_config]
    spread_k = 2

    [[routes]]
    filter = "sensors/+/frame"
    task = "detect"
    output = "results/{1}/ball"
    input_format = "json"
    output_format = "json"

Load it with :func:`load_edge_config` (file, then environment, then overrides).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from agent_common.settings import load_settings
from edge_agent.policy import PolicyConfig, check_policy
from edge_agent.tuning import Estimators
from topics.codec import DEFAULT_MAX_PAYLOAD
from topics.errors import TopicError
from topics.names import DEFAULT_PREFIX, TopicTree, validate_filter, validate_node_id
from topics.transport import ProtocolVersion, TlsConfig, TransportConfig

ENV_PREFIX = "EDGE_AGENT_"
PEER_SUFFIX = "-peer"
"""Node id of the in-process server of a device with ``serve = true``: ``<id>-peer``."""

_PLACEHOLDER = re.compile(r"\{(\d+)\}")

PositiveSeconds = Annotated[float, Field(gt=0.0, allow_inf_nan=False)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PolicySettings(_Frozen):
    """The tunables of :class:`edge_agent.policy.PolicyConfig`, as settings (same names)."""

    default_rtt: float = Field(default=0.005, ge=0.0)
    default_bandwidth: float = Field(default=12.5e6, gt=0.0)
    default_service_time: float = Field(default=0.050, ge=0.0)
    spread_k: int = Field(default=2, ge=1)
    near_equal: float = Field(default=0.15, ge=0.0)
    near_equal_abs: float = Field(default=0.0005, ge=0.0)
    hysteresis: float = Field(default=0.2, ge=0.0)
    failure_penalty: float = Field(default=0.0, ge=0.0)
    threshold_rate: float = Field(default=25.0, ge=0.0)
    in_flight_residual: float = Field(default=0.5, ge=0.0, le=1.0)
    rtt_dev_weight: float = Field(default=0.0, ge=0.0)
    choices: int = Field(default=2, ge=1)
    rounds: int = Field(default=3, ge=1)
    risk: float = Field(default=2.0, ge=0.0)
    explore: float = Field(default=1.0, ge=0.0)
    tail: float = Field(default=1.0, ge=0.0)
    busy_tasks: int = Field(default=4, ge=0)
    evidence_half_life: float = Field(default=1.0, ge=0.0)
    hedge: float = Field(default=0.01, ge=0.0, le=1.0)
    hedge_delay: float = Field(default=0.0, ge=0.0)
    loss_cost: float = Field(default=0.0, ge=0.0)
    hedge_share: float = Field(default=1.0, ge=0.0, le=1.0)

    def to_policy_config(self) -> PolicyConfig:
        return PolicyConfig(**self.model_dump())


def render_output(template: str, captures: list[str]) -> str:
    """Fill ``{1}``, ``{2}``... of an output template with the filter's wildcard captures."""

    def fill(match: re.Match[str]) -> str:
        index = int(match.group(1))
        if not 1 <= index <= len(captures):
            raise TopicError(f"output template uses {{{index}}} but the topic has {len(captures)} "
                             "capture(s)", topic=template)
        return captures[index - 1]

    return _PLACEHOLDER.sub(fill, template)


class BridgeRoute(_Frozen):
    """Route messages of an existing MQTT topic through a task and publish the result.

    ``output`` is a topic template: ``{1}``, ``{2}``... are the levels matched by the filter's
    ``+`` wildcards (and the rest of the topic for a final ``#``), in order.
    """

    filter: str
    task: str = Field(min_length=1, max_length=128)
    output: str
    input_format: Literal["json", "cbor", "raw"] = "json"
    output_format: Literal["json", "cbor", "raw"] = "json"
    qos: int = Field(default=0, ge=0, le=2)
    deadline: PositiveSeconds | None = None
    """Seconds each bridged message may take; ``None`` = no deadline."""
    retain: bool = False

    @field_validator("filter")
    @classmethod
    def _valid_filter(cls, value: str) -> str:
        return validate_filter(value)

    @model_validator(mode="after")
    def _valid_template(self) -> BridgeRoute:
        wildcards = sum(1 for level in self.filter.split("/") if level in ("+", "#"))
        indices = [int(n) for n in _PLACEHOLDER.findall(self.output)]
        if any(not 1 <= n <= wildcards for n in indices):
            raise ValueError(f"output {self.output!r} uses a capture the filter {self.filter!r} does not "
                             f"have (it has {wildcards})")
        sample = _PLACEHOLDER.sub("x", self.output)
        if not sample or "+" in sample or "#" in sample or sample.startswith("$"):
            raise ValueError(f"output {self.output!r} is not a publishable topic template")
        return self


class EdgeConfig(_Frozen):
    """Everything an edge agent needs; every field is also ``EDGE_AGENT_<FIELD>`` and most a flag."""

    id: str
    broker: str | None = None
    """``mqtt://host:port`` (``mqtts://`` for TLS); ``None`` = no broker, everything runs locally."""
    protocol: ProtocolVersion = "3.1.1"
    username: str | None = None
    password: SecretStr | None = None
    password_file: str | None = None
    """File holding the broker password (read when ``password`` is unset); never a flag."""
    tls: TlsConfig | None = None
    prefix: str = DEFAULT_PREFIX
    tasks: list[str] = Field(default_factory=list)
    """Importable modules registering the tasks this device can run itself."""
    policy: str = "ect"
    policy_config: PolicySettings = PolicySettings()
    local_workers: int = Field(default=1, ge=1, le=1024)
    local_queue_size: int = Field(default=32, ge=0, le=1_000_000)
    """Tasks that may wait for a local worker; beyond it the local option is full."""
    max_attempts: int = Field(default=3, ge=1, le=100)
    stale_after: int = Field(default=3, ge=1, le=1000)
    """A server is stale after this many missed heartbeats (each of its own interval)."""
    probe_interval: PositiveSeconds = 2.0
    """Mean seconds between round-trip probes to each server (jittered +-25%)."""
    default_timeout: PositiveSeconds = 5.0
    """Floor of an offloaded attempt's timeout (also capped by the task's deadline)."""
    timeout_factor: float = Field(default=4.0, ge=1.0)
    """An attempt times out after max(floor, timeout_factor x estimate), capped by the deadline."""
    attempt_share: float = Field(default=0.5, gt=0.0, le=1.0)
    """With a deadline and another option to fall back on, the floor is at most this share of the
    time left, so a silent server leaves time for the retry or the local run."""
    max_timeout: PositiveSeconds = 3600.0
    """Longest an attempt ever waits (an absurd service time reported by a server cannot make it wait
    for ever)."""
    failure_half_life: PositiveSeconds = 10.0
    """Seconds for a server's recent-failure count to halve."""
    estimators: Estimators = Estimators()
    """Gains of the round-trip, bandwidth and local service-time averages (``edge_agent.tuning``)."""
    heartbeat_interval: PositiveSeconds = 1.0
    freeze_startup_heap: bool = True
    """At start, freeze every object alive in the process (``gc.freeze``, once per process: see
    ``agent_common.heap``) so full collections stay short. Off for a host application whose own
    start-up objects may hold reference cycles it expects the collector to free."""
    announce: bool = True
    """Publish this device's heartbeats and retained birth/death (with its Will). One-shot clients
    (``edge-agent submit``, ``edge-agent servers``) turn it off and leave nothing retained."""
    format: Literal["cbor", "json"] = "cbor"
    max_payload: int = Field(default=DEFAULT_MAX_PAYLOAD, ge=1024)
    routes: list[BridgeRoute] = Field(default_factory=list)
    serve: bool = False
    """Also run a server (node id ``<id>-peer``) in this process for the peers' tasks."""
    serve_workers: int = Field(default=1, ge=1, le=1024)
    connect_timeout: PositiveSeconds = 5.0
    reconnect_max_delay: PositiveSeconds | None = None
    """Cap of the transport's reconnect backoff after a lost link (None: the transport's default)."""
    persistent_session: bool = False
    """Keep this device's MQTT session on the broker while it is away (clean session / clean start
    off, client id = ``id``): results published meanwhile are delivered when it returns."""
    session_expiry: Annotated[float, Field(gt=0.0, le=4294967295.0, allow_inf_nan=False)] = 3600.0
    """MQTT 5: seconds the broker keeps the session after the link is lost (4294967295: for ever);
    under 3.1.1 the broker decides (Mosquitto: ``persistent_client_expiration``)."""
    ping_reply_allow: list[str] = Field(default_factory=list)
    """MQTT filters a ping's ``reply_to`` may also match; by default pings are answered only on the
    pinger's own pong topic, ``{prefix}/node/{sender}/pong``."""
    peer_username: str | None = None
    """User name of the peer server's own connection (``serve``); default: ``username``. Under the
    shipped ACL (client id = user name) it must be ``<id>-peer``."""
    peer_password: SecretStr | None = None
    """Password of the peer server's connection; default: ``password``."""
    spool_path: Path | None = None
    """SQLite file of the store-and-forward spool (``edge_agent.spool``): tasks that cannot run
    anywhere now wait there, in order, across restarts, and are sent when a server is back.
    None: no spool (such tasks are handled in memory, as without one)."""
    spool_max_tasks: int = Field(default=1000, ge=1, le=10_000_000)
    """Most tasks the spool holds; a task beyond it is refused at submit (``SpoolFull``)."""
    spool_max_bytes: int = Field(default=64 * 2**20, ge=1024, le=2**40)
    """Most payload bytes the spool holds (at least ``max_payload``); beyond it a submit is refused."""
    spool_ttl: PositiveSeconds = 86_400.0
    """Longest a task waits in the spool (counted from its submission), or until its deadline if that
    is earlier; then it is answered ``expired``."""
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    """Serve Prometheus metrics on this port (0: any free port); ``None`` = off. Needs the
    ``metrics`` extra (prometheus-client)."""
    metrics_host: str = "127.0.0.1"
    """Address the metrics server binds (loopback by default)."""
    http_port: int | None = Field(default=None, ge=0, le=65535)
    """Serve the local HTTP endpoint (``POST /tasks/<name>``) on this port (0: any free port);
    ``None`` = off."""
    http_host: str = "127.0.0.1"
    """Address the HTTP endpoint binds: anything that reaches it can run tasks, so loopback by default."""
    http_max_body: int = Field(default=1024 * 1024, ge=1, le=256 * 1024 * 1024)
    """Largest request body the HTTP endpoint accepts (bytes); beyond it 413, unread."""
    http_max_pending: int = Field(default=64, ge=1, le=100_000)
    """HTTP requests that may wait for their task at once; beyond it 503 with Retry-After."""

    @field_validator("id")
    @classmethod
    def _valid_id(cls, value: str) -> str:
        validate_node_id(value)
        if len(value) + len(PEER_SUFFIX) > 64:
            raise ValueError("id must leave room for the '-peer' suffix (at most 59 characters)")
        return value

    @field_validator("policy")
    @classmethod
    def _valid_policy(cls, value: str) -> str:
        return check_policy(value)

    @field_validator("ping_reply_allow")
    @classmethod
    def _valid_reply_filters(cls, value: list[str]) -> list[str]:
        for topic_filter in value:
            validate_filter(topic_filter)
        return value

    @field_validator("prefix")
    @classmethod
    def _valid_prefix(cls, value: str) -> str:
        TopicTree(value)
        return value

    @field_validator("broker")
    @classmethod
    def _valid_broker(cls, value: str | None) -> str | None:
        if value:
            TransportConfig.from_url(value)
        return value or None

    @field_validator("spool_path", mode="before")
    @classmethod
    def _spool_path_named(cls, value: Any) -> Any:
        if isinstance(value, str) and (not value.strip() or value == ":memory:"):
            raise ValueError("spool_path must name a file (the spool exists to survive a restart)")
        return value

    @field_validator("spool_path")
    @classmethod
    def _valid_spool_path(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        if value.is_dir():
            raise ValueError(f"spool_path {str(value)!r} is a directory; name a file in it, e.g. "
                             f"{str(value / 'spool.db')!r}")
        return value

    @model_validator(mode="after")
    def _spool_holds_a_task(self) -> EdgeConfig:
        if self.spool_path is not None and self.spool_max_bytes < self.max_payload:
            raise ValueError(f"spool_max_bytes ({self.spool_max_bytes}) is smaller than max_payload "
                             f"({self.max_payload}): the largest task could never be spooled")
        return self

    @property
    def peer_id(self) -> str:
        return self.id + PEER_SUFFIX

    def transport_config(self, *, client_id: str | None = None) -> TransportConfig:
        """How to reach the broker (raises ``ValueError`` when no broker is configured)."""
        if not self.broker:
            raise ValueError("no broker configured")
        overrides: dict[str, Any] = {"protocol": self.protocol, "client_id": client_id or self.id,
                                     "connect_timeout": self.connect_timeout}
        if self.reconnect_max_delay is not None:
            overrides["reconnect_max_delay"] = self.reconnect_max_delay
        if self.persistent_session:
            overrides["persistent_session"] = True
            overrides["session_expiry"] = self.session_expiry
        if self.username is not None:
            overrides["username"] = self.username
        if self.password is not None:
            overrides["password"] = self.password.get_secret_value()
        if self.tls is not None:
            overrides["tls"] = self.tls
        return TransportConfig.from_url(self.broker, **overrides)


def load_edge_config(config_file: Path | str | None = None, *, overrides: dict[str, Any] | None = None,
                     environ: dict[str, str] | None = None) -> EdgeConfig:
    """Read the TOML file (optional), then ``EDGE_AGENT_*`` variables, then ``overrides``.

    Raises :class:`agent_common.settings.SettingsError` with one clear line on any problem.
    """
    return load_settings(EdgeConfig, config_file=config_file, env_prefix=ENV_PREFIX, overrides=overrides,
                         environ=environ)


__all__ = ["ENV_PREFIX", "PEER_SUFFIX", "BridgeRoute", "EdgeConfig", "PolicySettings", "load_edge_config",
           "render_output"]
